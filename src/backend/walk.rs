//! What both packet walks share (the iptables one, [`iptables::walk`](crate::backend::iptables::walk),
//! and the nftables one, [`nft::walk`](crate::backend::nft::walk)): the packet, the verdict,
//! the steps of a walk, the hooks a packet traverses, and the matching of addresses, ports,
//! interfaces and owner ids.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{Table, parse_number};

/// Transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// The first packet of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub proto: Proto,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    /// Owner of the sending socket (locally generated packets only).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub in_iface: Option<String>,
    pub out_iface: Option<String>,
    pub mark: u32,
    pub connmark: u32,
    /// Conntrack state: NEW for a first packet.
    pub ctstate: String,
}

/// Where the packet ends up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// nat REDIRECT to a local port (original destination kept for SO_ORIGINAL_DST).
    Redirect {
        port: u16,
    },
    /// mangle TPROXY to a local port, with a mark.
    Tproxy {
        port: u16,
        mark: u32,
    },
    Drop,
    NotCaptured,
}

/// One rule looked at (explain's JSON prints it as it is).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Step {
    /// The table's name: `nat` (iptables), `istio-proxy-nat` (nftables).
    pub table: &'static str,
    pub chain: String,
    /// 1-based position in the chain.
    pub rule: usize,
    pub text: String,
    pub matched: bool,
}

/// The outcome of a walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    pub walk: Vec<Step>,
    /// The packet's mark at the end (MARK/CONNMARK/TPROXY applied).
    pub mark: u32,
    /// Conntrack zone set by a CT target, if any.
    pub zone: Option<u16>,
}

/// Rules the interpreter does not understand.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot evaluate `{text}` ({table}/{chain} rule {rule}): {reason}")]
pub struct Unsupported {
    pub table: &'static str,
    pub chain: String,
    pub rule: usize,
    pub text: String,
    pub reason: String,
}

/// A hook: the (table, built-in chain) pairs a packet traverses, in netfilter order.
pub type Hook = &'static [(Table, &'static str)];

/// Locally generated packets.
pub const OUTPUT_HOOK: Hook = &[
    (Table::Raw, "OUTPUT"),
    (Table::Mangle, "OUTPUT"),
    (Table::Nat, "OUTPUT"),
    (Table::Filter, "OUTPUT"),
];
/// Packets arriving on an interface.
pub const PREROUTING_HOOK: Hook = &[
    (Table::Raw, "PREROUTING"),
    (Table::Mangle, "PREROUTING"),
    (Table::Nat, "PREROUTING"),
];

pub(crate) enum Flow {
    /// Fell off the end or RETURN: continue in the caller.
    Continue,
    /// ACCEPT: stop this table.
    Accept,
    /// A final verdict.
    Final(Verdict),
}

pub(crate) fn num(s: &str) -> Option<u32> {
    parse_number(s).and_then(|n| u32::try_from(n).ok())
}

pub(crate) fn port_in(spec: &str, port: u16, range: char) -> Option<bool> {
    let one = |s: &str| -> Option<bool> {
        match s.split_once(range) {
            Some((a, b)) => Some(a.parse::<u16>().ok()? <= port && port <= b.parse::<u16>().ok()?),
            None => Some(s.parse::<u16>().ok()? == port),
        }
    };
    let mut any = false;
    for s in spec.split(',') {
        any |= one(s)?;
    }
    Some(any)
}

/// Whether `iface` matches `pattern`, whose trailing `wildcard` (`+` in iptables, `*` in
/// nft) matches any suffix.
pub(crate) fn iface_matches(pattern: &str, iface: Option<&str>, wildcard: char) -> bool {
    let Some(iface) = iface else { return false };
    match pattern.strip_suffix(wildcard) {
        Some(prefix) => iface.starts_with(prefix),
        None => iface == pattern,
    }
}

/// The ids an owner match names: a uid or gid, a name `resolve` knows, or a range `a-b`.
pub(crate) fn id_range(
    val: &str,
    resolve: impl Fn(&str) -> Option<u32>,
) -> Result<(u32, u32), String> {
    if let Some(n) = num(val).or_else(|| resolve(val)) {
        return Ok((n, n));
    }
    match val.split_once('-') {
        Some((a, b)) => match (num(a), num(b)) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => Err(format!("bad id range {val:?}")),
        },
        None => Err(format!("cannot resolve owner {val:?}")),
    }
}

/// Whether `a` is the address or in the network `spec`; `None` when `spec` is neither.
pub(crate) fn addr_in(spec: &str, a: IpAddr) -> Option<bool> {
    if let Ok(n) = spec.parse::<IpNet>() {
        return Some(n.contains(&a));
    }
    spec.parse::<IpAddr>().ok().map(|x| x == a)
}
