//! `explain`: where one packet goes, walked through the config's rules or, with
//! `--from-kernel`, through the live ones of the chosen backend. Output as text for people
//! or JSON for tools ([`output`](super::output)).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use std::fmt::Write as _;

use serde::Serialize;

use super::output::{Format, to_json};
use crate::backend::walk::{self as interp, Outcome, Packet, Proto, Step, Verdict};
use crate::backend::{Backend, Scope, StepError};
use crate::cli;
use crate::config::{Config, HostFacts};
use crate::model::{self, Family};
use crate::system::Env;

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
    #[error(transparent)]
    Unsupported(#[from] interp::Unsupported),
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

/// The packet `explain` walks, and the hooks it traverses.
/// With `ipv6` on, this tool puts `::6` on lo, so it is a local address like the pod's own.
pub fn packet(
    args: &ExplainRequest,
    ipv6: bool,
) -> Result<(Packet, Vec<interp::Hook>), InspectError> {
    let (dst, dport) = parse_endpoint("--dst", &args.dst, true)?;
    let dport = dport.unwrap_or(0);
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
    let proto = args.proto;
    let inbound_v6_source = IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6));
    let local = Some(dst) == args.pod_ip || (ipv6 && dst == inbound_v6_source);
    let loopback = dst.is_loopback() || local;
    let v4 = dst.is_ipv4();
    let (src_ip, sport) = match (src, args.direction) {
        (Some((ip, port)), _) => (ip, port.unwrap_or(40000)),
        // To one of its own addresses the kernel picks that address as the source.
        (None, Direction::Outbound) if local => (dst, 40000),
        (None, Direction::Outbound) if dst.is_loopback() => (
            if v4 {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                IpAddr::V6(Ipv6Addr::LOCALHOST)
            },
            40000,
        ),
        (None, Direction::Outbound) => match args.pod_ip {
            Some(p) if p.is_ipv4() == v4 => (p, 40000),
            _ => (
                if v4 {
                    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10))
                } else {
                    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10))
                },
                40000,
            ),
        },
        (None, Direction::Inbound) => (
            if v4 {
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))
            } else {
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))
            },
            40000,
        ),
    };
    let mut p = Packet {
        proto,
        src: src_ip,
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
    };
    let hooks: Vec<interp::Hook> = match args.direction {
        Direction::Outbound => {
            let uid = args.uid.unwrap_or(0);
            p.uid = Some(uid);
            p.gid = Some(args.gid.unwrap_or(uid));
            let out = args
                .out_iface
                .clone()
                .unwrap_or_else(|| if loopback { "lo".into() } else { "eth0".into() });
            let via_lo = out == "lo";
            p.out_iface = Some(out);
            if via_lo {
                vec![interp::OUTPUT_HOOK, interp::PREROUTING_HOOK]
            } else {
                vec![interp::OUTPUT_HOOK]
            }
        }
        Direction::Inbound => {
            p.in_iface = Some(args.in_iface.clone().unwrap_or_else(|| "eth0".into()));
            vec![interp::PREROUTING_HOOK]
        }
    };
    Ok((p, hooks))
}

/// Runs `explain` with `backend`; returns the rendered output. The rules are the config's
/// or, with `--from-kernel` (`env` given), the live ones.
pub fn explain<B: Backend>(
    backend: &B,
    args: &ExplainRequest,
    cfg: &Config,
    facts: &HostFacts,
    env: &mut Env<'_>,
) -> Result<String, InspectError> {
    let (pkt, hooks) = packet(args, facts.ipv6)?;
    let family = if pkt.dst.is_ipv4() {
        Family::V4
    } else {
        Family::V6
    };
    let rules = backend.build(cfg, facts);
    let live = if args.from_kernel {
        let state = backend
            .read(Scope::Config(&[family]), env)
            .map_err(|e| InspectError::Read(Box::new(e)))?;
        Some(state)
    } else {
        None
    };
    let walked = backend.walk(
        &rules,
        live.as_ref(),
        facts.ipv6,
        &pkt,
        &hooks,
        env.resolver,
    )?;
    Ok(match args.format {
        Format::Json => render_json(&walked.outcome),
        Format::Text => render_text(
            args,
            cfg,
            &pkt,
            &walked.outcome,
            walked.source,
            family,
            walked.note,
        ),
    })
}

fn verdict_word(o: &Outcome) -> (&'static str, Option<u32>, Option<u32>) {
    let mark = (o.mark != 0).then_some(o.mark);
    match o.verdict {
        Verdict::Redirect { port } => ("redirect", Some(u32::from(port)), mark),
        Verdict::Tproxy { port, mark } => ("tproxy", Some(u32::from(port)), Some(mark)),
        Verdict::Drop => ("drop", None, mark),
        Verdict::NotCaptured => ("not-captured", None, mark),
    }
}

/// explain's JSON: the verdict, then every rule looked at.
#[derive(Serialize)]
struct ExplainJson<'a> {
    verdict: &'static str,
    port: Option<u32>,
    mark: Option<u32>,
    zone: Option<u16>,
    walk: &'a [Step],
}

fn render_json(o: &Outcome) -> String {
    let (verdict, port, mark) = verdict_word(o);
    let json = ExplainJson {
        verdict,
        port,
        mark,
        zone: o.zone,
        walk: &o.walk,
    };
    to_json(&json)
}

fn render_text(
    args: &ExplainRequest,
    cfg: &Config,
    p: &Packet,
    o: &Outcome,
    source: &str,
    family: Family,
    note: Option<&str>,
) -> String {
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
        "{family} {dir} {} {} -> {}{who}{iface}; {source}",
        p.proto.name(),
        SocketAddr::new(p.src, p.sport),
        SocketAddr::new(p.dst, p.dport)
    );
    if let Some(note) = note {
        let _ = writeln!(s, "  ({note})");
    }
    for st in &o.walk {
        let _ = writeln!(
            s,
            "  {:<5} {}/{} #{}: {}",
            if st.matched { "MATCH" } else { "-" },
            st.table,
            st.chain,
            st.rule,
            st.text
        );
    }
    let dst = SocketAddr::new(p.dst, p.dport);
    let verdict = match o.verdict {
        Verdict::Redirect { port } if port == cfg.proxy_port.get() => {
            format!("redirected to the outbound port {port} (original destination {dst} kept)")
        }
        Verdict::Redirect { port } if port == cfg.inbound_capture_port.get() => {
            format!("redirected to the inbound port {port} (original destination {dst} kept)")
        }
        Verdict::Redirect { port } if port == model::DNS_PROXY_PORT => {
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
        Verdict::NotCaptured => "not captured: it goes where it was sent".into(),
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
        match Args::parse_from(full).unwrap().cli.command {
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
            resolver: &NoResolver,
        };
        explain(&backend, a, cfg, facts, &mut env)
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
}
