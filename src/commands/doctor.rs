//! `doctor`: will the capture work in this namespace, and if not, exactly why. Read-only: it
//! reads what an apply reads ([`apply::read`], the same detection and snapshot), works out
//! what the apply would do ([`apply::plan`]) and compares the snapshot with the config
//! ([`verify::report`]); then what the host shows without a change: kernel support, the
//! capabilities, the namespace lock, addresses and DNS; with `--probe`, the validation
//! probe per family. Every problem is a [`Finding`] with its fix; `blocking` ones make the
//! exit code 7, warnings do not.

use std::fmt::Write as _;

use serde::Serialize;

use super::apply::{self, Options};
use super::output::{Format, to_json};
use super::{validate, verify};
use crate::backend::{Backend, Inventory, Place, PlaceView};
use crate::cli::Exit;
use crate::config::{Config, HostFacts};
use crate::system::Env;
use crate::system::host;
use crate::system::kernel_support::{Feature, Kernel, Support};
use crate::system::nslock;

/// What doctor found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Whether capture works as configured (or an apply would make it so).
    pub ok: bool,
    pub verdict: String,
    pub backend: BackendView,
    /// Every place our state can live, with what it holds.
    pub places: Vec<PlaceState>,
    /// How many places hold capture state of ours.
    pub places_with_capture_state: usize,
    pub routes: Routes,
    pub kernel: Vec<KernelSupport>,
    pub permissions: Permissions,
    pub addresses: Addresses,
    /// `--probe`: one outcome per family.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<Vec<ProbeOutcome>>,
    pub findings: Vec<Finding>,
}

/// The backend a run would choose, and why.
#[derive(Debug, Clone, Serialize)]
pub struct BackendView {
    /// `iptables` or `nftables`.
    pub chosen: &'static str,
    /// Where the config's rules would go, and why: one per family (one for nftables).
    pub targets: Vec<Target>,
    /// The programs looked for.
    pub programs: Vec<ProgramView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub place: String,
    pub program: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProgramView {
    pub program: String,
    pub installed: bool,
    pub version: Option<String>,
}

/// One place and what it holds against the config.
#[derive(Debug, Clone, Serialize)]
pub struct PlaceState {
    pub place: String,
    /// `matches`, `differs` (another config of ours), `stale` (our state where this
    /// config's rules do not go), `empty`, `not installed`.
    pub state: &'static str,
    /// The config's rules go here.
    pub target: bool,
    /// Tables: name, rules, rules of ours.
    pub tables: Vec<TableView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TableView {
    pub name: String,
    pub rules: usize,
    pub ours: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Routes {
    pub missing: Vec<String>,
    pub extra: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KernelSupport {
    pub feature: String,
    #[serde(flatten)]
    pub support: Support,
}

#[derive(Debug, Clone, Serialize)]
pub struct Permissions {
    /// The capabilities an apply checks for, and those of them this process lacks.
    pub capabilities_needed: Vec<&'static str>,
    pub capabilities_missing: Vec<&'static str>,
    /// The namespace lock an apply takes.
    pub lock: String,
    /// Who holds it now.
    pub lock_holder: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Addresses {
    /// `interface address`, as the namespace holds them.
    pub addresses: Vec<String>,
    /// The families the config's rules go to.
    pub rules_for: Vec<String>,
    pub dns_capture: bool,
    /// The DNS servers a DNS capture would use (resolv.conf), when --redirect-dns.
    pub dns_servers: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProbeOutcome {
    pub family: String,
    pub captured: bool,
    pub detail: String,
}

/// A problem, with its fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub problem: String,
    pub fix: String,
    /// Capture does not work as configured until it is fixed (else a warning).
    pub blocking: bool,
}

impl Finding {
    fn error(problem: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            problem: problem.into(),
            fix: fix.into(),
            blocking: true,
        }
    }
    fn warning(problem: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            blocking: false,
            ..Finding::error(problem, fix)
        }
    }
}

impl Report {
    pub fn exit(&self) -> Exit {
        if self.ok {
            Exit::Success
        } else {
            Exit::Unhealthy
        }
    }
}

/// What `doctor` is asked.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    /// Send the validation probe.
    pub probe: bool,
}

/// Diagnoses the namespace we are in for `cfg` with `chosen` (`other`: the backend not
/// chosen, whose state of ours matters too). Changes nothing.
pub fn doctor<C: Backend, O: Backend>(
    chosen: &C,
    other: &O,
    cfg: &Config,
    facts: &HostFacts,
    req: Request,
    env: &mut Env<'_>,
) -> Report {
    let mut findings = Vec::new();

    // Permissions first: without them the reads below fail, and this says why.
    let needed = apply::capabilities_needed(chosen, other);
    let missing = host::missing_caps(&needed);
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|c| c.name()).collect();
        let e = host::MissingCapabilities {
            missing: missing.clone(),
        };
        findings.push(Finding::error(
            e.to_string(),
            format!(
                "add to the container's securityContext: capabilities: {{add: [{}]}}",
                names.join(", ")
            ),
        ));
    }

    // The apply's reads and plan: the same code, stopped before its first change.
    let opts = Options::from_config(cfg);
    let mut report = verify::Report::default();
    let (chosen_inv, other_inv, read_ok) = match apply::read(chosen, other, cfg, facts, env) {
        Ok(mut snap) => {
            if let Err(e) = apply::plan(chosen, other, cfg, facts, &opts, &mut snap, env) {
                let fix = if e.is_conflict() {
                    "--reconcile=true (the default) replaces it, or --cleanup-only removes it \
                     first"
                } else {
                    "fix what the message names, then run doctor again"
                };
                findings.push(Finding::error(
                    format!("an apply would stop before its first change: {e}"),
                    fix,
                ));
            }
            match verify::report(chosen, other, cfg, &snap.rules, &snap.state, env) {
                Ok(r) => report = r,
                Err(e) => findings.push(Finding::error(
                    format!("{:#}", anyhow::Error::from(e)),
                    "fix what the message names, then run doctor again",
                )),
            }
            let other_rules = other.build(cfg, facts);
            (
                chosen.inventory(&snap.rules, &snap.state, true, env),
                other.inventory(&other_rules, &snap.other_state, false, env),
                true,
            )
        }
        Err(e) => {
            findings.push(Finding::error(
                format!("an apply would fail reading this namespace: {e}"),
                "fix what the message names, then run doctor again",
            ));
            (
                chosen.inventory(&chosen.build(cfg, facts), &C::State::default(), true, env),
                other.inventory(&other.build(cfg, facts), &O::State::default(), false, env),
                false,
            )
        }
    };

    let places: Vec<PlaceState> = chosen_inv
        .places
        .iter()
        .chain(&other_inv.places)
        .map(|p| place_state(p, &report))
        .collect();
    let with_state: Vec<&PlaceState> = places
        .iter()
        .filter(|p| p.tables.iter().any(|t| t.ours > 0))
        .collect();
    let applied = !with_state.is_empty() || !report.routes_extra.is_empty();
    state_findings(&places, &with_state, &report, applied, &mut findings);
    for note in chosen_inv.notes.iter().chain(&other_inv.notes) {
        findings.push(Finding {
            problem: note.problem.clone(),
            fix: note.fix.clone(),
            blocking: note.blocking,
        });
    }

    let kernel = kernel_support(&chosen_inv.needs, &mut findings);
    let permissions = permissions(&needed, &missing, &mut findings);
    let addresses = addresses(cfg, facts, env, &mut findings);
    let probe = req
        .probe
        .then(|| probe(cfg, facts, env.resolver, &mut findings));

    let blocking = findings.iter().filter(|f| f.blocking).count();
    let ok = blocking == 0 && read_ok;
    let verdict = if !ok {
        format!("PROBLEM: {blocking} finding(s) stop capture as configured")
    } else if applied {
        "OK: capture works as configured (the namespace's state matches the config everywhere)"
            .to_string()
    } else {
        "OK: nothing is applied yet; an apply with this config would succeed".to_string()
    };
    Report {
        ok,
        verdict,
        backend: backend_view(chosen.name(), &chosen_inv, &other_inv),
        places_with_capture_state: with_state.len(),
        places,
        routes: Routes {
            missing: report.routes_missing.clone(),
            extra: report.routes_extra.clone(),
        },
        kernel,
        permissions,
        addresses,
        probe,
        findings,
    }
}

/// What a place holds against the config, from the inventory and verify's drift there.
fn place_state(p: &PlaceView, report: &verify::Report) -> PlaceState {
    let drift: Vec<_> = report.drift.iter().filter(|d| d.place == p.place).collect();
    let ours = p.ours();
    // Only missing rules: nothing of ours is there (an apply writes them).
    let only_missing = drift
        .iter()
        .all(|d| d.extra.is_empty() && d.unread.is_empty() && !d.out_of_order);
    let state = match (p.installed, p.target.is_some()) {
        (false, _) => "not installed",
        (true, true) if drift.is_empty() && ours > 0 => "matches",
        (true, true) if ours == 0 && only_missing => "empty",
        (true, true) => "differs",
        (true, false) if ours > 0 || !drift.is_empty() => "stale",
        (true, false) => "empty",
    };
    PlaceState {
        place: label(p.place),
        state,
        target: p.target.is_some(),
        tables: p
            .tables
            .iter()
            .map(|(name, rules, ours)| TableView {
                name: name.clone(),
                rules: *rules,
                ours: *ours,
            })
            .collect(),
    }
}

/// How the report names a place: `IPv4 iptables-nft`, `inet (native nftables)`.
fn label(place: Place) -> String {
    match place {
        Place::Nftables => "inet (native nftables)".into(),
        p => p.label(),
    }
}

/// The findings of our state: a config of ours that differs, stale copies, more than one
/// place with capture state, routes, foreign rules ahead of ours.
fn state_findings(
    places: &[PlaceState],
    with_state: &[&PlaceState],
    report: &verify::Report,
    applied: bool,
    findings: &mut Vec<Finding>,
) {
    for p in places.iter().filter(|p| p.state == "differs") {
        findings.push(Finding::error(
            format!(
                "{} holds capture state that differs from this config",
                p.place
            ),
            "re-run istio-iptables with this config to replace it (`istio-iptables verify` \
             with the same flags shows the difference)",
        ));
    }
    let stale: Vec<&str> = places
        .iter()
        .filter(|p| p.state == "stale")
        .map(|p| p.place.as_str())
        .collect();
    if !stale.is_empty() {
        let problem = if with_state.len() > 1 {
            format!(
                "capture state of ours is in {} places ({}), where only one is meant to hold it",
                with_state.len(),
                with_state
                    .iter()
                    .map(|p| p.place.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            format!(
                "capture state of ours is in {}, where this config's rules do not go",
                stale.join(", ")
            )
        };
        findings.push(Finding::error(
            problem,
            format!(
                "re-run to replace the stale copy in {} (an apply removes it); to keep that \
                 place instead, set FORCE_IPTABLES_BINARY (legacy or nft) or \
                 --native-nftables to match it",
                stale.join(", ")
            ),
        ));
    }
    if applied {
        for m in &report.routes_missing {
            findings.push(Finding::error(
                format!("routes: `{m}` is missing"),
                "re-run istio-iptables with this config to add it",
            ));
        }
    }
    for m in &report.routes_extra {
        findings.push(Finding::error(
            format!("routes: `{m}` is left by an earlier run; this config does not want it"),
            "re-run istio-iptables with this config to remove it",
        ));
    }
    for f in &report.findings {
        findings.push(Finding::error(
            format!("{}: `{}`: {}", f.place, f.rule, f.effect),
            "remove or move that rule (it is not ours); `istio-iptables explain --from-kernel` \
             shows a packet's path",
        ));
    }
}

/// Each feature the config's rules need, as the kernel shows it.
fn kernel_support(needs: &[Feature], findings: &mut Vec<Finding>) -> Vec<KernelSupport> {
    let kernel = Kernel::read();
    needs
        .iter()
        .map(|f| {
            let support = kernel.supports(f);
            if let Support::No(how) = &support {
                findings.push(Finding::error(
                    format!("the kernel lacks {} ({how})", f.name),
                    f.fix(),
                ));
            }
            KernelSupport {
                feature: f.name.clone(),
                support,
            }
        })
        .collect()
}

/// The capabilities, and the namespace lock.
fn permissions(
    needed: &[host::Capability],
    missing: &[host::Capability],
    findings: &mut Vec<Finding>,
) -> Permissions {
    let lock = nslock::view();
    if let Some(why) = &lock.no_dir {
        findings.push(Finding::warning(
            format!(
                "the namespace lock is the abstract socket @{}, which any process can hold: {why}",
                nslock::NAME
            ),
            "run as root with a writable /run (e.g. an emptyDir mounted at /run)",
        ));
    }
    if let Some(holder) = &lock.holder {
        let pids = match holder {
            nslock::Holder::Processes(ps) => ps
                .iter()
                .map(|p| p.pid.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            nslock::Holder::Unknown => "the holder".into(),
        };
        findings.push(Finding::error(
            format!(
                "this network namespace's lock ({}) is held by {holder}: an apply waits for it \
                 (IPTABLES_LOCK_WAIT_SECONDS), then gives up",
                lock.kind
            ),
            format!("wait for that run to end; if it hangs, end it (pid {pids})"),
        ));
    }
    Permissions {
        capabilities_needed: names(needed),
        capabilities_missing: names(missing),
        lock: lock.kind.to_string(),
        lock_holder: lock.holder.map(|h| h.to_string()),
    }
}

/// Capabilities by name, once each, in order.
fn names(caps: &[host::Capability]) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for c in caps {
        if !out.contains(&c.name()) {
            out.push(c.name());
        }
    }
    out
}

/// The namespace's addresses against the config's families, and the DNS servers.
fn addresses(
    cfg: &Config,
    facts: &HostFacts,
    env: &Env<'_>,
    findings: &mut Vec<Finding>,
) -> Addresses {
    if facts.ipv6_uncaptured {
        findings.push(Finding::warning(
            "this network namespace has global IPv6 addresses, but only IPv4 rules are \
             applied: IPv6 traffic is not captured (the first address is IPv4)",
            "set --dual-stack (DUAL_STACK=true) or ENABLE_INBOUND_IPV6=true to capture IPv6 too",
        ));
    }
    let dns_capture = cfg.dns_capture_on(facts);
    if cfg.redirect_dns && !dns_capture {
        findings.push(Finding::warning(
            format!(
                "--redirect-dns is set, but {} names no DNS server and --capture-all-dns is \
                 off: DNS is not captured",
                cfg.resolv_conf.display()
            ),
            "set --capture-all-dns, or mount a resolv.conf with nameserver lines",
        ));
    }
    Addresses {
        addresses: env
            .probe
            .addresses()
            .unwrap_or_default()
            .iter()
            .map(|(i, a)| format!("{i} {a}"))
            .collect(),
        rules_for: facts.families().iter().map(ToString::to_string).collect(),
        dns_capture,
        dns_servers: if cfg.redirect_dns {
            facts
                .dns_servers_v4
                .iter()
                .chain(&facts.dns_servers_v6)
                .map(|d| d.text.clone())
                .collect()
        } else {
            Vec::new()
        },
    }
}

/// `--probe`: the validation probe, each family apart.
fn probe(
    cfg: &Config,
    facts: &HostFacts,
    resolver: &dyn crate::model::OwnerResolver,
    findings: &mut Vec<Finding>,
) -> Vec<ProbeOutcome> {
    let settings = validate::Settings::from_config(cfg, facts, resolver);
    validate::run_each(&settings)
        .into_iter()
        .map(|(family, r)| match r {
            Ok(detail) => ProbeOutcome {
                family: family.to_string(),
                captured: true,
                detail,
            },
            Err(e) => {
                let detail = e.to_string();
                findings.push(Finding::error(
                    format!("{family}: the validation probe was not captured: {detail}"),
                    "`istio-iptables verify` (the rules) and `explain --from-kernel` (the \
                     packet's path) show why",
                ));
                ProbeOutcome {
                    family: family.to_string(),
                    captured: false,
                    detail,
                }
            }
        })
        .collect()
}

/// The backend section: where the rules go and why, the programs looked for.
fn backend_view(chosen: &'static str, mine: &Inventory, other: &Inventory) -> BackendView {
    let targets = mine
        .places
        .iter()
        .filter_map(|p| {
            Some(Target {
                place: label(p.place),
                program: p.program.clone(),
                reason: p.target.clone()?,
            })
        })
        .collect();
    let mut programs: Vec<ProgramView> = Vec::new();
    for p in mine.places.iter().chain(&other.places) {
        let v = ProgramView {
            program: p.program.clone(),
            installed: p.installed,
            version: p.version.clone(),
        };
        if !programs.contains(&v) {
            programs.push(v);
        }
    }
    BackendView {
        chosen,
        targets,
        programs,
    }
}

/// Renders a doctor report: one screen of text, or JSON.
pub fn render(r: &Report, format: Format) -> String {
    if format == Format::Json {
        return to_json(r);
    }
    let mut s = String::new();
    let _ = writeln!(s, "Backend: {}", r.backend.chosen);
    for t in &r.backend.targets {
        let _ = writeln!(s, "  {}: {} ({})", t.place, t.program, t.reason);
    }
    let programs: Vec<String> = r
        .backend
        .programs
        .iter()
        .map(|p| match (p.installed, &p.version) {
            (false, _) => format!("{} not found", p.program),
            (true, Some(v)) => format!("{} {v}", p.program),
            (true, None) => p.program.clone(),
        })
        .collect();
    let _ = writeln!(s, "  programs: {}", programs.join(", "));
    let _ = writeln!(
        s,
        "Our state (what an apply reads; {} place(s) hold capture state):",
        r.places_with_capture_state
    );
    for p in &r.places {
        let tables: Vec<String> = p
            .tables
            .iter()
            .map(|t| format!("{} {}/{}", t.name, t.ours, t.rules))
            .collect();
        let target = if p.target {
            " (the config's rules go here)"
        } else {
            ""
        };
        let _ = write!(s, "  {:<28} {}{target}", p.place, p.state);
        if !tables.is_empty() {
            let _ = write!(s, "; tables (ours/rules): {}", tables.join(", "));
        }
        s.push('\n');
    }
    if r.routes.missing.is_empty() && r.routes.extra.is_empty() {
        let _ = writeln!(s, "  routes and ::6: as the config wants");
    }
    for m in &r.routes.missing {
        let _ = writeln!(s, "  routes: missing `{m}`");
    }
    for m in &r.routes.extra {
        let _ = writeln!(s, "  routes: not wanted `{m}`");
    }
    let _ = writeln!(s, "Kernel support (what this config's rules need):");
    if r.kernel.is_empty() {
        let _ = writeln!(s, "  not checked: the backend's places could not be read");
    }
    for k in &r.kernel {
        let (word, how) = match &k.support {
            Support::Yes(h) => ("yes", h),
            Support::No(h) => ("NO", h),
            Support::Unknown(h) => ("unknown", h),
        };
        let _ = writeln!(s, "  {:<36} {word}: {how}", k.feature);
    }
    let p = &r.permissions;
    let _ = writeln!(s, "Permissions:");
    let _ = writeln!(
        s,
        "  capabilities: an apply needs {}; {}",
        p.capabilities_needed.join(" and "),
        if p.capabilities_missing.is_empty() {
            "all held".to_string()
        } else {
            format!("missing {}", p.capabilities_missing.join(" and "))
        }
    );
    let _ = writeln!(
        s,
        "  lock: {}, {}",
        p.lock,
        p.lock_holder
            .as_ref()
            .map_or("free".to_string(), |h| format!("held by {h}"))
    );
    let a = &r.addresses;
    let _ = writeln!(s, "Addresses and DNS:");
    let _ = writeln!(
        s,
        "  addresses: {}",
        if a.addresses.is_empty() {
            "none".to_string()
        } else {
            a.addresses.join(", ")
        }
    );
    let _ = writeln!(s, "  rules for: {}", a.rules_for.join(", "));
    if a.dns_capture {
        let servers = if a.dns_servers.is_empty() {
            "all port-53 traffic (--capture-all-dns)".to_string()
        } else {
            a.dns_servers.join(", ")
        };
        let _ = writeln!(s, "  DNS capture: on, to {servers}");
    } else {
        let _ = writeln!(s, "  DNS capture: off");
    }
    if let Some(probe) = &r.probe {
        let _ = writeln!(s, "Traffic (the --run-validation probe):");
        for o in probe {
            let word = if o.captured {
                "captured"
            } else {
                "NOT captured"
            };
            let _ = writeln!(s, "  {}: {word}: {}", o.family, o.detail);
        }
    }
    if !r.findings.is_empty() {
        let _ = writeln!(s, "Findings:");
    }
    for f in &r.findings {
        let word = if f.blocking { "ERROR" } else { "WARNING" };
        let _ = writeln!(s, "  {word}: {}", f.problem);
        let _ = writeln!(s, "    fix: {}", f.fix);
    }
    let _ = writeln!(s, "{}", r.verdict);
    s
}
