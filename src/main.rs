//! Entry point: parse the command line, build the config, choose the backend once, run one
//! command ([`commands::run`]) and map its outcome to an exit code ([`Exit`]).

use std::process::ExitCode;
use std::time::Instant;

use clap::error::ErrorKind;

use istio_iptables::backend::iptables::Iptables;
use istio_iptables::backend::nft::Nftables;
use istio_iptables::cli::{Args, Command, Exit, docs};
use istio_iptables::commands;
use istio_iptables::config::{BackendChoice, RunMode, listfile, parse_go_bool};
use istio_iptables::logging;
use istio_iptables::system::signals::Signals;

// musl's own malloc is slow and returns memory to the kernel on most frees (Cargo.toml).
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOC: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

fn main() -> ExitCode {
    let started = Instant::now();
    let args = match Args::parse_from(std::env::args_os()) {
        Ok(a) => a,
        Err(e) => {
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    ExitCode::SUCCESS
                }
                _ => {
                    // All of clap's message: the missing arguments, "a similar argument
                    // exists", the allowed values and the usage line are the help.
                    let text = e.to_string();
                    eprintln!("istio-iptables: {}", text.trim_end());
                    ExitCode::from(Exit::Usage)
                }
            };
        }
    };
    let apply_command = matches!(args.command, None | Some(Command::IstioIptables));
    // stdout carries the dry-run script or explain/verify's report: logs go to stderr then.
    let dry_run = parse_go_bool(&args.cli.dry_run).unwrap_or(false);
    logging::init(logging::Settings::from_cli(
        &args.cli,
        dry_run || !apply_command,
    ));

    // From here on SIGTERM and SIGINT exit with their codes (130, 143), at once or, while
    // the rules are being changed, once what was changed is put back (`commands::run`).
    let signals = Signals::install().unwrap_or_else(|e| {
        tracing::warn!("{:#}", anyhow::Error::from(e));
        Signals::none()
    });

    // Generated from the clap definition; no config is read (a bad env var cannot stop them).
    match &args.command {
        Some(Command::Completion { shell }) => return print_doc(docs::completion(*shell)),
        Some(Command::Man) => return print_doc(docs::man_page()),
        _ => {}
    }

    // Env-only knobs: bytes that are not UTF-8 must be refused, not read as "unset" (which
    // `std::env::var` would make of them); lossy text fails validation naming the variable.
    let env = |k: &str| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned());
    let mut cfg = match listfile::build_config(&args, &env) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(Exit::Usage);
        }
    };
    // Past the dry run, rules are compared with what the kernel stores.
    if !matches!(cfg.run, RunMode::DryRun { .. }) {
        cfg.kernel_form();
    }
    // The raw values (clap's matches hold a long -x list several times over) are in `cfg`
    // now: free them before the rules and the saved state are built.
    let command = args.command.clone();
    drop(args);
    let inspect = command.filter(|_| !apply_command);

    // The one place the backend is chosen; the other one's state of ours is removed.
    let lock_wait_secs = cfg.lock_wait_secs;
    match cfg.backend {
        BackendChoice::Iptables { flavor } => commands::run::run(
            &Iptables {
                flavor,
                lock_wait_secs,
            },
            &Nftables,
            inspect.as_ref(),
            &cfg,
            started,
            &signals,
        ),
        BackendChoice::Nftables { .. } => commands::run::run(
            &Nftables,
            &Iptables {
                flavor: None,
                lock_wait_secs,
            },
            inspect.as_ref(),
            &cfg,
            started,
            &signals,
        ),
    }
    .into()
}

/// Writes a generated document (completion script, man page) to stdout.
fn print_doc(doc: Vec<u8>) -> ExitCode {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(&doc).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        // `istio-iptables man | head`: the reader had enough.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("cannot write to stdout: {e}");
            ExitCode::from(Exit::Failure)
        }
    }
}
