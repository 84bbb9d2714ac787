//! Command line: every flag of Istio's istio-iptables, each with its env var.
//!
//! Values stay raw strings here on purpose: `config` validates every one of them and,
//! because it can ask clap where a value came from, its error names the flag *or* the env var
//! that carried the bad value. Nothing here is interpreted beyond clap's precedence rules
//! (flag > env > default).
//!
//! The clap definition is [`Cli`] (`definition.rs`); this file builds the command from it
//! ([`command`]), parses ([`Args`]) and writes the closing sections of `--help` from
//! [`env_only`] and [`Exit`]; [`docs`] generates the man page and completions from the same
//! command. Nothing else of the crate is used here: conversions live with their consumers.

use clap::error::ErrorKind;
use clap::{CommandFactory, FromArgMatches, parser::ValueSource};

mod definition;
pub mod docs;
pub mod env_only;
mod exit;

pub use definition::{
    Cli, Command, Direction, DoctorArgs, ExplainArgs, Output, ProtoArg, VerifyArgs,
};
pub use exit::Exit;

/// `--version`: the crate version and the git commit it was built from (see build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("ISTIO_IPTABLES_GIT_COMMIT"),
    ")"
);

/// Flags that only mean something when applying: `explain`, `verify` (and `completion`,
/// `man`) refuse them on the command line and leave them out of their --help. Their env vars
/// are ignored there (a pod's environment is shared by every command).
pub const APPLY_ONLY: &[&str] = &[
    "dry_run",
    "skip_rule_apply",
    "run_validation",
    "iptables_probe_port",
    "probe_timeout",
    "cni_mode",
    "reconcile",
    "cleanup_only",
    "force_apply",
];

/// Where a value came from, so errors can name the flag or the env var.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Flag,
    Env,
    Default,
}

/// Parsed command line plus the knowledge of each value's origin.
#[derive(Debug, Clone)]
pub struct Args {
    pub cli: Cli,
    /// clap's matches, which know each value's source.
    matches: clap::ArgMatches,
}

impl Args {
    /// Parse `argv` (program name first) with the clap command ([`command`]): every
    /// command, --help, every error. Errors are clap's (usage, --help, --version).
    pub fn parse_from<I, T>(argv: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut cmd = command();
        let matches = cmd.try_get_matches_from_mut(argv)?;
        refuse_foreign_flags(&mut cmd, &matches)?;
        let cli = Cli::from_arg_matches(&matches)?;
        Ok(Self { cli, matches })
    }

    /// Where the value of the field `id` (clap's id: the field name) came from.
    pub fn origin(&self, id: &str) -> Origin {
        match self.matches.value_source(id) {
            Some(ValueSource::CommandLine) => Origin::Flag,
            Some(ValueSource::EnvVariable) => Origin::Env,
            _ => Origin::Default,
        }
    }
}

/// Commands that do not apply rules, and the root flags each refuses: `explain` and `verify`
/// take the capture config but not [`APPLY_ONLY`]; `completion` and `man` take no flags.
fn refused_flags(subcommand: &str) -> Option<fn(&clap::Arg) -> bool> {
    match subcommand {
        "explain" | "verify" => Some(|a| APPLY_ONLY.contains(&a.get_id().as_str())),
        "completion" | "man" => Some(|a| a.is_global_set()),
        _ => None,
    }
}

/// The clap command: [`Cli`] plus the version with its commit, the long help's closing
/// sections (env-only knobs, exit codes), and, in the commands that do not apply rules, a
/// hidden stand-in (no env var, no default) for each root flag they refuse, so that it is
/// missing from their --help and `refuse_foreign_flags` can name it. Parsing, completion
/// and the man page all use this one definition.
pub fn command() -> clap::Command {
    let mut cmd = Cli::command()
        .version(VERSION)
        .after_long_help(after_long_help());
    let root: Vec<clap::Arg> = cmd.get_arguments().cloned().collect();
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for name in names {
        let Some(refused) = refused_flags(&name) else {
            continue;
        };
        let stand_ins: Vec<clap::Arg> = root
            .iter()
            .filter(|a| refused(a))
            .map(|a| {
                a.clone()
                    .global(false)
                    .hide(true)
                    .env(None)
                    .default_value(None)
                    .required(false)
            })
            .collect();
        cmd = cmd.mut_subcommand(name, |sc| sc.args(stand_ins));
    }
    cmd
}

/// The same command as [`command`], for completion scripts: each command offers exactly the
/// flags it takes (generators list hidden stand-ins too, so none are used here). Every flag
/// is given to each command that takes it instead of being global: the root and
/// `istio-iptables` take them all, `explain` and `verify` all but [`APPLY_ONLY`],
/// `completion` and `man` none.
pub fn completion_command() -> clap::Command {
    let mut cmd = Cli::command().version(VERSION);
    let root: Vec<clap::Arg> = cmd.get_arguments().cloned().collect();
    cmd = cmd.mut_args(|a| a.global(false));
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for name in names {
        let refused = refused_flags(&name);
        let taken: Vec<clap::Arg> = root
            .iter()
            .filter(|a| refused.is_none_or(|r| !r(a)))
            .map(|a| a.clone().global(false))
            .collect();
        cmd = cmd.mut_subcommand(name, |sc| sc.args(taken));
    }
    cmd
}

/// `explain --dry-run` (or `--dry-run explain`): an error naming the flag and the command.
fn refuse_foreign_flags(cmd: &mut clap::Command, m: &clap::ArgMatches) -> Result<(), clap::Error> {
    let Some((name, sub)) = m.subcommand() else {
        return Ok(());
    };
    let Some(refused) = refused_flags(name) else {
        return Ok(());
    };
    let given = |id: &str| {
        [m, sub].iter().any(|m| {
            m.try_contains_id(id).unwrap_or(false)
                && m.value_source(id) == Some(ValueSource::CommandLine)
        })
    };
    let bad = cmd
        .get_arguments()
        .find(|a| refused(a) && given(a.get_id().as_str()));
    if let Some(a) = bad {
        let flag = format!("--{}", a.get_long().unwrap_or(a.get_id().as_str()));
        let why = if APPLY_ONLY.contains(&a.get_id().as_str()) {
            format!("{flag} is only for applying the rules; `{name}` does not take it")
        } else {
            format!("`{name}` takes no flags; {flag} has no effect on it")
        };
        return Err(cmd.error(ErrorKind::ArgumentConflict, why));
    }
    Ok(())
}

/// The closing sections of `--help` (not `-h`): env-only knobs and exit codes.
fn after_long_help() -> String {
    let mut s = String::from("Environment variables without a flag:\n");
    for (name, default, meaning) in env_only::DOCS {
        s.push_str(&format!(
            "  {name}\n          {meaning} [default: {default}]\n"
        ));
    }
    s.push_str("\nExit codes:\n");
    for exit in Exit::ALL {
        let (code, meaning) = (exit.code(), exit.meaning());
        s.push_str(&format!("  {code:<5} {meaning}\n"));
    }
    s
}

/// Flag name and env var of every clap argument, for messages (`--envoy-port / ENVOY_PORT`).
pub fn describe(id: &str) -> (String, Option<String>) {
    let cmd = Cli::command();
    match cmd.get_arguments().find(|a| a.get_id() == id) {
        Some(a) => (
            format!("--{}", a.get_long().unwrap_or(id)),
            a.get_env().map(|e| e.to_string_lossy().into_owned()),
        ),
        None => (id.to_string(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bool_flags_take_optional_value() {
        let a = Args::parse_from(["x", "--dry-run", "--reconcile=false"]).unwrap();
        assert_eq!(a.cli.dry_run, "true");
        assert_eq!(a.cli.reconcile, "false");
        assert_eq!(a.origin("dry_run"), Origin::Flag);
        assert_eq!(a.origin("envoy_port"), Origin::Default);
    }

    /// clap's rules that the pod's arguments meet: a value flag is given once, -v counts,
    /// --log_target repeats, a command's name after a value flag is its value, and the flags
    /// after `istio-iptables` are the apply command's, as before it.
    #[test]
    fn parse_follows_clap_rules() {
        let parse =
            |words: &[&str]| Args::parse_from(std::iter::once("x").chain(words.iter().copied()));
        let kind = |words: &[&str]| parse(words).map(|_| ()).unwrap_err().kind();
        assert_eq!(kind(&["-p", "1", "-p", "2"]), ErrorKind::ArgumentConflict);
        assert_eq!(
            kind(&["--dry-run", "--dry-run=false"]),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(parse(&["-v", "--verbose", "-v"]).unwrap().cli.verbose, 3);
        let a = parse(&["--log_target", "a", "--log_target=", "--log_target", "b"]).unwrap();
        assert_eq!(a.cli.log_target, ["a", "", "b"]);
        assert_eq!(a.origin("log_target"), Origin::Flag);
        assert_eq!(parse(&["-p", "explain"]).unwrap().cli.envoy_port, "explain");
        let a = parse(&["istio-iptables", "-p", "2", "--dry-run"]).unwrap();
        assert!(matches!(a.cli.command, Some(Command::IstioIptables)));
        assert_eq!(
            (a.cli.envoy_port.as_str(), a.cli.dry_run.as_str()),
            ("2", "true")
        );
        assert_eq!(a.origin("envoy_port"), Origin::Flag);
    }

    #[test]
    fn describe_names_flag_and_env() {
        assert_eq!(
            describe("envoy_port"),
            ("--envoy-port".to_string(), Some("ENVOY_PORT".to_string()))
        );
    }
}
