//! Command line: every flag of Istio's istio-iptables, each with its env var.
//!
//! Values stay raw strings here on purpose: `config` validates every one of them and,
//! because it can ask clap where a value came from, its error names the flag *or* the env var
//! that carried the bad value. Nothing here is interpreted beyond clap's precedence rules
//! (flag > env > default) and two of Istio's: an empty env var is unset, and a repeated flag
//! takes its last value ([`Args::parse_from`]).
//!
//! The clap definition is [`Cli`] (`definition.rs`); this file builds the command from it
//! ([`command`]), parses ([`Args`]) and writes the closing sections of `--help` from
//! [`env_only`] and [`Exit`]; [`docs`] generates the man page and completions from the same
//! command. Nothing else of the crate is used here: conversions live with their consumers.

use clap::error::ErrorKind;
use clap::{ArgAction, CommandFactory, FromArgMatches, parser::ValueSource};

mod definition;
pub mod docs;
pub mod env_only;
mod exit;

pub use definition::{Cli, Command, Direction, ExplainArgs, Output, ProtoArg, VerifyArgs};
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

/// A flag given more than once on the command line: the last value is used, as Istio's flag
/// parser (pflag) does; `config` warns of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repeated {
    /// The flag's long name, `--envoy-port`.
    pub flag: String,
    /// How often it was given.
    pub times: usize,
    /// The value used (the last).
    pub last: String,
}

/// Parsed command line plus the knowledge of each value's origin.
#[derive(Debug, Clone)]
pub struct Args {
    pub cli: Cli,
    /// clap's matches, which know each value's source.
    matches: clap::ArgMatches,
    /// The flags given more than once (the last value is in `cli`).
    pub repeated: Vec<Repeated>,
}

impl Args {
    /// Parse `argv` (program name first) with the clap command ([`command`]): every
    /// command, --help, every error. Errors are clap's (usage, --help, --version).
    ///
    /// Two rules are Istio's rather than clap's: an env var that is set but empty (or only
    /// blanks) counts as unset, so the default applies; and a flag given more than once
    /// takes its last value ([`Args::repeated`] names it). To see repetitions, the flags
    /// that take one value are parsed as lists first; only when one was repeated is the
    /// command line parsed again, each flag overriding its earlier values.
    pub fn parse_from<I, T>(argv: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let argv: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
        let mut cmd = without_empty_env(command()).args_override_self(true);
        let mut counting = collecting(cmd.clone());
        let matches = counting.try_get_matches_from_mut(&argv)?;
        refuse_foreign_flags(&mut counting, &matches)?;
        let repeated = repeated_flags(&cmd, &matches);
        let matches = if repeated.is_empty() {
            matches
        } else {
            cmd.try_get_matches_from_mut(&argv)?
        };
        let cli = Cli::from_arg_matches(&matches)?;
        Ok(Self {
            cli,
            matches,
            repeated,
        })
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

/// Whether an env value counts as set: empty (or blank) is unset, as Istio's template
/// renders an absent value, and the default applies.
pub fn env_is_set(value: &std::ffi::OsStr) -> bool {
    !value.to_string_lossy().trim().is_empty()
}

/// `cmd` with the env var of every flag whose variable is set but empty taken away, so that
/// clap uses the default ([`env_is_set`]).
fn without_empty_env(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|a| {
        let empty = a
            .get_env()
            .and_then(std::env::var_os)
            .is_some_and(|v| !env_is_set(&v));
        if empty { a.env(None) } else { a }
    })
}

/// Whether the flag takes one value and keeps it (clap's `Set`): those are the flags a
/// repetition overrides.
fn takes_one_value(a: &clap::Arg) -> bool {
    matches!(a.get_action(), ArgAction::Set) && !a.is_positional()
}

/// `cmd` with every flag that takes one value collecting all of them instead, in every
/// command, so that [`repeated_flags`] can count them.
fn collecting(cmd: clap::Command) -> clap::Command {
    let collect = |a: clap::Arg| {
        if takes_one_value(&a) {
            a.action(ArgAction::Append)
        } else {
            a
        }
    };
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    let mut cmd = cmd.mut_args(collect);
    for name in names {
        cmd = cmd.mut_subcommand(name, |sc| sc.mut_args(collect));
    }
    cmd
}

/// The flags of `cmd` that take one value and that the command line gave more than once,
/// from the matches of `collecting(cmd)`, in the command's order.
fn repeated_flags(cmd: &clap::Command, m: &clap::ArgMatches) -> Vec<Repeated> {
    let mut out = Vec::new();
    let mut scan = |cmd: &clap::Command, m: &clap::ArgMatches| {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if !takes_one_value(a)
                || !m.try_contains_id(id).unwrap_or(false)
                || m.value_source(id) != Some(ValueSource::CommandLine)
            {
                continue;
            }
            let Some(values) = m.get_raw_occurrences(id) else {
                continue;
            };
            let values: Vec<String> = values
                .map(|o| o.map(|v| v.to_string_lossy()).collect::<Vec<_>>().join(" "))
                .collect();
            let flag = format!("--{}", a.get_long().unwrap_or(id));
            if values.len() > 1 && !out.iter().any(|r: &Repeated| r.flag == flag) {
                out.push(Repeated {
                    flag,
                    times: values.len(),
                    last: values.last().cloned().unwrap_or_default(),
                });
            }
        }
    };
    scan(cmd, m);
    if let Some((name, sub)) = m.subcommand()
        && let Some(sc) = cmd.find_subcommand(name)
    {
        scan(sc, sub);
    }
    out
}

/// The default value of the flag `id` (clap's id), for a value that is not used.
pub fn default_value(id: &str) -> Option<String> {
    let cmd = Cli::command();
    let a = cmd.get_arguments().find(|a| a.get_id() == id)?;
    a.get_default_values()
        .first()
        .map(|v| v.to_string_lossy().into_owned())
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
        // A repeated flag: the last value, as Istio's pflag has it, and its name kept.
        let a = parse(&["-p", "1", "--envoy-port=2", "-z", "3"]).unwrap();
        assert_eq!(a.cli.envoy_port, "2");
        assert_eq!(
            a.repeated,
            [Repeated {
                flag: "--envoy-port".into(),
                times: 2,
                last: "2".into()
            }]
        );
        let a = parse(&["--dry-run", "--dry-run=false"]).unwrap();
        assert_eq!(a.cli.dry_run, "false");
        assert_eq!(a.repeated[0].flag, "--dry-run");
        assert!(parse(&["-p", "1", "-z", "2"]).unwrap().repeated.is_empty());
        let a = parse(&[
            "explain",
            "--dst",
            "1.2.3.4:1",
            "--direction",
            "inbound",
            "--dst",
            "5.6.7.8:2",
        ])
        .unwrap();
        let Some(Command::Explain(e)) = &a.cli.command else {
            panic!()
        };
        assert_eq!(e.dst, "5.6.7.8:2");
        assert_eq!(a.repeated[0].flag, "--dst");
        assert_eq!(parse(&["-v", "--verbose", "-v"]).unwrap().cli.verbose, 3);
        let a = parse(&["--log_target", "a", "--log_target=", "--log_target", "b"]).unwrap();
        assert_eq!(a.cli.log_target, ["a", "", "b"]);
        assert!(a.repeated.is_empty(), "a list flag is not a repetition");
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
