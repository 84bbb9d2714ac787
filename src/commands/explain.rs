//! `explain`: where one packet goes, walked through the config's rules or, with
//! `--from-kernel`, through whatever the kernel holds: every place either backend may have
//! state in (iptables legacy and nft, native nftables), walked together in the kernel's
//! order ([`walk::evaluate`](crate::backend::walk::evaluate)), the packet's path (source,
//! out interface, address types) from the namespace's own addresses and routes. Output as
//! text for people or JSON for tools ([`output`](super::output)).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use std::fmt::Write as _;

use serde::Serialize;

use super::output::{Format, to_json};
use crate::backend::walk::{
    self as interp, AddrTypes, Hook, Outcome, Packet, Proto, Source, Step, Stop, Verdict, addr_type,
};
use crate::backend::{Backend, Over, Scope, StepError};
use crate::cli;
use crate::config::{Config, HostFacts};
use crate::model::{self, Family};
use crate::system::Env;
use crate::system::host_view::Probe;
use crate::system::rtnl::RTN_UNREACHABLE;

/// Direction of the packet, as seen from the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

/// What `explain` is asked (`cli::ExplainArgs`, typed): the packet, where the rules come
/// from, how to print. Addresses stay text here: [`packet`] reads them, naming the flag.
#[derive(Debug, Clone)]
pub struct ExplainRequest {
    pub direction: Direction,
    /// `--dst` ADDR:PORT.
    pub dst: String,
    /// `--src` ADDR or ADDR:PORT.
    pub src: Option<String>,
    pub proto: Proto,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub in_iface: Option<String>,
    pub out_iface: Option<String>,
    pub pod_ip: Option<IpAddr>,
    /// Walk the live rules instead of the config's.
    pub from_kernel: bool,
    pub format: Format,
}

impl From<&cli::ExplainArgs> for ExplainRequest {
    fn from(a: &cli::ExplainArgs) -> Self {
        ExplainRequest {
            direction: match a.direction {
                cli::Direction::Inbound => Direction::Inbound,
                cli::Direction::Outbound => Direction::Outbound,
            },
            dst: a.dst.clone(),
            src: a.src.clone(),
            proto: match a.proto {
                cli::ProtoArg::Tcp => Proto::Tcp,
                cli::ProtoArg::Udp => Proto::Udp,
            },
            uid: a.uid,
            gid: a.gid,
            in_iface: a.in_iface.clone(),
            out_iface: a.out_iface.clone(),
            pod_ip: a.pod_ip,
            from_kernel: a.from_kernel,
            format: a.output.into(),
        }
    }
}

/// A failure of explain/verify (not a drift: that is a result).
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("invalid value {} for {flag}: {reason}", crate::config::quoted(value))]
    BadArg {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("reading the live rules: {0}")]
    Read(Box<dyn StepError>),
}

fn parse_endpoint(
    flag: &'static str,
    s: &str,
    need_port: bool,
) -> Result<(IpAddr, Option<u16>), InspectError> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip(), Some(sa.port())));
    }
    if !need_port && let Ok(ip) = s.parse::<IpAddr>() {
        return Ok((ip, None));
    }
    let want = if need_port {
        "ADDR:PORT ([ADDR]:PORT for IPv6)"
    } else {
        "ADDR or ADDR:PORT"
    };
    Err(InspectError::BadArg {
        flag,
        value: s.to_string(),
        reason: format!("expected {want}"),
    })
}

/// The packet's endpoints as given: (destination, its port, the source and maybe its port).
type Endpoints = (IpAddr, u16, Option<(IpAddr, Option<u16>)>);

fn endpoints(args: &ExplainRequest) -> Result<Endpoints, InspectError> {
    let (dst, dport) = parse_endpoint("--dst", &args.dst, true)?;
    let src = args
        .src
        .as_deref()
        .map(|s| parse_endpoint("--src", s, false))
        .transpose()?;
    if let Some((s, _)) = src
        && s.is_ipv4() != dst.is_ipv4()
    {
        return Err(InspectError::BadArg {
            flag: "--src",
            value: args.src.clone().unwrap_or_default(),
            reason: "source and destination must be of the same family".into(),
        });
    }
    Ok((dst, dport.unwrap_or(0), src))
}

/// An address standing in for the pod (`outbound`: 192.0.2.10, 2001:db8::10) or its peer
/// (192.0.2.1, 2001:db8::1) when none is given.
fn example(v4: bool, outbound: bool) -> IpAddr {
    let (n4, n6) = if outbound { (10, 0x10) } else { (1, 1) };
    if v4 {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, n4))
    } else {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, n6))
    }
}

fn localhost(v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        IpAddr::V6(Ipv6Addr::LOCALHOST)
    }
}

/// A first packet from `src` to `dst`, nothing else known yet.
fn new_packet(proto: Proto, (src, sport): (IpAddr, u16), (dst, dport): (IpAddr, u16)) -> Packet {
    Packet {
        proto,
        src,
        sport,
        dst,
        dport,
        uid: None,
        gid: None,
        in_iface: None,
        out_iface: None,
        mark: 0,
        connmark: 0,
        ctstate: "NEW".into(),
        src_type: None,
        dst_type: None,
    }
}

/// The hooks of a packet that leaves by `out`: OUTPUT, and PREROUTING again when it is
/// looped back over lo.
fn outbound_hooks(out: &str) -> Vec<Hook> {
    if out == "lo" {
        vec![Hook::Output, Hook::Prerouting]
    } else {
        vec![Hook::Output]
    }
}

/// The packet `explain` walks through the config's rules, and the hooks it traverses:
/// the namespace is not read, so `--pod-ip` says which address is the pod's. With `ipv6`
/// on, this tool puts `::6` on lo, so it is a local address like the pod's own.
pub fn packet(args: &ExplainRequest, ipv6: bool) -> Result<(Packet, Vec<Hook>), InspectError> {
    let (dst, dport, src) = endpoints(args)?;
    let inbound_v6_source = IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6));
    let local = Some(dst) == args.pod_ip || (ipv6 && dst == inbound_v6_source);
    let loopback = dst.is_loopback() || local;
    let v4 = dst.is_ipv4();
    let src = match (src, args.direction) {
        (Some((ip, port)), _) => (ip, port.unwrap_or(40000)),
        // To one of its own addresses the kernel picks that address as the source.
        (None, Direction::Outbound) if local => (dst, 40000),
        (None, Direction::Outbound) if dst.is_loopback() => (localhost(v4), 40000),
        (None, Direction::Outbound) => match args.pod_ip {
            Some(p) if p.is_ipv4() == v4 => (p, 40000),
            _ => (example(v4, true), 40000),
        },
        (None, Direction::Inbound) => (example(v4, false), 40000),
    };
    let mut p = new_packet(args.proto, src, (dst, dport));
    let hooks = match args.direction {
        Direction::Outbound => {
            let uid = args.uid.unwrap_or(0);
            p.uid = Some(uid);
            p.gid = Some(args.gid.unwrap_or(uid));
            let out = args
                .out_iface
                .clone()
                .unwrap_or_else(|| if loopback { "lo".into() } else { "eth0".into() });
            let hooks = outbound_hooks(&out);
            p.out_iface = Some(out);
            hooks
        }
        Direction::Inbound => {
            p.in_iface = Some(args.in_iface.clone().unwrap_or_else(|| "eth0".into()));
            vec![Hook::Prerouting]
        }
    };
    Ok((p, hooks))
}

/// The address types `-m addrtype` sees for `a` ([`AddrTypes`]): from the type of its route
/// (`kind`, `RTN_*`) and whether it is one of the namespace's addresses (`own`); `None`
/// when neither could be read.
fn addr_types(a: IpAddr, kind: Option<u8>, own: Option<bool>) -> Option<AddrTypes> {
    if kind.is_none() && own.is_none() {
        return None;
    }
    let bit = |n: &str| addr_type(n).unwrap_or(0);
    let local = own == Some(true) || a.is_loopback() || kind == Some(2);
    Some(match a {
        IpAddr::V4(v4) => {
            // xt_addrtype: the type of the address in the `local` table, which holds local
            // and broadcast routes; anything else is unicast.
            let mask = if v4.is_unspecified() || v4.is_broadcast() {
                bit("BROADCAST")
            } else if v4.is_multicast() {
                bit("MULTICAST")
            } else if local {
                bit("LOCAL")
            } else if kind == Some(3) {
                bit("BROADCAST")
            } else {
                bit("UNICAST")
            };
            AddrTypes { v6: false, mask }
        }
        IpAddr::V6(v6) => {
            let mut mask = if v6.is_multicast() {
                bit("MULTICAST")
            } else if v6.is_unspecified() {
                bit("UNSPEC")
            } else {
                bit("UNICAST")
            };
            if local {
                mask |= bit("LOCAL");
            }
            // No route, or a reject route (blackhole, unreachable, prohibit).
            if matches!(kind, Some(6..=8)) {
                mask |= bit("UNREACHABLE");
            }
            AddrTypes { v6: true, mask }
        }
    })
}

/// The packet `explain --from-kernel` walks, and its hooks: its path as this namespace
/// routes it. The namespace's addresses are the pod's (`--pod-ip` is not needed); the route
/// to the destination gives the interface an outbound packet leaves by (lo for a local
/// address) and the source the kernel picks; the routes of both addresses their types for
/// `-m addrtype`. What cannot be read falls back to [`packet`]'s model, said in `warnings`.
pub fn live_packet(
    args: &ExplainRequest,
    probe: &dyn Probe,
    warnings: &mut Vec<String>,
) -> Result<(Packet, Vec<Hook>), InspectError> {
    let (dst, dport, src) = endpoints(args)?;
    let v4 = dst.is_ipv4();
    let addrs = probe.addresses();
    let own = |a: IpAddr| addrs.as_ref().map(|v| v.iter().any(|(_, x)| *x == a));
    if addrs.is_none() {
        warnings.push(
            "could not read this namespace's addresses: --pod-ip (if given) says which is the pod's"
                .into(),
        );
    } else if let Some(pod) = args.pod_ip
        && own(pod) == Some(false)
    {
        warnings.push(format!(
            "--pod-ip {pod} is not an address of this namespace; its own addresses and routes are used"
        ));
    }
    let local = |a: IpAddr| own(a).unwrap_or(Some(a) == args.pod_ip) || a.is_loopback();
    let (mut p, hooks, dst_kind) = match args.direction {
        Direction::Outbound => {
            let uid = args.uid.unwrap_or(0);
            let route = probe.route(dst, Some(uid));
            let fallback = if local(dst) { "lo" } else { "eth0" };
            let out = args
                .out_iface
                .clone()
                .or_else(|| route.as_ref().and_then(|r| r.dev.clone()))
                .unwrap_or_else(|| fallback.to_string());
            match &route {
                None => warnings.push(format!(
                    "could not look up the route to {dst}: walked as leaving by {out}"
                )),
                Some(r) if r.kind == RTN_UNREACHABLE => warnings.push(format!(
                    "this namespace has no route to {dst}: a connection fails (network \
                     unreachable) before any rule; walked as leaving by {out}"
                )),
                Some(_) => {}
            }
            let src = match src {
                Some((ip, port)) => (ip, port.unwrap_or(40000)),
                None => {
                    let picked = route.as_ref().and_then(|r| r.src).unwrap_or(if local(dst) {
                        dst
                    } else if dst.is_loopback() {
                        localhost(v4)
                    } else {
                        example(v4, true)
                    });
                    (picked, 40000)
                }
            };
            let mut p = new_packet(args.proto, src, (dst, dport));
            p.uid = Some(uid);
            p.gid = Some(args.gid.unwrap_or(uid));
            let hooks = outbound_hooks(&out);
            p.out_iface = Some(out);
            (p, hooks, route.map(|r| r.kind))
        }
        Direction::Inbound => {
            let src = match src {
                Some((ip, port)) => (ip, port.unwrap_or(40000)),
                None => (example(v4, false), 40000),
            };
            let mut p = new_packet(args.proto, src, (dst, dport));
            p.in_iface = Some(args.in_iface.clone().unwrap_or_else(|| "eth0".into()));
            let kind = probe.route(dst, None).map(|r| r.kind);
            (p, vec![Hook::Prerouting], kind)
        }
    };
    p.dst_type = addr_types(p.dst, dst_kind, own(p.dst));
    let src_kind = probe.route(p.src, None).map(|r| r.kind);
    p.src_type = addr_types(p.src, src_kind, own(p.src));
    Ok((p, hooks))
}

/// What `explain` printed, and whether it reached a verdict (for the exit code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explained {
    pub output: String,
    /// The verdict is `unknown`: a rule on the way could not be evaluated, or the order of
    /// equal priorities decides.
    pub unknown: bool,
}

/// Reads every place where `backend` may hold state; when that fails, the places the config
/// would use for `family` (said in `warnings`).
fn read_places<B: Backend>(
    backend: &B,
    family: Family,
    env: &mut Env<'_>,
    warnings: &mut Vec<String>,
) -> Result<B::State, B::Error> {
    match backend.read(Scope::Everything, env) {
        Ok(s) => Ok(s),
        Err(e) => {
            let s = backend.read(Scope::Config(&[family]), env)?;
            warnings.push(format!(
                "reading every place {} may hold state in failed ({e}); only the {family} \
                 one the config would use was read",
                backend.name()
            ));
            Ok(s)
        }
    }
}

/// Runs `explain`; returns what it prints. The rules are the config's (for `chosen`) or,
/// with `--from-kernel`, every place either backend may hold state in (`chosen`'s and
/// `other`'s), whatever the flags choose.
pub fn explain<C: Backend, O: Backend>(
    chosen: &C,
    other: &O,
    args: &ExplainRequest,
    cfg: &Config,
    facts: &HostFacts,
    env: &mut Env<'_>,
) -> Result<Explained, InspectError> {
    let mut warnings = Vec::new();
    let (pkt, hooks) = if args.from_kernel {
        live_packet(args, env.probe, &mut warnings)?
    } else {
        packet(args, facts.ipv6)?
    };
    let family = if pkt.dst.is_ipv4() {
        Family::V4
    } else {
        Family::V6
    };
    let resolver = env.resolver;
    let rules;
    let chosen_state;
    let other_state;
    let sources: Vec<Source<'_>> = if args.from_kernel {
        chosen_state = read_places(chosen, family, env, &mut warnings)
            .map_err(|e| InspectError::Read(Box::new(e)))?;
        other_state = match read_places(other, family, env, &mut warnings) {
            Ok(s) => Some(s),
            Err(e) => {
                warnings.push(format!(
                    "could not read the {} places ({e}): they are left out of the walk",
                    other.name()
                ));
                None
            }
        };
        let mut s = chosen.walk(Over::Live(&chosen_state), family, resolver);
        if let Some(st) = &other_state {
            s.extend(other.walk(Over::Live(st), family, resolver));
        }
        // Equal priorities in a fixed order, whichever backend the flags choose.
        s.sort_by(|a, b| a.name.cmp(&b.name));
        s
    } else {
        rules = chosen.build(cfg, facts);
        chosen.walk(
            Over::Config {
                rules: &rules,
                ipv6: facts.ipv6,
            },
            family,
            resolver,
        )
    };
    let outcome = interp::evaluate(&sources, pkt.clone(), &hooks);
    let capture: Vec<&str> = sources
        .iter()
        .filter(|s| s.capture)
        .map(|s| s.name.as_str())
        .collect();
    let no_capture = args.from_kernel && capture.is_empty();
    if args.from_kernel && capture.len() > 1 {
        warnings.push(several_places(&capture, &outcome));
    }
    if no_capture && outcome.verdict != Verdict::NotCaptured {
        warnings.push(
            "no capture rules of ours are installed: the verdict is other rules' doing".into(),
        );
    }
    let walked = Walked {
        outcome: &outcome,
        sources: &sources,
        live: args.from_kernel,
        no_capture,
        warnings: &warnings,
        family,
    };
    let output = match args.format {
        Format::Json => render_json(&walked),
        Format::Text => render_text(args, cfg, &pkt, &walked),
    };
    Ok(Explained {
        output,
        unknown: outcome.verdict == Verdict::Unknown,
    })
}

/// The warning when capture rules are in more than one place.
fn several_places(capture: &[&str], o: &Outcome) -> String {
    let (last, rest) = capture.split_last().expect("more than one place");
    let order = match o.stopped {
        Some(Stop::Order(_)) => "; here the order decides (see the verdict)",
        Some(Stop::Rule { .. }) => "",
        None => "; every order gives this verdict",
    };
    format!(
        "capture rules are in more than one place: {} and {last}. The kernel runs them \
         all (at each hook by priority, iptables' nat, legacy or nft, at -100 like nftables' \
         nat chains; equal priorities newest first, which cannot be read): all were walked, \
         equal priorities in the order named{order}. Keep one: `istio-iptables \
         --cleanup-only` removes them all, then apply again",
        rest.join(", ")
    )
}

/// A walk and what explain says around it.
struct Walked<'a> {
    outcome: &'a Outcome,
    sources: &'a [Source<'a>],
    /// The kernel's rules (`--from-kernel`), not the config's.
    live: bool,
    /// `--from-kernel` found no capture rules of ours for the packet's family anywhere.
    no_capture: bool,
    warnings: &'a [String],
    family: Family,
}

impl Walked<'_> {
    /// The verdict's JSON word (`no-capture-rules` when nothing of ours is installed).
    fn verdict_word(&self) -> &'static str {
        if self.no_capture && self.outcome.verdict == Verdict::NotCaptured {
            "no-capture-rules"
        } else {
            self.outcome.verdict.word()
        }
    }

    /// Where the rules are, for the header.
    fn source(&self) -> String {
        let names: Vec<&str> = self.sources.iter().map(|s| s.name.as_str()).collect();
        match (self.live, names.is_empty()) {
            (false, _) => names.join(" + "),
            (true, true) => "live rules: none installed".into(),
            (true, false) => format!("live rules: {}", names.join(" + ")),
        }
    }

    fn notes(&self) -> Vec<&'static str> {
        self.sources.iter().filter_map(|s| s.note).collect()
    }
}

/// The rule that stopped the walk, in JSON.
#[derive(Serialize)]
struct StoppedJson<'a> {
    reason: String,
    place: Option<&'a str>,
    table: Option<&'a str>,
    chain: Option<&'a str>,
    rule: Option<usize>,
    text: Option<&'a str>,
}

/// explain's JSON: the verdict, where the rules are, what to know, then every rule looked at.
#[derive(Serialize)]
struct ExplainJson<'a> {
    verdict: &'static str,
    port: Option<u32>,
    mark: Option<u32>,
    zone: Option<u16>,
    /// `config` or `live`.
    rules: &'static str,
    places: Vec<&'a str>,
    notes: Vec<&'static str>,
    warnings: &'a [String],
    stopped: Option<StoppedJson<'a>>,
    walk: &'a [Step],
}

fn render_json(w: &Walked<'_>) -> String {
    let o = w.outcome;
    let mark = (o.mark != 0).then_some(o.mark);
    let (port, mark) = match o.verdict {
        Verdict::Redirect { port } => (Some(u32::from(port)), mark),
        Verdict::Tproxy { port, mark } => (Some(u32::from(port)), Some(mark)),
        Verdict::Drop | Verdict::NotCaptured | Verdict::Unknown => (None, mark),
    };
    let stopped = o.stopped.as_ref().map(|s| match s {
        Stop::Rule { place, rule } => StoppedJson {
            reason: rule.reason.clone(),
            place: place.as_deref(),
            table: Some(rule.table),
            chain: Some(&rule.chain),
            rule: Some(rule.rule),
            text: Some(&rule.text),
        },
        Stop::Order(why) => StoppedJson {
            reason: why.clone(),
            place: None,
            table: None,
            chain: None,
            rule: None,
            text: None,
        },
    });
    to_json(&ExplainJson {
        verdict: w.verdict_word(),
        port,
        mark,
        zone: o.zone,
        rules: if w.live { "live" } else { "config" },
        places: w.sources.iter().map(|s| s.name.as_str()).collect(),
        notes: w.notes(),
        warnings: w.warnings,
        stopped,
        walk: &o.walk,
    })
}

fn render_text(args: &ExplainRequest, cfg: &Config, p: &Packet, w: &Walked<'_>) -> String {
    let o = w.outcome;
    let mut s = String::new();
    let dir = match args.direction {
        Direction::Inbound => "inbound",
        Direction::Outbound => "outbound",
    };
    let who = match (p.uid, p.gid) {
        (Some(u), Some(g)) => format!(", uid {u}, gid {g}"),
        _ => String::new(),
    };
    let iface = match (&p.in_iface, &p.out_iface) {
        (Some(i), _) => format!(", in {i}"),
        (_, Some(o)) => format!(", out {o}"),
        _ => String::new(),
    };
    let _ = writeln!(
        s,
        "{} {dir} {} {} -> {}{who}{iface}; {}",
        w.family,
        p.proto.name(),
        SocketAddr::new(p.src, p.sport),
        SocketAddr::new(p.dst, p.dport),
        w.source()
    );
    for note in w.notes() {
        let _ = writeln!(s, "  ({note})");
    }
    for warning in w.warnings {
        let _ = writeln!(s, "  warning: {warning}");
    }
    let at = |place: &Option<String>| match place {
        Some(p) => format!("[{p}] "),
        None => String::new(),
    };
    for st in &o.walk {
        let _ = writeln!(
            s,
            "  {:<5} {}{}/{} #{}: {}",
            if st.matched { "MATCH" } else { "-" },
            at(&st.place),
            st.table,
            st.chain,
            st.rule,
            st.text
        );
    }
    if let Some(Stop::Rule { place, rule }) = &o.stopped {
        let _ = writeln!(
            s,
            "  STOP  {}{}/{} #{}: {}",
            at(place),
            rule.table,
            rule.chain,
            rule.rule,
            rule.text
        );
    }
    let dst = SocketAddr::new(p.dst, p.dport);
    let verdict = match &o.verdict {
        Verdict::Redirect { port } if *port == cfg.proxy_port.get() => {
            format!("redirected to the outbound port {port} (original destination {dst} kept)")
        }
        Verdict::Redirect { port } if *port == cfg.inbound_capture_port.get() => {
            format!("redirected to the inbound port {port} (original destination {dst} kept)")
        }
        Verdict::Redirect { port } if *port == model::DNS_PROXY_PORT => {
            format!("redirected to the DNS proxy on {port} (original destination {dst} kept)")
        }
        Verdict::Redirect { port } => {
            format!("redirected to port {port} (original destination {dst} kept)")
        }
        Verdict::Tproxy { port, mark } => {
            format!(
                "TPROXY to the inbound port {port} with mark {mark} (the proxy sees {dst} as its local address)"
            )
        }
        Verdict::Drop => "dropped".into(),
        Verdict::NotCaptured if w.no_capture => format!(
            "no capture rules installed (no ISTIO_* chains in any iptables flavour for {}, no \
             native nftables table inet istio-proxy-*): not captured, it goes where it was sent",
            w.family
        ),
        Verdict::NotCaptured => "not captured: it goes where it was sent".into(),
        Verdict::Unknown => match &o.stopped {
            Some(Stop::Rule { place, rule }) => format!(
                "unknown: the walk stops at {}/{} rule {}{}, which it cannot evaluate: {}",
                rule.table,
                rule.chain,
                rule.rule,
                place
                    .as_ref()
                    .map(|p| format!(" of {p}"))
                    .unwrap_or_default(),
                rule.reason
            ),
            Some(Stop::Order(why)) => format!("unknown: {why}"),
            None => "unknown".into(),
        },
    };
    let _ = writeln!(s, "verdict: {verdict}");
    if let Some(z) = o.zone {
        let _ = writeln!(s, "conntrack zone {z} set");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Args, Command};
    use crate::config::tests::{SEED, build as config};
    use crate::model::NoResolver;

    fn explain_args(argv: &[&str]) -> ExplainRequest {
        let mut full = vec!["istio-iptables", "explain"];
        full.extend_from_slice(argv);
        match Args::parse_from(full).unwrap().command {
            Some(Command::Explain(a)) => ExplainRequest::from(&a),
            _ => panic!("not explain"),
        }
    }

    /// Runs nothing: explain walks the config's rules.
    struct NoPrograms;
    impl crate::system::exec::Runner for NoPrograms {
        fn run(
            &mut self,
            program: &str,
            _: &[String],
            _: Option<&str>,
        ) -> Result<String, crate::system::exec::ExecError> {
            panic!("explain of the config's rules runs {program}")
        }
    }

    /// `explain` of the config's rules, iptables.
    fn from_config(
        a: &ExplainRequest,
        cfg: &Config,
        facts: &HostFacts,
    ) -> Result<String, InspectError> {
        let backend = crate::backend::iptables::Iptables {
            flavor: None,
            lock_wait_secs: 0,
        };
        let mut env = Env {
            runner: &mut NoPrograms,
            probe: &crate::system::host_view::NftOnly,
            nf: &mut crate::system::nftprobe::NoWrites,
            rtnl: &mut crate::system::rtnl_change::fake::Recorder::default(),
            resolver: &NoResolver,
        };
        explain(
            &backend,
            &crate::backend::nft::Nftables,
            a,
            cfg,
            facts,
            &mut env,
        )
        .map(|e| e.output)
    }

    fn seed() -> (Config, HostFacts) {
        config(SEED, &[]).unwrap()
    }

    fn verdict(argv: &[&str], (cfg, facts): &(Config, HostFacts)) -> String {
        let mut a = explain_args(argv);
        a.format = Format::Json;
        from_config(&a, cfg, facts).unwrap()
    }

    #[test]
    fn seed_scenarios() {
        let c = seed();
        assert!(
            verdict(&["--direction", "outbound", "--dst", "10.1.2.3:80"], &c)
                .starts_with("{\"verdict\":\"redirect\",\"port\":15001")
        );
        assert!(
            verdict(
                &[
                    "--direction",
                    "outbound",
                    "--dst",
                    "10.1.2.3:80",
                    "--uid",
                    "1337"
                ],
                &c
            )
            .starts_with("{\"verdict\":\"not-captured\"")
        );
        assert!(
            verdict(&["--direction", "inbound", "--dst", "10.0.0.5:8080"], &c)
                .starts_with("{\"verdict\":\"redirect\",\"port\":15006")
        );
        assert!(
            verdict(&["--direction", "inbound", "--dst", "10.0.0.5:15090"], &c)
                .starts_with("{\"verdict\":\"not-captured\"")
        );
        assert!(
            verdict(&["--direction", "outbound", "--dst", "127.0.0.1:8080"], &c)
                .starts_with("{\"verdict\":\"not-captured\"")
        );
        let own = [
            "--direction",
            "outbound",
            "--dst",
            "10.0.0.5:8080",
            "--pod-ip",
            "10.0.0.5",
            "--uid",
            "1337",
        ];
        assert!(verdict(&own, &c).starts_with("{\"verdict\":\"redirect\",\"port\":15006"));
        let passthrough = [
            "--direction",
            "outbound",
            "--dst",
            "10.0.0.5:8080",
            "--pod-ip",
            "10.0.0.5",
            "--uid",
            "1337",
            "--src",
            "127.0.0.6",
        ];
        assert!(verdict(&passthrough, &c).starts_with("{\"verdict\":\"not-captured\""));
    }

    #[test]
    fn text_output_walks_and_concludes() {
        let a = explain_args(&["--direction", "outbound", "--dst", "10.1.2.3:80"]);
        let out = from_config(&a, &seed().0, &seed().1).unwrap();
        assert!(
            out.contains("MATCH nat/OUTPUT #1: -A OUTPUT -j ISTIO_OUTPUT"),
            "{out}"
        );
        assert!(out.ends_with("verdict: redirected to the outbound port 15001 (original destination 10.1.2.3:80 kept)\n"), "{out}");
    }

    #[test]
    fn tproxy_and_dns() {
        let c = config(&["-m", "TPROXY", "-b", "*"], &[]).unwrap();
        let v = verdict(&["--direction", "inbound", "--dst", "10.0.0.5:8080"], &c);
        assert!(
            v.starts_with("{\"verdict\":\"tproxy\",\"port\":15006,\"mark\":1337"),
            "{v}"
        );
        let c = config(&["--redirect-dns"], &[]).unwrap();
        let v = verdict(
            &[
                "--direction",
                "outbound",
                "--dst",
                "10.96.0.10:53",
                "--proto",
                "udp",
            ],
            &c,
        );
        assert!(
            v.starts_with("{\"verdict\":\"redirect\",\"port\":15053"),
            "{v}"
        );
        assert!(v.contains("\"zone\":2"), "{v}");
        let v = verdict(
            &[
                "--direction",
                "outbound",
                "--dst",
                "10.96.0.10:53",
                "--proto",
                "udp",
                "--uid",
                "1337",
            ],
            &c,
        );
        assert!(v.starts_with("{\"verdict\":\"not-captured\""), "{v}");
        assert!(v.contains("\"zone\":1"), "{v}");
    }

    #[test]
    fn bad_endpoints_are_rejected() {
        let a = explain_args(&["--direction", "outbound", "--dst", "10.1.2.3"]);
        assert!(matches!(
            from_config(&a, &seed().0, &seed().1),
            Err(InspectError::BadArg { flag: "--dst", .. })
        ));
    }

    /// A pod as the kernel shows it: 10.0.0.5 on eth0 (a /24), iptables-nft installed, its
    /// IPv4 save being `save`, no native nftables table.
    struct Pod {
        save: &'static str,
    }

    impl Probe for Pod {
        fn in_path(&self, p: &str) -> bool {
            p.contains("-nft-")
        }
        fn legacy_tables(&self, _: Family) -> Vec<String> {
            vec![]
        }
        fn nft_inet_tables(&self) -> Option<Vec<String>> {
            Some(vec![])
        }
        fn nft_tables(&self, family: Family) -> Option<usize> {
            Some(usize::from(family == Family::V4 && !self.save.is_empty()))
        }
        fn nft_chain_with_prefix(&self, _: Family, _: &str) -> Option<bool> {
            Some(false)
        }
        fn addresses(&self) -> Option<Vec<(String, IpAddr)>> {
            Some(vec![
                ("lo".into(), "127.0.0.1".parse().unwrap()),
                ("eth0".into(), "10.0.0.5".parse().unwrap()),
            ])
        }
        fn route(&self, dst: IpAddr, _: Option<u32>) -> Option<crate::system::rtnl::Route> {
            let own: IpAddr = "10.0.0.5".parse().unwrap();
            let r = |kind, dev: &str, src: Option<IpAddr>| crate::system::rtnl::Route {
                kind,
                dev: Some(dev.into()),
                src,
            };
            Some(if dst == own || dst.is_loopback() {
                r(2, "lo", Some(dst))
            } else if addr_in_net(dst, "10.0.0.0/24") {
                r(1, "eth0", Some(own))
            } else {
                crate::system::rtnl::Route {
                    kind: RTN_UNREACHABLE,
                    dev: None,
                    src: None,
                }
            })
        }
    }

    fn addr_in_net(a: IpAddr, net: &str) -> bool {
        net.parse::<ipnet::IpNet>().unwrap().contains(&a)
    }

    /// Answers `iptables-nft-save` with the pod's save.
    struct Saves(&'static str);
    impl crate::system::exec::Runner for Saves {
        fn run(
            &mut self,
            program: &str,
            _: &[String],
            _: Option<&str>,
        ) -> Result<String, crate::system::exec::ExecError> {
            assert_eq!(program, "iptables-nft-save", "explain only reads");
            Ok(self.0.to_string())
        }
    }

    fn from_kernel(save: &'static str, argv: &[&str]) -> Explained {
        let mut a = explain_args(argv);
        a.from_kernel = true;
        let (cfg, facts) = seed();
        let backend = crate::backend::iptables::Iptables {
            flavor: None,
            lock_wait_secs: 0,
        };
        let mut env = Env {
            runner: &mut Saves(save),
            probe: &Pod { save },
            nf: &mut crate::system::nftprobe::NoWrites,
            rtnl: &mut crate::system::rtnl_change::fake::Recorder::default(),
            resolver: &NoResolver,
        };
        explain(
            &backend,
            &crate::backend::nft::Nftables,
            &a,
            &cfg,
            &facts,
            &mut env,
        )
        .unwrap()
    }

    const SEED_SAVE: &str = "*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";

    /// The pod's own address is local: the packet leaves by lo, from that address, so the
    /// app's connection is not captured and the proxy's goes to the inbound side.
    #[test]
    fn from_kernel_the_pods_own_address_is_routed_over_lo() {
        let mut warnings = Vec::new();
        let a = explain_args(&["--direction", "outbound", "--dst", "10.0.0.5:8080"]);
        let (p, hooks) = live_packet(&a, &Pod { save: "" }, &mut warnings).unwrap();
        assert_eq!(p.out_iface.as_deref(), Some("lo"));
        assert_eq!(p.src, "10.0.0.5".parse::<IpAddr>().unwrap());
        assert_eq!(hooks, [Hook::Output, Hook::Prerouting]);
        assert_eq!(p.dst_type.map(|t| t.mask), addr_type("LOCAL"));
        assert!(warnings.is_empty(), "{warnings:?}");
        let own = ["--direction", "outbound", "--dst", "10.0.0.5:8080"];
        let app = from_kernel(SEED_SAVE, &[&own[..], &["--output", "json"]].concat());
        assert!(
            app.output.starts_with("{\"verdict\":\"not-captured\""),
            "{}",
            app.output
        );
        let proxy = from_kernel(SEED_SAVE, &[&own[..], &["--uid", "1337"]].concat());
        assert!(
            proxy
                .output
                .contains("redirected to the inbound port 15006"),
            "{}",
            proxy.output
        );
        assert!(
            proxy
                .output
                .starts_with("IPv4 outbound tcp 10.0.0.5:40000 -> 10.0.0.5:8080, uid 1337, gid 1337, out lo; live rules: iptables-nft, IPv4\n"),
            "{}",
            proxy.output
        );
        let peer = from_kernel(
            SEED_SAVE,
            &["--direction", "outbound", "--dst", "10.0.0.9:80"],
        );
        assert!(peer.output.contains(", out eth0;"), "{}", peer.output);
        assert!(
            peer.output.contains("outbound port 15001"),
            "{}",
            peer.output
        );
        // --pod-ip that is not the namespace's: said, and not used.
        let wrong = from_kernel(
            SEED_SAVE,
            &[
                "--direction",
                "outbound",
                "--dst",
                "10.0.0.7:80",
                "--pod-ip",
                "10.0.0.7",
            ],
        );
        assert!(
            wrong
                .output
                .contains("warning: --pod-ip 10.0.0.7 is not an address"),
            "{}",
            wrong.output
        );
        assert!(wrong.output.contains(", out eth0;"), "{}", wrong.output);
    }

    #[test]
    fn from_kernel_with_nothing_installed_says_so() {
        let out = from_kernel("", &["--direction", "outbound", "--dst", "10.0.0.9:80"]);
        assert!(
            out.output.contains("; live rules: none installed\n"),
            "{}",
            out.output
        );
        assert!(
            out.output
                .contains("verdict: no capture rules installed (no ISTIO_* chains"),
            "{}",
            out.output
        );
        let json = from_kernel(
            "",
            &[
                "--direction",
                "outbound",
                "--dst",
                "10.0.0.9:80",
                "--output",
                "json",
            ],
        );
        assert!(
            json.output.starts_with("{\"verdict\":\"no-capture-rules\""),
            "{}",
            json.output
        );
        assert!(!json.unknown);
    }

    /// kube-proxy's random pick ends the walk: verdict unknown, the walk so far and the rule,
    /// text and JSON.
    #[test]
    fn from_kernel_a_rule_it_cannot_evaluate_ends_the_walk_unknown() {
        const SAVE: &str = "*nat
:OUTPUT ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
:KUBE-SVC-X - [0:0]
-A OUTPUT -d 10.96.0.0/12 -j KUBE-SVC-X
-A OUTPUT -j ISTIO_OUTPUT
-A KUBE-SVC-X -m comment --comment svc -m statistic --mode random --probability 0.5 -j RETURN
-A ISTIO_OUTPUT -j RETURN
COMMIT
";
        let argv = ["--direction", "outbound", "--dst", "10.96.0.10:80"];
        let text = from_kernel(SAVE, &argv);
        assert!(text.unknown);
        assert!(
            text.output.contains(
                "  MATCH nat/OUTPUT #1: -A OUTPUT -d 10.96.0.0/12 -j KUBE-SVC-X\n  STOP  nat/KUBE-SVC-X #1:"
            ),
            "{}",
            text.output
        );
        assert!(
            text.output.contains(
                "verdict: unknown: the walk stops at nat/KUBE-SVC-X rule 1, which it cannot evaluate: unknown match \"statistic\""
            ),
            "{}",
            text.output
        );
        let json = from_kernel(SAVE, &[&argv[..], &["--output", "json"]].concat());
        assert!(
            json.output
                .starts_with("{\"verdict\":\"unknown\",\"port\":null")
        );
        assert!(
            json.output.contains(
                "\"stopped\":{\"reason\":\"unknown match \\\"statistic\\\"\",\"place\":null,\"table\":\"nat\",\"chain\":\"KUBE-SVC-X\",\"rule\":1,"
            ),
            "{}",
            json.output
        );
        // A packet the rule is not about passes it by.
        let other = from_kernel(SAVE, &["--direction", "outbound", "--dst", "10.0.0.9:80"]);
        assert!(!other.unknown, "{}", other.output);
    }
}
