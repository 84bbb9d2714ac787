//! Changes TPROXY's policy routing and `lo`'s `::6` over rtnetlink, in process, as Istio's
//! own `tools/common` code does (no `ip` program at run time): one request per change, built
//! with `netlink-packet-route` and sent on the rtnetlink socket the reads use too
//! ([`crate::system::rtnl::Socket`]), answered by the kernel's acknowledgement or errno. The
//! requests are the ones `ip` sends for the commands Istio prints (`ip -4 rule add fwmark M
//! lookup T`, `ip -4 route add local default dev lo table T`, `ip -6 addr add ::6/128 dev
//! lo`), so the kernel ends up holding the same state.
//! Whether a change took is for the caller to read back ([`crate::system::rtnl`]).

use std::net::Ipv6Addr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::route::{
    RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::model::Family;
pub use crate::system::rtnl::RtnlError;
use crate::system::rtnl::{LOOPBACK_IFINDEX, Socket, address_family};

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
        // A new object must not exist yet (`NLM_F_CREATE | NLM_F_EXCL`), as `ip ... add` asks.
        let flags = if add { NLM_F_CREATE | NLM_F_EXCL } else { 0 };
        Socket::open()?.change(message(add, target), flags)
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
                    Err(RtnlError::Refused(std::io::Error::from_raw_os_error(errno)))
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
