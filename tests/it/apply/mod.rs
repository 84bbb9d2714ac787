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

use crate::common;

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

// The tests, one module per subject; the namespace scripts and the process counting they
// share are below.
mod changed_config;
mod cleanup;
mod concurrency;
mod detection;
mod errors;
mod every_place;
mod foreign_state;
mod half_applied;
mod hangs;
mod idempotence;
mod kernel_truth;
mod network_namespace;
mod nft;
mod reconcile;
mod rollback;
mod table_rollback;
mod tproxy_routing;
mod validation;
mod xtables_lock;

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
    /// `nft -f ...` fails like nft refusing a transaction (at its line 2).
    NftTransaction,
    /// `{ip,ip6}tables-*restore --noflush` (`ipv6` picks the family) commits the tables before
    /// the `n`th (1-based) of its payload with the real program, then fails like a kernel
    /// refusing the `n`th table: what iptables-restore does, table by table.
    NthTable { ipv6: bool, n: usize },
}

/// Shell lines that make the kernel refuse our `FAMILY route add local default dev lo table
/// TABLE` for real (no shim: the routes are changed over netlink): another device's `local
/// default` route already in the table (`File exists`). `family`: `-4` or `-6`.
fn conflicting_route_in(family: &str, table: u32) -> String {
    format!(
        "ip link show d0 >/dev/null 2>&1 || {{ ip link add d0 type veth peer name d1; ip link set d0 up; ip link set d1 up; }}\n\
         ip {family} route add local default dev d0 table {table}\n"
    )
}

/// [`conflicting_route_in`] table 133, the default TPROXY table.
fn conflicting_route(family: &str) -> String {
    conflicting_route_in(family, 133)
}

/// A namespace script under construction.
struct Script {
    text: String,
    shims: bool,
    /// The PATH of later runs, when not the usual one (see [`Script::only_programs`]).
    path: Option<String>,
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
        Script {
            text,
            shims: false,
            path: None,
        }
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
            if fail == Fail::NftTransaction && name == "nft" {
                body.push_str(
                    "case \" $* \" in *\" -f \"*) cat >/dev/null; \
                     echo '/dev/stdin:2:1-3: Error: Could not process rule: refused (shim)' >&2; exit 1;; esac\n",
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

    /// Later runs get a PATH of one directory, `$NS_TMP/only`, holding (as symlinks to the
    /// real programs) only the installed ones of `programs`.
    fn only_programs(mut self, programs: &[&str]) -> Script {
        let mut s = String::from("mkdir -p \"$NS_TMP/only\"\n");
        for name in programs {
            if let Some(real) = real_program(name) {
                let _ = writeln!(s, "ln -sf {} \"$NS_TMP/only/{name}\"", shell_quote(&real));
            }
        }
        self.path = Some("PATH=\"$NS_TMP/only\"".into());
        self.shims = false;
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
        let path = if let Some(p) = &self.path {
            p.clone()
        } else if self.shims {
            format!("PATH=\"$NS_TMP/shims\":{}", shell_quote(sane_path()))
        } else {
            shell_command([format!("PATH={}", sane_path())])
        };
        let mut words: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if let Some(t) = trace {
            // By its full path: the run's PATH may not hold it (`only_programs`).
            let strace = real_program("strace")
                .map_or("strace".into(), |p| p.to_string_lossy().into_owned());
            words.push(strace);
            words.extend(["-f", "-qq", "-e", &format!("trace={t}"), "-o"].map(String::from));
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

    /// Without the rules `logs` says were kept as rules of our shape that nothing proves
    /// ours (`kept IPv4 nat PREROUTING: -A PREROUTING -i eth9 -j RETURN (iptables-nft-save)`),
    /// and then without the tables that leaves empty.
    fn without_kept(&self, logs: &str) -> State {
        let kept: Vec<(&str, &str)> = logs
            .lines()
            .filter_map(|l| l.split_once("\tkept ").map(|(_, rest)| rest))
            .filter_map(|rest| {
                let (_, rest) = rest.split_once(' ')?; // the family
                let (table, rest) = rest.split_once(' ')?;
                let (_, rule) = rest.split_once(": ")?;
                let (rule, _) = rule.rsplit_once(" (")?;
                let rule = rule.rsplit_once(" (").map_or(rule, |(r, _)| r);
                Some((table, rule))
            })
            .collect();
        let mut s = self.clone();
        for text in s.parts.values_mut() {
            let mut table = "";
            *text = text
                .lines()
                .filter(|l| {
                    if let Some(t) = l.strip_prefix('*') {
                        table = t;
                    }
                    !kept.contains(&(table, l))
                })
                .map(|l| format!("{l}\n"))
                .collect();
        }
        s.without_empty_tables()
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
