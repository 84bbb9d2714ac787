//! One run of the program, once the config is valid and the backend chosen: `explain` or
//! `verify`, or the apply command (dry run, cleanup, apply, validation), with Istio's log
//! lines; the outcome as an exit code.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::apply::{self, Options};
use super::explain::{self, ExplainRequest, InspectError};
use super::verify::{self, render_report};
use super::{doctor, dry_run, validate};
use crate::backend::Backend;
use crate::cli::{Command, Exit};
use crate::config::{Config, HostFacts, RunMode, shortened};
use crate::system::Env;
use crate::system::exec::SystemRunner;
use crate::system::host::RealHost;
use crate::system::host_view::SystemProbe;
use crate::system::nftprobe::NfNetlink;
use crate::system::signals::Signals;
use crate::system::{netns, nslock};

/// Logs an error with its whole cause chain on one line, as Istio's `log.Error(err)` does
/// (anyhow's `{:#}`: each cause after a colon).
fn report(err: impl Into<anyhow::Error>) {
    let err: anyhow::Error = err.into();
    tracing::error!("{}", format!("{err:#}").replace('\n', " "));
}

/// Istio's environment and config blocks (`capture.logConfig` and `config.Print`), one log
/// entry each, with the names Istio prints.
fn log_config(cfg: &Config, facts: &HostFacts, backend: &str) {
    if !tracing::enabled!(tracing::Level::INFO) {
        return;
    }
    let mut env = String::new();
    for name in ISTIO_ENV_LOGGED {
        let _ = writeln!(env, "{name}={}", std::env::var(name).unwrap_or_default());
    }
    tracing::info!("Istio {backend} environment:\n{env}");
    let mut vars = String::new();
    for (k, v) in cfg.summary(facts) {
        let _ = writeln!(vars, "{k}={v}");
    }
    tracing::info!("Istio config:\n{vars}");
}

/// The env vars Istio's `logConfig` prints, in its order.
const ISTIO_ENV_LOGGED: [&str; 12] = [
    "ENVOY_PORT",
    "INBOUND_CAPTURE_PORT",
    "ISTIO_INBOUND_INTERCEPTION_MODE",
    "ISTIO_INBOUND_TPROXY_ROUTE_TABLE",
    "ISTIO_INBOUND_PORTS",
    "ISTIO_OUTBOUND_PORTS",
    "ISTIO_LOCAL_EXCLUDE_PORTS",
    "ISTIO_EXCLUDE_INTERFACES",
    "ISTIO_SERVICE_CIDR",
    "ISTIO_SERVICE_EXCLUDE_CIDR",
    "ISTIO_META_DNS_CAPTURE",
    "INVALID_DROP",
];

/// A log field listing what changed (`iptables-nft,ip6tables-nft`); none when
/// nothing did, so that a line names only what it did.
fn listed(items: &[String]) -> Option<String> {
    (!items.is_empty()).then(|| items.join(","))
}

/// Time since `started`, as `8.2ms`.
fn elapsed(started: Instant) -> String {
    format!("{:.1}ms", started.elapsed().as_secs_f64() * 1000.0)
}

/// Runs one command with `chosen`: `explain` or `verify` (`inspect`), else the apply command
/// (dry run, cleanup, apply, validation); `other`'s state of ours is removed or reported.
///
/// `signals`: SIGTERM and SIGINT end a read-only command or a dry run at once; while the
/// apply command holds the namespace lock they stop it at its next safe point, the apply
/// rolls back, and the exit code is the signal's.
pub fn run<C: Backend, O: Backend>(
    chosen: &C,
    other: &O,
    inspect: Option<&Command>,
    cfg: &Config,
    started: Instant,
    signals: &Signals,
) -> Exit {
    if let Some(Command::Doctor(a)) = inspect {
        return doctor_command(chosen, other, a, cfg);
    }
    if let Some(command) = inspect {
        return inspect_command(chosen, other, command, cfg);
    }
    if let RunMode::DryRun { cleanup } = cfg.run {
        return print_script(chosen, cfg, cleanup);
    }
    // The programs we run get the pod's xtables lock in CNI mode (ours is not changed).
    let runner = if cfg.cni_mode {
        SystemRunner::with_env(vec![netns::pod_xtables_lock(
            cfg.network_namespace.as_deref(),
        )])
    } else {
        SystemRunner::default()
    };
    let mut runner = runner
        .with_deadline(program_deadline(cfg))
        .with_signals(signals.clone());
    let facts = match prepare(chosen, other, cfg) {
        Ok(f) => f,
        Err(c) => return c,
    };
    let mut env = Env {
        runner: &mut runner,
        probe: &SystemProbe,
        nf: &mut NfNetlink,
        rtnl: &mut crate::system::rtnl_change::Kernel,
        resolver: &RealHost,
    };
    // One run at a time in this namespace, from the first read to the last `ip` step.
    let lock = if cfg.run != RunMode::SkipApply {
        match nslock::acquire(Duration::from_secs(cfg.lock_wait_secs.into())) {
            Ok(l) => Some(l),
            Err(e) => {
                log_config(cfg, &facts, chosen.name());
                report(e);
                return Exit::Failure;
            }
        }
    } else {
        None
    };
    // From the first read to the last step a signal only asks the run to stop.
    let deferred = lock.as_ref().map(|_| signals.defer());
    log_config(cfg, &facts, chosen.name());
    match cfg.run {
        RunMode::Cleanup => {
            let exit = cleanup(chosen, other, cfg, &facts, &mut env);
            return signal_exit(signals).unwrap_or(exit);
        }
        RunMode::SkipApply => tracing::info!("--skip-rule-apply: applying nothing"),
        RunMode::Apply | RunMode::DryRun { .. } => {
            if let Err(c) = apply_rules(chosen, other, cfg, &facts, &mut env, started) {
                return signal_exit(signals).unwrap_or(c);
            }
        }
    }
    drop(deferred);
    drop(lock);
    // Caught after the last safe point: the apply is done and stays (from now on a signal
    // ends the process at once).
    if let Some(exit) = signal_exit(signals) {
        tracing::error!("stopped after the last change: the capture rules are in place");
        return exit;
    }
    if cfg.run_validation {
        return validation(cfg, &facts);
    }
    Exit::Success
}

/// How long a program may run (IPTABLES_PROGRAM_TIMEOUT_SECONDS).
fn program_deadline(cfg: &Config) -> Duration {
    Duration::from_secs(cfg.program_timeout_secs.into())
}

/// The exit code of a signal that stopped the run, if one did.
fn signal_exit(signals: &Signals) -> Option<Exit> {
    let c = signals.caught()?;
    let exit = c.exit();
    tracing::info!("{c} asked the run to stop: exit code {}", exit.code());
    Some(exit)
}

/// `--dry-run`: the script, read where the dry run runs (it enters no namespace).
fn print_script<B: Backend>(backend: &B, cfg: &Config, cleanup: bool) -> Exit {
    let facts = match host_facts(cfg) {
        Ok(f) => f,
        Err(c) => return c,
    };
    warn_if_nothing_captured(cfg);
    log_config(cfg, &facts, backend.name());
    if cleanup {
        // Either backend: the script removes both backends' state.
        print!("{}", dry_run::cleanup_script(cfg));
    } else {
        print!("{}", dry_run::apply_script(backend, cfg, &facts));
    }
    Exit::Success
}

/// Enters the namespace and reads the host facts there; checks the capabilities a change
/// needs, and warns of IPv6 left uncaptured.
fn prepare<C: Backend, O: Backend>(chosen: &C, other: &O, cfg: &Config) -> Result<HostFacts, Exit> {
    if let Err(e) = enter_namespace(cfg) {
        report(e);
        return Err(Exit::Failure);
    }
    let facts = host_facts(cfg)?;
    warn_if_nothing_captured(cfg);
    if cfg.run != RunMode::SkipApply
        && let Err(e) = apply::check_capabilities(chosen, other)
    {
        tracing::error!("{e}");
        return Err(Exit::Failure);
    }
    if cfg.run != RunMode::Cleanup && facts.ipv6_uncaptured {
        tracing::warn!(
            "this network namespace has global IPv6 addresses, but only IPv4 rules are \
             applied: IPv6 traffic is not captured (the first address is IPv4; set \
             --dual-stack or ENABLE_INBOUND_IPV6=true to capture IPv6 too)"
        );
    }
    Ok(facts)
}

/// The apply, with Istio's closing log line.
fn apply_rules<C: Backend, O: Backend>(
    chosen: &C,
    other: &O,
    cfg: &Config,
    facts: &HostFacts,
    env: &mut Env<'_>,
    started: Instant,
) -> Result<(), Exit> {
    let opts = Options::from_config(cfg);
    match apply::apply(chosen, other, cfg, facts, &opts, env) {
        Ok(s) => {
            tracing::info!(
                iptables = listed(&s.committed),
                nftables = listed(&s.nft_tables),
                nftables_removed = listed(&s.nft_removed),
                routes = s.ip_changed.len(),
                elapsed = %elapsed(started),
                "capture rules are in place"
            );
            Ok(())
        }
        Err(e) => {
            let c = if e.is_conflict() {
                Exit::Conflict
            } else {
                Exit::Failure
            };
            report(e);
            Err(c)
        }
    }
}

/// Whether this process holds the capabilities the run needs: `chosen`'s, and `other`'s to
/// read its state of ours (in the namespace entered).
/// `--run-validation`: the probe, after the lock is released.
fn validation(cfg: &Config, facts: &HostFacts) -> Exit {
    let settings = validate::Settings::from_config(cfg, facts, &RealHost);
    if let Err(e) = validate::run(&settings) {
        let timeout = e.is_timeout();
        report(e);
        if timeout {
            tracing::error!(
                "iptables validation failed; workload is not ready for Istio \
                 (with Istio CNI this can happen when the pod was scheduled before the node was ready)"
            );
            return Exit::ValidationFailed;
        }
        return Exit::ValidationError;
    }
    tracing::info!("validation passed: traffic is captured");
    Exit::Success
}

/// Enters --network-namespace, if given; the host facts are then read in that namespace.
fn enter_namespace(cfg: &Config) -> Result<(), EnterError> {
    let Some(path) = &cfg.network_namespace else {
        return Ok(());
    };
    netns::enter(path).map_err(EnterError)?;
    tracing::info!(namespace = %path.display(), "entered network namespace");
    Ok(())
}

/// `--network-namespace` could not be entered; a long path is cut in the message, as every
/// value echoed from the command line is.
#[derive(Debug, thiserror::Error)]
#[error(
    "entering network namespace {}: {}",
    shortened(&.0.path.to_string_lossy()),
    .0.error
)]
struct EnterError(netns::NetnsError);

/// The one step that reads the host facts `cfg` needs, where we are (after entering the
/// namespace). An owner name that does not exist here or an unreadable resolv.conf is bad
/// input, as a bad value is: nothing has run yet.
fn host_facts(cfg: &Config) -> Result<HostFacts, Exit> {
    HostFacts::detect(cfg, &RealHost).map_err(|e| {
        tracing::error!("{e}");
        Exit::Usage
    })
}

/// After the host facts, whose errors come first (the apply command only).
fn warn_if_nothing_captured(cfg: &Config) {
    if cfg.run.applies() {
        cfg.warn_if_nothing_captured();
    }
}

fn cleanup<C: Backend, O: Backend>(
    chosen: &C,
    other: &O,
    cfg: &Config,
    facts: &HostFacts,
    env: &mut Env<'_>,
) -> Exit {
    match apply::cleanup(chosen, other, cfg, facts, env) {
        Ok(s) => {
            tracing::info!(
                iptables = listed(&s.committed),
                nftables_removed = listed(&s.nft_removed),
                routes = listed(&s.ip_changed),
                "cleanup done"
            );
            Exit::Success
        }
        Err(errors) => {
            for e in errors {
                report(e);
            }
            Exit::Failure
        }
    }
}

/// `explain` and `verify`: read-only.
fn inspect_command<C: Backend, O: Backend>(
    chosen: &C,
    other: &O,
    command: &Command,
    cfg: &Config,
) -> Exit {
    let needs_kernel = match command {
        Command::Explain(a) => a.from_kernel,
        Command::Verify(_) => true,
        Command::IstioIptables | Command::Doctor(_) | Command::Completion { .. } | Command::Man => {
            unreachable!("not an inspect command")
        }
    };
    if needs_kernel && let Err(e) = enter_namespace(cfg) {
        report(e);
        return Exit::Failure;
    }
    let facts = match host_facts(cfg) {
        Ok(f) => f,
        Err(c) => return c,
    };
    if needs_kernel && let Err(e) = apply::check_capabilities(chosen, other) {
        tracing::error!("{e}");
        return Exit::Failure;
    }
    let fail = |e: InspectError| {
        let c = if matches!(e, InspectError::BadArg { .. }) {
            Exit::Usage
        } else {
            Exit::Failure
        };
        report(e);
        c
    };
    let mut runner = SystemRunner::default().with_deadline(program_deadline(cfg));
    let mut env = Env {
        runner: &mut runner,
        probe: &SystemProbe,
        nf: &mut NfNetlink,
        rtnl: &mut crate::system::rtnl_change::Kernel,
        resolver: &RealHost,
    };
    match command {
        Command::Explain(a) => {
            let a = &ExplainRequest::from(a);
            match explain::explain(chosen, other, a, cfg, &facts, &mut env) {
                Ok(out) => {
                    print!("{}", out.output);
                    if out.unknown {
                        Exit::Unknown
                    } else {
                        Exit::Success
                    }
                }
                Err(e) => fail(e),
            }
        }
        Command::Verify(v) => match verify::verify(chosen, other, cfg, &facts, &mut env) {
            Ok(r) => {
                print!("{}", render_report(&r, v.output.into()));
                r.exit()
            }
            Err(e) => {
                report(e);
                Exit::Failure
            }
        },
        Command::IstioIptables | Command::Doctor(_) | Command::Completion { .. } | Command::Man => {
            unreachable!("not an inspect command")
        }
    }
}

/// `doctor`: read-only, in the namespace (entered with --network-namespace), for the config
/// an apply of these flags would use; the report on stdout.
fn doctor_command<C: Backend, O: Backend>(
    chosen: &C,
    other: &O,
    args: &crate::cli::DoctorArgs,
    cfg: &Config,
) -> Exit {
    if let Err(e) = enter_namespace(cfg) {
        report(e);
        return Exit::Failure;
    }
    let facts = match host_facts(cfg) {
        Ok(f) => f,
        Err(c) => return c,
    };
    // The rules compared with the kernel's, whatever the apply-only flags say.
    let mut cfg = cfg.clone();
    cfg.kernel_form();
    let mut runner = SystemRunner::default().with_deadline(program_deadline(&cfg));
    let mut env = Env {
        runner: &mut runner,
        probe: &SystemProbe,
        // Nothing here changes nf_tables: a write would fail.
        nf: &mut crate::system::nftprobe::NoWrites,
        rtnl: &mut crate::system::rtnl_change::Kernel,
        resolver: &RealHost,
    };
    let req = doctor::Request { probe: args.probe };
    let r = doctor::doctor(chosen, other, &cfg, &facts, req, &mut env);
    print!("{}", doctor::render(&r, args.output.into()));
    r.exit()
}
