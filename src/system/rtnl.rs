//! rtnetlink, in process: the one socket every request goes over ([`Socket`]: a change
//! answered by an acknowledgement, a question by one reply, a dump by many), built with
//! `netlink-packet-route` on `netlink-sys`; and the reads: policy routing rules and routes
//! (the numbers the kernel holds: no table names to translate, no `ip` process), for finding
//! the TPROXY routing an earlier run left whatever mark and table it used; whether `lo` has
//! `::6`; and, for explain, the namespace's addresses and the route one packet takes (`ip
//! route get`). A read's failure means "unknown" (`None`). The changes are
//! [`crate::system::rtnl_change`]'s.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv6Addr};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::model::Family;
use crate::system::netlink;

/// `lo`'s interface index, the same in every network namespace (the kernel's
/// `LOOPBACK_IFINDEX`, fixed since 2012): no lookup needed.
pub(crate) const LOOPBACK_IFINDEX: u32 = 1;

/// Why an rtnetlink request failed.
#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    #[error("opening a netlink route socket")]
    Socket(#[source] io::Error),
    #[error("sending the request to the kernel")]
    Send(#[source] io::Error),
    #[error("receiving the kernel's answer")]
    Receive(#[source] io::Error),
    #[error("reading the kernel's answer")]
    Decode(#[source] netlink_packet_core::DecodeError),
    #[error("the kernel refused it")]
    Refused(#[source] io::Error),
}

/// A family as rtnetlink messages name it.
pub(crate) fn address_family(family: Family) -> AddressFamily {
    match family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

/// A netlink route socket connected to the kernel: every rtnetlink request, read or change,
/// goes over one. One socket can serve several requests in turn.
pub(crate) struct Socket {
    socket: netlink_sys::Socket,
    seq: u32,
}

impl Socket {
    pub(crate) fn open() -> Result<Socket, RtnlError> {
        let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)
            .map_err(RtnlError::Socket)?;
        socket.bind_auto().map_err(RtnlError::Socket)?;
        socket
            .connect(&netlink_sys::SocketAddr::new(0, 0))
            .map_err(RtnlError::Socket)?;
        // An answer that never comes must not hang the run.
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(netlink::REPLY_TIMEOUT_SECS, 0),
        )
        .map_err(|e| RtnlError::Socket(e.into()))?;
        Ok(Socket { socket, seq: 0 })
    }

    /// Sends `msg` and waits for the kernel's acknowledgement; `flags` besides
    /// `NLM_F_REQUEST | NLM_F_ACK` (`NLM_F_CREATE | NLM_F_EXCL`: as a new object that must
    /// not exist yet, as `ip ... add` asks).
    pub(crate) fn change(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<(), RtnlError> {
        let seq = self.send(msg, NLM_F_ACK | flags)?;
        // The answer to a request with NLM_F_ACK is one NLMSG_ERROR message: code 0 (none)
        // is the acknowledgement.
        self.receive(seq, |payload| match payload {
            NetlinkPayload::Error(e) => Some(match e.code {
                None => Ok(()),
                Some(_) => Err(RtnlError::Refused(e.to_io())),
            }),
            _ => None,
        })
    }

    /// Sends `msg` (a `RTM_GET*` of one object) and returns the kernel's one reply; an error
    /// reply is [`RtnlError::Refused`].
    pub(crate) fn ask(
        &mut self,
        msg: RouteNetlinkMessage,
    ) -> Result<RouteNetlinkMessage, RtnlError> {
        let seq = self.send(msg, 0)?;
        self.receive(seq, |payload| match payload {
            NetlinkPayload::InnerMessage(m) => Some(Ok(m)),
            NetlinkPayload::Error(e) => Some(Err(RtnlError::Refused(e.to_io()))),
            _ => None,
        })
    }

    /// Sends `msg` as an `NLM_F_DUMP` request and returns every message of the reply, up to
    /// `NLMSG_DONE`.
    pub(crate) fn dump(
        &mut self,
        msg: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, RtnlError> {
        let seq = self.send(msg, NLM_F_DUMP)?;
        let mut out = Vec::new();
        self.receive(seq, |payload| match payload {
            NetlinkPayload::InnerMessage(m) => {
                out.push(m);
                None
            }
            // A dump that failed part way says so in its last message.
            NetlinkPayload::Done(d) if d.code != 0 => Some(Err(RtnlError::Refused(
                io::Error::from_raw_os_error(d.code.saturating_abs()),
            ))),
            NetlinkPayload::Done(_) => Some(Ok(())),
            NetlinkPayload::Error(e) => Some(Err(RtnlError::Refused(e.to_io()))),
            _ => None,
        })?;
        Ok(out)
    }

    /// Sends `msg` with `NLM_F_REQUEST | flags` and the next sequence number, which it returns.
    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<u32, RtnlError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(RtnlError::Send)?;
        Ok(self.seq)
    }

    /// Receives datagrams and hands the payload of each message answering request `seq` to
    /// `each` until it says the answer is complete (`Some`: what to return). Messages of other
    /// requests (a late answer to an earlier one) are skipped.
    fn receive<T>(
        &mut self,
        seq: u32,
        mut each: impl FnMut(NetlinkPayload<RouteNetlinkMessage>) -> Option<Result<T, RtnlError>>,
    ) -> Result<T, RtnlError> {
        loop {
            let (data, _) = self.socket.recv_from_full().map_err(RtnlError::Receive)?;
            let mut off = 0;
            while off < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..])
                    .map_err(RtnlError::Decode)?;
                let len = reply.header.length as usize;
                if reply.header.sequence_number == seq
                    && let Some(done) = each(reply.payload)
                {
                    return done;
                }
                if len == 0 {
                    break;
                }
                off += len.next_multiple_of(4);
            }
        }
    }
}

// The numbers [`Route::kind`] and [`Rule::action`] carry, so that callers need not speak the
// crate's enums (a test checks them against the crate's).

/// `RTN_UNREACHABLE`: what [`route`] says when the kernel has no route.
pub const RTN_UNREACHABLE: u8 = 7;
/// `lookup TABLE`.
pub const FR_ACT_TO_TBL: u8 = 1;
/// `goto PRIORITY`.
pub const FR_ACT_GOTO: u8 = 2;
/// `nop`.
pub const FR_ACT_NOP: u8 = 3;
/// `blackhole`.
pub const FR_ACT_BLACKHOLE: u8 = 6;
/// `unreachable`.
pub const FR_ACT_UNREACHABLE: u8 = 7;
/// `prohibit`.
pub const FR_ACT_PROHIBIT: u8 = 8;

/// One policy routing rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub priority: u32,
    /// `fwmark`, when the rule has one.
    pub mark: Option<u32>,
    pub mask: u32,
    pub table: u32,
    /// Nothing but `fwmark ... lookup TABLE`: no other selector, not inverted.
    pub plain: bool,
    /// What it does: [`FR_ACT_TO_TBL`] (`lookup`), [`FR_ACT_GOTO`], [`FR_ACT_BLACKHOLE`]...
    pub action: u8,
    /// `not`: the rule applies to the packets its selectors do not match.
    pub invert: bool,
    /// Its selectors other than the mark, as `ip rule` prints them (`from 10.0.0.0/8`, `iif
    /// eth0`), and what limits a lookup (`suppress_prefixlength 0`).
    pub selectors: Vec<String>,
    /// `ipproto`, when the rule has one.
    pub ip_proto: Option<u8>,
}

impl Default for Rule {
    /// `from all lookup 0` at priority 0 (tests fill in what they need).
    fn default() -> Rule {
        Rule {
            priority: 0,
            mark: None,
            mask: u32::MAX,
            table: 0,
            plain: true,
            action: FR_ACT_TO_TBL,
            invert: false,
            selectors: Vec::new(),
            ip_proto: None,
        }
    }
}

/// What one family's policy routing holds that matters to TPROXY.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    pub rules: Vec<Rule>,
    /// Tables holding a `local default dev lo` route (what TPROXY mode adds).
    pub local_default_tables: BTreeSet<u32>,
    /// Tables holding any route (a rule into a table not here looks up nothing).
    pub tables_with_routes: BTreeSet<u32>,
}

/// The addresses of the namespace's interfaces, of one family or (`Unspec`) both, as the
/// kernel reports them: (interface index, prefix length, address). `IFA_LOCAL` is the
/// address itself where there is a peer (IPv4); else `IFA_ADDRESS`.
fn interface_addresses(sock: &mut Socket, family: AddressFamily) -> Option<Vec<(u32, u8, IpAddr)>> {
    let mut ask = AddressMessage::default();
    ask.header.family = family;
    let mut out = Vec::new();
    for m in sock.dump(RouteNetlinkMessage::GetAddress(ask)).ok()? {
        let RouteNetlinkMessage::NewAddress(a) = m else {
            continue;
        };
        let local = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let addr = local.or_else(|| {
            a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        });
        if let Some(addr) = addr {
            out.push((a.header.index, a.header.prefix_len, addr));
        }
    }
    Some(out)
}

/// Whether `lo` has `addr/128`.
pub fn lo_has_v6_host_address(addr: Ipv6Addr) -> Option<bool> {
    let mut sock = Socket::open().ok()?;
    let addrs = interface_addresses(&mut sock, AddressFamily::Inet6)?;
    Some(
        addrs.into_iter().any(|(index, len, a)| {
            index == LOOPBACK_IFINDEX && len == 128 && a == IpAddr::V6(addr)
        }),
    )
}

/// One rule as the kernel holds it.
fn rule_of(m: &RuleMessage) -> Rule {
    let h = &m.header;
    let invert = h.flags.contains(RuleFlags::Invert);
    let mut rule = Rule {
        priority: 0,
        mark: None,
        mask: u32::MAX,
        table: u32::from(h.table),
        plain: h.dst_len == 0
            && h.src_len == 0
            && h.tos == 0
            && h.action == RuleAction::ToTable
            && !invert,
        action: u8::from(h.action),
        invert,
        selectors: Vec::new(),
        ip_proto: None,
    };
    if h.tos != 0 {
        rule.selectors.push(format!("tos 0x{:x}", h.tos));
    }
    for a in &m.attributes {
        match a {
            RuleAttribute::Priority(p) => rule.priority = *p,
            RuleAttribute::FwMark(v) => rule.mark = Some(*v),
            RuleAttribute::FwMask(v) => rule.mask = *v,
            RuleAttribute::Table(t) => rule.table = *t,
            RuleAttribute::Source(ip) => rule.selectors.push(format!("from {ip}/{}", h.src_len)),
            RuleAttribute::Destination(ip) => rule.selectors.push(format!("to {ip}/{}", h.dst_len)),
            RuleAttribute::Iifname(name) => rule.selectors.push(format!("iif {name}")),
            RuleAttribute::Oifname(name) => rule.selectors.push(format!("oif {name}")),
            RuleAttribute::Goto(p) => rule.selectors.push(format!("goto {p}")),
            RuleAttribute::Realm(r) => rule.selectors.push(format!(
                "realms {}",
                (u32::from(r.source) << 16) | u32::from(r.destination)
            )),
            RuleAttribute::TunId(_) => rule.selectors.push("tun_id".into()),
            RuleAttribute::L3MDev(_) => rule.selectors.push("l3mdev".into()),
            // The kernel sends -1 for "none".
            RuleAttribute::SuppressPrefixLen(n) if *n != u32::MAX => {
                rule.selectors.push(format!("suppress_prefixlength {n}"))
            }
            RuleAttribute::SuppressIfGroup(n) if *n != u32::MAX => {
                rule.selectors.push(format!("suppress_ifgroup {n}"))
            }
            RuleAttribute::UidRange(r) => rule
                .selectors
                .push(format!("uidrange {}-{}", r.start, r.end)),
            RuleAttribute::IpProtocol(p) => rule.ip_proto = Some(u8::from(*p)),
            RuleAttribute::SourcePortRange(r) => {
                rule.selectors.push(format!("sport {}-{}", r.start, r.end))
            }
            RuleAttribute::DestinationPortRange(r) => {
                rule.selectors.push(format!("dport {}-{}", r.start, r.end))
            }
            _ => {}
        }
    }
    if rule.ip_proto.is_some() || !rule.selectors.is_empty() {
        rule.plain = false;
    }
    rule
}

/// A route's table: the attribute's, which tables past 255 need, else the header's.
fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .rev()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

/// A route's outgoing interface (`RTA_OIF`).
fn route_oif(m: &RouteMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

/// The policy routing of `family` in the current network namespace: two dumps (rules, then
/// routes) of that family.
pub fn routing(family: Family) -> Option<Routing> {
    let family = address_family(family);
    let mut sock = Socket::open().ok()?;
    let mut out = Routing::default();
    let mut ask = RuleMessage::default();
    ask.header.family = family;
    for m in sock.dump(RouteNetlinkMessage::GetRule(ask)).ok()? {
        if let RouteNetlinkMessage::NewRule(r) = m
            && r.header.family == family
        {
            out.rules.push(rule_of(&r));
        }
    }
    // Routes are only of interest next to a rule with a mark, or on their own as leftovers
    // of a run killed between adding the route and the rule: always look.
    let mut ask = RouteMessage::default();
    ask.header.address_family = family;
    for m in sock.dump(RouteNetlinkMessage::GetRoute(ask)).ok()? {
        let RouteNetlinkMessage::NewRoute(r) = m else {
            continue;
        };
        if r.header.address_family != family {
            continue;
        }
        let table = route_table(&r);
        out.tables_with_routes.insert(table);
        if r.header.destination_prefix_length == 0
            && r.header.kind == RouteType::Local
            && route_oif(&r) == Some(LOOPBACK_IFINDEX)
        {
            out.local_default_tables.insert(table);
        }
    }
    Some(out)
}

/// The route a packet takes, as `ip route get` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The route's type (`RTN_*`: 1 unicast, 2 local, 3 broadcast, 5 multicast, ...);
    /// [`RTN_UNREACHABLE`] when the kernel has no route.
    pub kind: u8,
    /// The interface it leaves by (`lo` for a local address).
    pub dev: Option<String>,
    /// The source address the kernel picks.
    pub src: Option<IpAddr>,
}

/// The name of one link (`IFLA_IFNAME`).
fn link_name(m: &LinkMessage) -> Option<String> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })
}

/// The addresses of this namespace's interfaces, both families: (interface, address).
pub fn addresses() -> Option<Vec<(String, IpAddr)>> {
    let mut sock = Socket::open().ok()?;
    let mut names = BTreeMap::new();
    for m in sock
        .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
        .ok()?
    {
        if let RouteNetlinkMessage::NewLink(l) = m
            && let Some(name) = link_name(&l)
        {
            names.insert(l.header.index, name);
        }
    }
    let addrs = interface_addresses(&mut sock, AddressFamily::Unspec)?;
    Some(
        addrs
            .into_iter()
            .filter_map(|(index, _, addr)| Some((names.get(&index)?.clone(), addr)))
            .collect(),
    )
}

/// The route the kernel picks for a packet to `dst` from a socket of `uid` (`ip route get
/// DST uid UID`): one `RTM_GETROUTE` request, and one `RTM_GETLINK` for the interface's
/// name.
pub fn route(dst: IpAddr, uid: Option<u32>) -> Option<Route> {
    let mut sock = Socket::open().ok()?;
    let mut ask = RouteMessage::default();
    (
        ask.header.address_family,
        ask.header.destination_prefix_length,
    ) = match dst {
        IpAddr::V4(_) => (AddressFamily::Inet, 32),
        IpAddr::V6(_) => (AddressFamily::Inet6, 128),
    };
    ask.attributes.push(RouteAttribute::Destination(dst.into()));
    if let Some(uid) = uid {
        ask.attributes.push(RouteAttribute::Uid(uid));
    }
    let reply = match sock.ask(RouteNetlinkMessage::GetRoute(ask)) {
        Ok(RouteNetlinkMessage::NewRoute(r)) => r,
        // ENETUNREACH, EHOSTUNREACH...: no route.
        Err(RtnlError::Refused(_)) => {
            return Some(Route {
                kind: RTN_UNREACHABLE,
                dev: None,
                src: None,
            });
        }
        Ok(_) | Err(_) => return None,
    };
    let src = reply.attributes.iter().find_map(|a| match a {
        RouteAttribute::PrefSource(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        RouteAttribute::PrefSource(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    });
    let dev = match route_oif(&reply) {
        Some(index) => {
            let mut link = LinkMessage::default();
            link.header.index = index;
            match sock.ask(RouteNetlinkMessage::GetLink(link)).ok()? {
                RouteNetlinkMessage::NewLink(l) => link_name(&l),
                _ => None,
            }
        }
        None => None,
    };
    Some(Route {
        kind: u8::from(reply.header.kind),
        dev,
        src,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_numbers_callers_compare_are_the_crates() {
        assert_eq!(u8::from(RouteType::Unreachable), RTN_UNREACHABLE);
        let actions = [
            (RuleAction::ToTable, FR_ACT_TO_TBL),
            (RuleAction::Goto, FR_ACT_GOTO),
            (RuleAction::Nop, FR_ACT_NOP),
            (RuleAction::Blackhole, FR_ACT_BLACKHOLE),
            (RuleAction::Unreachable, FR_ACT_UNREACHABLE),
            (RuleAction::Prohibit, FR_ACT_PROHIBIT),
        ];
        for (action, number) in actions {
            assert_eq!(u8::from(action), number, "{action:?}");
        }
    }

    #[test]
    fn reads_marks_and_tables_as_numbers() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED rtnl::reads_marks_and_tables_as_numbers: needs root");
            return;
        }
        let r = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            let ip = |a: &str| {
                std::process::Command::new("ip")
                    .args(a.split(' '))
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            };
            let ok = ip("link set lo up")
                && ip("-4 rule add fwmark 1400 lookup 140")
                && ip("-4 route add local default dev lo table 140")
                && ip("-4 rule add fwmark 5 lookup 254")
                && ip("-4 rule add fwmark 6 lookup 300 iif eth0");
            ok.then(|| (routing(Family::V4), routing(Family::V6)))
        })
        .join()
        .unwrap();
        let Some((Some(v4), Some(v6))) = r else {
            panic!("could not set up or read the namespace: {r:?}");
        };
        let marked: Vec<(Option<u32>, u32, bool)> = v4
            .rules
            .iter()
            .filter(|r| r.mark.is_some())
            .map(|r| (r.mark, r.table, r.plain))
            .collect();
        assert!(marked.contains(&(Some(1400), 140, true)), "{v4:?}");
        assert!(marked.contains(&(Some(5), 254, true)), "{v4:?}");
        assert!(marked.contains(&(Some(6), 300, false)), "{v4:?}");
        assert_eq!(v4.local_default_tables, BTreeSet::from([140]));
        assert!(
            v4.tables_with_routes
                .is_superset(&BTreeSet::from([140, 255]))
        );
        assert!(!v4.tables_with_routes.contains(&300), "{v4:?}");
        assert!(v6.local_default_tables.is_empty());
        assert!(v4.rules.iter().any(|r| r.mark.is_none() && r.table == 254));
    }

    #[test]
    fn addresses_and_routes_of_a_namespace() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED rtnl::addresses_and_routes_of_a_namespace: needs root");
            return;
        }
        let r = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            let ip = |a: &str| {
                std::process::Command::new("ip")
                    .args(a.split(' '))
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            };
            let ok = ip("link set lo up")
                && ip("link add eth0 type veth peer name eth1")
                && ip("addr add 10.9.0.1/24 dev eth0")
                && ip("link set eth0 up")
                && ip("link set eth1 up");
            let a = |s: &str| s.parse::<IpAddr>().unwrap();
            ok.then(|| {
                (
                    addresses(),
                    route(a("10.9.0.1"), Some(1337)),
                    route(a("10.9.0.7"), None),
                    route(a("192.0.2.1"), None),
                    route(a("127.0.0.5"), None),
                )
            })
        })
        .join()
        .unwrap();
        let Some((Some(addrs), Some(own), Some(peer), Some(none), Some(lo))) = r else {
            panic!("could not set up or read the namespace: {r:?}");
        };
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(addrs.contains(&("eth0".into(), a("10.9.0.1"))), "{addrs:?}");
        assert!(addrs.contains(&("lo".into(), a("127.0.0.1"))), "{addrs:?}");
        assert_eq!(
            own,
            Route {
                kind: 2,
                dev: Some("lo".into()),
                src: Some(a("10.9.0.1"))
            }
        );
        assert_eq!((peer.kind, peer.dev.as_deref()), (1, Some("eth0")));
        assert_eq!(peer.src, Some(a("10.9.0.1")));
        assert_eq!(none.kind, RTN_UNREACHABLE);
        assert_eq!((lo.kind, lo.dev.as_deref()), (2, Some("lo")));
    }
}
