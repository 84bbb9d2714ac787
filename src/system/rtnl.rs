//! rtnetlink, in process: the one socket the changes go over ([`Socket`]), built with
//! `netlink-packet-route` on `netlink-sys`; and the reads: policy routing rules and routes
//! (the numbers the kernel holds: no table names to translate, no `ip` process), for finding
//! the TPROXY routing an earlier run left whatever mark and table it used; whether `lo` has
//! `::6`; and, for explain, the namespace's addresses and the route one packet takes (`ip
//! route get`). A read's failure means "unknown" (`None`). The changes are
//! [`crate::system::rtnl_change`]'s.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use nix::sys::socket::SockProtocol;

use crate::model::Family;
use crate::system::netlink;

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWRULE: u16 = 32;
const RTM_GETRULE: u16 = 34;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_PREFSRC: u16 = 7;
const RTA_UID: u16 = 25;
const IFLA_IFNAME: u16 = 3;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
/// `RTN_UNREACHABLE`: what [`route`] says when the kernel has no route.
pub const RTN_UNREACHABLE: u8 = 7;
const RTA_TABLE: u16 = 15;
const RTN_LOCAL: u8 = 2;
const FRA_DST: u16 = 1;
const FRA_SRC: u16 = 2;
const FRA_IIFNAME: u16 = 3;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const FRA_OIFNAME: u16 = 17;
const FRA_GOTO: u16 = 4;
const FRA_FLOW: u16 = 11;
const FRA_TUN_ID: u16 = 12;
const FRA_SUPPRESS_IFGROUP: u16 = 13;
const FRA_SUPPRESS_PREFIXLEN: u16 = 14;
const FRA_L3MDEV: u16 = 19;
const FRA_UID_RANGE: u16 = 20;
const FRA_IP_PROTO: u16 = 22;
const FRA_SPORT_RANGE: u16 = 23;
const FRA_DPORT_RANGE: u16 = 24;
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
const FIB_RULE_INVERT: u32 = 2;
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

/// Whether `lo` has `addr/128`.
pub fn lo_has_v6_host_address(addr: std::net::Ipv6Addr) -> Option<bool> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    Some(addrs.into_iter().any(|a| {
        a.interface_name == "lo"
            && a.address
                .as_ref()
                .and_then(|x| x.as_sockaddr_in6())
                .is_some_and(|x| x.ip() == addr)
            && a.netmask
                .as_ref()
                .and_then(|x| x.as_sockaddr_in6())
                .is_some_and(|m| m.ip() == std::net::Ipv6Addr::from(u128::MAX))
    }))
}

fn af(family: Family) -> u8 {
    match family {
        Family::V4 => libc_af::INET,
        Family::V6 => libc_af::INET6,
    }
}

mod libc_af {
    pub const INET: u8 = 2;
    pub const INET6: u8 = 10;
}

/// Runs one rtnetlink dump of `kind` on `sock` with a 12-byte header whose family byte is
/// `family` (0: every family); returns (type, body).
fn dump(sock: &mut netlink::Socket, kind: u16, family: u8) -> Option<Vec<(u16, Vec<u8>)>> {
    // rtmsg / fib_rule_hdr: family first, the rest zero.
    let mut header = [0u8; 12];
    header[0] = family;
    let mut out = Vec::new();
    sock.dump(kind, &header, |ty, body| {
        out.push((ty, body.to_vec()));
    })?;
    Some(out)
}

/// The attributes after a 12-byte header: (type, payload).
fn attrs(body: &[u8]) -> Vec<(u16, &[u8])> {
    netlink::attributes(body.get(12..).unwrap_or_default())
}

fn u32_of(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

/// Parses one RTM_NEWRULE body.
fn parse_rule(body: &[u8]) -> Option<Rule> {
    if body.len() < 12 {
        return None;
    }
    let (dst_len, src_len, tos, table8, action) = (body[1], body[2], body[3], body[4], body[7]);
    let flags = u32::from_ne_bytes(body[8..12].try_into().ok()?);
    let mut rule = Rule {
        priority: 0,
        mark: None,
        mask: u32::MAX,
        table: table8 as u32,
        plain: dst_len == 0
            && src_len == 0
            && tos == 0
            && action == FR_ACT_TO_TBL
            && flags & FIB_RULE_INVERT == 0,
        action,
        invert: flags & FIB_RULE_INVERT != 0,
        selectors: Vec::new(),
        ip_proto: None,
    };
    if tos != 0 {
        rule.selectors.push(format!("tos 0x{tos:x}"));
    }
    let u16_pair = |v: &[u8]| -> Option<(u16, u16)> {
        Some((
            u16::from_ne_bytes(v.get(..2)?.try_into().ok()?),
            u16::from_ne_bytes(v.get(2..4)?.try_into().ok()?),
        ))
    };
    for (ty, v) in attrs(body) {
        match ty {
            FRA_PRIORITY => rule.priority = u32_of(v)?,
            FRA_FWMARK => rule.mark = Some(u32_of(v)?),
            FRA_FWMASK => rule.mask = u32_of(v)?,
            FRA_TABLE => rule.table = u32_of(v)?,
            FRA_SRC => rule
                .selectors
                .push(format!("from {}/{src_len}", address(v)?)),
            FRA_DST => rule.selectors.push(format!("to {}/{dst_len}", address(v)?)),
            FRA_IIFNAME | FRA_OIFNAME => {
                let name = String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or(v));
                let kind = if ty == FRA_IIFNAME { "iif" } else { "oif" };
                rule.selectors.push(format!("{kind} {name}"));
                rule.plain = false;
            }
            FRA_GOTO => rule.selectors.push(format!("goto {}", u32_of(v)?)),
            FRA_FLOW => rule.selectors.push(format!("realms {}", u32_of(v)?)),
            FRA_TUN_ID => rule.selectors.push("tun_id".into()),
            FRA_L3MDEV => rule.selectors.push("l3mdev".into()),
            FRA_SUPPRESS_PREFIXLEN | FRA_SUPPRESS_IFGROUP => {
                // The kernel sends -1 for "none".
                let n = u32_of(v)?;
                if n != u32::MAX {
                    let kind = if ty == FRA_SUPPRESS_PREFIXLEN {
                        "suppress_prefixlength"
                    } else {
                        "suppress_ifgroup"
                    };
                    rule.selectors.push(format!("{kind} {n}"));
                }
            }
            FRA_UID_RANGE => {
                let a = u32_of(v)?;
                let b = u32_of(v.get(4..)?)?;
                rule.selectors.push(format!("uidrange {a}-{b}"));
            }
            FRA_IP_PROTO => rule.ip_proto = v.first().copied(),
            FRA_SPORT_RANGE | FRA_DPORT_RANGE => {
                let (a, b) = u16_pair(v)?;
                let kind = if ty == FRA_SPORT_RANGE {
                    "sport"
                } else {
                    "dport"
                };
                rule.selectors.push(format!("{kind} {a}-{b}"));
            }
            _ => {}
        }
    }
    if rule.ip_proto.is_some() || !rule.selectors.is_empty() {
        rule.plain = false;
    }
    Some(rule)
}

/// An address attribute (4 or 16 bytes) as text.
fn address(v: &[u8]) -> Option<std::net::IpAddr> {
    match v.len() {
        4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(v).ok()?)),
        16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(v).ok()?)),
        _ => None,
    }
}

/// The table of one RTM_NEWROUTE body.
fn route_table(body: &[u8]) -> Option<u32> {
    let mut table = u32::from(*body.get(4)?);
    for (ty, v) in attrs(body) {
        if ty == RTA_TABLE {
            table = u32_of(v)?;
        }
    }
    Some(table)
}

/// From one RTM_NEWROUTE body, the table of a `local default dev lo` route.
fn local_default_table(body: &[u8], lo: u32) -> Option<u32> {
    if body.len() < 12 || body[1] != 0 || body[7] != RTN_LOCAL {
        return None;
    }
    let mut table = body[4] as u32;
    let mut oif = None;
    for (ty, v) in attrs(body) {
        match ty {
            RTA_TABLE => table = u32_of(v)?,
            RTA_OIF => oif = u32_of(v),
            _ => {}
        }
    }
    (oif == Some(lo)).then_some(table)
}

/// The policy routing of `family` in the current network namespace: two dumps (rules, then
/// routes) of that family.
pub fn routing(family: Family) -> Option<Routing> {
    let family = af(family);
    let mut sock = netlink::Socket::open(SockProtocol::NetlinkRoute)?;
    let ours = |body: &[u8]| body.first() == Some(&family);
    let mut out = Routing::default();
    for (ty, b) in dump(&mut sock, RTM_GETRULE, family)? {
        if ty == RTM_NEWRULE
            && ours(&b)
            && let Some(rule) = parse_rule(&b)
        {
            out.rules.push(rule);
        }
    }
    // Routes are only of interest next to a rule with a mark, or on their own as leftovers
    // of a run killed between adding the route and the rule: always look.
    for (ty, b) in dump(&mut sock, RTM_GETROUTE, family)? {
        if ty != RTM_NEWROUTE || !ours(&b) {
            continue;
        }
        if let Some(t) = route_table(&b) {
            out.tables_with_routes.insert(t);
        }
        if let Some(t) = local_default_table(&b, LOOPBACK_IFINDEX) {
            out.local_default_tables.insert(t);
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

/// The interface names by index: one `RTM_GETLINK` dump.
fn links(sock: &mut netlink::Socket) -> Option<BTreeMap<u32, String>> {
    // ifinfomsg: family, pad, type, index, flags, change.
    let mut out = BTreeMap::new();
    sock.dump(RTM_GETLINK, &[0u8; 16], |ty, body| {
        if ty != RTM_NEWLINK || body.len() < 16 {
            return;
        }
        let index = u32::from_ne_bytes([body[4], body[5], body[6], body[7]]);
        for (t, v) in netlink::attributes(&body[16..]) {
            if t == IFLA_IFNAME {
                let name = v.split(|b| *b == 0).next().unwrap_or_default();
                out.insert(index, String::from_utf8_lossy(name).into_owned());
            }
        }
    })?;
    Some(out)
}

fn ip_of(v: &[u8]) -> Option<IpAddr> {
    match v.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(v).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(v).ok()?))),
        _ => None,
    }
}

/// The addresses of this namespace's interfaces, both families: (interface, address).
pub fn addresses() -> Option<Vec<(String, IpAddr)>> {
    let mut sock = netlink::Socket::open(SockProtocol::NetlinkRoute)?;
    let names = links(&mut sock)?;
    let mut out = Vec::new();
    // ifaddrmsg: family, prefixlen, flags, scope, index.
    sock.dump(RTM_GETADDR, &[0u8; 8], |ty, body| {
        if ty != RTM_NEWADDR || body.len() < 8 {
            return;
        }
        let index = u32::from_ne_bytes([body[4], body[5], body[6], body[7]]);
        let attrs = netlink::attributes(&body[8..]);
        // IFA_LOCAL is the address itself where there is a peer (IPv4); else IFA_ADDRESS.
        let addr = attrs
            .iter()
            .find(|(t, _)| *t == IFA_LOCAL)
            .or_else(|| attrs.iter().find(|(t, _)| *t == IFA_ADDRESS))
            .and_then(|(_, v)| ip_of(v));
        if let (Some(addr), Some(name)) = (addr, names.get(&index)) {
            out.push((name.clone(), addr));
        }
    })?;
    Some(out)
}

fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
    let len = (4 + payload.len()) as u16;
    let mut a = Vec::with_capacity(8 + payload.len());
    a.extend_from_slice(&len.to_ne_bytes());
    a.extend_from_slice(&ty.to_ne_bytes());
    a.extend_from_slice(payload);
    a.resize((a.len() + 3) & !3, 0);
    a
}

/// The route the kernel picks for a packet to `dst` from a socket of `uid` (`ip route get
/// DST uid UID`): one `RTM_GETROUTE` request.
pub fn route(dst: IpAddr, uid: Option<u32>) -> Option<Route> {
    let mut sock = netlink::Socket::open(SockProtocol::NetlinkRoute)?;
    let (family, bits, octets) = match dst {
        IpAddr::V4(a) => (libc_af::INET, 32, a.octets().to_vec()),
        IpAddr::V6(a) => (libc_af::INET6, 128, a.octets().to_vec()),
    };
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    let mut body = vec![0u8; 12];
    body[0] = family;
    body[1] = bits;
    body.extend(attr(RTA_DST, &octets));
    if let Some(uid) = uid {
        body.extend(attr(RTA_UID, &uid.to_ne_bytes()));
    }
    let reply = match sock.request(RTM_GETROUTE, &body)? {
        Ok((RTM_NEWROUTE, b)) if b.len() >= 12 => b,
        Ok(_) => return None,
        // ENETUNREACH, EHOSTUNREACH...: no route.
        Err(_) => {
            return Some(Route {
                kind: RTN_UNREACHABLE,
                dev: None,
                src: None,
            });
        }
    };
    let mut r = Route {
        kind: reply[7],
        dev: None,
        src: None,
    };
    let mut oif = None;
    for (ty, v) in attrs(&reply) {
        match ty {
            RTA_OIF => oif = u32_of(v),
            RTA_PREFSRC => r.src = ip_of(v),
            _ => {}
        }
    }
    if let Some(oif) = oif {
        r.dev = links(&mut sock)?.remove(&oif);
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

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
