//! Entry point: parse, validate, build, then print (dry run) or apply.

use std::process::ExitCode;

use clap::error::ErrorKind;
use tracing_subscriber::EnvFilter;

use istio_iptables::apply::{self, CommandExecutor};
use istio_iptables::cli::Args;
use istio_iptables::config::Config;
use istio_iptables::exec::SystemRunner;
use istio_iptables::host::RealHost;
use istio_iptables::{rules, script};

/// Exit codes (documented in the README).
mod code {
    /// Applying failed.
    pub const FAILURE: u8 = 1;
    /// Bad input: unknown flag, invalid value; nothing was applied.
    pub const USAGE: u8 = 2;
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
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

    let cfg = match Config::build(&args, &|k| std::env::var(k).ok(), &RealHost) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("istio-iptables: error: {e}");
            return ExitCode::from(code::USAGE);
        }
    };
    for (k, v) in cfg.summary() {
        tracing::debug!("{k}={v}");
    }
    let plan = rules::build(&cfg);

    if cfg.dry_run {
        print!("{}", script::render(&cfg, &plan));
        return ExitCode::SUCCESS;
    }
    if let Some(what) = unsupported(&cfg) {
        eprintln!("istio-iptables: error: {what} is not implemented yet; nothing was applied");
        return ExitCode::from(code::USAGE);
    }
    if cfg.skip_rule_apply {
        tracing::info!("--skip-rule-apply: applying nothing");
        return ExitCode::SUCCESS;
    }
    let mut exec = CommandExecutor {
        runner: SystemRunner,
        flavor: cfg.flavor,
    };
    match apply::apply(&plan, &mut exec) {
        Ok(()) => {
            tracing::info!("rules applied");
            ExitCode::SUCCESS
        }
        Err(e) => {
            report(&e);
            ExitCode::from(code::FAILURE)
        }
    }
}

/// Flags accepted for compatibility whose behaviour lands with the apply-path work.
fn unsupported(cfg: &Config) -> Option<&'static str> {
    if cfg.network_namespace.is_some() {
        Some("--network-namespace")
    } else if cfg.cleanup_only {
        Some("--cleanup-only")
    } else if cfg.run_validation {
        Some("--run-validation")
    } else {
        None
    }
}
