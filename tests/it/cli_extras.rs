//! What a shell user expects beyond the flags: completion scripts, the man page, a long
//! `--help` that answers the usual questions, `--version` with its commit, commands that
//! take only the flags that matter to them, and lists read from files (`@PATH`) past the
//! kernel's 128 KiB limit on one argument.
//!
//! Every test drives the built binary with a cleared environment and a PATH holding only
//! recording shims (as tests/it/cli.rs does), so nothing can touch the host's rules and a test
//! can prove that nothing was run. The one test that applies rules for real does it in a
//! fresh network namespace (root only; skipped with a message otherwise).

use crate::common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::RwLock;

use common::{
    BIN, DEFAULT_TIMEOUT, SEED, SHIMMED_PROGRAMS, TempDir, run_with_timeout, shell_quote,
};

/// Writing an executable while another thread forks can make exec'ing it fail with ETXTBSY
/// (the child holds a copy of the write fd until it execs): shims are written under the
/// write lock, every spawn happens under the read lock.
static SPAWN_LOCK: RwLock<()> = RwLock::new(());

/// The flags that only concern applying (`cli::APPLY_ONLY`, checked below), as flags with
/// a value that makes them valid.
const APPLY_ONLY: &[&[&str]] = &[
    &["--dry-run"],
    &["--skip-rule-apply"],
    &["--run-validation"],
    &["--iptables-probe-port", "15002"],
    &["--probe-timeout", "1s"],
    &["--cni-mode"],
    &["--reconcile=false"],
    &["--cleanup-only"],
    &["--force-apply"],
];

/// A temp dir with recording shims in `bin/`.
struct Sandbox {
    dir: TempDir,
}

/// One run of the binary.
struct Run {
    what: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn from_output(what: String, out: Output) -> Run {
        Run {
            what,
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn dump(&self) -> String {
        format!(
            "`{}`: exit code {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what, self.code, self.stdout, self.stderr
        )
    }

    /// Asserts exit 0; returns stdout.
    fn success(&self) -> &str {
        assert_eq!(self.code, Some(0), "should exit 0: {}", self.dump());
        &self.stdout
    }
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = TempDir::new("istio-iptables-cli-extras");
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).expect("create the shim dir");
        let log = shell_quote(dir.path().join("calls.log"));
        let _guard = SPAWN_LOCK.write().unwrap_or_else(|e| e.into_inner());
        for name in SHIMMED_PROGRAMS {
            let path = bin.join(name);
            let script = format!(
                "#!/bin/sh\n# Test stand-in: records the call, changes nothing.\n\
                 echo \"{name} $*\" >> {log}\ncat > /dev/null\nexit 0\n"
            );
            fs::write(&path, script).expect("write a shim");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod a shim");
        }
        Sandbox { dir }
    }

    /// A file in the sandbox.
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, text).expect("write a sandbox file");
        path
    }

    /// The binary with `args`, a cleared environment (PATH = the shims,
    /// `ENABLE_INBOUND_IPV6=false`, then `env`).
    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .env("PATH", self.dir.path().join("bin"))
            .env("ENABLE_INBOUND_IPV6", "false")
            .envs(env.iter().copied())
            .args(args);
        let mut what = String::new();
        for (k, v) in env {
            what.push_str(&format!("{k}={} ", shell_quote(v)));
        }
        what.push_str(&common::shell_command(
            std::iter::once("istio-iptables").chain(args.iter().copied()),
        ));
        let out = {
            let _guard = SPAWN_LOCK.read().unwrap_or_else(|e| e.into_inner());
            run_with_timeout(&mut cmd, DEFAULT_TIMEOUT)
        }
        .unwrap_or_else(|e| panic!("`{what}`: {e}"));
        Run::from_output(what, out)
    }

    /// What the shims recorded (empty when nothing ran).
    fn calls(&self) -> String {
        fs::read_to_string(self.dir.path().join("calls.log")).unwrap_or_default()
    }

    /// Asserts that clap refused `run`: exit 2, the first line of stderr mentioning each of
    /// `mentions` (clap's usage may follow), nothing on stdout, nothing executed.
    fn assert_usage_error(&self, run: &Run, mentions: &[&str]) {
        assert_eq!(run.code, Some(2), "should exit 2: {}", run.dump());
        assert!(
            run.stdout.is_empty(),
            "stdout should be empty: {}",
            run.dump()
        );
        let first = run.stderr.lines().next().unwrap_or_default();
        for m in mentions {
            assert!(
                first.contains(m),
                "stderr's first line should mention {m:?}: {}",
                run.dump()
            );
        }
        assert!(
            self.calls().is_empty(),
            "nothing may run on bad input; ran:\n{}\n{}",
            self.calls(),
            run.dump()
        );
    }

    /// Asserts that `run` was refused: exit 2, one line on stderr mentioning each of
    /// `mentions`, nothing on stdout, nothing executed.
    fn assert_refused(&self, run: &Run, mentions: &[&str]) {
        assert_eq!(run.code, Some(2), "should exit 2: {}", run.dump());
        assert!(
            run.stdout.is_empty(),
            "stdout should be empty: {}",
            run.dump()
        );
        assert_eq!(
            run.stderr.lines().count(),
            1,
            "stderr should be one line: {}",
            run.dump()
        );
        for m in mentions {
            assert!(
                run.stderr.contains(m),
                "stderr should mention {m:?}: {}",
                run.dump()
            );
        }
        assert!(
            self.calls().is_empty(),
            "nothing may run on bad input; ran:\n{}\n{}",
            self.calls(),
            run.dump()
        );
    }
}

/// Runs `program args` (not under the sandbox), with `PATH` from the test's environment.
fn tool(program: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("PATH", common::sane_path())
        .envs(env.iter().copied());
    let what = common::shell_command(std::iter::once(program).chain(args.iter().copied()));
    let out = {
        let _guard = SPAWN_LOCK.read().unwrap_or_else(|e| e.into_inner());
        run_with_timeout(&mut cmd, DEFAULT_TIMEOUT)
    }
    .unwrap_or_else(|e| panic!("`{what}`: {e}"));
    Run::from_output(what, out)
}

/// Whether `program` is on the PATH.
fn have(program: &str) -> bool {
    common::sane_path()
        .split(':')
        .any(|d| Path::new(d).join(program).is_file())
}

/// The long flags (`--name`) of a clap help text, and the env vars it names.
fn help_longs_and_envs(help: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut longs = BTreeSet::new();
    let mut envs = BTreeSet::new();
    for line in help.lines() {
        let t = line.trim_start();
        if t.starts_with('-')
            && let Some(i) = t.find("--")
        {
            let name: String = t[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect();
            longs.insert(name);
        }
        for (i, _) in line.match_indices("[env: ") {
            let rest = &line[i + 6..];
            if let Some(end) = rest.find('=') {
                envs.insert(rest[..end].to_string());
            }
        }
    }
    (longs, envs)
}

// ---------------------------------------------------------------------------------------------
// Completion
// ---------------------------------------------------------------------------------------------

#[test]
fn completion_prints_a_script_for_each_shell() {
    let sb = Sandbox::new();
    for shell in ["bash", "zsh", "fish", "powershell"] {
        let run = sb.run(&["completion", shell], &[]);
        let script = run.success();
        assert!(
            script.contains("istio-iptables") && script.contains("istio-service-exclude-cidr"),
            "the {shell} script should complete istio-iptables' flags:\n{}",
            run.dump()
        );
        assert!(run.stderr.is_empty(), "nothing on stderr: {}", run.dump());
        let path = sb.file(&format!("completion.{shell}"), script);
        let path = path.to_str().expect("utf-8 temp path");
        let check = match shell {
            "bash" => Some(("bash", vec!["-n", path])),
            "zsh" => Some(("zsh", vec!["-n", path])),
            "fish" => Some(("fish", vec!["--no-execute", path])),
            _ => None,
        };
        if let Some((program, args)) = check {
            if have(program) {
                let syntax = tool(program, &args, &[]);
                assert_eq!(
                    syntax.code,
                    Some(0),
                    "the {shell} completion script should parse: {}",
                    syntax.dump()
                );
            } else if shell == "bash" {
                panic!("bash is needed to check the bash completion script");
            } else {
                eprintln!("note: {program} is not installed; its script's syntax is not checked");
            }
        }
    }
    assert!(
        sb.calls().is_empty(),
        "completion runs nothing: {}",
        sb.calls()
    );
    let run = sb.run(&["completion", "tcsh"], &[]);
    assert_eq!(
        run.code,
        Some(2),
        "an unknown shell is bad input: {}",
        run.dump()
    );
}

/// Completes the words `line` (the last one being completed) with the bash script, as bash
/// does on TAB: COMP_WORDS/COMP_CWORD set, the function `complete -p` names called with the
/// command, the current and the previous word. Returns COMPREPLY.
fn bash_complete(script: &Path, words: &[&str]) -> BTreeSet<String> {
    let driver = r#"
source "$1"; shift
COMP_WORDS=("$@")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
COMP_LINE="${COMP_WORDS[*]}"
COMP_POINT=${#COMP_LINE}
spec=$(complete -p istio-iptables)
fn=${spec##*-F }
fn=${fn%% *}
COMPREPLY=()
"$fn" istio-iptables "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"#;
    let mut args = vec!["-c", driver, "driver", script.to_str().expect("utf-8 path")];
    args.extend_from_slice(words);
    let run = tool("bash", &args, &[]);
    run.success();
    run.stdout
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn bash_completion_offers_flags_modes_and_directions() {
    let sb = Sandbox::new();
    let script = sb.file(
        "istio-iptables.bash",
        sb.run(&["completion", "bash"], &[]).success(),
    );
    let help = sb.run(&["--help"], &[]);
    let (longs, _) = help_longs_and_envs(help.success());
    let istio: BTreeSet<String> = longs
        .iter()
        .filter(|l| l.starts_with("--istio-"))
        .cloned()
        .collect();
    assert!(
        istio.len() >= 10,
        "--help lists the --istio-* flags: {istio:?}"
    );

    let got = bash_complete(&script, &["istio-iptables", "--istio-"]);
    assert_eq!(
        got, istio,
        "`istio-iptables --istio-<TAB>` offers every --istio-* flag"
    );

    let got = bash_complete(&script, &["istio-iptables", "-m", ""]);
    let modes: BTreeSet<String> = ["REDIRECT", "TPROXY"].map(String::from).into();
    assert_eq!(got, modes, "`istio-iptables -m <TAB>`");
    let got = bash_complete(
        &script,
        &["istio-iptables", "--istio-inbound-interception-mode", "T"],
    );
    assert_eq!(got, BTreeSet::from(["TPROXY".to_string()]));

    let got = bash_complete(&script, &["istio-iptables", "explain", "--direction", ""]);
    let directions: BTreeSet<String> = ["inbound", "outbound"].map(String::from).into();
    assert_eq!(
        got, directions,
        "`istio-iptables explain --direction <TAB>`"
    );

    // explain offers its own flags and the capture flags, not the apply-only ones.
    let got = bash_complete(&script, &["istio-iptables", "explain", "--d"]);
    for want in ["--direction", "--dst", "--drop-invalid", "--dual-stack"] {
        assert!(
            got.contains(want),
            "explain --d<TAB> should offer {want}: {got:?}"
        );
    }
    assert!(
        !got.contains("--dry-run"),
        "explain does not take --dry-run: {got:?}"
    );
    let got = bash_complete(&script, &["istio-iptables", "--d"]);
    assert!(
        got.contains("--dry-run"),
        "the root takes --dry-run: {got:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Man page
// ---------------------------------------------------------------------------------------------

/// `man -l PATH` with groff's warnings on (as text, 120 columns).
fn render_man(path: &Path) -> Run {
    tool(
        "man",
        &[
            "--warnings=all,mac",
            "-l",
            path.to_str().expect("utf-8 path"),
        ],
        &[
            ("MANWIDTH", "120"),
            ("MANPAGER", "cat"),
            ("LC_ALL", "C.UTF-8"),
        ],
    )
}

#[test]
fn man_page_renders_without_warnings_and_documents_everything() {
    if !have("man") {
        // .ci/run installs man-db, so CI always runs this.
        eprintln!("SKIPPED man_page_renders_without_warnings...: `man` is not installed (man-db)");
        return;
    }
    let sb = Sandbox::new();
    let run = sb.run(&["man"], &[("ENVOY_PORT", "not-a-port")]);
    let roff = run.success().to_string();
    assert!(run.stderr.is_empty(), "nothing on stderr: {}", run.dump());
    assert!(roff.contains(".TH istio-iptables 8 "), "section 8:\n{roff}");
    let page = sb.file("istio-iptables.8", &roff);

    // The check can fail: a page with an unknown macro gets a warning.
    let broken = sb.file("broken.8", &format!("{roff}\n.NOSUCHMACRO x\n"));
    let r = render_man(&broken);
    assert!(
        !r.stderr.trim().is_empty(),
        "man should warn about an unknown macro (else this test checks nothing): {}",
        r.dump()
    );

    let r = render_man(&page);
    let text = r.success();
    assert!(
        r.stderr.is_empty(),
        "man -l should render without warnings: {}",
        r.dump()
    );
    for section in [
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "COMMANDS",
        "EXPLAIN OPTIONS",
        "VERIFY OPTIONS",
        "ENVIRONMENT",
        "EXIT STATUS",
        "EXAMPLES",
    ] {
        assert!(
            text.lines().any(|l| l == section),
            "the man page should have a {section} section:\n{text}"
        );
    }

    // Every flag of --help, with its env var and default, is in the page (the roff source:
    // the rendered text hyphenates long names).
    let source = roff.replace("\\-", "-");
    let help = sb.run(&["--help"], &[]);
    let help = help.success();
    let (longs, envs) = help_longs_and_envs(help);
    for long in longs.iter().filter(|l| *l != "--help" && *l != "--version") {
        assert!(
            source.contains(&format!("\\fB{long}\\fR")),
            "no {long} in the man page"
        );
    }
    assert!(envs.len() >= 30, "--help names the env vars: {envs:?}");
    for env in &envs {
        assert!(
            source.contains(&format!("\\fB{env}\\fR")),
            "no env var {env} in the man page"
        );
    }
    for (i, _) in help.match_indices("[default: ") {
        let value = &help[i..i + help[i..].find(']').expect("closing ]") + 1];
        if value != "[default: \"\"]" {
            assert!(source.contains(value), "no {value} in the man page");
        }
    }
    for knob in [
        "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
        "ISTIO_OUTBOUND_OWNER_GROUPS",
        "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
        "ENVOY_USER",
        "ENABLE_INBOUND_IPV6",
        "IPTABLES_LOCK_WAIT_SECONDS",
        "IPTABLES_PROGRAM_TIMEOUT_SECONDS",
    ] {
        assert!(
            source.contains(&format!("\\fB{knob}\\fR")),
            "no {knob} in ENVIRONMENT"
        );
    }
    let exit = text
        .split("\nEXIT STATUS\n")
        .nth(1)
        .expect("EXIT STATUS section");
    for code in ["0", "1", "2", "3", "4", "5", "125", "126", "130", "143"] {
        assert!(
            exit.lines()
                .any(|l| l.trim_start().starts_with(&format!("{code} "))),
            "exit code {code} in EXIT STATUS:\n{exit}"
        );
    }
    for word in [
        "--direction",
        "--from-kernel",
        "--output",
        "istio-iptables istio-iptables",
    ] {
        assert!(source.contains(word), "no {word} in the man page");
    }
    assert!(sb.calls().is_empty(), "man runs nothing: {}", sb.calls());
}

// ---------------------------------------------------------------------------------------------
// --help, --version, what each command takes
// ---------------------------------------------------------------------------------------------

#[test]
fn long_help_lists_env_only_knobs_and_exit_codes_and_short_help_does_not() {
    let sb = Sandbox::new();
    let long = sb.run(&["--help"], &[]);
    let long = long.success();
    let after = long
        .split("Environment variables without a flag:")
        .nth(1)
        .unwrap_or_else(|| panic!("--help should end with the env-only knobs:\n{long}"));
    for knob in [
        "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
        "ISTIO_OUTBOUND_OWNER_GROUPS",
        "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
        "ENVOY_USER",
        "ENABLE_INBOUND_IPV6",
        "IPTABLES_LOCK_WAIT_SECONDS",
        "IPTABLES_PROGRAM_TIMEOUT_SECONDS",
    ] {
        assert!(
            after.lines().any(|l| l.trim() == knob),
            "--help should list {knob}:\n{after}"
        );
    }
    let codes = after
        .split("Exit codes:")
        .nth(1)
        .unwrap_or_else(|| panic!("--help should list the exit codes:\n{after}"));
    for code in ["0", "1", "2", "3", "4", "5", "125", "126", "130", "143"] {
        assert!(
            codes
                .lines()
                .any(|l| l.split_whitespace().next() == Some(code)),
            "--help should explain exit code {code}:\n{codes}"
        );
    }
    let short = sb.run(&["-h"], &[]);
    let short = short.success();
    assert!(
        !short.contains("Exit codes:") && !short.contains("IPTABLES_LOCK_WAIT_SECONDS"),
        "-h stays short:\n{short}"
    );
    assert!(short.lines().count() < long.lines().count());
}

#[test]
fn explain_and_verify_help_show_only_their_flags() {
    let sb = Sandbox::new();
    for (command, own) in [("explain", "--direction"), ("verify", "--output")] {
        let run = sb.run(&[command, "--help"], &[]);
        let (longs, _) = help_longs_and_envs(run.success());
        for want in [
            own,
            "--envoy-port",
            "--istio-service-exclude-cidr",
            "--network-namespace",
        ] {
            assert!(
                longs.contains(want),
                "`{command} --help` should list {want}: {longs:?}"
            );
        }
        for flag in APPLY_ONLY {
            let long = flag[0].split('=').next().unwrap();
            assert!(
                !longs.contains(long),
                "`{command} --help` should not list the apply-only {long}: {longs:?}"
            );
        }
    }
}

#[test]
fn apply_only_flags_given_to_explain_or_verify_are_refused_by_name() {
    let ids: BTreeSet<String> = APPLY_ONLY
        .iter()
        .map(|f| {
            f[0].trim_start_matches("--")
                .split('=')
                .next()
                .unwrap()
                .replace('-', "_")
        })
        .collect();
    let lib: BTreeSet<String> = istio_iptables::cli::APPLY_ONLY
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(ids, lib, "this test covers every apply-only flag");
    let explain = ["explain", "--direction", "inbound", "--dst", "10.0.0.1:80"];
    for flag in APPLY_ONLY {
        let long = flag[0].split('=').next().unwrap();
        for (command, base) in [("explain", &explain[..]), ("verify", &["verify"][..])] {
            // After the command, and before it.
            for before in [false, true] {
                let sb = Sandbox::new();
                let args: Vec<&str> = if before {
                    flag.iter().chain(base).copied().collect()
                } else {
                    base.iter().chain(flag.iter()).copied().collect()
                };
                let run = sb.run(&args, &[]);
                sb.assert_usage_error(&run, &[long, command, "only for applying"]);
            }
        }
    }
    // Their env vars are ignored (a pod's environment is shared by every command).
    let sb = Sandbox::new();
    let run = sb.run(&explain, &[("DRY_RUN", "true"), ("CLEANUP_ONLY", "true")]);
    assert!(run.success().contains("verdict:"), "{}", run.dump());
    // completion and man take no flags at all.
    let run = sb.run(&["completion", "bash", "-x", "10.0.0.0/8"], &[]);
    sb.assert_usage_error(&run, &["--istio-service-exclude-cidr", "completion"]);
}

#[test]
fn version_names_the_git_commit() {
    let sb = Sandbox::new();
    let run = sb.run(&["--version"], &[]);
    let out = run.success().trim().to_string();
    let root = env!("CARGO_MANIFEST_DIR");
    let git = tool("git", &["-C", root, "rev-parse", "--short", "HEAD"], &[]);
    let commit = if git.code == Some(0) {
        git.stdout.trim().to_string()
    } else {
        "unknown".to_string()
    };
    assert_eq!(
        out,
        format!(
            "istio-iptables {} (commit {commit})",
            env!("CARGO_PKG_VERSION")
        ),
        "--version names the version and the commit built from"
    );
}

// ---------------------------------------------------------------------------------------------
// Lists from files
// ---------------------------------------------------------------------------------------------

/// Each list flag, its env var, a file's content, and the same list typed.
#[rustfmt::skip]
const LISTS: &[(&str, &str, &str, &str)] = &[
    ("-i", "ISTIO_SERVICE_CIDR",                 "10.96.0.0/12\n# pods\n10.244.0.0/16, fd00::/8\n", "10.96.0.0/12,10.244.0.0/16,fd00::/8"),
    ("-x", "ISTIO_SERVICE_EXCLUDE_CIDR",         "169.254.169.254/32 # metadata\n10.0.0.0/8\n",   "169.254.169.254/32,10.0.0.0/8"),
    ("-b", "ISTIO_INBOUND_PORTS",                "8080 9090\n9100:9110\n",                        "8080,9090,9100:9110"),
    ("-d", "ISTIO_LOCAL_EXCLUDE_PORTS",          "15090\n15021,15020\n",                          "15090,15021,15020"),
    ("-q", "ISTIO_OUTBOUND_PORTS",               "# always\n443\n",                               "443"),
    ("-o", "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", "5432 6379\n",                                   "5432,6379"),
    ("-k", "KUBE_VIRT_INTERFACES",               "veth0\nveth1\n",                                "veth0,veth1"),
    ("-c", "ISTIO_EXCLUDE_INTERFACES",           "eth1 # storage\n",                              "eth1"),
    ("-u", "PROXY_UID",                          "1337\n1338\n",                                  "1337,1338"),
    ("-g", "PROXY_GID",                          "1337 1339\n",                                   "1337,1339"),
];

/// `--dry-run -i '*' -b '*' ARGS` (something captured, so every list shows in the script),
/// without the `-i` or `-b` that ARGS or ENV give themselves.
fn dry_run(sb: &Sandbox, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut full = vec!["--dry-run"];
    for (flag, var) in [("-i", "ISTIO_SERVICE_CIDR"), ("-b", "ISTIO_INBOUND_PORTS")] {
        if !args.contains(&flag) && !env.iter().any(|(k, _)| *k == var) {
            full.extend([flag, "*"]);
        }
    }
    full.extend_from_slice(args);
    let run = sb.run(&full, env);
    let script = run.success().to_string();
    assert!(
        sb.calls().is_empty(),
        "a dry run runs nothing: {}",
        sb.calls()
    );
    script
}

#[test]
fn every_list_flag_and_env_var_reads_at_path_as_if_typed() {
    for &(flag, env, content, typed) in LISTS {
        let sb = Sandbox::new();
        let path = sb.file("list.txt", content);
        let at = format!("@{}", path.display());
        let want = dry_run(&sb, &[flag, typed], &[]);
        let control = dry_run(&sb, &[], &[]);
        assert_ne!(
            want, control,
            "{flag} {typed} should change the script (else this proves nothing)"
        );
        assert_eq!(
            dry_run(&sb, &[flag, &at], &[]),
            want,
            "{flag} {at} is {flag} {typed}"
        );
        assert_eq!(
            dry_run(&sb, &[], &[(env, &at)]),
            want,
            "{env}={at} is {flag} {typed}"
        );
    }
    for (var, content, typed) in [
        (
            "ISTIO_OUTBOUND_OWNER_GROUPS",
            "java\n202 # batch\n",
            "java,202",
        ),
        (
            "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
            "888\nftp\n",
            "888,ftp",
        ),
    ] {
        let sb = Sandbox::new();
        let path = sb.file("groups.txt", content);
        let at = format!("@{}", path.display());
        let want = dry_run(&sb, &[], &[(var, typed)]);
        assert_ne!(
            want,
            dry_run(&sb, &[], &[]),
            "{var}={typed} should change the script"
        );
        assert_eq!(
            dry_run(&sb, &[], &[(var, &at)]),
            want,
            "{var}={at} is {var}={typed}"
        );
    }
}

#[test]
fn thousands_of_cidrs_from_a_file_print_the_same_script_as_typed() {
    // 5,000 CIDRs still fit in one argument (70 KB), so both ways can be compared.
    let cidrs: Vec<String> = (0..5000)
        .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
        .collect();
    let sb = Sandbox::new();
    let path = sb.file("exclude.txt", &(cidrs.join("\n") + "\n"));
    let at = format!("@{}", path.display());
    let typed = dry_run(&sb, &["-x", &cidrs.join(",")], &[]);
    assert!(typed.matches("-j RETURN").count() >= 5000, "{typed}");
    assert_eq!(dry_run(&sb, &["-x", &at], &[]), typed);
}

#[test]
fn an_unreadable_list_file_is_refused_naming_the_flag_and_the_path() {
    let sb = Sandbox::new();
    for run in [
        sb.run(&["-x", "@/nonexistent/exclude.txt"], &[]),
        sb.run(&["--dry-run", "-x", "@/nonexistent/exclude.txt"], &[]),
    ] {
        sb.assert_refused(
            &run,
            &[
                "--istio-service-exclude-cidr",
                "/nonexistent/exclude.txt",
                "No such file",
            ],
        );
    }
    let run = sb.run(&[], &[("ISTIO_SERVICE_EXCLUDE_CIDR", "@/nonexistent/x")]);
    sb.assert_refused(&run, &["ISTIO_SERVICE_EXCLUDE_CIDR", "/nonexistent/x"]);
    let run = sb.run(&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS", "@/nonexistent/g")]);
    sb.assert_refused(&run, &["ISTIO_OUTBOUND_OWNER_GROUPS", "/nonexistent/g"]);
    let run = sb.run(&["-d", "@/dev/zero"], &[]);
    sb.assert_refused(
        &run,
        &[
            "--istio-local-exclude-ports",
            "/dev/zero",
            "not a regular file",
        ],
    );
    let dir = sb.dir.path().to_str().unwrap().to_string();
    let run = sb.run(&["-k", &format!("@{dir}")], &[]);
    sb.assert_refused(&run, &["--kube-virt-interfaces", &dir, "directory"]);

    // An invalid item read from a file: the flag, the path and the line, never the item.
    let bad = sb.file("bad.txt", "10.0.0.0/8\n10.0.0.0/33\n");
    let at = format!("@{}", bad.display());
    let run = sb.run(&["-x", &at], &[]);
    sb.assert_refused(&run, &["--istio-service-exclude-cidr", &at, "line 2"]);
    assert!(!run.stderr.contains("10.0.0.0/33"), "{}", run.dump());
    let ports = sb.file("ports.txt", "15090 http\n");
    let at = format!("@{}", ports.display());
    let run = sb.run(
        &[
            "explain",
            "--direction",
            "inbound",
            "--dst",
            "10.0.0.1:80",
            "-d",
            &at,
        ],
        &[],
    );
    sb.assert_refused(
        &run,
        &["--istio-local-exclude-ports", &at, "item 2 on line 1"],
    );
    assert!(!run.stderr.contains("http"), "{}", run.dump());
}

/// Istio's injector copies annotations (`excludeOutboundIPRanges`, ...) into the list flags,
/// so whoever writes an annotation picks the path this program reads as root: an error
/// names the flag, the file, the line and what is wrong, never what the file holds. The same
/// for env vars, and for names that do not exist on this machine.
#[test]
fn a_list_file_that_does_not_parse_is_never_echoed() {
    let sb = Sandbox::new();
    let secret = "db_password=hunter2";
    let app = sb.file(
        "app.conf",
        &format!("# app settings\n{secret}\nlevel=debug\n"),
    );
    let at = format!("@{}", app.display());
    for run in [
        sb.run(&["-x", &at], &[]),
        sb.run(&["--dry-run", "-i", &at], &[]),
        sb.run(&["-c", &at], &[]),
        sb.run(&["-b", &at], &[]),
        sb.run(&[], &[("ISTIO_SERVICE_EXCLUDE_CIDR", &at)]),
        sb.run(&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS", &at)]),
    ] {
        sb.assert_refused(&run, &[&at, "the item on line 2"]);
        assert!(!run.stderr.contains("hunter2"), "{}", run.dump());
    }
    // The process's own environment, as root reads it: the error shows none of it.
    let run = sb.run(
        &["-x", "@/proc/self/environ"],
        &[("APP_TOKEN", "s3cr3t-token")],
    );
    sb.assert_refused(&run, &["@/proc/self/environ", "line 1"]);
    assert!(
        !run.stderr.contains("s3cr3t") && !run.stderr.contains("PATH="),
        "{}",
        run.dump()
    );
    // A name that passes the syntax but does not exist here: named by its line only.
    let users = sb.file("users.txt", "0\nhunter2-user\n");
    let at = format!("@{}", users.display());
    let run = sb.run(&["-u", &at], &[]);
    sb.assert_refused(&run, &["--proxy-uid", &at, "line 2", "names no user"]);
    assert!(!run.stderr.contains("hunter2"), "{}", run.dump());
}

/// Some editors start UTF-8 text with a byte-order mark: it is not part of the first item.
#[test]
fn a_list_file_with_a_byte_order_mark_reads_as_without() {
    let sb = Sandbox::new();
    let bom = sb.file("bom.txt", "\u{feff}10.0.0.0/8\n172.16.0.0/12\n");
    let at = format!("@{}", bom.display());
    let from_file = dry_run(&sb, &["-i", "*", "-x", &at], &[]);
    let typed = dry_run(&sb, &["-i", "*", "-x", "10.0.0.0/8,172.16.0.0/12"], &[]);
    assert_eq!(from_file, typed);
    assert!(from_file.contains("-d 10.0.0.0/8 -j RETURN"), "{from_file}");
}

/// 20,000 excluded CIDRs (16,000 IPv4, 4,000 IPv6) from a file: past the argv limit, applied
/// for real in a fresh namespace in one iptables-restore per family, then verified.
#[test]
#[ignore = "needs root and network namespaces"]
fn twenty_thousand_cidrs_from_a_file_apply_in_one_restore_per_family() {
    if common::skip_unless_root("twenty_thousand_cidrs_from_a_file_apply_in_one_restore_per_family")
    {
        return;
    }
    if !have("strace") {
        panic!("strace is needed to count the restores (.ci/run installs it)");
    }
    let dir = TempDir::new("istio-iptables-20k");
    let mut text = String::from("# 20,000 ranges never captured\n");
    for i in 0..16_000u32 {
        text.push_str(&format!("10.{}.{}.0/24\n", i / 256, i % 256));
    }
    for i in 0..4_000u32 {
        text.push_str(&format!("fd00:{i:x}::/32 "));
    }
    assert!(
        text.len() > 128 * 1024,
        "the list must not fit in one argument"
    );
    let file = dir.path().join("exclude.txt");
    fs::write(&file, &text).expect("write the list");
    let at = format!("@{}", file.display());
    let mut args: Vec<&str> = SEED.to_vec();
    let x = args.iter().position(|a| *a == "-x").unwrap() + 1;
    args[x] = &at;
    let apply = common::shell_command(std::iter::once(BIN).chain(args.iter().copied()));
    let verify = common::shell_command([BIN, "verify"].into_iter().chain(args.iter().copied()));
    let script = format!(
        "ip link set lo up\n\
         export ENABLE_INBOUND_IPV6=true\n\
         strace -f -qq -e trace=execve -e signal=none -o \"$NS_OUT/trace\" {apply} \
           >\"$NS_OUT/apply.out\" 2>&1\n\
         iptables-save -t nat > \"$NS_OUT/v4\"\n\
         ip6tables-save -t nat > \"$NS_OUT/v6\"\n\
         {verify} > \"$NS_OUT/verify\" 2>&1\n"
    );
    let out = common::run_in_fresh_ns_ok(&script).unwrap_or_else(|e| panic!("{e}"));
    let trace = out.file("trace").unwrap();
    let restores: Vec<&str> = trace
        .lines()
        .filter(|l| l.contains("execve(") && l.contains("restore\"") && l.ends_with("= 0"))
        .collect();
    let v4 = restores.iter().filter(|l| l.contains("/iptables")).count();
    let v6 = restores.iter().filter(|l| l.contains("/ip6tables")).count();
    assert!(
        v4 == 1 && v6 == 1,
        "one iptables-restore and one ip6tables-restore, got:\n{}",
        restores.join("\n")
    );
    let count = |save: &str, prefix: &str| {
        save.lines()
            .filter(|l| {
                l.starts_with("-A ISTIO_OUTPUT -d ")
                    && l.contains(prefix)
                    && l.ends_with("-j RETURN")
            })
            .count()
    };
    let v4 = out.file("v4").unwrap();
    let v6 = out.file("v6").unwrap();
    assert_eq!(count(v4, "-d 10."), 16_000, "IPv4 exclusions in the kernel");
    assert_eq!(
        count(v6, "-d fd00:"),
        4_000,
        "IPv6 exclusions in the kernel"
    );
    // `verify` with the same file exited 0 (no drift), or the script (`set -e`) would have
    // failed above.
}
