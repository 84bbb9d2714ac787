//! Changes TPROXY's policy routing and `lo`'s `::6` over rtnetlink, in process, as Istio's
//! own `tools/common` code does (no `ip` program at run time): one request per change, built
//! with `netlink-packet-route` and sent on a `netlink-sys` socket, answered by the kernel's
//! acknowledgement or errno. The requests are the ones `ip` sends for the commands Istio
//! prints (`ip -4 rule add fwmark M lookup T`, `ip -4 route add local default dev lo table
//! T`, `ip -6 addr add ::6/128 dev lo`), so the kernel ends up holding the same state.
//! Whether a change took is for the caller to read back ([`crate::system::rtnl`]).

use std::io;
use std::net::Ipv6Addr;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::route::{
    RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::model::Family;

/// `lo`'s interface index, the same in every network namespace (the kernel's
/// `LOOPBACK_IFINDEX`).
const LOOPBACK_IFINDEX: u32 = 1;
/// How long the kernel's answer may take before the change counts as failed.
const REPLY_TIMEOUT_SECS: i64 = 10;

/// What one change adds or removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `fwmark MARK lookup TABLE`; with a priority, exactly the rule there (or put there).
    Rule {
        family: Family,
        mark: u32,
        table: u32,
        priority: Option<u32>,
    },
    /// `local default dev lo table TABLE`.
    LocalDefaultRoute { family: Family, table: u32 },
    /// `ADDR/128` on `lo`.
    LoV6HostAddress(Ipv6Addr),
}

/// Why a change could not be made.
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

/// Changes to the kernel's routing (the tests give fakes).
pub trait Rtnl {
    /// Adds (`add`) or removes `target`; `Ok` when the kernel acknowledged it.
    fn change(&mut self, add: bool, target: &Target) -> Result<(), RtnlError>;
}

/// The kernel of the current network namespace (of this thread, after `setns`).
#[derive(Debug, Default)]
pub struct Kernel;

impl Rtnl for Kernel {
    fn change(&mut self, add: bool, target: &Target) -> Result<(), RtnlError> {
        tracing::debug!(add, ?target, "rtnetlink request");
        request(message(add, target), add)
    }
}

fn address_family(family: Family) -> AddressFamily {
    match family {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

/// A table number as the 8-bit header field carries it: itself below 256, else "see the
/// attribute" (`RT_TABLE_UNSPEC`), as `ip` does.
fn header_table(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(0)
}

/// The request `ip` sends for the same change.
fn message(add: bool, target: &Target) -> RouteNetlinkMessage {
    match *target {
        Target::Rule {
            family,
            mark,
            table,
            priority,
        } => {
            let mut m = RuleMessage::default();
            m.header.family = address_family(family);
            m.header.table = header_table(table);
            // A removal names what it matches; the kernel reads an unset action as "any".
            m.header.action = if add {
                RuleAction::ToTable
            } else {
                RuleAction::Unspec
            };
            if let Some(p) = priority {
                m.attributes.push(RuleAttribute::Priority(p));
            }
            m.attributes.push(RuleAttribute::FwMark(mark));
            m.attributes.push(RuleAttribute::Table(table));
            if add {
                RouteNetlinkMessage::NewRule(m)
            } else {
                RouteNetlinkMessage::DelRule(m)
            }
        }
        Target::LocalDefaultRoute { family, table } => {
            let mut m = RouteMessage::default();
            m.header.address_family = address_family(family);
            m.header.table = header_table(table);
            m.header.kind = RouteType::Local;
            if add {
                m.header.protocol = RouteProtocol::Boot;
                // `ip` gives a local IPv4 route host scope; IPv6 has no route scopes.
                m.header.scope = match family {
                    Family::V4 => RouteScope::Host,
                    Family::V6 => RouteScope::Universe,
                };
            } else {
                // "Any scope" for a removal (IPv4 matches on it).
                m.header.scope = match family {
                    Family::V4 => RouteScope::NoWhere,
                    Family::V6 => RouteScope::Universe,
                };
            }
            m.attributes.push(RouteAttribute::Table(table));
            m.attributes.push(RouteAttribute::Oif(LOOPBACK_IFINDEX));
            if add {
                RouteNetlinkMessage::NewRoute(m)
            } else {
                RouteNetlinkMessage::DelRoute(m)
            }
        }
        Target::LoV6HostAddress(addr) => {
            let mut m = AddressMessage::default();
            m.header.family = AddressFamily::Inet6;
            m.header.prefix_len = 128;
            m.header.index = LOOPBACK_IFINDEX;
            m.attributes.push(AddressAttribute::Local(addr.into()));
            m.attributes.push(AddressAttribute::Address(addr.into()));
            if add {
                RouteNetlinkMessage::NewAddress(m)
            } else {
                RouteNetlinkMessage::DelAddress(m)
            }
        }
    }
}

/// Sends `msg` (`create`: as a new object that must not exist yet, `NLM_F_CREATE |
/// NLM_F_EXCL`, as `ip ... add` does) and waits for the kernel's acknowledgement.
fn request(msg: RouteNetlinkMessage, create: bool) -> Result<(), RtnlError> {
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(RtnlError::Socket)?;
    socket.bind_auto().map_err(RtnlError::Socket)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(RtnlError::Socket)?;
    // An answer that never comes must not hang the run.
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(REPLY_TIMEOUT_SECS, 0),
    )
    .map_err(|e| RtnlError::Socket(e.into()))?;

    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    if create {
        header.flags |= NLM_F_CREATE | NLM_F_EXCL;
    }
    header.sequence_number = 1;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0).map_err(RtnlError::Send)?;

    // The answer to a request with NLM_F_ACK is one NLMSG_ERROR message: code 0 is the
    // acknowledgement. Anything else of ours (sequence 1) is not expected; skip it.
    loop {
        let (data, _) = socket.recv_from_full().map_err(RtnlError::Receive)?;
        let mut off = 0;
        while off < data.len() {
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..])
                .map_err(RtnlError::Decode)?;
            let len = reply.header.length as usize;
            if let NetlinkPayload::Error(e) = reply.payload {
                return match e.code {
                    None => Ok(()),
                    Some(_) => Err(RtnlError::Refused(e.to_io())),
                };
            }
            if len == 0 {
                break;
            }
            off += len.next_multiple_of(4);
        }
    }
}

#[cfg(test)]
pub mod fake {
    //! A kernel in memory for unit tests: it records each change and answers as told.

    use super::*;

    #[derive(Debug, Default)]
    pub struct Recorder {
        /// Every change asked for, in order.
        pub calls: Vec<(bool, Target)>,
        /// The kernel refuses the change of this index (0-based) with this errno.
        pub refuse: Option<(usize, i32)>,
    }

    impl Rtnl for Recorder {
        fn change(&mut self, add: bool, target: &Target) -> Result<(), RtnlError> {
            self.calls.push((add, *target));
            match self.refuse {
                Some((i, errno)) if i + 1 == self.calls.len() => {
                    Err(RtnlError::Refused(io::Error::from_raw_os_error(errno)))
                }
                _ => Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::Emitable;

    #[test]
    fn requests_are_the_ones_ip_sends() {
        // `ip -4 rule add fwmark 1337 lookup 133`: table in the header (and attribute).
        let RouteNetlinkMessage::NewRule(r) = message(
            true,
            &Target::Rule {
                family: Family::V4,
                mark: 1337,
                table: 133,
                priority: None,
            },
        ) else {
            panic!("not a new rule");
        };
        assert_eq!(r.header.table, 133);
        assert_eq!(r.header.action, RuleAction::ToTable);
        assert!(r.attributes.contains(&RuleAttribute::FwMark(1337)));
        assert!(
            !r.attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::Priority(_)))
        );
        // A table past 255 lives only in the attribute.
        let RouteNetlinkMessage::DelRoute(m) = message(
            false,
            &Target::LocalDefaultRoute {
                family: Family::V4,
                table: 1000,
            },
        ) else {
            panic!("not a route removal");
        };
        assert_eq!(m.header.table, 0);
        assert_eq!(m.header.scope, RouteScope::NoWhere);
        assert!(m.attributes.contains(&RouteAttribute::Table(1000)));
        let a = message(
            true,
            &Target::LoV6HostAddress(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6)),
        );
        let RouteNetlinkMessage::NewAddress(ref m) = a else {
            panic!("not an address");
        };
        assert_eq!((m.header.prefix_len, m.header.index), (128, 1));
        // 8-byte header + two 20-byte attributes, as `ip -6 addr add ::6/128 dev lo` sends.
        assert_eq!(m.buffer_len(), 48);
    }
}
