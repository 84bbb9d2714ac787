//! Applying for real, as root, inside fresh network namespaces: backend detection and the
//! number of processes run, idempotence, changed configs, repairing half-applied state,
//! `--reconcile=false` / `--force-apply`, all-or-nothing rollback, `--cleanup-only`,
//! `--network-namespace`, the xtables lock, `--run-validation` and error messages.
//!
//! Every test is `#[ignore = "needs root and network namespaces"]` (run them with `cargo
//! test -- --include-ignored`), starts with `if common::skip_unless_root(..) { return; }`
//! and runs everything in a namespace script ([`common::run_in_fresh_ns`]): a fresh network
//! namespace plus a private mount namespace in which a tmpfs is mounted over `/run` (so the
//! legacy xtables lock and `ip netns` files are private to the test too), `lo` is up, and a
//! shell function `snap LABEL` records the whole observable state into `$NS_OUT`:
//! `iptables-nft-save`, `ip6tables-nft-save`, `iptables-legacy-save`, `ip6tables-legacy-save`
//! (all compared after [`common::normalize_save`]), `ip -4/-6 rule`,
//! `ip -4/-6 route show table all`, `ip -6 addr show dev lo` and
//! `/proc/net/ip{,6}_tables_names`. The host's own tables are never touched.
//!
//! The binary runs with a cleared environment plus `PATH` and `ENABLE_INBOUND_IPV6`
//! (`false` unless IPv6 is tested). Some tests put a directory of shims first in `PATH`:
//! each shim appends `NAME ARGS` to a log and execs the real program (or fails on purpose),
//! which counts and inspects the processes the binary runs.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{
    BIN, NsOutput, SEED, compare_lines, extract_heredoc_blocks, indent, normalize_save,
    run_in_fresh_ns, run_with_timeout, sane_path, seed_with, shell_command, shell_quote,
    skip_unless_root,
};

/// IPv4 only.
const V4: &[(&str, &str)] = &[("ENABLE_INBOUND_IPV6", "false")];
/// IPv4 and IPv6.
const V6: &[(&str, &str)] = &[("ENABLE_INBOUND_IPV6", "true")];

/// `a` followed by `b`.
fn cat<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<&'a str> {
    a.iter().chain(b).copied().collect()
}

/// The seed command with `--force-iptables-binary BACKEND`.
fn seed_forcing(backend: &str) -> Vec<&str> {
    cat(SEED, &["--force-iptables-binary", backend])
}

// ---------------------------------------------------------------------------
// Namespace scripts
// ---------------------------------------------------------------------------

/// Programs that get a shim: every iptables flavour and tool the binary might run.
fn shimmed_programs() -> Vec<String> {
    let mut v = Vec::new();
    for base in ["iptables", "ip6tables"] {
        for flavor in ["-nft", "-legacy", ""] {
            v.push(format!("{base}{flavor}"));
            for op in ["-save", "-restore"] {
                v.push(format!("{base}{flavor}{op}"));
            }
        }
    }
    v.push("ip".into());
    v.push("nft".into());
    v
}

/// The real program `name` in the standard directories (never a shim).
fn real_program(name: &str) -> Option<PathBuf> {
    common::DEFAULT_PATH
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Skips `test` (with a note) unless every one of `programs` is installed.
fn skip_unless_installed(test: &str, programs: &[&str]) -> bool {
    let missing = programs.iter().any(|p| real_program(p).is_none());
    if missing {
        eprintln!("SKIPPED {test}: needs {}", programs.join(" and "));
    }
    missing
}

/// How the shims misbehave.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fail {
    /// Every shim logs and execs the real program.
    Nothing,
    /// `ip6tables-*restore --noflush` prints `ip6tables-restore: line 3 failed` and exits 1.
    Ip6tablesRestoreNoflush,
    /// `ip ... rule add ...` fails like the kernel refusing it.
    IpRuleAdd,
    /// `nft -f ...` fails like nft refusing a transaction (at its line 2).
    NftTransaction,
    /// `{ip,ip6}tables-*restore --noflush` (`ipv6` picks the family) commits the tables before
    /// the `n`th (1-based) of its payload with the real program, then fails like a kernel
    /// refusing the `n`th table: what iptables-restore does, table by table.
    NthTable { ipv6: bool, n: usize },
    /// `ip ... rule add` fails when its arguments contain this text.
    IpRuleAddOf(&'static str),
}

/// A namespace script under construction.
struct Script {
    text: String,
    shims: bool,
}

impl Script {
    /// The prelude: private /run, lo up, the `snap` function.
    fn new() -> Script {
        let text = r#"mount -t tmpfs tmpfs /run
ip link set lo up
snap() {
    # An address in DAD (`tentative`) gains its local route a moment later: wait it out.
    __w=0; while ip -6 addr show | grep -q tentative; do __w=$((__w+1)); [ $__w -lt 500 ]; sleep 0.01; done
    iptables-nft-save > "$NS_OUT/$1.v4-nft"
    ip6tables-nft-save > "$NS_OUT/$1.v6-nft"
    if command -v iptables-legacy-save >/dev/null; then iptables-legacy-save > "$NS_OUT/$1.v4-legacy"; else : > "$NS_OUT/$1.v4-legacy"; fi
    if command -v ip6tables-legacy-save >/dev/null; then ip6tables-legacy-save > "$NS_OUT/$1.v6-legacy"; else : > "$NS_OUT/$1.v6-legacy"; fi
    cat /proc/net/ip_tables_names > "$NS_OUT/$1.legacy-names4" 2>/dev/null || : > "$NS_OUT/$1.legacy-names4"
    cat /proc/net/ip6_tables_names > "$NS_OUT/$1.legacy-names6" 2>/dev/null || : > "$NS_OUT/$1.legacy-names6"
    ip -4 rule > "$NS_OUT/$1.rule4"
    ip -6 rule > "$NS_OUT/$1.rule6"
    ip -4 route show table all > "$NS_OUT/$1.route4"
    ip -6 route show table all > "$NS_OUT/$1.route6"
    ip -6 addr show dev lo > "$NS_OUT/$1.addr6-lo"
    nft list ruleset inet > "$NS_OUT/$1.nft-inet"
}
"#
        .to_string();
        Script { text, shims: false }
    }

    /// Appends a shell line.
    fn sh(mut self, line: &str) -> Script {
        self.text.push_str(line);
        self.text.push('\n');
        self
    }

    /// Records the state as `label`.
    fn snap(self, label: &str) -> Script {
        self.sh(&format!("snap {}", shell_quote(label)))
    }

    /// Writes shims for [`shimmed_programs`] into `$NS_TMP/shims`; later [`Script::run`]s
    /// put that directory first in PATH and move each run's log to `$NS_OUT/LABEL.execs`.
    /// Calling it again replaces the shims (e.g. to change what fails).
    fn shims(mut self, fail: Fail) -> Script {
        self.shims = true;
        let mut s = String::from("mkdir -p \"$NS_TMP/shims\"\n");
        for name in shimmed_programs() {
            let Some(real) = real_program(&name) else {
                continue;
            };
            let mut body = String::from("#!/bin/sh\n");
            body.push_str(&format!(
                "echo \"{name} $*\" >> \"$(dirname \"$0\")/exec.log\"\n"
            ));
            if fail == Fail::Ip6tablesRestoreNoflush
                && name.starts_with("ip6tables")
                && name.ends_with("restore")
            {
                body.push_str(
                    "case \" $* \" in *\" --noflush \"*) \
                     echo 'ip6tables-restore: line 3 failed' >&2; exit 1;; esac\n",
                );
            }
            if let Fail::NthTable { ipv6, n } = fail
                && name.starts_with(if ipv6 { "ip6tables" } else { "iptables" })
                && name.ends_with("restore")
            {
                let real = shell_quote(&real);
                let _ = write!(
                    body,
                    "case \" $* \" in *\" --noflush \"*)\n\
                     __p=\"$(dirname \"$0\")/payload.$$\"; cat > \"$__p\"\n\
                     __l=$(awk -v n={n} 'substr($0,1,1)==\"*\"{{k++; if (k==n) {{print NR; exit}}}}' \"$__p\")\n\
                     if [ -n \"$__l\" ]; then\n\
                     head -n $((__l - 1)) \"$__p\" | {real} \"$@\" || exit $?\n\
                     echo \"{name}: line $((__l + 1)) failed (shim: table {n} refused)\" >&2; exit 1\n\
                     fi\n\
                     exec {real} \"$@\" < \"$__p\";;\n\
                     esac\n"
                );
            }
            if let Fail::IpRuleAddOf(text) = fail
                && name == "ip"
            {
                let _ = writeln!(
                    body,
                    "case \" $* \" in *\" rule add \"*\"{text}\"*) \
                     echo 'RTNETLINK answers: Operation not permitted (shim)' >&2; exit 2;; esac"
                );
            }
            if fail == Fail::NftTransaction && name == "nft" {
                body.push_str(
                    "case \" $* \" in *\" -f \"*) cat >/dev/null; \
                     echo '/dev/stdin:2:1-3: Error: Could not process rule: refused (shim)' >&2; exit 1;; esac\n",
                );
            }
            if fail == Fail::IpRuleAdd && name == "ip" {
                body.push_str(
                    "case \" $* \" in *\" rule add \"*) \
                     echo 'RTNETLINK answers: Operation not permitted (shim)' >&2; exit 2;; esac\n",
                );
            }
            body.push_str(&format!("exec {} \"$@\"\n", shell_quote(&real)));
            let _ = write!(
                s,
                "cat > \"$NS_TMP/shims/{name}\" <<'SHIM_EOF'\n{body}SHIM_EOF\n\
                 chmod 755 \"$NS_TMP/shims/{name}\"\n"
            );
        }
        self.text.push_str(&s);
        self
    }

    /// Runs the binary as run `label`: env cleared but for PATH and `env`; stdout, stderr,
    /// exit code and wall time (ms) go to `$NS_OUT/LABEL.{out,err,rc,ms}`. A failing run does
    /// not stop the script.
    fn run(self, label: &str, env: &[(&str, &str)], args: &[&str]) -> Script {
        self.run_traced(label, env, args, None)
    }

    /// [`Script::run`] under `strace -f -qq -e trace=TRACE -o $NS_OUT/LABEL.strace`.
    fn run_traced(
        self,
        label: &str,
        env: &[(&str, &str)],
        args: &[&str],
        trace: Option<&str>,
    ) -> Script {
        let path = if self.shims {
            format!("PATH=\"$NS_TMP/shims\":{}", shell_quote(sane_path()))
        } else {
            shell_command([format!("PATH={}", sane_path())])
        };
        let mut words: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if let Some(t) = trace {
            words.extend(
                ["strace", "-f", "-qq", "-e", &format!("trace={t}"), "-o"].map(String::from),
            );
        }
        let strace_out = if trace.is_some() {
            format!("\"$NS_OUT/{label}.strace\" ")
        } else {
            String::new()
        };
        let mut cmd = vec![BIN.to_string()];
        cmd.extend(args.iter().map(|a| a.to_string()));
        let l = shell_quote(label);
        let mut s = format!(
            "set +x\n__t0=$(date +%s%N)\n__rc=0\n\
             env -i {path} {} {strace_out}{} >\"$NS_OUT/{l}.out\" 2>\"$NS_OUT/{l}.err\" || __rc=$?\n\
             echo $__rc > \"$NS_OUT/{l}.rc\"\n\
             echo $(( ($(date +%s%N) - __t0) / 1000000 )) > \"$NS_OUT/{l}.ms\"\n",
            shell_command(&words),
            shell_command(&cmd),
        );
        if self.shims {
            let _ = writeln!(
                s,
                "if [ -f \"$NS_TMP/shims/exec.log\" ]; then mv \"$NS_TMP/shims/exec.log\" \"$NS_OUT/{l}.execs\"; \
                 else : > \"$NS_OUT/{l}.execs\"; fi"
            );
        }
        s.push_str("set -x");
        self.sh(&s)
    }

    /// Runs the script; panics (with everything) when the script itself fails.
    fn exec(self) -> Ns {
        let out = run_in_fresh_ns(&self.text);
        if !out.success() {
            panic!("namespace script failed\n{}", out.describe());
        }
        Ns { out }
    }
}

/// A finished namespace script.
struct Ns {
    out: NsOutput,
}

/// One run of the binary.
#[derive(Debug)]
struct Run {
    label: String,
    rc: i32,
    stdout: String,
    stderr: String,
    ms: u64,
    /// Shim log lines (`PROGRAM ARGS`), when shims were installed.
    execs: Vec<String>,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "run `{}`: exit {} after {} ms\n--- stdout ---\n{}--- stderr ---\n{}--- processes (shim log) ---\n{}",
            self.label,
            self.rc,
            self.ms,
            indent(&self.stdout, "  "),
            indent(&self.stderr, "  "),
            indent(&self.execs.join("\n"), "  ")
        )
    }

    /// Every log line: info and debug go to stdout, warnings and errors to stderr (Istio's
    /// default target is stdout; ours splits it).
    fn logs(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// The messages of the error log lines (`TIME<TAB>error<TAB>MESSAGE`) on stderr.
    fn error_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter_map(|l| l.split_once("\terror\t").map(|(_, msg)| msg))
            .collect()
    }

    /// The one error message; panics unless there is exactly one.
    fn one_error(&self) -> &str {
        let lines = self.error_lines();
        assert_eq!(
            lines.len(),
            1,
            "expected exactly one error log line\n{}",
            self.describe()
        );
        lines[0]
    }

    /// Shim log lines whose program satisfies `pred`.
    fn execs_of(&self, pred: impl Fn(&str) -> bool) -> Vec<&str> {
        self.execs
            .iter()
            .map(String::as_str)
            .filter(|l| pred(l.split(' ').next().unwrap_or("")))
            .collect()
    }
}

/// The parts of a [`State`], in order.
const PARTS: &[&str] = &[
    "v4-nft",
    "v6-nft",
    "v4-legacy",
    "v6-legacy",
    "legacy-names4",
    "legacy-names6",
    "rule4",
    "rule6",
    "route4",
    "route6",
    "addr6-lo",
    "nft-inet",
];
/// The iptables parts.
const TABLES: &[&str] = &["v4-nft", "v6-nft", "v4-legacy", "v6-legacy"];

/// A recorded state: part name to (normalised) content.
#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    label: String,
    parts: BTreeMap<&'static str, String>,
}

impl State {
    fn get(&self, part: &str) -> &str {
        self.parts.get(part).map(String::as_str).unwrap_or("")
    }

    /// Only the named parts.
    fn only(&self, parts: &[&str]) -> State {
        State {
            label: self.label.clone(),
            parts: self
                .parts
                .iter()
                .filter(|(k, _)| parts.contains(k))
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
        }
    }

    /// Drops save sections that hold nothing (built-in chains with policy ACCEPT, no rules,
    /// no user chains): legacy x_tables cannot be unloaded once created.
    fn without_empty_tables(&self) -> State {
        let mut s = self.clone();
        for part in TABLES {
            if let Some(text) = s.parts.get_mut(part) {
                *text = drop_empty_tables(text);
            }
        }
        s
    }

    fn describe(&self) -> String {
        let mut s = format!("state `{}`:\n", self.label);
        for (k, v) in &self.parts {
            let _ = write!(s, "  [{k}]\n{}", indent(v, "    "));
        }
        s
    }
}

/// `nft list ruleset inet` without the counters' values (which traffic changes).
fn normalize_nft(listing: &str) -> String {
    let mut out = String::new();
    for line in listing.lines() {
        let w: Vec<&str> = line.split(' ').collect();
        let mut kept = Vec::new();
        let mut i = 0;
        while i < w.len() {
            kept.push(w[i]);
            if w[i].ends_with("counter") && w.get(i + 1) == Some(&"packets") {
                i += 5;
            } else {
                i += 1;
            }
        }
        out.push_str(&kept.join(" "));
        out.push('\n');
    }
    out
}

/// See [`State::without_empty_tables`]; `save` is normalised.
fn drop_empty_tables(save: &str) -> String {
    let mut out = String::new();
    let mut section: Vec<&str> = Vec::new();
    for line in save.lines() {
        section.push(line);
        if line == "COMMIT" {
            let empty = section.iter().all(|l| {
                l.starts_with('*')
                    || *l == "COMMIT"
                    || (l.starts_with(':') && l.ends_with(" ACCEPT"))
            });
            if !empty {
                for l in &section {
                    out.push_str(l);
                    out.push('\n');
                }
            }
            section.clear();
        }
    }
    for l in section {
        out.push_str(l);
        out.push('\n');
    }
    out
}

impl Ns {
    fn run(&self, label: &str) -> Run {
        let f = |ext: &str| self.out.files.get(&format!("{label}.{ext}")).cloned();
        let rc = f("rc")
            .unwrap_or_else(|| panic!("no run `{label}`\n{}", self.out.describe()))
            .trim()
            .parse()
            .unwrap_or(-1);
        Run {
            label: label.into(),
            rc,
            stdout: f("out").unwrap_or_default(),
            stderr: f("err").unwrap_or_default(),
            ms: f("ms").and_then(|s| s.trim().parse().ok()).unwrap_or(0),
            execs: f("execs")
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect(),
        }
    }

    /// Run `label`, asserting exit code `code`.
    fn run_rc(&self, label: &str, code: i32) -> Run {
        let r = self.run(label);
        assert_eq!(
            r.rc,
            code,
            "run `{label}` should exit {code}\n{}\n{}",
            r.describe(),
            self.context()
        );
        r
    }

    fn state(&self, label: &str) -> State {
        let mut parts = BTreeMap::new();
        for part in PARTS {
            let name = format!("{label}.{part}");
            let content = self
                .out
                .file(&name)
                .unwrap_or_else(|e| panic!("{e}"))
                .to_string();
            let content = if TABLES.contains(part) {
                normalize_save(&content)
            } else if *part == "nft-inet" {
                normalize_nft(&content)
            } else {
                content
            };
            parts.insert(*part, content);
        }
        State {
            label: label.into(),
            parts,
        }
    }

    fn file(&self, name: &str) -> &str {
        self.out.file(name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The script and every run's stderr (not the state files: the assertion shows those).
    fn context(&self) -> String {
        let mut s = String::from("--- namespace script ---\n");
        for (i, line) in self.out.script.lines().enumerate() {
            if line.starts_with("cat > \"$NS_TMP/shims") {
                let _ = writeln!(s, "{:4} | {line} (shim body omitted)", i + 1);
            } else {
                let _ = writeln!(s, "{:4} | {line}", i + 1);
            }
        }
        for name in self.out.files.keys() {
            if let Some(label) = name.strip_suffix(".rc") {
                let r = self.run(label);
                let _ = writeln!(
                    s,
                    "--- run `{label}`: exit {}, {} ms; logs ---\n{}",
                    r.rc,
                    r.ms,
                    indent(&r.logs(), "  ")
                );
            }
        }
        s
    }
}

/// Panics with a per-part diff unless `a` and `b` are equal.
fn assert_same(what: &str, a: &State, b: &State, ctx: &str) {
    let mut diffs = String::new();
    let keys: std::collections::BTreeSet<&str> =
        a.parts.keys().chain(b.parts.keys()).copied().collect();
    for k in keys {
        let (x, y) = (a.get(k), b.get(k));
        let xl: Vec<&str> = x.lines().collect();
        let yl: Vec<&str> = y.lines().collect();
        if let Some(d) = compare_lines(&a.label, &xl, &b.label, &yl) {
            let _ = write!(diffs, "[{k}] differs:\n{}", indent(&d, "  "));
        }
    }
    if !diffs.is_empty() {
        panic!("{what}: `{}` != `{}`\n{diffs}\n{ctx}", a.label, b.label);
    }
}

/// The state after applying `args` once in a fresh namespace.
fn fresh_state(env: &[(&str, &str)], args: &[&str]) -> State {
    let ns = Script::new().run("fresh", env, args).snap("fresh").exec();
    ns.run_rc("fresh", 0);
    let mut s = ns.state("fresh");
    s.label = format!("fresh apply of {}", shell_command(args));
    s
}

/// Lines of `text` containing `needle`.
fn count_lines(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

/// Shell lines adding a foreign chain and rules (nat and filter) with `tool`.
fn foreign_rules(tool: &str) -> String {
    format!(
        "{tool} -t nat -N FOREIGN\n{tool} -t nat -A FOREIGN -j RETURN\n\
         {tool} -t nat -A OUTPUT -p tcp --dport 9999 -j FOREIGN\n\
         {tool} -t filter -N FOREIGN_F\n{tool} -t filter -A FOREIGN_F -j RETURN\n\
         {tool} -t filter -A INPUT -p tcp --dport 9998 -j FOREIGN_F\n"
    )
}

// ---------------------------------------------------------------------------
// Process counting
// ---------------------------------------------------------------------------

/// Successful execve's in an `strace -f -e trace=execve` log, in order: (path, line).
fn strace_execs(log: &str) -> Vec<(String, String)> {
    let mut pending: BTreeMap<String, String> = BTreeMap::new();
    let mut out = Vec::new();
    for line in log.lines() {
        let pid = line.split_whitespace().next().unwrap_or("").to_string();
        if let Some(i) = line.find("execve(\"") {
            let rest = &line[i + 8..];
            let path = rest.split('"').next().unwrap_or("").to_string();
            if line.trim_end().ends_with("<unfinished ...>") {
                pending.insert(pid, path);
            } else if line.trim_end().ends_with("= 0") {
                out.push((path, line.to_string()));
            }
        } else if line.contains("<... execve resumed>")
            && line.trim_end().ends_with("= 0")
            && let Some(path) = pending.remove(&pid)
        {
            out.push((path, line.to_string()));
        }
    }
    out
}

/// Programs run by the binary, by kind.
#[derive(Debug, Default)]
struct Processes {
    v4: Vec<String>,
    v6: Vec<String>,
    ip: Vec<String>,
    other: Vec<String>,
}

impl Processes {
    fn classify(programs: impl IntoIterator<Item = (String, String)>) -> Processes {
        let mut p = Processes::default();
        for (name, line) in programs {
            let base = name.rsplit('/').next().unwrap_or(&name).to_string();
            if base.starts_with("ip6tables") {
                p.v6.push(line);
            } else if base.starts_with("iptables") {
                p.v4.push(line);
            } else if base == "ip" {
                p.ip.push(line);
            } else {
                p.other.push(line);
            }
        }
        p
    }
}

/// How processes are counted: strace when installed (sees every execve), else shims.
fn have_strace() -> bool {
    real_program("strace").is_some()
}

/// Runs `args` once in a fresh namespace and returns what it ran.
fn count_processes(env: &[(&str, &str)], args: &[&str]) -> (Processes, String) {
    let strace = have_strace();
    let mut script = Script::new();
    if strace {
        script = script.run_traced("apply", env, args, Some("execve"));
    } else {
        eprintln!("strace is not installed: counting processes with PATH shims");
        script = script.shims(Fail::Nothing).run("apply", env, args);
    }
    let ns = script.snap("after").exec();
    let run = ns.run_rc("apply", 0);
    let (procs, log) = if strace {
        let log = ns.file("apply.strace").to_string();
        let mut execs = strace_execs(&log);
        assert!(
            !execs.is_empty() && execs[0].0.ends_with("istio-iptables"),
            "the first execve of the strace log should be the binary\n{log}"
        );
        execs.remove(0);
        (Processes::classify(execs), log)
    } else {
        let execs = run.execs.iter().map(|l| {
            let name = l.split(' ').next().unwrap_or("").to_string();
            (name, l.clone())
        });
        (Processes::classify(execs), run.execs.join("\n"))
    };
    let report = format!(
        "processes run by `{}` (env {env:?}):\n{}\n{}\n{}",
        shell_command(args),
        indent(&log, "  "),
        run.describe(),
        ns.state("after").describe()
    );
    (procs, report)
}

// ---------------------------------------------------------------------------
// 1. Backend detection and process count
// ---------------------------------------------------------------------------

#[test]
#[ignore = "needs root and network namespaces"]
fn fresh_apply_runs_at_most_two_processes_for_ipv4_and_none_for_ipv6() {
    if skip_unless_root("fresh_apply_runs_at_most_two_processes_for_ipv4_and_none_for_ipv6") {
        return;
    }
    let (p, report) = count_processes(V4, SEED);
    assert!(
        p.v4.len() <= 2,
        "IPv4: {} processes, want at most 2\n{report}",
        p.v4.len()
    );
    assert!(
        p.v4.iter().any(|l| l.contains("restore")),
        "IPv4: no restore ran\n{report}"
    );
    assert!(p.v6.is_empty(), "IPv6 is off but ip6tables ran\n{report}");
    assert!(
        p.ip.is_empty() && p.other.is_empty(),
        "REDIRECT without IPv6 needs no ip/nft/other process\n{report}"
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn fresh_apply_with_ipv6_runs_at_most_two_processes_per_family() {
    if skip_unless_root("fresh_apply_with_ipv6_runs_at_most_two_processes_per_family") {
        return;
    }
    let (p, report) = count_processes(V6, SEED);
    assert!(p.v4.len() <= 2, "IPv4: {} processes\n{report}", p.v4.len());
    assert!(p.v6.len() <= 2, "IPv6: {} processes\n{report}", p.v6.len());
    assert!(
        p.v6.iter().any(|l| l.contains("restore")),
        "IPv6: no restore ran\n{report}"
    );
    // The ::6 address: one `ip` to look, one to add (counted apart from iptables).
    assert!(
        p.ip.len() <= 2 && p.ip.iter().all(|l| l.contains("addr")),
        "expected at most 2 `ip ... addr` processes for ::6, got {}\n{report}",
        p.ip.len()
    );
    assert!(p.other.is_empty(), "unexpected processes\n{report}");
}

#[test]
#[ignore = "needs root and network namespaces"]
fn legacy_tables_in_the_namespace_select_legacy() {
    let test = "legacy_tables_in_the_namespace_select_legacy";
    if skip_unless_root(test) || skip_unless_installed(test, &["iptables-legacy"]) {
        return;
    }
    let ns = Script::new()
        .sh("iptables-legacy -t filter -A INPUT -j ACCEPT")
        .run("apply", V4, SEED)
        .snap("after")
        .exec();
    let ctx = ns.context();
    let run = ns.run_rc("apply", 0);
    assert!(
        run.logs().contains("iptables-legacy-restore") && run.logs().contains("legacy tables"),
        "the log should name iptables-legacy-restore and why\n{}",
        run.describe()
    );
    let st = ns.state("after");
    assert!(
        st.get("v4-legacy").contains("-A ISTIO_OUTPUT"),
        "rules should be in iptables-legacy-save\n{}\n{ctx}",
        st.describe()
    );
    assert!(
        st.get("v4-legacy").contains("-A INPUT -j ACCEPT"),
        "the foreign legacy rule must stay\n{}",
        st.describe()
    );
    assert!(
        !st.get("v4-nft").contains("ISTIO"),
        "nothing may go to nft\n{}",
        st.describe()
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn force_iptables_binary_overrides_detection() {
    let test = "force_iptables_binary_overrides_detection";
    if skip_unless_root(test) || skip_unless_installed(test, &["iptables-legacy"]) {
        return;
    }
    for (setup, forced, other) in [
        // Legacy tables present, nft forced.
        (
            "iptables-legacy -t filter -A INPUT -j ACCEPT",
            "nft",
            "legacy",
        ),
        // No legacy tables, legacy forced.
        ("", "legacy", "nft"),
    ] {
        let ns = Script::new()
            .sh(setup)
            .run("apply", V4, &seed_forcing(forced))
            .snap("after")
            .exec();
        let run = ns.run_rc("apply", 0);
        let st = ns.state("after");
        assert!(
            run.logs().contains(&format!("iptables-{forced}-restore"))
                && run.logs().contains("forced"),
            "{}",
            run.describe()
        );
        assert!(
            st.get(&format!("v4-{forced}")).contains("-A ISTIO_OUTPUT")
                && !st.get(&format!("v4-{other}")).contains("ISTIO"),
            "--force-iptables-binary {forced}: rules must be in {forced} only\n{}\n{}",
            st.describe(),
            ns.context()
        );
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn detection_leaves_no_trace() {
    if skip_unless_root("detection_leaves_no_trace") {
        return;
    }
    let ns = Script::new()
        .snap("before")
        .run("skip", V4, &cat(SEED, &["--skip-rule-apply"]))
        .snap("after-skip")
        .run("apply", V4, SEED)
        .snap("after-apply")
        .exec();
    let ctx = ns.context();
    ns.run_rc("skip", 0);
    ns.run_rc("apply", 0);
    let before = ns.state("before");
    for part in TABLES {
        assert_eq!(
            before.get(part),
            "",
            "a fresh namespace has no {part} state\n{}",
            before.describe()
        );
    }
    assert_same(
        "--skip-rule-apply must change nothing",
        &before,
        &ns.state("after-skip"),
        &ctx,
    );
    // A real apply on nft: detection loaded no legacy table and ran nothing for it.
    let after = ns.state("after-apply");
    assert_same(
        "applying on nft must not create legacy tables",
        &before.only(&["v4-legacy", "v6-legacy", "legacy-names4", "legacy-names6"]),
        &after.only(&["v4-legacy", "v6-legacy", "legacy-names4", "legacy-names6"]),
        &ctx,
    );
}

// ---------------------------------------------------------------------------
// 2. Idempotence
// ---------------------------------------------------------------------------

#[test]
#[ignore = "needs root and network namespaces"]
fn seed_command_twice_changes_nothing_the_second_time() {
    if skip_unless_root("seed_command_twice_changes_nothing_the_second_time") {
        return;
    }
    let ns = Script::new()
        .shims(Fail::Nothing)
        .run("first", V4, SEED)
        .snap("first")
        .run("second", V4, SEED)
        .snap("second")
        .exec();
    let ctx = ns.context();
    ns.run_rc("first", 0);
    let second = ns.run_rc("second", 0);
    let first_state = ns.state("first");
    assert!(
        first_state.get("v4-nft").contains("-A ISTIO_OUTPUT"),
        "{}",
        first_state.describe()
    );
    assert_same(
        "second run of the seed command",
        &first_state,
        &ns.state("second"),
        &ctx,
    );
    assert!(
        second.logs().contains("already in place"),
        "the second run should say the rules are already in place\n{}",
        second.describe()
    );
    // The state is read with one iptables-nft-save; nothing else runs.
    let programs = second.execs_of(|_| true);
    assert!(
        programs.len() == 1 && programs[0].starts_with("iptables-nft-save"),
        "the second run must run one save and nothing else, ran {programs:?}\n{}",
        second.describe()
    );
}

/// The seed applied (run `first`), then `setup` (shell), then the seed again (run `second`,
/// with shims failing as `fail` says); the state is snapped as `before` and `after` it.
fn seed_again_after(setup: &str, fail: Fail) -> Ns {
    Script::new()
        .run("first", V4, SEED)
        .sh(setup)
        .snap("before")
        .shims(fail)
        .run("second", V4, SEED)
        .snap("after")
        .exec()
}

/// The iptables rules are in place but removing the tables of an earlier `--native-nftables`
/// run fails: the error says nothing was changed, and that claim rests on real saves (the
/// one read before the run, one to re-read for the rollback).
#[test]
#[ignore = "needs root and network namespaces"]
fn a_failed_switch_from_native_nftables_over_rules_in_place_is_checked_with_real_saves() {
    if skip_unless_root(
        "a_failed_switch_from_native_nftables_over_rules_in_place_is_checked_with_real_saves",
    ) {
        return;
    }
    let ns = seed_again_after("nft add table inet istio-proxy-nat", Fail::NftTransaction);
    let ctx = ns.context();
    ns.run_rc("first", 0);
    let run = ns.run_rc("second", 1);
    assert_same(
        "a failed switch",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
    let line = run.one_error();
    assert!(
        line.contains("removing the native nftables tables")
            && line.contains("nothing was changed (checked by re-reading the kernel)"),
        "{line}"
    );
    let saves = run.execs_of(|p| p == "iptables-nft-save");
    assert_eq!(saves.len(), 2, "{}", run.describe());
}

/// A namespace also holding a foreign rule with a comment: the re-run reads it with one
/// iptables-save, changes nothing, and keeps the foreign rule.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_rerun_over_a_foreign_commented_rule_changes_nothing_and_keeps_it() {
    if skip_unless_root("a_rerun_over_a_foreign_commented_rule_changes_nothing_and_keeps_it") {
        return;
    }
    let ns = seed_again_after(
        "iptables-nft -t filter -A INPUT -m comment --comment keep -j ACCEPT",
        Fail::Nothing,
    );
    let ctx = ns.context();
    ns.run_rc("first", 0);
    let second = ns.run_rc("second", 0);
    assert!(
        ns.state("before").get("v4-nft").contains("--comment keep"),
        "{ctx}"
    );
    assert_same(
        "re-run over a comment",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
    assert!(
        second.logs().contains("already in place"),
        "{}",
        second.describe()
    );
    let programs = second.execs_of(|_| true);
    assert!(
        programs.len() == 1 && programs[0].starts_with("iptables-nft-save"),
        "one save and nothing else, ran {programs:?}\n{}",
        second.describe()
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn tproxy_with_ipv6_twice_has_one_rule_route_and_address() {
    if skip_unless_root("tproxy_with_ipv6_twice_has_one_rule_route_and_address") {
        return;
    }
    let args = &["-m", "TPROXY", "-b", "*"];
    let ns = Script::new()
        .shims(Fail::Nothing)
        .run("first", V6, args)
        .snap("first")
        .run("second", V6, args)
        .snap("second")
        .exec();
    let ctx = ns.context();
    ns.run_rc("first", 0);
    let second = ns.run_rc("second", 0);
    let (a, b) = (ns.state("first"), ns.state("second"));
    assert_same("second TPROXY + IPv6 run", &a, &b, &ctx);
    for (part, what) in [
        ("rule4", "fwmark 0x539 lookup 133"),
        ("rule6", "fwmark 0x539 lookup 133"),
        ("route4", "local default dev lo table 133"),
        ("route6", "local default dev lo table 133"),
        ("addr6-lo", "inet6 ::6/128"),
    ] {
        assert_eq!(
            count_lines(b.get(part), what),
            1,
            "[{part}] should have exactly one `{what}`\n{}",
            b.describe()
        );
    }
    assert!(
        b.get("v4-nft").contains("TPROXY") && b.get("v6-nft").contains("TPROXY"),
        "{}",
        b.describe()
    );
    for family in ["IPv4", "IPv6"] {
        assert!(
            second
                .logs()
                .contains(&format!("{family} rules are already in place")),
            "the second run should say the {family} rules are already in place\n{}",
            second.describe()
        );
    }
    let changes = second.execs_of(|p| p.ends_with("-restore") || p == "nft");
    let ip_changes: Vec<&str> = second
        .execs_of(|p| p == "ip")
        .into_iter()
        .filter(|l| !l.contains(" show"))
        .collect();
    assert!(
        changes.is_empty() && ip_changes.is_empty(),
        "the second run must change nothing, ran {changes:?} {ip_changes:?}\n{}",
        second.describe()
    );
}

// ---------------------------------------------------------------------------
// 3. Changed config
// ---------------------------------------------------------------------------

/// Applies `from` then `to` in one namespace; the `parts` of the state must equal a fresh
/// apply of `to`, and applying `to` once more must commit nothing.
fn assert_transition(
    env: &[(&str, &str)],
    from: &[&str],
    to: &[&str],
    parts: &[&str],
) -> (State, State) {
    let ns = Script::new()
        .run("from", env, from)
        .snap("from")
        .run("to", env, to)
        .snap("to")
        .run("again", env, to)
        .snap("again")
        .exec();
    let ctx = ns.context();
    ns.run_rc("from", 0);
    ns.run_rc("to", 0);
    let again = ns.run_rc("again", 0);
    let fresh = fresh_state(env, to);
    let mut got = ns.state("to");
    got.label = format!("{} then {}", shell_command(from), shell_command(to));
    assert_same(
        "a changed config must converge to a fresh apply",
        &fresh.only(parts),
        &got.only(parts),
        &ctx,
    );
    assert_same(
        "applying the new config again",
        &got,
        &ns.state("again"),
        &ctx,
    );
    assert!(
        again.logs().contains("already in place"),
        "{}",
        again.describe()
    );
    (fresh, got)
}

#[test]
#[ignore = "needs root and network namespaces"]
fn all_inbound_ports_then_one_port_equals_fresh_apply() {
    if skip_unless_root("all_inbound_ports_then_one_port_equals_fresh_apply") {
        return;
    }
    assert_transition(V4, SEED, &seed_with("-b", "8080"), PARTS);
    assert_transition(V4, &seed_with("-b", "8080"), SEED, PARTS);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn tproxy_then_redirect_equals_fresh_redirect() {
    if skip_unless_root("tproxy_then_redirect_equals_fresh_redirect") {
        return;
    }
    let (_, got) = assert_transition(V4, &["-m", "TPROXY", "-b", "8080"], &["-b", "8080"], TABLES);
    assert!(
        !got.get("v4-nft").contains("*mangle"),
        "the emptied mangle table must be dropped\n{}",
        got.describe()
    );
    // And with IPv6: both families converge.
    assert_transition(V6, &["-m", "TPROXY", "-b", "8080"], &["-b", "8080"], TABLES);
}

/// Switching TPROXY off removes the TPROXY policy routing (`ip rule fwmark 0x539 lookup 133`
/// and `local default dev lo table 133`) too, so the state is that of a fresh REDIRECT apply
/// (Istio itself leaves them behind).
#[test]
#[ignore = "needs root and network namespaces"]
fn tproxy_then_redirect_removes_tproxy_routing() {
    if skip_unless_root("tproxy_then_redirect_removes_tproxy_routing") {
        return;
    }
    assert_transition(V4, &["-m", "TPROXY", "-b", "8080"], &["-b", "8080"], PARTS);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn exclude_and_virtual_interfaces_added_then_removed_equal_fresh_apply() {
    if skip_unless_root("exclude_and_virtual_interfaces_added_then_removed_equal_fresh_apply") {
        return;
    }
    let plain = SEED.to_vec();
    let ifaces = cat(SEED, &["-c", "eth9,eth10", "-k", "veth1"]);
    assert_transition(V4, &plain, &ifaces, PARTS);
    assert_transition(V4, &ifaces, &plain, PARTS);
    let tproxy = ["-m", "TPROXY", "-b", "*"];
    let tproxy_ifaces = cat(&tproxy, &["-c", "eth9", "-k", "veth1"]);
    assert_transition(V6, &tproxy_ifaces, &tproxy, PARTS);
    assert_transition(V6, &tproxy, &tproxy_ifaces, PARTS);
}

// ---------------------------------------------------------------------------
// 4. Half-applied state
// ---------------------------------------------------------------------------

/// The IPv4 payload of `--dry-run` (run here: dry-run needs no privileges).
fn dry_run_v4_payload(env: &[(&str, &str)], args: &[&str]) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .arg("--dry-run")
        .env_clear()
        .env("PATH", sane_path())
        .envs(env.iter().copied());
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30)).expect("dry run");
    let script = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "dry run failed: {out:?}");
    let blocks = extract_heredoc_blocks(&script, "iptables-restore --noflush <<'EOF'")
        .unwrap_or_else(|e| panic!("{e}\n{script}"));
    assert_eq!(blocks.len(), 1, "{script}");
    blocks[0].clone()
}

/// For every prefix of the payload's rules, applied one `iptables-nft` command at a time
/// (after creating all its chains), one run of the binary must repair the namespace.
fn assert_repairs_every_prefix(env: &[(&str, &str)], args: &[&str], step: usize) {
    let payload = dry_run_v4_payload(env, args);
    let mut chains: Vec<(String, String)> = Vec::new();
    let mut rules: Vec<(String, Vec<String>)> = Vec::new();
    let mut table = String::new();
    for line in payload.lines() {
        let line = line.trim();
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
        } else if let Some(c) = line.strip_prefix("-N ") {
            chains.push((table.clone(), c.trim().to_string()));
        } else if line.starts_with("-A ") || line.starts_with("-I ") {
            rules.push((
                table.clone(),
                line.split_whitespace().map(str::to_string).collect(),
            ));
        }
    }
    assert!(rules.len() > 5, "payload too small:\n{payload}");
    let fresh = fresh_state(env, args);
    let mut prefixes: Vec<usize> = (0..=rules.len()).step_by(step).collect();
    if prefixes.last() != Some(&rules.len()) {
        prefixes.push(rules.len());
    }
    let mut script = Script::new();
    for &n in &prefixes {
        script = script.sh("nft flush ruleset");
        for (t, c) in &chains {
            script = script.sh(&format!("iptables-nft -t {t} -N {c}"));
        }
        for (t, words) in &rules[..n] {
            let mut cmd = vec!["iptables-nft".to_string(), "-t".into(), t.clone()];
            cmd.extend(words.iter().cloned());
            script = script.sh(&shell_command(&cmd));
        }
        let l = format!("prefix{n}");
        script = script
            .snap(&format!("{l}-before"))
            .run(&l, env, args)
            .snap(&l);
    }
    let ns = script.exec();
    let ctx = ns.context();
    for &n in &prefixes {
        let l = format!("prefix{n}");
        ns.run_rc(&l, 0);
        let mut got = ns.state(&l);
        got.label = format!("first {n} of {} rules applied, then repaired", rules.len());
        assert_same(
            &format!(
                "half-applied ({n} rules), repaired by one run; partial state was:\n{}",
                ns.state(&format!("{l}-before")).get("v4-nft")
            ),
            &fresh,
            &got,
            &ctx,
        );
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn half_applied_seed_is_repaired_by_one_run() {
    if skip_unless_root("half_applied_seed_is_repaired_by_one_run") {
        return;
    }
    assert_repairs_every_prefix(V4, SEED, 1);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn half_applied_tproxy_is_repaired_by_one_run() {
    if skip_unless_root("half_applied_tproxy_is_repaired_by_one_run") {
        return;
    }
    // Two tables (mangle and nat) and `-I` lines; the ip rule/route added by the first repair
    // stay across prefixes (only `nft flush ruleset` runs between them), as in a fresh apply.
    assert_repairs_every_prefix(V4, &["-m", "TPROXY", "-b", "*", "-c", "eth9"], 1);
}

// ---------------------------------------------------------------------------
// 5. --reconcile=false and --force-apply
// ---------------------------------------------------------------------------

#[test]
#[ignore = "needs root and network namespaces"]
fn reconcile_false_refuses_a_conflict_and_changes_nothing() {
    if skip_unless_root("reconcile_false_refuses_a_conflict_and_changes_nothing") {
        return;
    }
    let other = cat(&seed_with("-b", "8080"), &["--reconcile=false"]);
    let same = cat(SEED, &["--reconcile=false"]);
    let ns = Script::new()
        .run("apply", V4, SEED)
        .shims(Fail::Nothing)
        .snap("before")
        .run("conflict", V4, &other)
        .snap("after-conflict")
        .run("same", V4, &same)
        .snap("after-same")
        .exec();
    let ctx = ns.context();
    ns.run_rc("apply", 0);
    let conflict = ns.run_rc("conflict", 4);
    let line = conflict.one_error();
    assert!(
        line.contains("--reconcile") && line.contains("nat"),
        "the error should mention reconcile and the table: {line}"
    );
    assert_eq!(conflict.error_lines().len(), 1, "{}", conflict.describe());
    let writes = conflict.execs_of(|p| p.ends_with("-restore") || p == "nft" || p == "ip");
    assert!(
        writes.is_empty(),
        "a refused conflict must run no restore: {writes:?}"
    );
    let before = ns.state("before");
    assert_same(
        "--reconcile=false on a conflict",
        &before,
        &ns.state("after-conflict"),
        &ctx,
    );
    let same = ns.run_rc("same", 0);
    assert!(
        same.execs_of(|p| p.ends_with("-restore")).is_empty(),
        "{}",
        same.describe()
    );
    assert_same(
        "--reconcile=false with the same config",
        &before,
        &ns.state("after-same"),
        &ctx,
    );
}

/// `--force-apply --reconcile=false` over different ISTIO_* state: like Istio, our payload is
/// restored on top, which iptables rejects (`-N` of an existing chain): exit 1, the error
/// names the phase and says nothing was changed, and nothing was changed.
#[test]
#[ignore = "needs root and network namespaces"]
fn force_apply_without_reconcile_on_a_conflict_fails_cleanly() {
    if skip_unless_root("force_apply_without_reconcile_on_a_conflict_fails_cleanly") {
        return;
    }
    let args = cat(
        &seed_with("-b", "8080"),
        &["--reconcile=false", "--force-apply"],
    );
    let ns = Script::new()
        .run("apply", V4, SEED)
        .snap("before")
        .run("force", V4, &args)
        .snap("after")
        .exec();
    let ctx = ns.context();
    ns.run_rc("apply", 0);
    let force = ns.run_rc("force", 1);
    let line = force.one_error();
    assert!(
        line.contains("committing IPv4 rules")
            && line.contains("iptables-nft-restore")
            && line.contains("Chain already exists")
            && line.contains("nothing was changed"),
        "{}",
        force.describe()
    );
    assert!(
        force.logs().contains("--force-apply"),
        "the warning about adding on top should be logged\n{}",
        force.describe()
    );
    assert_same(
        "--force-apply --reconcile=false on a conflict",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
}

// ---------------------------------------------------------------------------
// 6. All or nothing
// ---------------------------------------------------------------------------

/// Runs `args` with failing shims (after `setup`), expecting exit 1 and no change at all.
fn assert_rollback(setup: &str, fail: Fail, env: &[(&str, &str)], args: &[&str]) -> Run {
    let ns = Script::new()
        .sh(setup)
        .snap("before")
        .shims(fail)
        .run("failing", env, args)
        .snap("after")
        .exec();
    let ctx = ns.context();
    let run = ns.run_rc("failing", 1);
    assert_same(
        "a failed apply must leave everything as it was",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
    let line = run.one_error();
    assert!(
        line.contains("the previous state was restored"),
        "the error should say the previous state was restored: {line}\n{}",
        run.describe()
    );
    run
}

/// A namespace with foreign rules in both families and an earlier Istio config (IPv6 on).
fn existing_state_setup() -> String {
    let earlier = cat(&[BIN], &seed_with("-b", "8080"));
    // The ::6 address is `tentative` for a moment (DAD): wait, so that snapshots compare.
    format!(
        "{}{}env -i PATH={} ENABLE_INBOUND_IPV6=true {} 2>/dev/null\n\
         __i=0; while ip -6 addr show dev lo | grep -q tentative; do \
         __i=$((__i+1)); [ $__i -lt 500 ]; sleep 0.01; done\n",
        foreign_rules("iptables-nft"),
        foreign_rules("ip6tables-nft"),
        shell_quote(sane_path()),
        shell_command(&earlier)
    )
}

fn assert_ip6tables_failure_message(run: &Run) {
    let line = run.one_error();
    assert!(
        line.contains("committing IPv6 rules")
            && line.contains("ip6tables-nft-restore")
            && line.contains("line 3 failed")
            && line.contains("(IPv4; checked by re-reading the kernel)"),
        "the error should name the phase, the program, its message and what was restored: \
         {line}"
    );
    assert!(
        line.contains(" at `"),
        "the error should quote the rejected payload line (line 3): {line}"
    );
    let v6_restores = run.execs_of(|p| p.starts_with("ip6tables") && p.ends_with("restore"));
    assert_eq!(v6_restores.len(), 1, "{}", run.describe());
}

#[test]
#[ignore = "needs root and network namespaces"]
fn failed_ip6tables_restore_rolls_back_ipv4_in_a_fresh_namespace() {
    if skip_unless_root("failed_ip6tables_restore_rolls_back_ipv4_in_a_fresh_namespace") {
        return;
    }
    let run = assert_rollback("", Fail::Ip6tablesRestoreNoflush, V6, SEED);
    assert_ip6tables_failure_message(&run);
    let run = assert_rollback(
        "",
        Fail::Ip6tablesRestoreNoflush,
        V6,
        &["-m", "TPROXY", "-b", "*"],
    );
    assert_ip6tables_failure_message(&run);
    assert!(
        run.execs_of(|p| p == "ip")
            .iter()
            .all(|l| !l.contains(" add ")),
        "no ip change may happen after a failed commit\n{}",
        run.describe()
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn failed_ip6tables_restore_restores_existing_content() {
    if skip_unless_root("failed_ip6tables_restore_restores_existing_content") {
        return;
    }
    let run = assert_rollback(
        &existing_state_setup(),
        Fail::Ip6tablesRestoreNoflush,
        V6,
        &["-m", "TPROXY", "-b", "*", "-c", "eth9"],
    );
    assert_ip6tables_failure_message(&run);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn failed_ip_rule_add_rolls_back_tables_routes_and_address() {
    if skip_unless_root("failed_ip_rule_add_rolls_back_tables_routes_and_address") {
        return;
    }
    for setup in [String::new(), existing_state_setup()] {
        let run = assert_rollback(&setup, Fail::IpRuleAdd, V6, &["-m", "TPROXY", "-b", "*"]);
        let line = run.one_error();
        assert!(
            line.contains("configuring routes")
                && line.contains("rule add")
                && line.contains("Operation not permitted (shim)")
                && line.contains("IPv4, IPv6"),
            "the error should name the phase, the ip command, its message and what was \
             restored: {line}"
        );
    }
}

// ---------------------------------------------------------------------------
// 7. Cleanup
// ---------------------------------------------------------------------------

/// Foreign state (`setup`), snapshot `before`, apply `apply_args` (snapshot `applied`),
/// cleanup with `cleanup_args` twice (`cleaned`, `cleaned2`); every run must exit 0.
fn apply_then_clean_up_twice(
    setup: &str,
    env: &[(&str, &str)],
    apply_args: &[&str],
    cleanup_args: &[&str],
) -> Ns {
    let ns = Script::new()
        .sh(setup)
        .snap("before")
        .run("apply", env, apply_args)
        .snap("applied")
        .run("cleanup", env, cleanup_args)
        .snap("cleaned")
        .run("cleanup2", env, cleanup_args)
        .snap("cleaned2")
        .exec();
    ns.run_rc("apply", 0);
    ns.run_rc("cleanup", 0);
    ns.run_rc("cleanup2", 0);
    ns
}

/// [`apply_then_clean_up_twice`]: the state after each cleanup equals the one before the
/// apply.
fn assert_cleanup_restores(
    setup: &str,
    env: &[(&str, &str)],
    apply_args: &[&str],
    cleanup_args: &[&str],
) -> Ns {
    let ns = apply_then_clean_up_twice(setup, env, apply_args, cleanup_args);
    let ctx = ns.context();
    let applied = ns.state("applied");
    assert!(
        TABLES.iter().any(|p| applied.get(p).contains("ISTIO_"))
            || applied.get("nft-inet").contains("table inet istio-proxy-"),
        "nothing was applied\n{}\n{ctx}",
        applied.describe()
    );
    let before = ns.state("before");
    assert_same(
        "--cleanup-only must return to the state before the apply",
        &before,
        &ns.state("cleaned"),
        &ctx,
    );
    assert_same(
        "a second --cleanup-only",
        &before,
        &ns.state("cleaned2"),
        &ctx,
    );
    ns
}

#[test]
#[ignore = "needs root and network namespaces"]
fn cleanup_after_seed_restores_foreign_state_exactly() {
    if skip_unless_root("cleanup_after_seed_restores_foreign_state_exactly") {
        return;
    }
    assert_cleanup_restores(
        &foreign_rules("iptables-nft"),
        V4,
        SEED,
        &["--cleanup-only"],
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn cleanup_after_tproxy_ipv6_dns_restores_foreign_state_exactly() {
    if skip_unless_root("cleanup_after_tproxy_ipv6_dns_restores_foreign_state_exactly") {
        return;
    }
    let tmp = common::TempDir::new("istio-iptables-resolv");
    let resolv = tmp.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 10.0.0.53\n").expect("write resolv.conf");
    let resolv = resolv.to_string_lossy().into_owned();
    let args = [
        "-m",
        "TPROXY",
        "-b",
        "*",
        "--redirect-dns",
        "--resolv-conf",
        &resolv,
    ];
    let setup = format!(
        "{}{}",
        foreign_rules("iptables-nft"),
        foreign_rules("ip6tables-nft")
    );
    // Cleanup with the same flags (as Istio's CNI does) ...
    let ns = assert_cleanup_restores(&setup, V6, &args, &cat(&args, &["--cleanup-only"]));
    let applied = ns.state("applied");
    for (part, what) in [
        ("v4-nft", "10.0.0.53"),
        ("v4-nft", "*raw"),
        ("v6-nft", "*mangle"),
        ("rule4", "lookup 133"),
        ("rule6", "lookup 133"),
        ("addr6-lo", "::6/128"),
    ] {
        assert!(
            applied.get(part).contains(what),
            "[{part}] should contain `{what}` after the apply\n{}",
            applied.describe()
        );
    }
    // ... and a bare --cleanup-only.
    assert_cleanup_restores(&setup, V6, &args, &["--cleanup-only"]);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn cleanup_finds_rules_applied_with_forced_legacy() {
    let test = "cleanup_finds_rules_applied_with_forced_legacy";
    if skip_unless_root(test) || skip_unless_installed(test, &["iptables-legacy"]) {
        return;
    }
    let ns = apply_then_clean_up_twice(
        &foreign_rules("iptables-nft"),
        V4,
        &seed_forcing("legacy"),
        &["--cleanup-only"],
    );
    let ctx = ns.context();
    let applied = ns.state("applied");
    assert!(
        applied.get("v4-legacy").contains("-A ISTIO_OUTPUT"),
        "{}",
        applied.describe()
    );
    let cleaned = ns.state("cleaned");
    assert!(
        !cleaned.get("v4-legacy").contains("ISTIO"),
        "cleanup must remove the legacy rules\n{}\n{ctx}",
        cleaned.describe()
    );
    // Legacy tables cannot be unloaded: an empty nat table may stay. Everything else is
    // exactly as before.
    let before = ns.state("before").without_empty_tables();
    let parts = [
        "v4-nft",
        "v6-nft",
        "v4-legacy",
        "v6-legacy",
        "rule4",
        "rule6",
        "route4",
        "route6",
        "addr6-lo",
    ];
    assert_same(
        "cleanup of legacy rules (empty legacy tables aside)",
        &before.only(&parts),
        &cleaned.without_empty_tables().only(&parts),
        &ctx,
    );
    assert_same("a second cleanup", &cleaned, &ns.state("cleaned2"), &ctx);
}

// ---------------------------------------------------------------------------
// 8. --network-namespace
// ---------------------------------------------------------------------------

/// Without ENABLE_INBOUND_IPV6, IPv6 is detected from the addresses of the namespace the rules
/// go into, not from the caller's: an IPv6-only pod gets ip6tables rules even when the caller
/// has no IPv6 address.
#[test]
#[ignore = "needs root and network namespaces"]
fn network_namespace_ipv6_is_detected_inside() {
    if skip_unless_root("network_namespace_ipv6_is_detected_inside") {
        return;
    }
    let no_override: &[(&str, &str)] = &[];
    let ns = Script::new()
        .sh("ip netns add inner")
        .sh("ip link add v0 type veth peer name v1")
        .sh("ip link set v1 netns inner")
        .sh("ip link set v0 up")
        .sh("ip netns exec inner ip link set lo up")
        .sh("ip netns exec inner ip link set v1 up")
        .sh("ip netns exec inner ip -6 addr add fd00:77::1/64 dev v1 nodad")
        .run(
            "apply",
            no_override,
            &cat(SEED, &["--network-namespace", "/run/netns/inner"]),
        )
        .sh("ip netns exec inner ip6tables-nft-save > \"$NS_OUT/inner.v6\"")
        .sh("ip6tables-nft-save > \"$NS_OUT/outer.v6\"")
        .exec();
    ns.run_rc("apply", 0);
    let inner = ns.out.file("inner.v6").unwrap_or_default().to_string();
    let outer = ns.out.file("outer.v6").unwrap_or_default().to_string();
    assert!(
        inner.contains("-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN"),
        "the IPv6-only inner namespace should get IPv6 rules:\n{inner}\n{}",
        ns.context()
    );
    assert!(
        !outer.contains("ISTIO"),
        "the caller's namespace must stay untouched:\n{outer}"
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn network_namespace_applies_inside_and_leaves_the_caller_alone() {
    if skip_unless_root("network_namespace_applies_inside_and_leaves_the_caller_alone") {
        return;
    }
    let have_legacy = real_program("iptables-legacy").is_some();
    // The outer namespace (the test's) has foreign nft rules and, if possible, legacy tables:
    // detection must look at the inner namespace, which has none.
    let mut outer_setup = foreign_rules("iptables-nft");
    if have_legacy {
        outer_setup.push_str("iptables-legacy -t filter -A INPUT -j ACCEPT\n");
    }
    let inner_snap = r#"isnap() {
    ip netns exec inner iptables-nft-save > "$NS_OUT/$1.v4-nft"
    ip netns exec inner ip6tables-nft-save > "$NS_OUT/$1.v6-nft"
    ip netns exec inner cat /proc/net/ip_tables_names > "$NS_OUT/$1.legacy-names4" 2>/dev/null || : > "$NS_OUT/$1.legacy-names4"
    ip netns exec inner ip -4 rule > "$NS_OUT/$1.rule4"
    ip netns exec inner ip -6 rule > "$NS_OUT/$1.rule6"
    ip netns exec inner ip -6 addr show dev lo > "$NS_OUT/$1.addr6-lo"
    ip netns exec inner nft list ruleset inet > "$NS_OUT/$1.nft-inet"
}"#;
    let tproxy = ["-m", "TPROXY", "-b", "*"];
    let ns_arg = ["--network-namespace", "/run/netns/inner"];
    let ns = Script::new()
        .sh(&outer_setup)
        .sh(inner_snap)
        .sh("ip netns add inner")
        .sh("ip netns exec inner ip link set lo up")
        .snap("outer-before")
        .run("seed", V4, &cat(SEED, &ns_arg))
        .snap("outer-after-seed")
        .sh("isnap inner-seed")
        .run("tproxy", V6, &cat(&tproxy, &ns_arg))
        .snap("outer-after-tproxy")
        .sh("isnap inner-tproxy")
        .run(
            "cleanup",
            V6,
            &cat(&tproxy, &cat(&ns_arg, &["--cleanup-only"])),
        )
        .snap("outer-after-cleanup")
        .sh("isnap inner-cleaned")
        .exec();
    let ctx = ns.context();
    let seed = ns.run_rc("seed", 0);
    ns.run_rc("tproxy", 0);
    ns.run_rc("cleanup", 0);
    assert!(
        seed.logs().contains("iptables-nft-restore")
            && seed.logs().contains("no legacy tables in this namespace"),
        "detection must look at the target namespace, which has no legacy tables\n{}",
        seed.describe()
    );
    let outer = ns.state("outer-before");
    for after in [
        "outer-after-seed",
        "outer-after-tproxy",
        "outer-after-cleanup",
    ] {
        assert_same(
            "the caller's namespace must not change",
            &outer,
            &ns.state(after),
            &ctx,
        );
    }
    let fresh = fresh_state(V4, SEED);
    let inner = ns.file("inner-seed.v4-nft");
    if let Some(d) = compare_lines(
        "fresh apply",
        &normalize_save(fresh.get("v4-nft"))
            .lines()
            .collect::<Vec<_>>(),
        "inner namespace",
        &normalize_save(inner).lines().collect::<Vec<_>>(),
    ) {
        panic!("the inner namespace should hold the seed rules\n{d}\n{ctx}");
    }
    for (file, what) in [
        ("inner-tproxy.v4-nft", "TPROXY"),
        ("inner-tproxy.v6-nft", "TPROXY"),
        ("inner-tproxy.rule4", "lookup 133"),
        ("inner-tproxy.rule6", "lookup 133"),
        ("inner-tproxy.addr6-lo", "::6/128"),
    ] {
        assert!(
            ns.file(file).contains(what),
            "{file} should contain `{what}`:\n{}\n{ctx}",
            ns.file(file)
        );
    }
    for file in [
        "inner-cleaned.v4-nft",
        "inner-cleaned.v6-nft",
        "inner-cleaned.legacy-names4",
    ] {
        assert_eq!(
            normalize_save(ns.file(file)),
            "",
            "{file}: cleanup inside the namespace leaves nothing\n{ctx}"
        );
    }
    for (file, what) in [
        ("inner-cleaned.rule4", "lookup 133"),
        ("inner-cleaned.rule6", "lookup 133"),
        ("inner-cleaned.addr6-lo", "::6/128"),
    ] {
        assert!(
            !ns.file(file).contains(what),
            "{file} should not contain `{what}`:\n{}",
            ns.file(file)
        );
    }
}

// ---------------------------------------------------------------------------
// 9. The xtables lock (legacy)
// ---------------------------------------------------------------------------

/// Shell lines holding /run/xtables.lock (private: /run is a tmpfs here) for `secs` in the
/// background, returning once it is held; `$__holder` is the holder's pid.
fn hold_lock(secs: u32) -> String {
    format!(
        "( exec 9>/run/xtables.lock; flock -x 9; exec sleep {secs} ) &\n__holder=$!\n\
         __i=0; while flock -n /run/xtables.lock true; do __i=$((__i+1)); [ $__i -lt 500 ]; sleep 0.01; done\n"
    )
}

/// Runs the seed command (legacy) with `extra` args while /run/xtables.lock is held for `hold`
/// seconds; snapshots before and after.
fn apply_under_held_lock(hold: u32, wait_env: Option<&str>, extra: &[&str]) -> Ns {
    let mut env = vec![("ENABLE_INBOUND_IPV6", "false")];
    if let Some(w) = wait_env {
        env.push(("IPTABLES_LOCK_WAIT_SECONDS", w));
    }
    Script::new()
        .snap("before")
        .sh(&hold_lock(hold))
        .run("apply", &env, &cat(&seed_forcing("legacy"), extra))
        .sh("kill $__holder 2>/dev/null || true; wait $__holder || true")
        .snap("after")
        .exec()
}

fn assert_applied_to_legacy(ns: &Ns) {
    let st = ns.state("after");
    assert!(
        st.get("v4-legacy").contains("-A ISTIO_OUTPUT"),
        "{}\n{}",
        st.describe(),
        ns.context()
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn legacy_waits_for_the_xtables_lock() {
    let test = "legacy_waits_for_the_xtables_lock";
    if skip_unless_root(test) || skip_unless_installed(test, &["iptables-legacy", "flock"]) {
        return;
    }
    let ns = apply_under_held_lock(3, None, &[]);
    let run = ns.run_rc("apply", 0);
    assert!(
        run.ms >= 2500,
        "the binary should have waited for the lock (held ~3 s), took {} ms\n{}",
        run.ms,
        run.describe()
    );
    assert_applied_to_legacy(&ns);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn legacy_gives_up_on_a_held_xtables_lock() {
    let test = "legacy_gives_up_on_a_held_xtables_lock";
    if skip_unless_root(test) || skip_unless_installed(test, &["iptables-legacy", "flock"]) {
        return;
    }
    let ns = apply_under_held_lock(4, Some("1"), &[]);
    let ctx = ns.context();
    let run = ns.run_rc("apply", 1);
    let line = run.one_error();
    assert!(
        line.contains("xtables lock held") && !line.contains("kernel support"),
        "the error should blame the lock, not the kernel: {line}"
    );
    assert!(
        run.ms < 3500,
        "the wait should be bounded by IPTABLES_LOCK_WAIT_SECONDS=1, took {} ms",
        run.ms
    );
    assert_same(
        "nothing may change when the lock is not obtained",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
}

/// `--cni-mode`: the lock is scoped to the pod (Istio's CNI runs in the node's filesystem,
/// where /run/xtables.lock is shared by every pod), so a held node-wide lock does not block.
#[test]
#[ignore = "needs root and network namespaces"]
fn cni_mode_does_not_wait_for_the_node_wide_lock() {
    let test = "cni_mode_does_not_wait_for_the_node_wide_lock";
    if skip_unless_root(test) || skip_unless_installed(test, &["iptables-legacy", "flock"]) {
        return;
    }
    let ns = apply_under_held_lock(4, Some("1"), &["--cni-mode"]);
    let run = ns.run_rc("apply", 0);
    assert!(
        run.ms < 2500,
        "with --cni-mode the node-wide lock must not be waited for, took {} ms\n{}",
        run.ms,
        run.describe()
    );
    assert_applied_to_legacy(&ns);
}

// ---------------------------------------------------------------------------
// 10. Validation through the binary
// ---------------------------------------------------------------------------

#[test]
#[ignore = "needs root and network namespaces"]
fn run_validation_passes_after_apply_and_fails_without_rules() {
    if skip_unless_root("run_validation_passes_after_apply_and_fails_without_rules") {
        return;
    }
    let validate_only = |timeout| {
        cat(
            SEED,
            &[
                "--skip-rule-apply",
                "--run-validation",
                "--probe-timeout",
                timeout,
            ],
        )
    };
    let ns = Script::new()
        .run("no-rules", V4, &validate_only("1s"))
        .run("apply", V4, SEED)
        .run("validate", V4, &validate_only("3s"))
        .exec();
    let none = ns.run_rc("no-rules", 126);
    assert!(
        none.ms >= 900 && none.ms < 4000,
        "a failing validation should end at its 1 s timeout, took {} ms\n{}",
        none.ms,
        none.describe()
    );
    let errors = none.error_lines().join("\n");
    assert!(
        errors.contains("IPv4")
            && errors.contains("no connection")
            && errors.contains("redirected"),
        "the error should name the family and say nothing was redirected\n{}",
        none.describe()
    );
    ns.run_rc("apply", 0);
    let ok = ns.run_rc("validate", 0);
    assert!(ok.ms < 3000, "{}", ok.describe());

    // Apply and validate in one run.
    let ns = Script::new()
        .run(
            "both",
            V4,
            &cat(SEED, &["--run-validation", "--probe-timeout", "3s"]),
        )
        .snap("after")
        .exec();
    let both = ns.run_rc("both", 0);
    assert!(
        both.logs().contains("validation passed"),
        "{}",
        both.describe()
    );
}

// ---------------------------------------------------------------------------
// 11. Error messages
// ---------------------------------------------------------------------------

/// File-creating syscalls in an strace log (ignoring /dev and the xtables lock).
fn file_writes(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            let writes = l.contains("O_CREAT")
                || l.contains("O_WRONLY")
                || l.contains("O_RDWR")
                || l.contains("creat(")
                || l.contains("mkdir")
                || l.contains("rename")
                || l.contains("unlink");
            writes && !l.contains("\"/dev/") && !l.contains("xtables.lock")
        })
        .collect()
}

#[test]
#[ignore = "needs root and network namespaces"]
fn failed_restore_reports_phase_program_version_and_changes_nothing() {
    if skip_unless_root("failed_restore_reports_phase_program_version_and_changes_nothing") {
        return;
    }
    let env = [
        ("ENABLE_INBOUND_IPV6", "false"),
        ("ISTIO_OUTBOUND_OWNER_GROUPS", "nosuchgroup123"),
    ];
    let trace = have_strace()
        .then_some("openat,open,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat");
    let ns = Script::new()
        .sh("iptables-nft-restore --version > \"$NS_OUT/version\"")
        .snap("before")
        .run_traced("apply", &env, SEED, trace)
        .snap("after")
        .exec();
    let ctx = ns.context();
    let run = ns.run_rc("apply", 1);
    let line = run.one_error();
    let version = ns
        .file("version")
        .split_whitespace()
        .find(|w| w.starts_with('v') && w[1..].starts_with(|c: char| c.is_ascii_digit()))
        .map(|w| w[1..].to_string())
        .unwrap_or_else(|| panic!("no version in {:?}", ns.file("version")));
    for needle in [
        "committing IPv4 rules",
        "iptables-nft-restore",
        &format!("iptables {version}"),
        "nothing was changed",
    ] {
        assert!(
            line.contains(needle),
            "the error should contain `{needle}`: {line}"
        );
    }
    assert_same(
        "a rejected restore must change nothing",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
    if trace.is_some() {
        let log = ns.file("apply.strace");
        let writes = file_writes(log);
        assert!(
            writes.is_empty(),
            "the binary and its children must not create or write files:\n{}",
            writes.join("\n")
        );
    }
}

/// The rejected payload line must be quoted. iptables-nft-restore 1.8.9 reports a bad
/// option value as `Error occurred at line: 21`.
#[test]
#[ignore = "needs root and network namespaces"]
fn failed_restore_quotes_the_rejected_payload_line() {
    if skip_unless_root("failed_restore_quotes_the_rejected_payload_line") {
        return;
    }
    let env = [
        ("ENABLE_INBOUND_IPV6", "false"),
        ("ISTIO_OUTBOUND_OWNER_GROUPS", "nosuchgroup123"),
    ];
    let ns = Script::new().run("apply", &env, SEED).exec();
    let run = ns.run_rc("apply", 1);
    let line = run.one_error();
    assert!(
        line.contains("--gid-owner nosuchgroup123"),
        "the error should quote the rejected payload line (`... --gid-owner nosuchgroup123 ...`): \
         {line}"
    );
}

// ---------------------------------------------------------------------------
// 11. All or nothing across tables: iptables-restore commits table by table
// ---------------------------------------------------------------------------

/// A TPROXY + DNS config (mangle, nat and raw in both families), with its resolv.conf.
struct TproxyDns {
    _tmp: common::TempDir,
    resolv: String,
}

impl TproxyDns {
    fn new() -> TproxyDns {
        let tmp = common::TempDir::new("istio-iptables-resolv");
        let resolv = tmp.path().join("resolv.conf");
        std::fs::write(&resolv, "nameserver 10.0.0.53\nnameserver fd00::53\n")
            .expect("write resolv.conf");
        let resolv = resolv.to_string_lossy().into_owned();
        TproxyDns { _tmp: tmp, resolv }
    }

    fn args(&self) -> Vec<&str> {
        vec![
            "-m",
            "TPROXY",
            "-b",
            "*",
            "-c",
            "eth9",
            "--redirect-dns",
            "--resolv-conf",
            &self.resolv,
        ]
    }
}

/// After `setup`, `args` with the `n`th table of one family refused: exit 1, everything as
/// before, and the message says what failed and what was restored.
fn assert_table_fault(setup: &str, ipv6: bool, n: usize, args: &[&str]) {
    let ns = Script::new()
        .sh(setup)
        .snap("before")
        .shims(Fail::NthTable { ipv6, n })
        .run("failing", V6, args)
        .snap("after")
        .exec();
    let ctx = ns.context();
    let run = ns.run_rc("failing", 1);
    let what = format!(
        "table {n} of {} refused (setup: {})",
        if ipv6 { "IPv6" } else { "IPv4" },
        if setup.is_empty() {
            "fresh"
        } else {
            "existing"
        }
    );
    assert_same(
        &format!("{what}: the namespace must be exactly as before"),
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
    let line = run.one_error();
    let family = if ipv6 { "IPv6" } else { "IPv4" };
    assert!(
        line.contains(&format!("committing {family} rules"))
            && line.contains(&format!("table {n} refused")),
        "{what}: the error should name the family and the refusal: {line}"
    );
    // Only a refused first IPv4 table leaves nothing to restore.
    let expected = if !ipv6 && n == 1 {
        "nothing was changed (checked by re-reading the kernel)"
    } else {
        "the previous state was restored ("
    };
    assert!(
        line.contains(expected) && !line.contains("ROLLBACK FAILED"),
        "{what}: the error should say `{expected}`: {line}\n{}",
        run.describe()
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn a_refused_table_in_a_fresh_namespace_leaves_nothing_behind() {
    if skip_unless_root("a_refused_table_in_a_fresh_namespace_leaves_nothing_behind") {
        return;
    }
    let cfg = TproxyDns::new();
    for ipv6 in [false, true] {
        for n in 1..=3 {
            assert_table_fault("", ipv6, n, &cfg.args());
        }
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn a_refused_table_over_an_existing_config_restores_it() {
    if skip_unless_root("a_refused_table_over_an_existing_config_restores_it") {
        return;
    }
    let cfg = TproxyDns::new();
    let setup = existing_state_setup();
    for ipv6 in [false, true] {
        for n in 1..=3 {
            assert_table_fault(&setup, ipv6, n, &cfg.args());
        }
    }
}

/// A real refusal, no shim: over an existing config, `--reconcile=false --force-apply` feeds
/// Istio's plain payload, whose mangle table (`--drop-invalid`: ISTIO_DROP) commits and whose
/// nat table the kernel refuses (`-N ISTIO_INBOUND`: the chain exists). Mangle must not
/// stay behind.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_real_refusal_of_a_later_table_rolls_back_the_earlier_ones() {
    if skip_unless_root("a_real_refusal_of_a_later_table_rolls_back_the_earlier_ones") {
        return;
    }
    let args = cat(
        SEED,
        &["--drop-invalid", "--reconcile=false", "--force-apply"],
    );
    let ns = Script::new()
        .sh(&existing_state_setup())
        .snap("before")
        .run("failing", V6, &args)
        .snap("after")
        .exec();
    let ctx = ns.context();
    let run = ns.run_rc("failing", 1);
    assert_same(
        "a refused nat table must not leave mangle's ISTIO_DROP behind",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
    let line = run.one_error();
    assert!(
        line.contains("committing IPv4 rules")
            && line.contains("-N ISTIO_INBOUND")
            && line.contains("the previous state was restored (IPv4"),
        "{line}"
    );
}

// ---------------------------------------------------------------------------
// 12. Concurrent runs in one namespace
// ---------------------------------------------------------------------------

impl Script {
    /// Starts the binary in the background as run `label` (see [`Script::run`]; no timing,
    /// no shims); `wait` collects it.
    fn spawn(self, label: &str, env: &[(&str, &str)], args: &[&str]) -> Script {
        let mut words: Vec<String> = vec![format!("PATH={}", sane_path())];
        words.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        words.push(BIN.to_string());
        words.extend(args.iter().map(|a| a.to_string()));
        let l = shell_quote(label);
        self.sh(&format!(
            "set +x\n( __rc=0; env -i {} >\"$NS_OUT/{l}.out\" 2>\"$NS_OUT/{l}.err\" || __rc=$?; \
             echo $__rc > \"$NS_OUT/{l}.rc\" ) &\nset -x",
            shell_command(&words)
        ))
    }
}

/// `rounds` rounds of ten simultaneous runs, run `i` using `configs[i % configs.len()]`;
/// after each round every run exited 0 and the state is a fresh apply of one of the configs.
fn assert_concurrent_runs_converge(env: &[(&str, &str)], configs: &[Vec<&str>], rounds: usize) {
    let fresh: Vec<State> = configs.iter().map(|c| fresh_state(env, c)).collect();
    let mut script = Script::new();
    for round in 0..rounds {
        for i in 0..10 {
            script = script.spawn(&format!("r{round}-{i}"), env, &configs[i % configs.len()]);
        }
        script = script.sh("wait").snap(&format!("r{round}"));
    }
    let ns = script.exec();
    let ctx = ns.context();
    for round in 0..rounds {
        for i in 0..10 {
            let run = ns.run_rc(&format!("r{round}-{i}"), 0);
            assert!(
                run.error_lines().is_empty(),
                "a concurrent run must not fail or warn\n{}",
                run.describe()
            );
        }
        let mut got = ns.state(&format!("r{round}"));
        got.label = format!("after round {round} of 10 simultaneous runs");
        if !fresh.iter().any(|f| f.parts == got.parts) {
            // Show the difference from the first config's clean state.
            assert_same(
                "simultaneous runs must end in one config's clean state",
                &fresh[0],
                &got,
                &ctx,
            );
        }
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn ten_simultaneous_runs_of_one_config_end_in_its_clean_state() {
    if skip_unless_root("ten_simultaneous_runs_of_one_config_end_in_its_clean_state") {
        return;
    }
    assert_concurrent_runs_converge(V6, &[SEED.to_vec()], 3);
    if real_program("iptables-legacy").is_some() {
        // Legacy: our lock and the (private) xtables lock together.
        assert_concurrent_runs_converge(V4, &[seed_forcing("legacy")], 2);
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn ten_simultaneous_runs_of_two_configs_end_in_one_clean_state() {
    if skip_unless_root("ten_simultaneous_runs_of_two_configs_end_in_one_clean_state") {
        return;
    }
    let tproxy = cat(&seed_with("-m", "TPROXY"), &["-t", "1400", "-r", "140"]);
    assert_concurrent_runs_converge(V6, &[SEED.to_vec(), tproxy], 3);
}

/// Shell lines: a run of the binary holds the namespace's lock (in the current network
/// namespace, or the one `ns_exec` enters, e.g. `ip netns exec pod`) while its
/// `iptables-nft-restore` (a shim) sleeps, having changed nothing. `$__holder` is the run's
/// pid; [`release_ns_lock`] ends it and the sleeper.
fn hold_ns_lock(ns_exec: &str) -> String {
    let mut words = vec!["ENABLE_INBOUND_IPV6=false".to_string(), BIN.to_string()];
    // --force-apply: it commits (here: sleeps) even where the rules are already in place.
    words.extend(seed_forcing("nft").iter().map(|a| a.to_string()));
    words.push("--force-apply".into());
    format!(
        "mkdir -p \"$NS_TMP/holdshim\"; rm -f \"$NS_TMP/held\"\n\
         printf '#!/bin/sh\\necho $$ > %s/held.tmp; mv %s/held.tmp %s/held; exec sleep 30\\n' \
         \"$NS_TMP\" \"$NS_TMP\" \"$NS_TMP\" > \"$NS_TMP/holdshim/iptables-nft-restore\"\n\
         chmod 755 \"$NS_TMP/holdshim/iptables-nft-restore\"\n\
         {ns_exec} env -i PATH=\"$NS_TMP/holdshim\":{} {} >/dev/null 2>&1 &\n\
         __holder=$!\n\
         __i=0; while [ ! -f \"$NS_TMP/held\" ]; do __i=$((__i+1)); [ $__i -lt 500 ]; sleep 0.01; done",
        shell_quote(sane_path()),
        shell_command(&words)
    )
}

/// Ends the holder of [`hold_ns_lock`] and its sleeping child (which inherited the lock).
fn release_ns_lock() -> &'static str {
    "kill $__holder $(cat \"$NS_TMP/held\") 2>/dev/null || true; wait $__holder || true"
}

/// With `--network-namespace` (and `--cni-mode`), the lock is the target namespace's, not
/// the caller's: a holder in the pod's namespace blocks, one in the caller's does not.
#[test]
#[ignore = "needs root and network namespaces"]
fn the_lock_is_the_target_namespaces() {
    let test = "the_lock_is_the_target_namespaces";
    if skip_unless_root(test) {
        return;
    }
    let env = [
        ("ENABLE_INBOUND_IPV6", "false"),
        ("IPTABLES_LOCK_WAIT_SECONDS", "1"),
    ];
    let args = cat(
        SEED,
        &["--cni-mode", "--network-namespace", "/run/netns/pod"],
    );
    let ns = Script::new()
        .sh("ip netns add pod")
        .sh(&hold_ns_lock(""))
        .run("caller-held", &env, &args)
        .sh(release_ns_lock())
        .sh("ip netns exec pod iptables-nft-save > \"$NS_OUT/pod-after-first\"")
        .sh(&hold_ns_lock("ip netns exec pod"))
        .run("pod-held", &env, &cat(&args, &["--cleanup-only"]))
        .sh(release_ns_lock())
        .sh("ip netns exec pod iptables-nft-save > \"$NS_OUT/pod-after-second\"")
        .exec();
    ns.run_rc("caller-held", 0);
    assert!(ns.file("pod-after-first").contains("-A ISTIO_OUTPUT"));
    let run = ns.run_rc("pod-held", 1);
    assert!(
        run.one_error().contains("gave up waiting"),
        "{}",
        run.describe()
    );
    assert!(
        ns.file("pod-after-second").contains("-A ISTIO_OUTPUT"),
        "the cleanup that did not get the lock must change nothing"
    );
}

/// A run that cannot get the namespace's lock in time says so, names the holder, and
/// changes nothing.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_run_that_waited_past_the_lock_timeout_says_so() {
    let test = "a_run_that_waited_past_the_lock_timeout_says_so";
    if skip_unless_root(test) {
        return;
    }
    let hold = hold_ns_lock("");
    let hold = hold.as_str();
    let env = [
        ("ENABLE_INBOUND_IPV6", "false"),
        ("IPTABLES_LOCK_WAIT_SECONDS", "1"),
    ];
    let ns = Script::new()
        .snap("before")
        .sh(hold)
        .run("apply", &env, SEED)
        .sh("echo $__holder > \"$NS_OUT/holder\"")
        .sh(release_ns_lock())
        .snap("after")
        .exec();
    let ctx = ns.context();
    let run = ns.run_rc("apply", 1);
    let line = run.one_error();
    let holder = ns.file("holder").trim().to_string();
    assert!(
        line.contains("gave up waiting")
            && line.contains("more than 1 s")
            && line.contains(&format!("(pid {holder})"))
            && line.contains("nothing was changed"),
        "the error should say the run waited past the lock timeout and name the holder: {line}"
    );
    assert_same(
        "nothing may change without the lock",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
}

// ---------------------------------------------------------------------------
// 13. Only our own state is touched
// ---------------------------------------------------------------------------

/// A foreign rule of the shape of our exclude-interface rules, alone, survives a first apply
/// and an identical second run commits nothing and deletes nothing.
#[test]
#[ignore = "needs root and network namespaces"]
fn an_identical_rerun_keeps_a_foreign_rule_of_our_shape() {
    if skip_unless_root("an_identical_rerun_keeps_a_foreign_rule_of_our_shape") {
        return;
    }
    let tproxy = seed_with("-m", "TPROXY");
    for foreign in [
        "iptables-nft -t nat -A PREROUTING -i eth9 -j RETURN",
        "iptables-nft -t nat -A OUTPUT -o eth9 -j RETURN",
        "iptables-nft -t mangle -A PREROUTING -i eth9 -j RETURN",
    ] {
        for args in [SEED, &tproxy] {
            let ns = Script::new()
                .sh(foreign)
                .shims(Fail::Nothing)
                .run("first", V4, args)
                .snap("first")
                .run("second", V4, args)
                .snap("second")
                .exec();
            let ctx = ns.context();
            ns.run_rc("first", 0);
            let second = ns.run_rc("second", 0);
            let first = ns.state("first");
            let rule = foreign.split_once(" -A ").unwrap().1;
            assert!(
                first.get("v4-nft").contains(&format!("-A {rule}")),
                "the first run must keep the foreign `{rule}`\n{}\n{ctx}",
                first.describe()
            );
            assert_same(
                "an identical second run must change nothing",
                &first,
                &ns.state("second"),
                &ctx,
            );
            let changes = second.execs_of(|p| p.ends_with("-restore") || p == "nft");
            assert!(
                changes.is_empty(),
                "the second run must commit nothing, ran {changes:?}\n{}",
                second.describe()
            );
        }
    }
}

/// kube-proxy's and Docker's chains and jumps, in nat, filter, mangle and raw.
fn kube_and_docker_rules(tool: &str) -> String {
    [
        "-t nat -N KUBE-SERVICES",
        "-t nat -N DOCKER",
        "-t nat -A PREROUTING -m comment --comment kubernetes-service-portals -j KUBE-SERVICES",
        "-t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
        "-t nat -A OUTPUT -m comment --comment kubernetes-service-portals -j KUBE-SERVICES",
        "-t nat -A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER",
        "-t nat -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE",
        "-t nat -A DOCKER -i docker0 -j RETURN",
        "-t nat -A KUBE-SERVICES -d 10.96.0.1/32 -p tcp --dport 443 -j RETURN",
        "-t filter -N DOCKER-USER",
        "-t filter -A FORWARD -j DOCKER-USER",
        "-t mangle -N KUBE-KUBELET-CANARY",
        "-t mangle -A PREROUTING -j KUBE-KUBELET-CANARY",
        "-t mangle -A OUTPUT -p udp --dport 4789 -j RETURN",
        "-t raw -A PREROUTING -p udp --dport 4789 -j NOTRACK",
        "-t raw -A OUTPUT -p udp --sport 4789 -j NOTRACK",
    ]
    .iter()
    .map(|r| {
        let r = if tool.starts_with("ip6") {
            r.replace("172.17.0.0/16", "fd17::/64")
                .replace("127.0.0.0/8", "::1/128")
                .replace("10.96.0.1/32", "fd96::1/128")
        } else {
            r.to_string()
        };
        format!("{tool} {r}\n")
    })
    .collect()
}

/// The `-A`/`:` lines of `before` appear in `after`, each once, in the same order.
fn assert_foreign_in_place(what: &str, before: &str, after: &str) {
    let foreign: Vec<&str> = before
        .lines()
        .filter(|l| l.starts_with("-A ") || (l.starts_with(':') && l.ends_with(" -")))
        .collect();
    let kept: Vec<&str> = after.lines().filter(|l| foreign.contains(l)).collect();
    if let Some(d) = compare_lines("foreign rules before", &foreign, what, &kept) {
        panic!("{what}: other tools' chains and rules must stay, in order\n{d}\n{after}");
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn other_tools_chains_stay_in_place_through_apply_reconfigure_and_cleanup() {
    if skip_unless_root("other_tools_chains_stay_in_place_through_apply_reconfigure_and_cleanup") {
        return;
    }
    let cfg = TproxyDns::new();
    let tproxy_dns = cfg.args();
    let redirect_dns = cat(SEED, &["--redirect-dns", "--resolv-conf", &cfg.resolv]);
    let steps: [(&str, Vec<&str>); 5] = [
        ("redirect-dns", redirect_dns.clone()),
        ("tproxy-dns", tproxy_dns.clone()),
        ("redirect", SEED.to_vec()),
        ("tproxy", seed_with("-m", "TPROXY")),
        ("cleanup", vec!["--cleanup-only"]),
    ];
    let mut script = Script::new()
        .sh(&kube_and_docker_rules("iptables-nft"))
        .sh(&kube_and_docker_rules("ip6tables-nft"))
        .snap("before");
    for (label, args) in &steps {
        script = script.run(label, V6, args).snap(label);
    }
    let ns = script.exec();
    let ctx = ns.context();
    let before = ns.state("before");
    for (label, _) in &steps {
        ns.run_rc(label, 0);
        let st = ns.state(label);
        for part in ["v4-nft", "v6-nft"] {
            assert_foreign_in_place(
                &format!("[{part}] after `{label}`\n{ctx}"),
                before.get(part),
                st.get(part),
            );
        }
    }
    assert_same(
        "cleanup must return to exactly the other tools' state",
        &before,
        &ns.state("cleanup"),
        &ctx,
    );
}

// ---------------------------------------------------------------------------
// 14. TPROXY routing: exact values, no leftovers
// ---------------------------------------------------------------------------

/// TPROXY with mark 1400 (0x578) and route table 140.
fn tproxy_1400() -> Vec<&'static str> {
    cat(&seed_with("-m", "TPROXY"), &["-t", "1400", "-r", "140"])
}

#[test]
#[ignore = "needs root and network namespaces"]
fn dangerous_tproxy_values_are_refused_before_anything_runs() {
    if skip_unless_root("dangerous_tproxy_values_are_refused_before_anything_runs") {
        return;
    }
    /// (label, extra env, args, the flag or env var the error must name)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<&'a str>, &'a str);
    let cases: [Case; 5] = [
        (
            "t0",
            vec![],
            cat(&seed_with("-m", "TPROXY"), &["-t", "0"]),
            "--istio-inbound-tproxy-mark",
        ),
        (
            "r254",
            vec![],
            cat(&seed_with("-m", "TPROXY"), &["-r", "254"]),
            "--istio-inbound-tproxy-route-table",
        ),
        (
            "r255",
            vec![],
            cat(&seed_with("-m", "TPROXY"), &["-r", "255"]),
            "--istio-inbound-tproxy-route-table",
        ),
        (
            "env-mark",
            vec![("ISTIO_INBOUND_TPROXY_MARK", "0")],
            seed_with("-m", "TPROXY"),
            "ISTIO_INBOUND_TPROXY_MARK",
        ),
        (
            "env-table",
            vec![("ISTIO_INBOUND_TPROXY_ROUTE_TABLE", "253")],
            seed_with("-m", "TPROXY"),
            "ISTIO_INBOUND_TPROXY_ROUTE_TABLE",
        ),
    ];
    let mut script = Script::new().snap("before").shims(Fail::Nothing);
    for (label, env, args, _) in &cases {
        let mut env = env.clone();
        env.push(("ENABLE_INBOUND_IPV6", "true"));
        script = script.run(label, &env, args);
    }
    let ns = script.snap("after").exec();
    let ctx = ns.context();
    for (label, env, _, flag) in &cases {
        let run = ns.run_rc(label, 2);
        let lines = run.error_lines();
        let value = env
            .first()
            .map(|(_, v)| *v)
            .unwrap_or_else(|| label.trim_start_matches(['t', 'r']));
        assert!(
            lines.len() == 1
                && lines[0].contains(flag)
                && lines[0].contains(&format!("\"{value}\"")),
            "one line naming {flag} and {value:?}\n{}",
            run.describe()
        );
        assert!(run.execs.is_empty(), "nothing may run\n{}", run.describe());
    }
    assert_same(
        "refused values change nothing",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn tproxy_with_another_mark_and_table_then_redirect_leaves_no_routing() {
    if skip_unless_root("tproxy_with_another_mark_and_table_then_redirect_leaves_no_routing") {
        return;
    }
    assert_transition(V6, &tproxy_1400(), SEED, PARTS);
    assert_transition(V6, &tproxy_1400(), &seed_with("-m", "TPROXY"), PARTS);
    assert_transition(V6, &seed_with("-m", "TPROXY"), &tproxy_1400(), PARTS);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn cleanup_removes_tproxy_routing_of_any_mark_and_table() {
    if skip_unless_root("cleanup_removes_tproxy_routing_of_any_mark_and_table") {
        return;
    }
    let ns = assert_cleanup_restores(
        &foreign_rules("iptables-nft"),
        V6,
        &tproxy_1400(),
        &["--cleanup-only"],
    );
    let applied = ns.state("applied");
    assert!(
        applied.get("rule4").contains("fwmark 0x578 lookup 140")
            && applied
                .get("route6")
                .contains("local default dev lo table 140"),
        "{}",
        applied.describe()
    );
}

/// Leftover routing (another mark and table, and a duplicate of ours) is drift for verify,
/// and one apply removes it.
#[test]
#[ignore = "needs root and network namespaces"]
fn leftover_tproxy_routing_is_drift_and_the_next_apply_removes_it() {
    if skip_unless_root("leftover_tproxy_routing_is_drift_and_the_next_apply_removes_it") {
        return;
    }
    let tproxy = seed_with("-m", "TPROXY");
    let verify = |a: &[&'static str]| cat(&["verify"], a);
    let ns = Script::new()
        .run("apply", V6, &tproxy)
        .sh("ip -4 rule add fwmark 1400 lookup 140; ip -4 route add local default dev lo table 140")
        .sh("ip -6 rule add fwmark 1337 lookup 133")
        .run("verify-drift", V6, &verify(&tproxy))
        .run("repair", V6, &tproxy)
        .snap("repaired")
        .run("verify-ok", V6, &verify(&tproxy))
        .exec();
    let ctx = ns.context();
    ns.run_rc("apply", 0);
    let drift = ns.run_rc("verify-drift", 3);
    for leftover in [
        "routes: not wanted, left by an earlier run `ip -4 rule add fwmark 1400 lookup 140`",
        "routes: not wanted, left by an earlier run `ip -4 route add local default dev lo table 140`",
        "routes: not wanted, left by an earlier run `ip -6 rule add fwmark 1337 lookup 133`",
    ] {
        assert!(
            drift.stdout.contains(leftover),
            "verify should report {leftover}\n{}",
            drift.describe()
        );
    }
    ns.run_rc("repair", 0);
    ns.run_rc("verify-ok", 0);
    let fresh = fresh_state(V6, &tproxy);
    assert_same(
        "one apply removes leftover routing",
        &fresh,
        &ns.state("repaired"),
        &ctx,
    );
}

/// Deterministic pseudo-random delays (seeded from the clock, printed on failure).
fn kill_delays(n: usize, max_us: u64) -> (u64, Vec<u64>) {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    let mut x = seed;
    let mut v: Vec<u64> = (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Spread over the whole run, plus jitter.
            (max_us * i as u64 / n as u64) + x % (max_us / n as u64 + 1)
        })
        .collect();
    v.sort();
    (seed, v)
}

/// SIGKILL at random moments of a TPROXY reconfigure (iptables commit, rollback, `ip`
/// steps); one more run of the target config always ends in its clean state.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_run_killed_at_any_moment_is_repaired_by_the_next() {
    if skip_unless_root("a_run_killed_at_any_moment_is_repaired_by_the_next") {
        return;
    }
    let from = tproxy_1400();
    let targets: [(&str, Vec<&str>); 2] = [
        ("redirect", SEED.to_vec()),
        ("tproxy", seed_with("-m", "TPROXY")),
    ];
    for (name, to) in &targets {
        let (seed, delays) = kill_delays(12, 120_000);
        let mut script = Script::new();
        for (i, us) in delays.iter().enumerate() {
            let mut words: Vec<String> = vec![
                format!("PATH={}", sane_path()),
                "ENABLE_INBOUND_IPV6=true".into(),
                BIN.into(),
            ];
            words.extend(to.iter().map(|a| a.to_string()));
            script = script
                .run(&format!("setup{i}"), V6, &from)
                .sh(&format!(
                    "set +x\nenv -i {} >/dev/null 2>&1 &\n__k=$!\nsleep {}.{:06}\nkill -9 $__k 2>/dev/null || true\nwait $__k || true\nset -x",
                    shell_command(&words),
                    us / 1_000_000,
                    us % 1_000_000
                ))
                .run(&format!("repair{i}"), V6, to)
                .snap(&format!("k{i}"));
        }
        let ns = script.exec();
        let ctx = ns.context();
        let fresh = fresh_state(V6, to);
        for (i, us) in delays.iter().enumerate() {
            ns.run_rc(&format!("setup{i}"), 0);
            ns.run_rc(&format!("repair{i}"), 0);
            let mut got = ns.state(&format!("k{i}"));
            got.label = format!("killed after {us} us (seed {seed}), then one run of {name}");
            assert_same(
                "a run after a SIGKILL must end in the clean state",
                &fresh,
                &got,
                &ctx,
            );
        }
    }
}

/// A failing `ip rule add` in a reconfigure that already removed the earlier config's
/// routing (another mark and table): everything comes back, routing included.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_failed_ip_step_in_a_tproxy_reconfigure_restores_the_earlier_routing() {
    if skip_unless_root("a_failed_ip_step_in_a_tproxy_reconfigure_restores_the_earlier_routing") {
        return;
    }
    let setup = format!(
        "{}env -i PATH={} ENABLE_INBOUND_IPV6=true {} 2>/dev/null\n",
        foreign_rules("iptables-nft"),
        shell_quote(sane_path()),
        shell_command(cat(&[BIN], &tproxy_1400()))
    );
    // A second rule into table 140 at an explicit priority: put back exactly there.
    let setup = format!("{setup}ip -4 rule add priority 100 fwmark 1500 lookup 140\n");
    let run = assert_rollback(
        &setup,
        Fail::IpRuleAddOf("fwmark 1337"),
        V6,
        &seed_with("-m", "TPROXY"),
    );
    let line = run.one_error();
    assert!(
        line.contains("configuring routes")
            && line.contains("rule add fwmark 1337 lookup 133")
            && line.contains("IPv4, IPv6, routes"),
        "{line}"
    );
    // When putting the earlier rules back fails too, the message says exactly that.
    let ns = Script::new()
        .sh(&setup)
        .shims(Fail::IpRuleAdd)
        .run("failing", V6, &seed_with("-m", "TPROXY"))
        .exec();
    let run = ns.run_rc("failing", 1);
    let line = run.one_error();
    assert!(
        line.contains("ROLLBACK FAILED")
            && line.contains("undoing the change to `ip -4 rule add fwmark 1400 lookup 140`")
            && line.contains("restored and checked by re-reading the kernel: IPv4, IPv6")
            && !line.contains("the previous state was restored"),
        "{line}"
    );
}

/// The same faults with the legacy backend, whose tables cannot be unloaded: a table the
/// failed run created stays, empty; everything else is exactly as before.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_refused_table_with_legacy_leaves_nothing_but_empty_tables() {
    let test = "a_refused_table_with_legacy_leaves_nothing_but_empty_tables";
    if skip_unless_root(test) || skip_unless_installed(test, &["iptables-legacy"]) {
        return;
    }
    let cfg = TproxyDns::new();
    let args = cat(&cfg.args(), &["--force-iptables-binary", "legacy"]);
    let earlier = cat(&[BIN], &seed_forcing("legacy"));
    let existing = format!(
        "{}env -i PATH={} ENABLE_INBOUND_IPV6=false {} 2>/dev/null\n",
        foreign_rules("iptables-legacy"),
        shell_quote(sane_path()),
        shell_command(&earlier)
    );
    let parts = [
        "v4-nft",
        "v6-nft",
        "v4-legacy",
        "rule4",
        "rule6",
        "route4",
        "route6",
        "addr6-lo",
    ];
    for setup in ["", existing.as_str()] {
        for n in 1..=3 {
            let ns = Script::new()
                .sh(setup)
                .snap("before")
                .shims(Fail::NthTable { ipv6: false, n })
                .run("failing", V4, &args)
                .snap("after")
                .exec();
            let ctx = ns.context();
            let run = ns.run_rc("failing", 1);
            assert_same(
                &format!("legacy, table {n} refused"),
                &ns.state("before").without_empty_tables().only(&parts),
                &ns.state("after").without_empty_tables().only(&parts),
                &ctx,
            );
            let line = run.one_error();
            assert!(
                (line.contains("the previous state was restored (IPv4;")
                    || (n == 1 && line.contains("nothing was changed")))
                    && !line.contains("ROLLBACK FAILED"),
                "{line}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 13. Native nftables (--native-nftables)
// ---------------------------------------------------------------------------

/// `args` with `--native-nftables` first.
fn nft<'a>(args: &[&'a str]) -> Vec<&'a str> {
    cat(&["--native-nftables"], args)
}

/// TPROXY with IPv6, DNS capture and an excluded interface: all three tables, routes and
/// `::6`.
const NFT_FULL: &[&str] = &[
    "--native-nftables",
    "-m",
    "TPROXY",
    "-b",
    "*",
    "-d",
    "15090",
    "-c",
    "eth9",
    "--drop-invalid",
    "--redirect-dns",
    "--capture-all-dns",
];

/// Foreign nft state next to ours: an inet table of another tool.
const FOREIGN_NFT: &str = "nft add table inet foreign\n\
    nft add chain inet foreign out '{ type filter hook output priority 0 ; }'\n\
    nft add rule inet foreign out tcp dport 9999 counter accept\n";

#[test]
#[ignore = "needs root and network namespaces"]
fn nft_seed_runs_only_nft_and_a_rerun_changes_nothing() {
    if skip_unless_root("nft_seed_runs_only_nft_and_a_rerun_changes_nothing") {
        return;
    }
    let ns = Script::new()
        .shims(Fail::Nothing)
        .run("first", V4, &nft(SEED))
        .snap("first")
        .run("second", V4, &nft(SEED))
        .snap("second")
        .exec();
    let ctx = ns.context();
    let first = ns.run_rc("first", 0);
    assert_eq!(first.execs, ["nft -f -"], "{}", first.describe());
    let second = ns.run_rc("second", 0);
    assert_eq!(
        second.execs,
        ["nft list ruleset inet"],
        "a re-run reads the ruleset once and commits nothing\n{}",
        second.describe()
    );
    assert!(
        second.logs().contains("already in place"),
        "{}",
        second.describe()
    );
    assert_same("a re-run", &ns.state("first"), &ns.state("second"), &ctx);
    let fresh = ns.state("first");
    assert!(
        fresh
            .get("nft-inet")
            .contains("table inet istio-proxy-nat {")
    );
    assert!(
        !fresh.get("v4-nft").contains("ISTIO_"),
        "{}",
        fresh.describe()
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn nft_changed_config_equals_fresh_apply() {
    if skip_unless_root("nft_changed_config_equals_fresh_apply") {
        return;
    }
    // Istio would leave the mangle and raw tables and the TPROXY routing in place.
    let (fresh, _) = assert_transition(V6, NFT_FULL, &nft(SEED), PARTS);
    assert!(!fresh.get("nft-inet").contains("istio-proxy-mangle"));
    assert_transition(V6, &nft(SEED), NFT_FULL, PARTS);
    assert_transition(V4, &nft(SEED), &nft(&seed_with("-b", "8080")), PARTS);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn nft_backend_switch_both_ways_equals_fresh_apply() {
    if skip_unless_root("nft_backend_switch_both_ways_equals_fresh_apply") {
        return;
    }
    let iptables = &NFT_FULL[1..];
    let (fresh_nft, _) = assert_transition(V6, iptables, NFT_FULL, PARTS);
    for part in TABLES {
        assert!(
            !fresh_nft.get(part).contains("ISTIO_"),
            "{}",
            fresh_nft.describe()
        );
    }
    let (fresh_ipt, _) = assert_transition(V6, NFT_FULL, iptables, PARTS);
    assert!(
        !fresh_ipt.get("nft-inet").contains("istio-proxy"),
        "{}",
        fresh_ipt.describe()
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn nft_half_applied_or_tampered_tables_are_repaired_by_one_run() {
    if skip_unless_root("nft_half_applied_or_tampered_tables_are_repaired_by_one_run") {
        return;
    }
    let fresh = fresh_state(V6, NFT_FULL);
    let apply = shell_command(cat(&[BIN], NFT_FULL));
    let first = format!(
        "env -i PATH={} ENABLE_INBOUND_IPV6=true {apply} >/dev/null\n",
        shell_quote(sane_path())
    );
    for damage in [
        // A rule gone.
        "h=$(nft -a list chain inet istio-proxy-nat istio-output | awk '/skuid/ {print $NF; exit}')\n\
         nft delete rule inet istio-proxy-nat istio-output handle $h",
        // A rule of someone else's in our chain.
        "nft add rule inet istio-proxy-nat istio-output tcp dport 1234 counter return",
        // A table emptied, another dropped.
        "nft flush table inet istio-proxy-mangle\nnft delete table inet istio-proxy-raw",
        // A chain of ours missing its hook (written by an older tool).
        "nft delete table inet istio-proxy-raw\nnft add table inet istio-proxy-raw\n\
         nft add chain inet istio-proxy-raw output",
        // Only the first table written (a run killed before Istio's second table).
        "nft delete table inet istio-proxy-mangle\nnft delete table inet istio-proxy-raw",
    ] {
        let ns = Script::new()
            .sh(&first)
            .sh(damage)
            .snap("damaged")
            .run("repair", V6, NFT_FULL)
            .snap("repaired")
            .exec();
        let ctx = ns.context();
        ns.run_rc("repair", 0);
        assert_ne!(
            ns.state("damaged").parts,
            fresh.parts,
            "the damage did nothing: {damage}"
        );
        let mut got = ns.state("repaired");
        got.label = format!("repaired after `{damage}`");
        assert_same("one run repairs the tables", &fresh, &got, &ctx);
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn nft_cleanup_restores_foreign_state_exactly() {
    if skip_unless_root("nft_cleanup_restores_foreign_state_exactly") {
        return;
    }
    let setup = format!(
        "{}{FOREIGN_NFT}ip -4 rule add fwmark 7 lookup 77\n",
        foreign_rules("iptables-nft")
    );
    let ns = assert_cleanup_restores(
        &setup,
        V6,
        NFT_FULL,
        &["--cleanup-only", "--native-nftables"],
    );
    let cleanup = ns.run("cleanup");
    assert!(
        cleanup.logs().contains("cleanup done"),
        "{}",
        cleanup.describe()
    );
    // The iptables cleanup removes the nft tables too: a pod never keeps a capture.
    assert_cleanup_restores(&setup, V6, NFT_FULL, &["--cleanup-only"]);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn nft_failed_ip_step_undoes_the_transaction() {
    if skip_unless_root("nft_failed_ip_step_undoes_the_transaction") {
        return;
    }
    let earlier = format!(
        "{FOREIGN_NFT}env -i PATH={} ENABLE_INBOUND_IPV6=true {} >/dev/null\n",
        shell_quote(sane_path()),
        shell_command(cat(&[BIN], &nft(SEED)))
    );
    // Fresh, over an earlier nft config, and over an earlier iptables config (a switch).
    let earlier_iptables = existing_state_setup();
    for setup in ["", earlier.as_str(), earlier_iptables.as_str()] {
        let run = assert_rollback(setup, Fail::IpRuleAdd, V6, NFT_FULL);
        let line = run.one_error();
        assert!(
            line.contains("configuring routes")
                && line.contains("rule add")
                && line.contains("Operation not permitted (shim)")
                && line.contains("nftables"),
            "the error should name the ip step and say nftables was restored: {line}"
        );
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn nft_refused_transaction_changes_nothing_and_says_so() {
    if skip_unless_root("nft_refused_transaction_changes_nothing_and_says_so") {
        return;
    }
    let earlier = format!(
        "{FOREIGN_NFT}env -i PATH={} {} >/dev/null\n",
        shell_quote(sane_path()),
        shell_command(cat(&[BIN], &nft(SEED)))
    );
    for setup in ["", earlier.as_str()] {
        let ns = Script::new()
            .sh(setup)
            .snap("before")
            .shims(Fail::NftTransaction)
            .run("failing", V6, NFT_FULL)
            .snap("after")
            .exec();
        let ctx = ns.context();
        let run = ns.run_rc("failing", 1);
        assert_same(
            "a refused transaction",
            &ns.state("before"),
            &ns.state("after"),
            &ctx,
        );
        let line = run.one_error();
        assert!(
            line.contains("committing the nftables transaction with nft -f failed at `")
                && line.contains("refused (shim)")
                && line.contains("nothing was changed (checked by re-reading the kernel)"),
            "{line}"
        );
        assert!(
            !run.execs.iter().any(|e| e.starts_with("ip ")),
            "no ip step after a refused transaction\n{}",
            run.describe()
        );
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn nft_missing_or_too_old_is_refused_before_anything_changes() {
    if skip_unless_root("nft_missing_or_too_old_is_refused_before_anything_changes") {
        return;
    }
    let args = shell_command(cat(&[BIN], NFT_FULL));
    // An nft whose binary says 0.9.8, which logs if it is ever run.
    let old = "mkdir -p \"$NS_TMP/old\"\n\
        printf '#!/bin/sh\\necho \"$*\" >> \"$NS_TMP/old/ran\"\\nexit 0\\n' > \"$NS_TMP/old/nft\"\n\
        printf '\\000' >> \"$NS_TMP/old/nft\"; printf '0.9.8' >> \"$NS_TMP/old/nft\"; printf '\\000' >> \"$NS_TMP/old/nft\"\n\
        chmod 755 \"$NS_TMP/old/nft\"";
    let run = |label: &str, path: &str| {
        format!(
            "set +x\n__rc=0\nenv -i PATH={path} ENABLE_INBOUND_IPV6=true NS_TMP=\"$NS_TMP\" {args} \
             >\"$NS_OUT/{label}.out\" 2>\"$NS_OUT/{label}.err\" || __rc=$?\n\
             echo $__rc > \"$NS_OUT/{label}.rc\"\nset -x"
        )
    };
    let ns = Script::new()
        .sh(FOREIGN_NFT)
        .snap("before")
        .sh(&run("missing", "/nonexistent"))
        .snap("after-missing")
        .sh(old)
        .sh(&run(
            "old",
            &format!("\"$NS_TMP/old\":{}", shell_quote(sane_path())),
        ))
        .snap("after-old")
        .sh("[ ! -e \"$NS_TMP/old/ran\" ] || cp \"$NS_TMP/old/ran\" \"$NS_OUT/old-ran\"")
        .exec();
    let ctx = ns.context();
    let missing = ns.run_rc("missing", 1);
    let line = missing.one_error();
    assert!(
        line.contains("needs the nft program")
            && line.contains("install the nftables package")
            && line.contains("nothing was changed"),
        "{line}"
    );
    let old = ns.run_rc("old", 1);
    let line = old.one_error();
    assert!(
        line.contains("nft 0.9.8 is too old") && line.contains("1.0.1"),
        "{line}"
    );
    assert!(
        !ns.out.files.contains_key("old-ran"),
        "the old nft must not run\n{ctx}"
    );
    let before = ns.state("before");
    assert_same("nft missing", &before, &ns.state("after-missing"), &ctx);
    assert_same("nft too old", &before, &ns.state("after-old"), &ctx);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn nft_reconcile_false_refuses_a_conflict_and_changes_nothing() {
    if skip_unless_root("nft_reconcile_false_refuses_a_conflict_and_changes_nothing") {
        return;
    }
    let no = ["--reconcile=false"];
    let ns = Script::new()
        .run("seed", V4, &nft(SEED))
        .snap("before")
        .run("other", V4, &cat(&nft(&seed_with("-b", "8080")), &no))
        .run("same", V4, &cat(&nft(SEED), &no))
        .snap("after")
        .run("iptables", V4, SEED)
        .snap("iptables")
        .run("switch", V4, &cat(&nft(SEED), &no))
        .snap("after-switch")
        .exec();
    let ctx = ns.context();
    ns.run_rc("seed", 0);
    let other = ns.run_rc("other", 4);
    assert!(
        other
            .one_error()
            .contains("table inet istio-proxy-nat differs"),
        "{}",
        other.describe()
    );
    ns.run_rc("same", 0);
    assert_same(
        "--reconcile=false",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
    ns.run_rc("iptables", 0);
    let switch = ns.run_rc("switch", 4);
    assert!(
        switch.one_error().contains("ISTIO_* iptables rules"),
        "{}",
        switch.describe()
    );
    assert_same(
        "--reconcile=false over iptables",
        &ns.state("iptables"),
        &ns.state("after-switch"),
        &ctx,
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn nft_network_namespace_cni_mode_and_skip_rule_apply() {
    if skip_unless_root("nft_network_namespace_cni_mode_and_skip_rule_apply") {
        return;
    }
    let target = ["--network-namespace", "/run/netns/pod", "--cni-mode"];
    let ns = Script::new()
        .sh("ip netns add pod\nip netns exec pod ip link set lo up")
        .snap("before")
        .run("skip", V4, &cat(&nft(SEED), &["--skip-rule-apply"]))
        .snap("after-skip")
        .run("cni", V4, &cat(&nft(SEED), &target))
        .snap("after-cni")
        .sh("ip netns exec pod nft list ruleset > \"$NS_OUT/pod.nft\"")
        .run(
            "cleanup",
            V4,
            &cat(&nft(SEED), &cat(&target, &["--cleanup-only"])),
        )
        .sh("ip netns exec pod nft list ruleset > \"$NS_OUT/pod-cleaned.nft\"")
        .exec();
    let ctx = ns.context();
    ns.run_rc("skip", 0);
    ns.run_rc("cni", 0);
    ns.run_rc("cleanup", 0);
    let before = ns.state("before");
    assert_same("--skip-rule-apply", &before, &ns.state("after-skip"), &ctx);
    assert_same(
        "the caller's namespace",
        &before,
        &ns.state("after-cni"),
        &ctx,
    );
    assert!(
        ns.file("pod.nft").contains("table inet istio-proxy-nat {"),
        "{ctx}"
    );
    assert_eq!(ns.file("pod-cleaned.nft").trim(), "", "{ctx}");
}

#[test]
#[ignore = "needs root and network namespaces"]
fn ten_simultaneous_nft_runs_of_two_configs_end_in_one_clean_state() {
    if skip_unless_root("ten_simultaneous_nft_runs_of_two_configs_end_in_one_clean_state") {
        return;
    }
    assert_concurrent_runs_converge(V6, &[nft(SEED), NFT_FULL.to_vec()], 2);
}
