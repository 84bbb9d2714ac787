//! Entry point: parse, validate, build, then print (dry run), clean up, or apply; then
//! optionally validate. Exit codes are listed in `code` and in the README.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::error::ErrorKind;
use tracing_subscriber::EnvFilter;

use istio_iptables::apply::{self, Env, Options};
use istio_iptables::backend::SystemProbe;
use istio_iptables::cli::{Args, Command};
use istio_iptables::config::{Config, Owner, detect_ipv6};
use istio_iptables::exec::SystemRunner;
use istio_iptables::host::RealHost;
use istio_iptables::inspect::{self, InspectError};
use istio_iptables::reconcile::Policy;
use istio_iptables::rules::{Family, IpCommand};
use istio_iptables::state::OwnerResolver;
use istio_iptables::{netns, nslock, rules, script, validate};

/// Exit codes (documented in the README).
mod code {
    /// Applying or cleaning up failed (earlier steps were rolled back unless the message
    /// says otherwise), or the network namespace could not be entered.
    pub const FAILURE: u8 = 1;
    /// Bad input: unknown flag, invalid value. Nothing was run.
    pub const USAGE: u8 = 2;
    /// --reconcile=false and the namespace holds different ISTIO_* rules. Nothing changed.
    pub const CONFLICT: u8 = 4;
    /// verify: the live rules differ from the config.
    pub const DRIFT: u8 = 3;
    /// --run-validation could not run its probe (listeners could not be opened).
    pub const VALIDATION_ERROR: u8 = 125;
    /// --run-validation: traffic was not captured within --probe-timeout (Istio's code).
    pub const VALIDATION_FAILED: u8 = 126;
}

fn init_logging(verbose: u8) {
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    // RUST_LOG gets the full filter syntax; otherwise a plain level, which is cheaper to set
    // up (an init container runs once per pod start: every millisecond shows).
    match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => builder.with_env_filter(EnvFilter::new(spec)).init(),
        _ => builder
            .with_max_level(match verbose {
                0 => tracing::Level::INFO,
                1 => tracing::Level::DEBUG,
                _ => tracing::Level::TRACE,
            })
            .init(),
    }
}

/// Prints an error with its whole cause chain on one line.
fn report(err: &dyn std::error::Error) {
    let mut msg = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !msg.contains(&s) {
            msg.push_str(": ");
            msg.push_str(&s);
        }
        cur = e.source();
    }
    eprintln!("istio-iptables: error: {}", msg.replace('\n', " "));
}

fn main() -> ExitCode {
    let args = match Args::parse_from(std::env::args_os()) {
        Ok(a) => a,
        Err(e) => {
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    ExitCode::SUCCESS
                }
                _ => {
                    // clap's first line names the flag and the value; the rest is advice.
                    let text = e.to_string();
                    let first = text.lines().next().unwrap_or("invalid arguments");
                    eprintln!("istio-iptables: {first} (see --help)");
                    ExitCode::from(code::USAGE)
                }
            };
        }
    };
    init_logging(args.cli.verbose);

    let mut cfg = match Config::build(&args, &|k| std::env::var(k).ok(), &RealHost) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("istio-iptables: error: {e}");
            return ExitCode::from(code::USAGE);
        }
    };
    if tracing::enabled!(tracing::Level::DEBUG) {
        for (k, v) in cfg.summary() {
            tracing::debug!("{k}={v}");
        }
    }
    if let Some(command) = &args.cli.command {
        return inspect_command(command, &mut cfg);
    }

    if cfg.dry_run {
        if cfg.cleanup_only {
            print!("{}", script::render_cleanup(&cfg));
        } else {
            print!("{}", script::render(&cfg, &rules::build(&cfg)));
        }
        return ExitCode::SUCCESS;
    }

    if cfg.cni_mode {
        netns::scope_xtables_lock(cfg.network_namespace.as_deref());
    }
    if let Err(e) = enter_namespace(&mut cfg) {
        report(&e);
        return ExitCode::from(code::FAILURE);
    }
    let plan = rules::build(&cfg);

    let opts = Options {
        flavor: cfg.flavor,
        policy: Policy {
            reconcile: cfg.reconcile,
            force: cfg.force_apply,
        },
        lock_wait_secs: cfg.lock_wait_secs,
        tproxy_mark: cfg.tproxy_mark,
        tproxy_route_table: cfg.tproxy_route_table,
    };
    let mut runner = SystemRunner;
    let mut env = Env {
        runner: &mut runner,
        probe: &SystemProbe,
        resolver: &RealHost,
    };

    // One run at a time in this namespace, from the first read to the last `ip` step.
    let lock = if cfg.cleanup_only || !cfg.skip_rule_apply {
        match nslock::acquire(std::time::Duration::from_secs(cfg.lock_wait_secs.into())) {
            Ok(l) => Some(l),
            Err(e) => {
                report(&e);
                return ExitCode::from(code::FAILURE);
            }
        }
    } else {
        None
    };

    if cfg.cleanup_only {
        return cleanup(&cfg, &opts, &mut env);
    }

    if cfg.skip_rule_apply {
        tracing::info!("--skip-rule-apply: applying nothing");
    } else {
        match apply::apply(&plan, &opts, &mut env) {
            Ok(s) => tracing::info!(
                committed = ?s.committed,
                routes = s.ip_changed.len(),
                "capture rules are in place"
            ),
            Err(e) => {
                report(&e);
                let c = if matches!(e, apply::ApplyError::Conflict { .. }) {
                    code::CONFLICT
                } else {
                    code::FAILURE
                };
                return ExitCode::from(c);
            }
        }
    }

    drop(lock);

    if cfg.run_validation {
        let settings = validate::Settings {
            proxy_port: cfg.proxy_port.get(),
            inbound_port: cfg.inbound_capture_port.get(),
            probe_port: cfg.probe_port.get(),
            timeout: cfg.probe_timeout,
            ipv6: cfg.enable_ipv6,
            uid: first_id(&cfg.proxy_uids, |n| RealHost.uid(n)),
            gid: first_id(&cfg.proxy_gids, |n| RealHost.gid(n)),
        };
        if let Err(e) = validate::run(&settings) {
            report(&e);
            if e.is_timeout() {
                eprintln!(
                    "istio-iptables: iptables validation failed; the workload is not ready for Istio \
                     (with Istio CNI this can happen when the pod was scheduled before the node was ready)"
                );
                return ExitCode::from(code::VALIDATION_FAILED);
            }
            return ExitCode::from(code::VALIDATION_ERROR);
        }
        tracing::info!("validation passed: traffic is captured");
    }
    ExitCode::SUCCESS
}

/// Enters --network-namespace, if given; IPv6 detection then looks at that namespace.
fn enter_namespace(cfg: &mut Config) -> Result<(), netns::NetnsError> {
    let Some(path) = &cfg.network_namespace else {
        return Ok(());
    };
    netns::enter(path)?;
    tracing::info!(namespace = %path.display(), "entered network namespace");
    if cfg.ipv6_detected {
        cfg.enable_ipv6 = detect_ipv6(&RealHost, cfg.dual_stack);
    }
    Ok(())
}

/// The first owner as a number (the probe runs with that identity).
fn first_id(owners: &[Owner], resolve: impl Fn(&str) -> Option<u32>) -> Option<u32> {
    match owners.first()? {
        Owner::Id(n) => Some(*n),
        Owner::Name(n) => resolve(n),
    }
}

fn cleanup(cfg: &Config, opts: &Options, env: &mut Env<'_>) -> ExitCode {
    // Rules of the current config help recognise ours; both families, whatever IPv6 says.
    let mut both = cfg.clone();
    both.enable_ipv6 = true;
    let plan = rules::build(&both);
    let rules = BTreeMap::from([(Family::V4, plan.v4.clone()), (Family::V6, plan.v6.clone())]);
    let mut ip = vec![IpCommand::AddInboundV6Address];
    for family in [Family::V4, Family::V6] {
        ip.push(IpCommand::RuleAdd {
            family,
            mark: cfg.tproxy_mark,
            table: cfg.tproxy_route_table,
        });
        ip.push(IpCommand::RouteAddLocal {
            family,
            table: cfg.tproxy_route_table,
        });
    }
    match apply::cleanup(&rules, &ip, opts, env) {
        Ok(s) => {
            tracing::info!(cleaned = ?s.committed, routes = ?s.ip_changed, "cleanup done");
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("istio-iptables: error: {}", e.replace('\n', " "));
            }
            ExitCode::from(code::FAILURE)
        }
    }
}

/// `explain` and `verify`: read-only.
fn inspect_command(command: &Command, cfg: &mut Config) -> ExitCode {
    let needs_kernel = match command {
        Command::Explain(a) => a.from_kernel,
        Command::Verify(_) => true,
    };
    if needs_kernel && let Err(e) = enter_namespace(cfg) {
        report(&e);
        return ExitCode::from(code::FAILURE);
    }
    let cfg = &*cfg;
    let fail = |e: InspectError| {
        report(&e);
        ExitCode::from(if matches!(e, InspectError::BadArg { .. }) {
            code::USAGE
        } else {
            code::FAILURE
        })
    };
    let mut runner = SystemRunner;
    match command {
        Command::Explain(a) => {
            let live = if a.from_kernel {
                let family = match inspect::packet(a, cfg.enable_ipv6) {
                    Ok((p, _)) if p.dst.is_ipv4() => Family::V4,
                    Ok(_) => Family::V6,
                    Err(e) => return fail(e),
                };
                match inspect::read_live(family, cfg, &SystemProbe, &mut runner) {
                    Ok(st) => Some(st),
                    Err(e) => return fail(e),
                }
            } else {
                None
            };
            match inspect::explain(a, cfg, &RealHost, live.as_ref()) {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Verify(v) => match inspect::verify(cfg, &SystemProbe, &mut runner, &RealHost) {
            Ok(r) => {
                print!("{}", inspect::render_report(&r, v.output));
                if r.drift() {
                    ExitCode::from(code::DRIFT)
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(e) => fail(e),
        },
    }
}
