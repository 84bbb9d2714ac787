//! The `explain` and `verify` commands: glue between the config, the live state and the pure
//! pieces (`interp` and `nftinterp` walk a packet, `reconcile::diff` and `nftverify` compare
//! chains). Output as text for people or JSON for tools (`output`).

mod output;

pub use self::output::render_report;
use self::output::{render_json, render_text};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::backend::iptables::build as rules;
use crate::backend::iptables::detect;
use crate::backend::iptables::plan::{self as reconcile, ChainDiff};
use crate::backend::iptables::save::{SaveState, parse_save};
use crate::backend::iptables::walk::Ruleset;
use crate::backend::nft::build as nft;
use crate::backend::nft::state::{self as nftstate, NftState};
use crate::backend::walk::{self as interp, Packet, Proto};
use crate::cli;
use crate::config::{BackendChoice, Config, HostFacts};
use crate::model::OwnerResolver;
use crate::model::{Family, Rule, Table};
use crate::routes as ip;
use crate::system::exec::{ExecError, Runner};
use crate::system::host_view::Probe;

/// How a result is printed: text for people, JSON for tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

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

impl From<cli::Output> for Format {
    fn from(o: cli::Output) -> Self {
        match o {
            cli::Output::Text => Format::Text,
            cli::Output::Json => Format::Json,
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
    #[error("reading the live {family} rules: {reason}")]
    Read { family: Family, reason: String },
    #[error("reading the live nftables rules (`nft list ruleset inet`): {reason}")]
    ReadNft { reason: String },
    #[error(transparent)]
    Unsupported(#[from] interp::Unsupported),
}

/// The config's rules of one family as chains in their final order.
pub fn ruleset_from_rules(rules: &[Rule]) -> Ruleset {
    let mut rs = Ruleset::new();
    for r in rules {
        let chain = rs
            .entry(r.table)
            .or_default()
            .entry(r.chain.to_string())
            .or_default();
        let item = (format!("-A {} {}", r.chain, r.spec()), r.args.clone());
        r.position.place(chain, item);
    }
    rs
}

/// Live rules as chains.
pub fn ruleset_from_state(st: &SaveState) -> Ruleset {
    let mut rs = Ruleset::new();
    // Only our tables: a hook walks nothing else.
    let ours = st
        .tables
        .iter()
        .filter_map(|(n, ts)| Some((Table::from_name(n)?, ts)));
    for (table, ts) in ours {
        for (chain, toks) in &ts.rules {
            rs.entry(table)
                .or_default()
                .entry(chain.clone())
                .or_default()
                .push((format!("-A {chain} {}", toks.join(" ")), toks.clone()));
        }
    }
    rs
}

/// The live rules `explain --from-kernel` walks, of the backend the config names.
#[derive(Debug, Clone)]
pub enum Live {
    /// One family's iptables-save.
    Iptables(SaveState),
    /// Our nftables tables.
    Nft(NftState),
}

/// The program and arguments that list the live nftables rules (only the `inet` family: our
/// tables; iptables-nft's `ip`/`ip6` tables are not read).
pub const NFT_LIST: (&str, [&str; 3]) = ("nft", ["list", "ruleset", "inet"]);

/// Reads our live nftables tables.
pub fn read_live_nft(
    runner: &mut dyn Runner,
    resolver: &dyn OwnerResolver,
) -> Result<nftstate::Live, InspectError> {
    let (program, args) = NFT_LIST;
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let text = runner
        .run(program, &args, None)
        .map_err(|e| InspectError::ReadNft {
            reason: e.to_string(),
        })?;
    nftstate::parse_listing(&text, resolver).map_err(|e| InspectError::ReadNft {
        reason: e.to_string(),
    })
}

/// Reads the live state of one family with the backend detection uses.
pub fn read_live(
    family: Family,
    cfg: &Config,
    probe: &dyn Probe,
    runner: &mut dyn Runner,
) -> Result<SaveState, InspectError> {
    let b = detect::detect(family, cfg.backend.forced_flavor(), probe).map_err(|e| {
        InspectError::Read {
            family,
            reason: e.to_string(),
        }
    })?;
    let text = runner
        .run(&b.save_program(), &[], None)
        .map_err(|e: ExecError| InspectError::Read {
            family,
            reason: e.to_string(),
        })?;
    parse_save(&text).map_err(|e| InspectError::Read {
        family,
        reason: e.to_string(),
    })
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

/// Runs `explain`; returns the rendered output. The rules are the config's (`live: None`),
/// of the backend it names (`--native-nftables`), or the live ones given.
pub fn explain(
    args: &ExplainRequest,
    cfg: &Config,
    facts: &HostFacts,
    resolver: &dyn OwnerResolver,
    live: Option<&Live>,
) -> Result<String, InspectError> {
    let (pkt, hooks) = packet(args, facts.ipv6)?;
    let family = if pkt.dst.is_ipv4() {
        Family::V4
    } else {
        Family::V6
    };
    let v6_off = family == Family::V6 && !facts.ipv6;
    let (outcome, source, note) = match live {
        Some(Live::Iptables(st)) => {
            let rs = ruleset_from_state(st);
            let o = crate::backend::iptables::walk::evaluate(&rs, resolver, pkt.clone(), &hooks)?;
            (o, "live rules (iptables-save)", None)
        }
        Some(Live::Nft(st)) => {
            let o = nft_evaluate(st, resolver, &pkt, &hooks)?;
            (o, "live rules (nft list ruleset inet)", None)
        }
        None if matches!(cfg.backend, BackendChoice::Nftables { .. }) => {
            let st = nftstate::desired(&nft::build(cfg, facts), resolver);
            let o = nft_evaluate(&st, resolver, &pkt, &hooks)?;
            let note = v6_off.then_some(
                "IPv6 is off for this config: no ip6 rules are generated, but inet rules that name no address see IPv6 too",
            );
            (o, "nftables rules from the config", note)
        }
        None => {
            let plan = rules::build(cfg, facts);
            let rs = ruleset_from_rules(plan.rules(family));
            let o = crate::backend::iptables::walk::evaluate(&rs, resolver, pkt.clone(), &hooks)?;
            let note = (family == Family::V6 && !plan.ipv6)
                .then_some("IPv6 is off for this config: no ip6tables rules are generated");
            (o, "rules from the config", note)
        }
    };
    Ok(match args.format {
        Format::Json => render_json(&outcome),
        Format::Text => render_text(args, cfg, &pkt, &outcome, source, family, note),
    })
}

fn nft_evaluate(
    st: &NftState,
    resolver: &dyn OwnerResolver,
    pkt: &Packet,
    hooks: &[interp::Hook],
) -> Result<interp::Outcome, InspectError> {
    let hooks: Vec<crate::backend::nft::walk::NftHook> = hooks
        .iter()
        .map(|h| crate::backend::nft::walk::hook_of(h))
        .collect();
    Ok(crate::backend::nft::walk::evaluate(
        st,
        resolver,
        pkt.clone(),
        &hooks,
    )?)
}

/// The result of `verify`.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub diffs: Vec<(Family, ChainDiff)>,
    /// With `--native-nftables`: our nftables tables' differences.
    pub nft: Vec<crate::backend::nft::drift::NftDiff>,
    /// Capture rules of the other backend in the namespace (ISTIO_* iptables rules with
    /// `--native-nftables`, our nftables tables without): a pod must never have both.
    pub other_backend: Vec<String>,
    /// `ip` commands whose effect is missing.
    pub routes_missing: Vec<String>,
    /// TPROXY routing an earlier run added that the config does not want (as the `ip`
    /// commands that added it).
    pub routes_extra: Vec<String>,
}

impl Report {
    pub fn drift(&self) -> bool {
        !self.diffs.is_empty()
            || !self.nft.is_empty()
            || !self.other_backend.is_empty()
            || !self.routes_missing.is_empty()
            || !self.routes_extra.is_empty()
    }
}

/// Compares live state with the config, both families (or our nftables tables, with
/// `--native-nftables`), and the `ip` plumbing.
pub fn verify(
    cfg: &Config,
    facts: &HostFacts,
    probe: &dyn Probe,
    runner: &mut dyn Runner,
    resolver: &dyn OwnerResolver,
) -> Result<Report, InspectError> {
    if matches!(cfg.backend, BackendChoice::Nftables { .. }) {
        return verify_nft(cfg, facts, probe, runner, resolver);
    }
    let plan = rules::build(cfg, facts);
    let mut report = Report::default();
    for family in plan.families() {
        let st = read_live(family, cfg, probe, runner)?;
        for d in reconcile::diff(&st, plan.rules(family), resolver) {
            report.diffs.push((family, d));
        }
    }
    // Our nftables tables, when this namespace can tell (netlink, no `nft` run).
    for name in probe.nft_inet_tables().unwrap_or_default() {
        if nft::Table::from_name(&name).is_some() {
            report.other_backend.push(format!(
                "nftables table {} {name}, written by --native-nftables",
                nft::FAMILY
            ));
        }
    }
    check_routes(&plan.ip, probe, runner, &mut report)?;
    Ok(report)
}

fn verify_nft(
    cfg: &Config,
    facts: &HostFacts,
    probe: &dyn Probe,
    runner: &mut dyn Runner,
    resolver: &dyn OwnerResolver,
) -> Result<Report, InspectError> {
    let ruleset = nft::build(cfg, facts);
    let want = nftstate::desired(&ruleset, resolver);
    let live = read_live_nft(runner, resolver)?;
    let mut report = Report {
        nft: crate::backend::nft::drift::diff(&live.state, &want),
        ..Report::default()
    };
    for family in [Family::V4, Family::V6] {
        if let Some(st) = read_iptables_if_installed(family, cfg, probe, runner)? {
            report
                .other_backend
                .extend(istio_iptables_leftovers(family, &st));
        }
    }
    check_routes(&ruleset.ip, probe, runner, &mut report)?;
    Ok(report)
}

/// The iptables rules of `family`, or `None` when no iptables is installed to read them.
fn read_iptables_if_installed(
    family: Family,
    cfg: &Config,
    probe: &dyn Probe,
    runner: &mut dyn Runner,
) -> Result<Option<SaveState>, InspectError> {
    let Ok(b) = detect::detect(family, cfg.backend.forced_flavor(), probe) else {
        return Ok(None);
    };
    let text = match runner.run(&b.save_program(), &[], None) {
        Ok(t) => t,
        Err(ExecError::NotFound { .. }) => return Ok(None),
        Err(e) => {
            return Err(InspectError::Read {
                family,
                reason: e.to_string(),
            });
        }
    };
    parse_save(&text).map(Some).map_err(|e| InspectError::Read {
        family,
        reason: e.to_string(),
    })
}

/// Our iptables chains, and rules jumping to them, per table: one line each.
fn istio_iptables_leftovers(family: Family, st: &SaveState) -> Vec<String> {
    let ours = |s: &str| s.starts_with(crate::model::chain::PREFIX);
    let mut out = Vec::new();
    for (name, ts) in &st.tables {
        let chains: Vec<&str> = ts
            .user_chains
            .iter()
            .map(String::as_str)
            .filter(|c| ours(c))
            .collect();
        let rules = ts
            .rules
            .iter()
            .filter(|(c, toks)| ours(c) || toks.iter().any(|t| ours(t)))
            .count();
        if !chains.is_empty() || rules > 0 {
            out.push(format!(
                "{family} iptables table {name}: {rules} ISTIO_* rule(s), chains {}",
                if chains.is_empty() {
                    "-".to_string()
                } else {
                    chains.join(",")
                }
            ));
        }
    }
    out
}

/// The `ip` plumbing: missing steps, and TPROXY routing the config does not want.
fn check_routes(
    wanted: &[ip::IpCommand],
    probe: &dyn Probe,
    runner: &mut dyn Runner,
    report: &mut Report,
) -> Result<(), InspectError> {
    for family in [Family::V4, Family::V6] {
        if let Some(routing) = probe.routing(family) {
            for cmd in ip::leftovers(family, &routing, wanted) {
                report.routes_extra.push(cmd.to_string());
            }
        }
    }
    for cmd in wanted {
        match ip::present(cmd, probe, runner) {
            Ok(true) => {}
            Ok(false) => report.routes_missing.push(cmd.to_string()),
            Err(e) => {
                return Err(InspectError::Read {
                    family: Family::V4,
                    reason: format!("checking `{cmd}`: {e}"),
                });
            }
        }
    }
    Ok(())
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

    fn seed() -> (Config, HostFacts) {
        config(SEED, &[]).unwrap()
    }

    fn verdict(argv: &[&str], (cfg, facts): &(Config, HostFacts)) -> String {
        let mut a = explain_args(argv);
        a.format = Format::Json;
        explain(&a, cfg, facts, &NoResolver, None).unwrap()
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
        let out = explain(&a, &seed().0, &seed().1, &NoResolver, None).unwrap();
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
            explain(&a, &seed().0, &seed().1, &NoResolver, None),
            Err(InspectError::BadArg { flag: "--dst", .. })
        ));
    }

    #[test]
    fn report_renders_drift() {
        let r = Report {
            diffs: vec![(
                Family::V4,
                ChainDiff {
                    table: crate::model::Table::Nat,
                    chain: "ISTIO_OUTPUT".into(),
                    missing: vec!["-A X".into()],
                    extra: vec![],
                    out_of_order: false,
                },
            )],
            ..Report::default()
        };
        assert!(render_report(&r, Format::Text).contains("missing:  -A X"));
        assert!(
            render_report(&r, Format::Json)
                .starts_with("{\"match\":false,\"differences\":[{\"family\":\"ipv4\"")
        );
        assert!(!render_report(&r, Format::Json).contains("routes_extra"));
        let extra = Report {
            routes_extra: vec!["ip -4 rule add fwmark 1400 lookup 140".into()],
            ..Report::default()
        };
        assert!(extra.drift());
        assert!(render_report(&extra, Format::Text).contains(
            "routes: not wanted, left by an earlier run `ip -4 rule add fwmark 1400 lookup 140`"
        ));
        assert!(
            render_report(&extra, Format::Json)
                .ends_with(",\"routes_extra\":[\"ip -4 rule add fwmark 1400 lookup 140\"]}\n")
        );
    }

    /// A machine with iptables-nft, answering `nft list ruleset inet` and the save
    /// programs from fixed text.
    struct Machine {
        nft: String,
        iptables_save: Result<String, ()>,
    }

    impl Runner for Machine {
        fn run(
            &mut self,
            program: &str,
            args: &[String],
            _: Option<&str>,
        ) -> Result<String, ExecError> {
            match program {
                "nft" => {
                    assert_eq!(args, ["list", "ruleset", "inet"]);
                    Ok(self.nft.clone())
                }
                "iptables-nft-save" => {
                    self.iptables_save
                        .clone()
                        .map_err(|()| ExecError::NotFound {
                            program: program.into(),
                        })
                }
                "ip6tables-nft-save" => Ok(String::new()),
                other => panic!("unexpected program {other}"),
            }
        }
    }

    use crate::system::host_view::NftOnly;

    /// `st` as `nft list ruleset` prints it.
    fn listing(st: &NftState) -> String {
        let mut s = String::new();
        for (t, ts) in &st.tables {
            s.push_str(&format!("table inet {} {{\n", t.name()));
            for c in &ts.chains {
                s.push_str(&format!("\tchain {} {{\n", c.name));
                if let Some(h) = &c.hook {
                    s.push_str(&format!(
                        "\t\ttype {} hook {} priority {}; policy {};\n",
                        h.kind, h.hook, h.priority, h.policy
                    ));
                }
                for r in &c.rules {
                    s.push_str(&format!("\t\t{r}\n"));
                }
                s.push_str("\t}\n");
            }
            s.push_str("}\n");
        }
        s
    }

    #[test]
    fn nft_verify_reads_the_listing_and_the_other_backend() {
        let mut args = vec!["verify", "--native-nftables"];
        args.extend_from_slice(SEED);
        let (cfg, facts) = config(&args, &[]).unwrap();
        let want = nftstate::desired(&nft::build(&cfg, &facts), &NoResolver);
        let mut m = Machine {
            nft: listing(&want),
            iptables_save: Err(()),
        };
        let r = verify(&cfg, &facts, &NftOnly, &mut m, &NoResolver).unwrap();
        assert!(!r.drift(), "{r:?}");

        let mut live = want.clone();
        let gone = live.tables.get_mut(&nft::Table::Nat).unwrap().chains[1]
            .rules
            .remove(0);
        m.nft = listing(&live);
        m.iptables_save = Ok("*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n".into());
        let r = verify(&cfg, &facts, &NftOnly, &mut m, &NoResolver).unwrap();
        assert_eq!(r.nft.len(), 1);
        assert_eq!(r.nft[0].missing, [gone]);
        assert_eq!(
            r.other_backend,
            ["IPv4 iptables table nat: 1 ISTIO_* rule(s), chains ISTIO_OUTPUT"]
        );
        let text = render_report(&r, Format::Text);
        assert!(
            text.contains("other backend: IPv4 iptables table nat"),
            "{text}"
        );
        let json = render_report(&r, Format::Json);
        assert!(
            json.contains(",\"other_backend\":[\"IPv4 iptables table nat: 1 ISTIO_* rule(s), chains ISTIO_OUTPUT\"],\"routes_missing\":[]}"),
            "{json}"
        );
    }

    #[test]
    fn nft_report_renders_tables_chains_and_unread_lines() {
        let r = Report {
            nft: vec![
                crate::backend::nft::drift::NftDiff {
                    table: "istio-proxy-raw",
                    chain: None,
                    extra: vec!["table inet istio-proxy-raw".into()],
                    unread: vec!["flags dormant".into()],
                    ..Default::default()
                },
                crate::backend::nft::drift::NftDiff {
                    table: "istio-proxy-nat",
                    chain: Some("output".into()),
                    out_of_order: true,
                    ..Default::default()
                },
            ],
            ..Report::default()
        };
        assert!(r.drift());
        assert_eq!(
            render_report(&r, Format::Text),
            "DRIFT: the live rules differ from the config\n\
             inet istio-proxy-raw:\n\
             \x20 extra:    table inet istio-proxy-raw\n\
             \x20 not read: flags dormant   (nft lists something this tool never writes: see `nft list table inet istio-proxy-raw`)\n\
             inet istio-proxy-nat/output:\n\
             \x20 out of order: the same rules are there, in another order\n"
        );
        assert_eq!(
            render_report(&r, Format::Json),
            "{\"match\":false,\"differences\":[\
             {\"family\":\"inet\",\"table\":\"istio-proxy-raw\",\"chain\":null,\"missing\":[],\"extra\":[\"table inet istio-proxy-raw\"],\"out_of_order\":false,\"unread\":[\"flags dormant\"]},\
             {\"family\":\"inet\",\"table\":\"istio-proxy-nat\",\"chain\":\"output\",\"missing\":[],\"extra\":[],\"out_of_order\":true}],\
             \"routes_missing\":[]}\n"
        );
    }
}
