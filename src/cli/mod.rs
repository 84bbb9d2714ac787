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

use std::ffi::OsString;

use clap::error::ErrorKind;
use clap::{ArgAction, Args as _, CommandFactory, FromArgMatches, Subcommand, parser::ValueSource};

mod definition;
pub mod docs;
pub mod env_only;
mod exit;

use definition::APPLY_COMMAND;
pub use definition::{
    Cli, Command, Direction, DoctorArgs, ExplainArgs, Output, ProtoArg, Root, VerifyArgs,
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
    /// The command (`None`: apply, as with `istio-iptables`).
    pub command: Option<Command>,
    /// clap's matches, which know each value's source.
    matches: clap::ArgMatches,
    /// The flags given more than once (the last value is in `cli`).
    pub repeated: Vec<Repeated>,
}

impl Args {
    /// Parse `argv` (program name first) with the clap command ([`command`]): every
    /// command, --help, every error. Errors are clap's (usage, --help, --version). The
    /// apply's own arguments go the short way ([`Args::parse_apply`]).
    ///
    /// Two rules are Istio's rather than clap's: an env var that is set but empty (or only
    /// blanks) counts as unset, so the default applies; and a flag given more than once
    /// takes its last value ([`Args::repeated`] names it). To see repetitions, the flags
    /// that take one value are parsed as lists first; only when one was repeated is the
    /// command line parsed again, each flag overriding its earlier values.
    pub fn parse_from<I, T>(argv: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
        match Self::parse_apply(&argv) {
            Some(args) => Ok(args),
            None => Self::parse_whole(&argv),
        }
    }

    /// `argv` parsed by the whole command.
    fn parse_whole(argv: &[OsString]) -> Result<Self, clap::Error> {
        let mut cmd = without_empty_env(command()).args_override_self(true);
        let mut counting = collecting(cmd.clone());
        let matches = counting.try_get_matches_from_mut(argv)?;
        refuse_foreign_flags(&mut counting, &matches)?;
        let repeated = repeated_flags(&cmd, &matches);
        let matches = if repeated.is_empty() {
            matches
        } else {
            cmd.try_get_matches_from_mut(argv)?
        };
        let Root { cli, command } = Root::from_arg_matches(&matches)?;
        Ok(Self {
            cli,
            command,
            matches,
            repeated,
        })
    }

    /// An argv in which no word names a command, but for `istio-iptables` right after the
    /// program's name (as Istio's injector writes it), and in which no flag is repeated,
    /// parsed by the root's flags alone: clap copies each global flag into every command
    /// before it parses, which is two thirds of parsing the seed command, 0.3 ms of a
    /// re-run's 1.5 ms of CPU. The whole command parses the same words the same way: in it,
    /// `istio-iptables` there is that command, which has no arguments of its own and takes
    /// the root's global flags after it. `None` for anything else, and for anything this
    /// parse does not accept (--help and --version included): [`Args::parse_from`] then
    /// asks the whole command.
    fn parse_apply(argv: &[OsString]) -> Option<Self> {
        let (program, words) = argv.split_first()?;
        let apply = words.first().is_some_and(|w| w == APPLY_COMMAND);
        let rest = if apply { &words[1..] } else { words };
        let names_a_command = |w: &OsString| {
            w.to_str()
                .is_none_or(|w| w == "help" || Command::has_subcommand(w))
        };
        if rest.iter().any(names_a_command) {
            return None;
        }
        let cmd = without_empty_env(Cli::augment_args(clap::Command::new(APPLY_COMMAND)));
        let single: Vec<clap::Id> = cmd
            .get_arguments()
            .filter(|a| takes_one_value(a))
            .map(|a| a.get_id().clone())
            .collect();
        let mut counting = collecting(cmd);
        let matches = counting
            .try_get_matches_from_mut(std::iter::once(program).chain(rest))
            .ok()?;
        let given_once = |id: &clap::Id| {
            matches
                .get_raw_occurrences(id.as_str())
                .is_none_or(|o| o.count() <= 1)
        };
        if !single.iter().all(given_once) {
            return None;
        }
        let cli = Cli::from_arg_matches(&matches).ok()?;
        Some(Self {
            cli,
            command: apply.then_some(Command::IstioIptables),
            matches,
            repeated: Vec::new(),
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

/// The clap command: [`Root`] plus the version with its commit, the long help's closing
/// sections (env-only knobs, exit codes), and, in the commands that do not apply rules, a
/// hidden stand-in (no env var, no default) for each root flag they refuse, so that it is
/// missing from their --help and `refuse_foreign_flags` can name it. Parsing, completion
/// and the man page all use this one definition.
pub fn command() -> clap::Command {
    let cmd = Root::command()
        .version(VERSION)
        .after_long_help(after_long_help());
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    names
        .iter()
        .fold(cmd, |cmd, name| match refused_flags(name) {
            // clap has copied the root's global flags into the command when it builds it,
            // which is when the deferred function runs: only for the command that is used.
            Some(_) => cmd.mut_subcommand(name, |sc| sc.defer(stand_ins)),
            None => cmd,
        })
}

/// A command's refused root flags as hidden stand-ins ([`command`]).
fn stand_ins(sc: clap::Command) -> clap::Command {
    let Some(refused) = refused_flags(sc.get_name()) else {
        return sc;
    };
    sc.mut_args(|a| {
        if a.is_global_set() && refused(&a) {
            a.global(false)
                .hide(true)
                .env(None)
                .default_value(None)
                .required(false)
        } else {
            a
        }
    })
}

/// The same command as [`command`], for completion scripts: each command offers exactly the
/// flags it takes (generators list hidden stand-ins too, so none are used here). Every flag
/// is given to each command that takes it instead of being global: the root and
/// `istio-iptables` take them all, `explain` and `verify` all but [`APPLY_ONLY`],
/// `completion` and `man` none.
pub fn completion_command() -> clap::Command {
    // The values the parser takes (config checks them and says so in one line): offered as
    // completions instead of file names.
    let mut cmd = Root::command()
        .version(VERSION)
        .mut_arg("force_iptables_binary", |a| {
            a.value_parser(clap::builder::PossibleValuesParser::new(["legacy", "nft"]))
        });
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
    let cmd = Root::command();
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
    let cmd = Root::command();
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
        Root::command().debug_assert();
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
        let Some(Command::Explain(e)) = &a.command else {
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
        assert!(matches!(a.command, Some(Command::IstioIptables)));
        assert_eq!(
            (a.cli.envoy_port.as_str(), a.cli.dry_run.as_str()),
            ("2", "true")
        );
        assert_eq!(a.origin("envoy_port"), Origin::Flag);
    }

    /// The short way parses what it accepts exactly as the whole command does: the same
    /// values, the same command, the same origin of every flag (words from the seed command,
    /// the injector's first word, the commands' names, help and version, in any order).
    #[test]
    fn apply_parse_equals_the_whole_command() {
        use proptest::prelude::*;
        const WORDS: &[&str] = &[
            "-p",
            "15001",
            "-z",
            "-u",
            "1337",
            "-m",
            "TPROXY",
            "-i",
            "*",
            "-x",
            "",
            "-b",
            "-d",
            "15090,15020",
            "--dry-run",
            "--dry-run=false",
            "--reconcile=false",
            "-v",
            "--log_target",
            "stderr",
            "istio-iptables",
            "explain",
            "verify",
            "man",
            "help",
            "--help",
            "-h",
            "--version",
            "-V",
            "--direction",
            "outbound",
            "--dst",
            "1.1.1.1:80",
            "-c",
            "eth0",
            "--cleanup-only",
            "--",
            "-p=2",
            "--envoy-port",
            "--bogus",
        ];
        let ids: Vec<String> = Cli::augment_args(clap::Command::new("x"))
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        let accepted = std::cell::Cell::new(0);
        proptest!(ProptestConfig::with_cases(3000), |(picks in prop::collection::vec(0..WORDS.len(), 0..10))| {
            let argv: Vec<OsString> = std::iter::once("istio-iptables")
                .chain(picks.iter().map(|&i| WORDS[i]))
                .map(OsString::from)
                .collect();
            if let Some(short) = Args::parse_apply(&argv) {
                accepted.set(accepted.get() + 1);
                let whole = Args::parse_whole(&argv);
                prop_assert!(whole.is_ok(), "{argv:?}: only the short way accepts it");
                let whole = whole.unwrap();
                prop_assert_eq!(format!("{:?}", short.cli), format!("{:?}", whole.cli));
                prop_assert_eq!(format!("{:?}", short.command), format!("{:?}", whole.command));
                for id in &ids {
                    prop_assert_eq!(short.origin(id), whole.origin(id), "{:?}: {}", argv, id);
                }
            }
        });
        // Not vacuous: a good share of the command lines takes the short way.
        let accepted = accepted.get();
        assert!(accepted > 300, "{accepted} of 3000 took the short way");
    }

    #[test]
    fn describe_names_flag_and_env() {
        assert_eq!(
            describe("envoy_port"),
            ("--envoy-port".to_string(), Some("ENVOY_PORT".to_string()))
        );
    }
}
