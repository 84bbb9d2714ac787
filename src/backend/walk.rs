//! What both packet walks share (the iptables one, [`iptables::walk`](crate::backend::iptables::walk),
//! and the nftables one, [`nft::walk`](crate::backend::nft::walk)): the packet, the verdict,
//! the steps of a walk, the hooks a packet traverses, the matching of addresses, ports,
//! interfaces and owner ids, and the walk itself across every place that holds rules
//! ([`evaluate`]).
//!
//! **The kernel's order.** Each place (one iptables flavour of one family, or our nftables
//! tables) attaches base chains to the hooks a packet traverses, each with a priority:
//! iptables' raw at -300, mangle at -150, nat at -100 (legacy xtables and iptables-nft
//! alike), filter at 0; nftables' chains at the priority they were created with. At each
//! hook the kernel runs every place's base chains in priority order; `accept` ends one base
//! chain and the next still runs; `drop` and a NAT binding end the packet's walk; nat chains
//! see only a connection's first packet, at its first hook. Of equal priorities the kernel
//! runs the one registered last first, which nothing shows afterwards: [`evaluate`] walks
//! the places in the order given, then in every other order, and when that changes the
//! verdict the verdict is [`Verdict::Unknown`] ([`Stop::Order`]).

use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::parse_number;

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
    /// What the namespace's routing says the source and the destination are, for
    /// `-m addrtype` ([`AddrTypes`]); `None` where the namespace was not read (the config's
    /// rules).
    pub src_type: Option<AddrTypes>,
    pub dst_type: Option<AddrTypes>,
}

/// The address types (`-m addrtype`) an address has, as the kernel's `xt_addrtype` sees it:
/// a mask of `1 << RTN_*` ([`addr_type`]). IPv4: exactly one, the type of its route in the
/// `local` table (LOCAL, BROADCAST, MULTICAST; else UNICAST). IPv6: UNICAST or MULTICAST (or
/// UNSPEC for `::`) by the address, with LOCAL and UNREACHABLE from its route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrTypes {
    pub v6: bool,
    pub mask: u16,
}

/// The names `-m addrtype` takes, by `RTN_*` number (linux/rtnetlink.h).
pub const ADDR_TYPES: [&str; 12] = [
    "UNSPEC",
    "UNICAST",
    "LOCAL",
    "BROADCAST",
    "ANYCAST",
    "MULTICAST",
    "BLACKHOLE",
    "UNREACHABLE",
    "PROHIBIT",
    "THROW",
    "NAT",
    "XRESOLVE",
];

/// The bit of the address type `name` (`LOCAL`), as in [`AddrTypes::mask`].
pub fn addr_type(name: &str) -> Option<u16> {
    ADDR_TYPES
        .iter()
        .position(|t| t.eq_ignore_ascii_case(name))
        .map(|n| 1 << n)
}

impl AddrTypes {
    /// Whether an address of these types matches `--src-type`/`--dst-type` `want` (a mask),
    /// as `xt_addrtype` decides: IPv4, any of them; IPv6, every one of UNICAST, MULTICAST
    /// and UNSPEC asked for, and then any of LOCAL, ANYCAST, UNREACHABLE asked for.
    pub fn matches(self, want: u16) -> bool {
        if !self.v6 {
            return self.mask & want != 0;
        }
        let class = want & (addr_bit("UNICAST") | addr_bit("MULTICAST") | addr_bit("UNSPEC"));
        if self.mask & class != class {
            return false;
        }
        let routed = want & (addr_bit("LOCAL") | addr_bit("ANYCAST") | addr_bit("UNREACHABLE"));
        routed == 0 || self.mask & routed != 0
    }
}

fn addr_bit(name: &str) -> u16 {
    addr_type(name).unwrap_or(0)
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
    /// The walk cannot tell ([`Outcome::stopped`] says why).
    Unknown,
}

impl Verdict {
    /// The verdict in explain's JSON words: `redirect`, `tproxy`, `drop`, `not-captured`,
    /// `unknown`.
    pub fn word(&self) -> &'static str {
        match self {
            Verdict::Redirect { .. } => "redirect",
            Verdict::Tproxy { .. } => "tproxy",
            Verdict::Drop => "drop",
            Verdict::NotCaptured => "not-captured",
            Verdict::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for Verdict {
    /// `redirect to 15001`, `tproxy to 15006`, `not-captured`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Redirect { port } | Verdict::Tproxy { port, .. } => {
                write!(f, "{} to {port}", self.word())
            }
            _ => f.write_str(self.word()),
        }
    }
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
    /// Where the rule is ([`Source::name`]), when the walk went through more than one place.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub place: Option<String>,
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
    /// Why the verdict is [`Verdict::Unknown`].
    pub stopped: Option<Stop>,
}

/// Why a walk has no verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// A rule the walk cannot evaluate, met on the way (in `place`, when the walk went
    /// through more than one); the walk before it is in [`Outcome::walk`].
    Rule {
        place: Option<String>,
        rule: Unsupported,
    },
    /// Base chains of equal priority in different places decide differently by the order the
    /// kernel runs them in, which cannot be read: what each order gives.
    Order(String),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Rule {
                place: Some(place),
                rule,
            } => write!(f, "{rule} in {place}"),
            Stop::Rule { place: None, rule } => write!(f, "{rule}"),
            Stop::Order(why) => f.write_str(why),
        }
    }
}

/// Rules the interpreter does not understand.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("cannot evaluate `{text}` ({table}/{chain} rule {rule}): {reason}")]
pub struct Unsupported {
    pub table: &'static str,
    pub chain: String,
    pub rule: usize,
    pub text: String,
    pub reason: String,
}

/// A netfilter hook on the packet's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Packets arriving on an interface (also the looped-back packets of lo).
    Prerouting,
    /// Locally generated packets.
    Output,
}

impl Hook {
    /// nft's name of the hook: `prerouting`, `output`.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Output => "output",
        }
    }
}

/// What one base chain did with the packet.
pub enum Flow {
    /// Fell off the end or RETURN: continue in the caller.
    Continue,
    /// ACCEPT: stop this base chain (the next one still runs).
    Accept,
    /// A final verdict.
    Final(Verdict),
}

/// A base chain: where a place's rules start at a hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    pub priority: i32,
    /// A nat chain: it sees only a connection's first packet, at its first hook.
    pub nat: bool,
    /// Its policy drops what falls off its end.
    pub policy_drop: bool,
    /// The table's name, as in [`Step::table`].
    pub table: &'static str,
    pub chain: String,
}

/// The packet on its way through the base chains, and what the walk saw.
#[derive(Debug)]
pub struct Walk {
    pub pkt: Packet,
    pub steps: Vec<Step>,
    /// Conntrack zone set by a CT target (the first one counts).
    pub zone: Option<u16>,
    /// A TPROXY's port: the socket is assigned, the packet is the proxy's unless something
    /// drops it (a later NAT does not take it away).
    pub tproxy: Option<u16>,
}

/// One place's rules as the kernel runs them: its base chains at a hook, each walked with
/// the packet (a backend's walker).
pub trait Chains {
    /// The base chains this place attaches at `hook`.
    fn bases(&self, hook: Hook) -> Vec<Base>;
    /// Walks `base` (one of [`bases`](Chains::bases)) with the packet in `walk`.
    fn run(&self, base: &Base, walk: &mut Walk) -> Result<Flow, Unsupported>;
}

/// One place's rules, for a walk: what a backend's [`walk`](crate::backend::Backend::walk)
/// gives.
pub struct Source<'a> {
    /// Where the rules are: `iptables-nft, IPv4`, `native nftables (inet istio-proxy-*)`,
    /// `rules from the config`.
    pub name: String,
    /// Whether they hold capture rules of ours (ISTIO_* chains, `istio-proxy-*` tables).
    pub capture: bool,
    /// What the rules leave out (IPv6 off), said with the walk.
    pub note: Option<&'static str>,
    pub chains: Box<dyn Chains + 'a>,
}

/// Walks `pkt` through `hooks` ([`Hook::Output`], then [`Hook::Prerouting`] for a packet
/// looped back over lo) and every source's base chains at each, in the kernel's order
/// (module docs). Equal priorities of different sources are walked in the order of
/// `sources`; when another order gives another verdict (or zone), the verdict is
/// [`Verdict::Unknown`] and [`Stop::Order`] says what each gives.
pub fn evaluate(sources: &[Source<'_>], pkt: Packet, hooks: &[Hook]) -> Outcome {
    let given: Vec<usize> = (0..sources.len()).collect();
    let mut first = walk_in_order(sources, &given, pkt.clone(), hooks);
    if sources.len() < 2 || first.verdict == Verdict::Unknown {
        return first;
    }
    for order in permutations(sources.len()).into_iter().skip(1) {
        let other = walk_in_order(sources, &order, pkt.clone(), hooks);
        if (&other.verdict, other.zone) != (&first.verdict, first.zone) {
            let names = |order: &[usize]| {
                order
                    .iter()
                    .map(|&i| sources[i].name.as_str())
                    .collect::<Vec<_>>()
                    .join(", then ")
            };
            let said = |o: &Outcome| match &o.stopped {
                Some(s) => format!("{} ({s})", o.verdict),
                None => o.verdict.to_string(),
            };
            first.stopped = Some(Stop::Order(format!(
                "at equal priority the kernel runs the base chain registered last first, which \
                 cannot be read: {} gives {}, but {} gives {}",
                names(&given),
                said(&first),
                names(&order),
                said(&other)
            )));
            first.verdict = Verdict::Unknown;
            break;
        }
    }
    first
}

/// Every order of `0..n`, the given one first.
fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![Vec::new()];
    }
    let mut out = Vec::new();
    for rest in permutations(n - 1) {
        for at in (0..=rest.len()).rev() {
            let mut p = rest.clone();
            p.insert(at, n - 1);
            out.push(p);
        }
    }
    out
}

/// The walk with equal priorities of different sources in `order` (a permutation of the
/// sources' indexes, first runs first).
fn walk_in_order(sources: &[Source<'_>], order: &[usize], pkt: Packet, hooks: &[Hook]) -> Outcome {
    let many = sources.len() > 1;
    let mut w = Walk {
        pkt,
        steps: Vec::new(),
        zone: None,
        tproxy: None,
    };
    let mut verdict = None;
    let mut stopped = None;
    let rank = |src: usize| order.iter().position(|&i| i == src).unwrap_or(usize::MAX);
    'hooks: for (n, &hook) in hooks.iter().enumerate() {
        if n > 0 {
            // Looped back over lo: no socket, no output device.
            w.pkt.in_iface = Some("lo".into());
            w.pkt.out_iface = None;
            w.pkt.uid = None;
            w.pkt.gid = None;
        }
        let mut bases: Vec<(i32, usize, usize, usize, Base)> = sources
            .iter()
            .enumerate()
            .flat_map(|(src, s)| {
                s.chains
                    .bases(hook)
                    .into_iter()
                    .enumerate()
                    .map(move |(k, b)| (b.priority, rank(src), k, src, b))
            })
            .collect();
        bases.sort_by_key(|b| (b.0, b.1, b.2));
        for (_, _, _, src, base) in bases {
            // NAT is decided once per connection, at its first hook.
            if base.nat && (n > 0 || !w.pkt.ctstate.eq_ignore_ascii_case("new")) {
                continue;
            }
            let s = &sources[src];
            let from = w.steps.len();
            let flow = s.chains.run(&base, &mut w);
            if many {
                for st in &mut w.steps[from..] {
                    st.place = Some(s.name.clone());
                }
            }
            match flow {
                Err(rule) => {
                    // A rule whose target stops the walk was looked at already: it is the
                    // stop, not a step.
                    if w.steps.last().is_some_and(|st| {
                        (st.table, st.chain.as_str(), st.rule, st.text.as_str())
                            == (
                                rule.table,
                                rule.chain.as_str(),
                                rule.rule,
                                rule.text.as_str(),
                            )
                    }) {
                        w.steps.pop();
                    }
                    stopped = Some(Stop::Rule {
                        place: many.then(|| s.name.clone()),
                        rule,
                    });
                    break 'hooks;
                }
                Ok(Flow::Accept) => {}
                Ok(Flow::Continue) if base.policy_drop => {
                    verdict = Some(Verdict::Drop);
                    break 'hooks;
                }
                Ok(Flow::Continue) => {}
                Ok(Flow::Final(v)) => {
                    verdict = Some(v);
                    break 'hooks;
                }
            }
        }
    }
    let verdict = match (&stopped, verdict, w.tproxy) {
        (Some(_), ..) => Verdict::Unknown,
        (None, Some(Verdict::Drop), _) => Verdict::Drop,
        // The socket is assigned: a later NAT does not take the packet from the proxy.
        (None, _, Some(port)) => Verdict::Tproxy {
            port,
            mark: w.pkt.mark,
        },
        (None, Some(v), None) => v,
        (None, None, None) => Verdict::NotCaptured,
    };
    Outcome {
        verdict,
        walk: w.steps,
        mark: w.pkt.mark,
        zone: w.zone,
        stopped,
    }
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
