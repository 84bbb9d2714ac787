//! Shared helpers for the integration tests.
//!
//! Each test file includes this with `mod common;`. Not every test file uses
//! every helper, so dead-code warnings are silenced for the whole module (CI
//! runs `cargo clippy --all-targets -- -D warnings`).
//!
//! What is here:
//! - privilege checks: [`is_root`], [`can_unshare`], [`skip_unless_root`];
//! - running a shell script as root inside a fresh network + mount namespace:
//!   [`run_in_fresh_ns`], [`run_in_fresh_ns_ok`] and [`NsOutput`];
//! - shell snippets: [`with_test_groups_prelude`], [`groups_prelude`],
//!   [`shell_quote`], [`shell_command`];
//! - test-case data: [`Case`], [`read_case`], [`read_cases`],
//!   [`istio_cases_dir`], [`parse_args_file`], [`parse_env_file`];
//! - running the binary ([`BIN`]) for a case: [`case_command`] (a
//!   `Command`), [`case_shell_command`] (a line for a namespace script),
//!   [`case_env`], [`sane_path`];
//! - output handling: [`normalize_save`], [`normalize_restore_payload`],
//!   [`extract_heredoc_blocks`], [`line_diff`], [`compare_lines`], [`indent`];
//! - process helpers: [`run_with_timeout`], [`TempDir`];
//! - Istio's seed command line and variants: [`SEED`], [`seed_with`], [`proxy_flags`].
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Path of the binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_istio-iptables");

/// Standard directories that must be on PATH for iptables/ip/unshare.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long one namespace script or one binary invocation may run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Istio's seed command:
/// `-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15020`.
pub const SEED: &[&str] = &[
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15020",
];

/// The proxy's ports and uid as in [`SEED`] (`-p 15001 -z 15006 -u 1337`), `-m mode`, then
/// `rest`.
pub fn proxy_flags<'a>(mode: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["-p", "15001", "-z", "15006", "-u", "1337", "-m", mode];
    v.extend_from_slice(rest);
    v
}

/// [`SEED`] with the value of `flag` replaced by `value` (`seed_with("-m", "TPROXY")`).
pub fn seed_with<'a>(flag: &str, value: &'a str) -> Vec<&'a str> {
    let mut v = SEED.to_vec();
    let i = v
        .iter()
        .position(|a| *a == flag)
        .unwrap_or_else(|| panic!("no {flag} in the seed command"))
        + 1;
    v[i] = value;
    v
}

// ---------------------------------------------------------------------------
// Privileges
// ---------------------------------------------------------------------------

/// Effective uid of this process, read from `/proc/self/status` (falls back
/// to `id -u`). `None` if neither works.
pub fn effective_uid() -> Option<u32> {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        for line in status.lines() {
            if let Some(rest) = line.strip_prefix("Uid:") {
                // Fields: real, effective, saved set, filesystem.
                if let Some(euid) = rest.split_whitespace().nth(1)
                    && let Ok(v) = euid.parse()
                {
                    return Some(v);
                }
            }
        }
    }
    let out = Command::new("id").arg("-u").output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// True if running with effective uid 0.
pub fn is_root() -> bool {
    effective_uid() == Some(0)
}

/// True if a fresh network + mount namespace can be created here (root with
/// CAP_SYS_ADMIN and the `unshare` tool present).
pub fn can_unshare() -> bool {
    Command::new("unshare")
        .args(["--net", "--mount", "--propagation", "private", "--", "true"])
        .env("PATH", sane_path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Returns `true` when the test must be SKIPPED (not root, or namespaces are
/// unavailable), after printing a clear `SKIPPED <test_name>: ...` line to
/// stderr. Such a test is also marked ignored, so that a plain `cargo test` lists it
/// (`cargo test -- --include-ignored` runs it). Use as:
///
/// ```ignore
/// #[test]
/// #[ignore = "needs root and network namespaces"]
/// fn my_test() {
///     if common::skip_unless_root("my test") { return; }
/// ```
pub fn skip_unless_root(test_name: &str) -> bool {
    if !is_root() {
        eprintln!(
            "SKIPPED {test_name}: needs root and network namespaces (effective uid is {:?})",
            effective_uid()
        );
        return true;
    }
    if !can_unshare() {
        eprintln!(
            "SKIPPED {test_name}: needs root and network namespaces \
             (`unshare --net --mount` failed: missing CAP_SYS_ADMIN or util-linux?)"
        );
        return true;
    }
    false
}

// ---------------------------------------------------------------------------
// Temporary directories
// ---------------------------------------------------------------------------

/// A uniquely named directory under `std::env::temp_dir()`, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let base = std::env::temp_dir();
        loop {
            let n = COUNTER.fetch_add(1, Ordering::SeqCst);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let path = base.join(format!("{prefix}-{}-{n}-{nanos:08x}", std::process::id()));
            match fs::create_dir(&path) {
                Ok(()) => return TempDir { path },
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot create temp dir {}: {e}", path.display()),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// PATH of this process with the standard sbin/bin directories appended if
/// missing; [`DEFAULT_PATH`] if PATH is unset or empty.
pub fn sane_path() -> String {
    let parent = std::env::var("PATH").unwrap_or_default();
    if parent.trim().is_empty() {
        return DEFAULT_PATH.to_string();
    }
    let mut dirs: Vec<&str> = parent.split(':').filter(|d| !d.is_empty()).collect();
    for d in DEFAULT_PATH.split(':') {
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs.join(":")
}

/// Runs `cmd` (stdin closed, stdout/stderr captured) in its own process
/// group. If it runs longer than `timeout`, that process group is killed and
/// an error is returned. Errors are human-readable strings.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    use std::os::unix::process::CommandExt;
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot spawn {desc}: {e}"))?;
    let pid = child.id();
    let mut out_pipe = child.stdout.take().expect("stdout piped");
    let mut err_pipe = child.stderr.take().expect("stderr piped");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(format!("waiting for {desc}: {e}")),
        }
        if start.elapsed() > timeout {
            // Kill the whole process group we created (its id is the child's pid).
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{pid}")])
                .env("PATH", sane_path())
                .status();
            let _ = child.kill();
            let _ = child.wait();
            let stderr =
                String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
            return Err(format!(
                "{desc} timed out after {timeout:?} and was killed; stderr so far:\n{stderr}"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

// ---------------------------------------------------------------------------
// Fresh namespaces
// ---------------------------------------------------------------------------

/// Result of [`run_in_fresh_ns`].
#[derive(Debug)]
pub struct NsOutput {
    /// The script as it was run (including the `set -ex` header).
    pub script: String,
    pub status: ExitStatus,
    pub stdout: String,
    /// Script stderr; it contains the shell's `set -x` trace.
    pub stderr: String,
    /// Files the script wrote directly into `$NS_OUT`, by file name.
    pub files: BTreeMap<String, String>,
}

impl NsOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Content of `$NS_OUT/<name>`, or an error naming the missing file and
    /// describing the whole run.
    pub fn file(&self, name: &str) -> Result<&str, String> {
        self.files.get(name).map(String::as_str).ok_or_else(|| {
            format!(
                "namespace script did not write $NS_OUT/{name}\n{}",
                self.describe()
            )
        })
    }

    /// Human-readable account of the run: status, numbered script, stdout,
    /// stderr, and the output files.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "namespace script exit status: {}", self.status);
        let _ = writeln!(s, "--- script ---");
        for (i, line) in self.script.lines().enumerate() {
            let _ = writeln!(s, "{:4} | {line}", i + 1);
        }
        let _ = writeln!(s, "--- stdout ---\n{}", self.stdout.trim_end());
        let _ = writeln!(s, "--- stderr ---\n{}", self.stderr.trim_end());
        for (name, content) in &self.files {
            let _ = writeln!(s, "--- $NS_OUT/{name} ---\n{}", content.trim_end());
        }
        s
    }
}

/// Runs `script` with `sh` as root inside a fresh network namespace and a
/// fresh (private-propagation) mount namespace:
/// `unshare --net --mount --propagation private -- sh <script>`.
///
/// - The script runs under `set -ex`: any failing simple command aborts it
///   with a non-zero status (beware `set -e` exemptions: commands in `if`,
///   `&&`/`||` lists and non-final pipeline stages). The trace goes to stderr.
/// - Environment: cleared except `PATH` ([`sane_path`]), `HOME=/root`,
///   `NS_OUT` (an empty directory; every regular file written into it is
///   returned in [`NsOutput::files`]) and `NS_TMP` (scratch directory).
/// - Working directory: `$NS_TMP`.
/// - Both directories are removed afterwards.
///
/// Panics only if `unshare` cannot be spawned or times out; a failing script
/// is reported through [`NsOutput::status`] (see [`run_in_fresh_ns_ok`]).
pub fn run_in_fresh_ns(script: &str) -> NsOutput {
    let tmp = TempDir::new("istio-iptables-ns");
    let out_dir = tmp.path().join("out");
    let scratch = tmp.path().join("tmp");
    fs::create_dir(&out_dir).expect("create NS_OUT");
    fs::create_dir(&scratch).expect("create NS_TMP");
    let full_script = format!("set -ex\n{script}\n");
    let script_path = tmp.path().join("script.sh");
    fs::write(&script_path, &full_script).expect("write namespace script");

    let mut cmd = Command::new("unshare");
    cmd.args(["--net", "--mount", "--propagation", "private", "--", "sh"])
        .arg(&script_path)
        .current_dir(&scratch)
        .env_clear()
        .env("PATH", sane_path())
        .env("HOME", "/root")
        .env("NS_OUT", &out_dir)
        .env("NS_TMP", &scratch);
    let output = run_with_timeout(&mut cmd, DEFAULT_TIMEOUT).unwrap_or_else(|e| {
        panic!("running namespace script failed: {e}\n--- script ---\n{full_script}")
    });

    let mut files = BTreeMap::new();
    if let Ok(entries) = fs::read_dir(&out_dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_file() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let content = fs::read(&path)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_else(|e| format!("<unreadable: {e}>"));
                files.insert(name, content);
            }
        }
    }
    NsOutput {
        script: full_script,
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        files,
    }
}

/// Like [`run_in_fresh_ns`], but a non-zero exit is an `Err` carrying
/// [`NsOutput::describe`] (script, stdout, stderr, files).
pub fn run_in_fresh_ns_ok(script: &str) -> Result<NsOutput, String> {
    let out = run_in_fresh_ns(script);
    if out.success() {
        Ok(out)
    } else {
        Err(out.describe())
    }
}

// ---------------------------------------------------------------------------
// Shell snippets
// ---------------------------------------------------------------------------

/// Quotes `s` as one POSIX sh word (single quotes).
pub fn shell_quote(s: impl AsRef<OsStr>) -> String {
    let s = s.as_ref().to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        return s.into_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Quotes a program and its arguments as one sh command line.
pub fn shell_command<I, S>(words: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    words
        .into_iter()
        .map(shell_quote)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Shell snippet for a fresh mount namespace: makes each named group exist
/// by bind-mounting a copy of `/etc/group` with extra `name:x:gid:` lines over
/// `/etc/group` (names already present are left alone; gids are picked so
/// they clash with no existing group). Uses `$NS_TMP` (falls back to `/tmp`).
/// Must only be used in a private mount namespace (e.g. [`run_in_fresh_ns`]).
pub fn groups_prelude(names: &[&str]) -> String {
    let existing = fs::read_to_string("/etc/group").unwrap_or_default();
    let mut used_gids: BTreeSet<u32> = BTreeSet::new();
    for line in existing.lines() {
        if let Some(gid) = line.split(':').nth(2).and_then(|g| g.parse().ok()) {
            used_gids.insert(gid);
        }
    }
    let mut next_gid = 40000u32;
    let mut s = String::new();
    s.push_str("__groups_file=$(mktemp \"${NS_TMP:-/tmp}/group.XXXXXX\")\n");
    s.push_str("cat /etc/group > \"$__groups_file\"\n");
    for name in names {
        while used_gids.contains(&next_gid) {
            next_gid += 1;
        }
        let gid = next_gid;
        used_gids.insert(gid);
        let line = format!("{name}:x:{gid}:");
        let _ = writeln!(
            s,
            "grep -q {} \"$__groups_file\" || echo {} >> \"$__groups_file\"",
            shell_quote(format!("^{name}:")),
            shell_quote(&line)
        );
    }
    s.push_str("chmod 0644 \"$__groups_file\"\n");
    s.push_str("mount --bind \"$__groups_file\" /etc/group\n");
    for name in names {
        let _ = writeln!(s, "getent group {} >/dev/null", shell_quote(name));
    }
    s
}

/// [`groups_prelude`] for the groups the Istio test data refers to by name
/// (`java`, `ftp`).
pub fn with_test_groups_prelude() -> String {
    groups_prelude(&["java", "ftp"])
}

// ---------------------------------------------------------------------------
// Test cases
// ---------------------------------------------------------------------------

/// One test case directory (`tests/data/istio/<name>/`).
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub dir: PathBuf,
    /// Command-line arguments (one per line of `args`; empty line = "").
    pub args: Vec<String>,
    /// `KEY=VALUE` lines of `env`.
    pub env: Vec<(String, String)>,
    /// Content of `expected-v4.rules`.
    pub expected_v4: String,
    /// Content of `expected-v6.rules`, if present (absent = no ip6tables).
    pub expected_v6: Option<String>,
}

/// `tests/data/istio` of this crate: the shared conformance set, copied as it is.
pub fn istio_cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/istio")
}

/// `tests/data/istio-more`: more of Istio's golden cases, transcribed by us from Istio's
/// run_test.go (each has a SOURCE naming the golden and its commit).
pub fn istio_more_cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/istio-more")
}

/// Every conformance case: the shared set, then ours.
pub fn all_istio_cases() -> Vec<Case> {
    let mut cases = read_cases(&istio_cases_dir());
    cases.extend(read_cases(&istio_more_cases_dir()));
    cases
}

/// Parses an `args` file: one argument per line, an empty line is an empty
/// argument; the final newline does not make an extra argument.
pub fn parse_args_file(content: &str) -> Vec<String> {
    let content = content.strip_suffix('\n').unwrap_or(content);
    if content.is_empty() {
        return Vec::new();
    }
    content
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
        .collect()
}

/// Parses an `env` file: `KEY=VALUE` lines; blank lines and `#` comments are
/// skipped.
pub fn parse_env_file(content: &str) -> Result<Vec<(String, String)>, String> {
    let mut env = Vec::new();
    for (i, line) in content.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        match line.split_once('=') {
            Some((k, v)) if !k.is_empty() => env.push((k.to_string(), v.to_string())),
            _ => return Err(format!("line {}: not KEY=VALUE: {line:?}", i + 1)),
        }
    }
    Ok(env)
}

/// Reads one case directory. Panics with a clear message on malformed data.
pub fn read_case(dir: &Path) -> Case {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    let read = |file: &str| -> Option<String> {
        let p = dir.join(file);
        if p.exists() {
            Some(
                fs::read_to_string(&p)
                    .unwrap_or_else(|e| panic!("case {name}: cannot read {}: {e}", p.display())),
            )
        } else {
            None
        }
    };
    let args = parse_args_file(
        &read("args").unwrap_or_else(|| panic!("case {name}: missing `args` file")),
    );
    let env = match read("env") {
        Some(c) => parse_env_file(&c).unwrap_or_else(|e| panic!("case {name}: env: {e}")),
        None => Vec::new(),
    };
    let expected_v4 = read("expected-v4.rules")
        .unwrap_or_else(|| panic!("case {name}: missing `expected-v4.rules`"));
    let expected_v6 = read("expected-v6.rules");
    Case {
        name,
        dir: dir.to_path_buf(),
        args,
        env,
        expected_v4,
        expected_v6,
    }
}

/// Reads every sub-directory of `root` as a case, sorted by name. Panics if
/// there are none.
pub fn read_cases(root: &Path) -> Vec<Case> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(root)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", root.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "no test cases found in {}",
        root.display()
    );
    dirs.iter().map(|d| read_case(d)).collect()
}

/// Environment a case runs with: PATH ([`sane_path`]) then the case's env.
pub fn case_env(case: &Case) -> Vec<(String, String)> {
    let mut env = vec![("PATH".to_string(), sane_path())];
    env.extend(case.env.iter().cloned());
    env
}

/// `Command` running the binary for `case` with `extra_args` appended:
/// environment cleared, then [`case_env`]; working directory = case dir.
pub fn case_command(case: &Case, extra_args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(&case.args)
        .args(extra_args)
        .current_dir(&case.dir)
        .env_clear()
        .envs(case_env(case));
    cmd
}

/// Shell line (for a namespace script) running the binary for `case` like
/// [`case_command`] does: `(cd DIR && exec env -i K=V... BIN ARGS... EXTRA...)`.
/// Under `set -x`, dash writes the trace of a redirected command into the
/// redirection target: wrap it in `set +x` ... `set -x` to keep a captured
/// stderr clean.
pub fn case_shell_command(case: &Case, extra_args: &[&str]) -> String {
    let mut words: Vec<String> = vec!["env".into(), "-i".into()];
    words.extend(case_env(case).into_iter().map(|(k, v)| format!("{k}={v}")));
    words.push(BIN.to_string());
    words.extend(case.args.iter().cloned());
    words.extend(extra_args.iter().map(|s| s.to_string()));
    format!(
        "(cd {} && exec {})",
        shell_quote(&case.dir),
        shell_command(&words)
    )
}

// ---------------------------------------------------------------------------
// Output normalisation and comparison
// ---------------------------------------------------------------------------

/// Normalises `iptables-save` output: drops `#` comment lines and blank
/// lines, strips counters from chain lines (`:CHAIN POLICY [x:y]` →
/// `:CHAIN POLICY`) and trailing whitespace.
pub fn normalize_save(save: &str) -> String {
    let mut out = String::new();
    for line in save.lines() {
        let line = line.trim_end();
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let line = if line.starts_with(':') && line.ends_with(']') {
            match line.rfind(" [") {
                Some(i) => line[..i].trim_end(),
                None => line,
            }
        } else {
            line
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Normalises an iptables-restore payload for comparison: trims each line,
/// collapses inner whitespace runs to one space, turns `*  nat` into `*nat`,
/// and drops blank lines.
pub fn normalize_restore_payload(payload: &str) -> Vec<String> {
    payload
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .map(|l| match l.strip_prefix('*') {
            Some(rest) => format!("*{}", rest.trim_start()),
            None => l,
        })
        .collect()
}

/// Finds every here-document in `script` whose opening line (trimmed) is
/// exactly `marker` and returns the bodies (lines up to the next line that
/// is exactly `EOF`). A body without its `EOF` is an `Err`.
pub fn extract_heredoc_blocks(script: &str, marker: &str) -> Result<Vec<String>, String> {
    let lines: Vec<&str> = script.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() == marker {
            let start = i + 1;
            let end = (start..lines.len())
                .find(|&j| lines[j] == "EOF")
                .ok_or_else(|| format!("`{marker}` at line {} has no closing EOF line", i + 1))?;
            let mut body = lines[start..end].join("\n");
            body.push('\n');
            blocks.push(body);
            i = end + 1;
        } else {
            i += 1;
        }
    }
    Ok(blocks)
}

/// Line diff of `expected` vs `actual` (LCS based): unchanged lines prefixed
/// with two spaces, missing ones with `- `, unexpected ones with `+ `.
pub fn line_diff<E: AsRef<str>, A: AsRef<str>>(expected: &[E], actual: &[A]) -> String {
    let (n, m) = (expected.len(), actual.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if expected[i].as_ref() == actual[j].as_ref() {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut out = String::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && expected[i].as_ref() == actual[j].as_ref() {
            let _ = writeln!(out, "  {}", expected[i].as_ref());
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            let _ = writeln!(out, "- {}", expected[i].as_ref());
            i += 1;
        } else {
            let _ = writeln!(out, "+ {}", actual[j].as_ref());
            j += 1;
        }
    }
    out
}

/// Compares two line lists. `None` if equal; otherwise a report with the
/// first differing line (both sides), a `-expected/+actual` diff and both
/// full texts.
pub fn compare_lines<E: AsRef<str>, A: AsRef<str>>(
    expected_label: &str,
    expected: &[E],
    actual_label: &str,
    actual: &[A],
) -> Option<String> {
    let first = (0..expected.len().max(actual.len()))
        .find(|&i| expected.get(i).map(AsRef::as_ref) != actual.get(i).map(AsRef::as_ref))?;
    let show = |v: Option<&str>| v.map_or("<no line>".to_string(), |s| format!("{s:?}"));
    let mut r = String::new();
    let _ = writeln!(r, "first difference at line {}:", first + 1);
    let _ = writeln!(
        r,
        "  {expected_label}: {}",
        show(expected.get(first).map(AsRef::as_ref))
    );
    let _ = writeln!(
        r,
        "  {actual_label}: {}",
        show(actual.get(first).map(AsRef::as_ref))
    );
    let _ = writeln!(r, "diff (- {expected_label}, + {actual_label}):");
    r.push_str(&line_diff(expected, actual));
    let _ = writeln!(r, "full {expected_label}:");
    for l in expected {
        let _ = writeln!(r, "    {}", l.as_ref());
    }
    let _ = writeln!(r, "full {actual_label}:");
    for l in actual {
        let _ = writeln!(r, "    {}", l.as_ref());
    }
    Some(r)
}

/// Indents every line of `text` by `prefix` (for nesting reports).
pub fn indent(text: &str, prefix: &str) -> String {
    text.lines()
        .map(|l| format!("{prefix}{l}\n"))
        .collect::<String>()
}

// ---------------------------------------------------------------------------
// Two-namespace topology (real traffic)
// ---------------------------------------------------------------------------

/// Serialises `ip netns add` (the first one mounts `/run/netns`; concurrent first calls race).
static NETNS_CREATE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Name of the veth end in each namespace of a [`Topology`].
pub const TOPOLOGY_DEV: &str = "eth0";

/// Two named network namespaces, `pod` and `peer`, joined by a veth pair (named
/// [`TOPOLOGY_DEV`] on both sides), `lo` up in both:
///
/// | | pod | peer |
/// |---|---|---|
/// | IPv4 (`/24`) | `10.X.Y.1` | `10.X.Y.2` |
/// | IPv6 (`/64`, `nodad`) | `fd00:X:Y::1` | `fd00:X:Y::2` |
///
/// `X`/`Y` come from the pid and a counter, and the namespace names are unique
/// (`iit-<name>-<pid>-<n>-pod|peer`), so tests may run in parallel. Both namespaces (and with
/// them the veth pair, rules and routes) are deleted on drop, also when a test panics.
///
/// Everything happens inside the two namespaces; the root namespace is never touched.
#[derive(Debug)]
pub struct Topology {
    /// Name of the pod namespace (`ip netns exec <pod> ...`, `/run/netns/<pod>`).
    pub pod: String,
    /// Name of the peer namespace.
    pub peer: String,
    pub pod_v4: std::net::Ipv4Addr,
    pub peer_v4: std::net::Ipv4Addr,
    pub pod_v6: std::net::Ipv6Addr,
    pub peer_v6: std::net::Ipv6Addr,
    created: Vec<String>,
}

impl Topology {
    /// Builds the topology; panics with the failing `ip` command and its stderr (after
    /// deleting whatever was already created).
    pub fn new(name: &str) -> Topology {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let (x, y) = (100 + (pid % 100) as u8, (n % 250) as u8 + 1);
        let base = format!("iit-{name}-{pid}-{n}");
        let mut t = Topology {
            pod: format!("{base}-pod"),
            peer: format!("{base}-peer"),
            pod_v4: std::net::Ipv4Addr::new(10, x, y, 1),
            peer_v4: std::net::Ipv4Addr::new(10, x, y, 2),
            pod_v6: std::net::Ipv6Addr::new(0xfd00, x.into(), y.into(), 0, 0, 0, 0, 1),
            peer_v6: std::net::Ipv6Addr::new(0xfd00, x.into(), y.into(), 0, 0, 0, 0, 2),
            created: Vec::new(),
        };
        if let Err(e) = t.build() {
            panic!("cannot build the two-namespace topology {base}: {e}");
        }
        t
    }

    fn build(&mut self) -> Result<(), String> {
        {
            let _guard = NETNS_CREATE.lock().unwrap_or_else(|p| p.into_inner());
            for ns in [self.pod.clone(), self.peer.clone()] {
                run_ip(&["netns", "add", &ns])?;
                self.created.push(ns);
            }
        }
        let (pod, peer, dev) = (self.pod.clone(), self.peer.clone(), TOPOLOGY_DEV);
        run_ip(&[
            "link", "add", dev, "netns", &pod, "type", "veth", "peer", "name", dev, "netns", &peer,
        ])?;
        for (ns, v4, v6) in [
            (&pod, self.pod_v4, self.pod_v6),
            (&peer, self.peer_v4, self.peer_v6),
        ] {
            self.ip(ns, &["link", "set", "lo", "up"])?;
            self.ip(ns, &["addr", "add", &format!("{v4}/24"), "dev", dev])?;
            self.ip(
                ns,
                &["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"],
            )?;
            self.ip(ns, &["link", "set", dev, "up"])?;
        }
        Ok(())
    }

    /// `10.X.Y.host`: another address of the topology's IPv4 subnet.
    pub fn v4(&self, host: u8) -> std::net::Ipv4Addr {
        let o = self.pod_v4.octets();
        std::net::Ipv4Addr::new(o[0], o[1], o[2], host)
    }

    /// `fd00:X:Y::host`: another address of the topology's IPv6 subnet.
    pub fn v6(&self, host: u16) -> std::net::Ipv6Addr {
        let s = self.pod_v6.segments();
        std::net::Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, host)
    }

    /// The IPv4 subnet, `10.X.Y.0/24`.
    pub fn subnet_v4(&self) -> String {
        format!("{}/24", self.v4(0))
    }

    /// `/run/netns/<ns>`.
    pub fn netns_path(ns: &str) -> PathBuf {
        Path::new("/run/netns").join(ns)
    }

    /// `ip -n <ns> ARGS...`; stdout, or an error with the command and its stderr.
    pub fn ip(&self, ns: &str, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", ns];
        all.extend_from_slice(args);
        run_ip(&all)
    }

    /// Runs `program ARGS...` in namespace `ns` (`ip netns exec`) with a cleared environment:
    /// PATH ([`sane_path`]) plus `env`.
    pub fn exec(&self, ns: &str, program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, program])
            .args(args)
            .env_clear()
            .env("PATH", sane_path())
            .envs(env.iter().copied());
        run_with_timeout(&mut cmd, DEFAULT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs the binary under test ([`BIN`]) in namespace `ns` with PATH and
    /// `ENABLE_INBOUND_IPV6=<ipv6>` as its whole environment.
    pub fn run_bin(&self, ns: &str, ipv6: bool, args: &[&str]) -> Output {
        let v6 = if ipv6 { "true" } else { "false" };
        self.exec(ns, BIN, args, &[("ENABLE_INBOUND_IPV6", v6)])
    }

    /// Like [`Topology::run_bin`], but panics (with stdout and stderr) unless it exits 0.
    /// Returns stderr (the binary's log).
    pub fn run_bin_ok(&self, ns: &str, ipv6: bool, args: &[&str]) -> String {
        let out = self.run_bin(ns, ipv6, args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "`ip netns exec {ns} {BIN} {}` (ENABLE_INBOUND_IPV6={ipv6}) failed with {}\n\
             --- stdout ---\n{}\n--- stderr ---\n{stderr}",
            shell_command(args),
            out.status,
            String::from_utf8_lossy(&out.stdout),
        );
        stderr
    }

    /// The rules and routing state of namespace `ns`, for failure messages: `iptables-save`,
    /// `ip6tables-save`, `ip rule`, addresses.
    pub fn describe(&self, ns: &str) -> String {
        let mut s = String::new();
        for (program, args) in [
            ("iptables-save", &[][..]),
            ("ip6tables-save", &[][..]),
            ("ip", &["-4", "rule"][..]),
            ("ip", &["-6", "rule"][..]),
            ("ip", &["-br", "addr"][..]),
        ] {
            let out = self.exec(ns, program, args, &[]);
            let _ = writeln!(
                s,
                "--- {ns}: {program} {} ---\n{}{}",
                args.join(" "),
                normalize_save(&String::from_utf8_lossy(&out.stdout)),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        s
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.created.drain(..).rev() {
            if let Err(e) = run_ip(&["netns", "del", &ns]) {
                eprintln!("warning: cannot delete network namespace {ns}: {e}");
            }
        }
    }
}

/// `ip ARGS...` with PATH only; stdout, or an error with the command line and stderr.
fn run_ip(args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("ip");
    cmd.args(args).env_clear().env("PATH", sane_path());
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Moves the *calling thread* into the named network namespace (`setns` on
/// `/run/netns/<ns>`). Only that thread (and threads it spawns afterwards) is affected: call
/// it first thing in a thread of its own.
pub fn enter_netns(ns: &str) -> Result<(), String> {
    let path = Topology::netns_path(ns);
    let file = fs::File::open(&path).map_err(|e| format!("open {}: {e}", path.display()))?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("setns({}): {e}", path.display()))
}

/// Runs `f` in a new thread inside network namespace `ns` and returns its result (the thread
/// is joined; a panic in `f` is resumed in the caller).
pub fn run_in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T, String> {
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            enter_netns(ns)?;
            Ok(f())
        });
        match h.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

// ---------------------------------------------------------------------------
// Real traffic: listeners that say where a connection landed, and clients
// (shared by tests/traffic.rs and tests/explain.rs)
// ---------------------------------------------------------------------------
//
// **Where did a connection land?** Every TCP [`Listener`] answers each accepted connection
// with one line: its label (`pod:15001`, `peer:80`, ...), the accepted socket's local
// address, the original destination (`SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`, from
// conntrack) and the client's address ([`Landing`]). [`connect`] reads that line. A
// [`UdpListener`] records each datagram and answers it ([`udp_exchange`]).
//
// **As whom?** iptables' owner match reads the socket's file credentials, fixed when the
// socket is created. Clients run in their own thread, which calls `setfsgid`/`setfsuid`
// (per thread on Linux) before creating the socket ([`Ident::assume`]).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};

use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6,
    sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};
use nix::unistd::{Gid, Uid};

/// Bound of one connect, one read, one UDP round trip.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// How often idle listeners check whether they should stop.
pub const POLL: Duration = Duration::from_millis(5);

/// The proxy's uid and gid (`-u 1337`).
pub const PROXY: Ident = Ident {
    uid: 1337,
    gid: 1337,
};
/// An application running as root.
pub const APP: Ident = Ident { uid: 0, gid: 0 };

pub const LOCALHOST_V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
pub const LOCALHOST_V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
/// Source address of the proxy's inbound passthrough (`127.0.0.6`, `::6`).
pub const PASSTHROUGH_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6));
pub const PASSTHROUGH_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6));

/// Which way a connection between the two namespaces of a [`Topology`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// From the pod to the peer.
    Outbound,
    /// From the peer to the pod.
    Inbound,
}

// ---------------------------------------------------------------------------
// Identities
// ---------------------------------------------------------------------------

/// Filesystem uid/gid a client's socket is created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ident {
    pub uid: u32,
    pub gid: u32,
}

impl Ident {
    /// Sets the calling thread's filesystem ids (gid first: leaving fsuid 0 drops the
    /// capability to change the gid). Only call in a thread that ends afterwards.
    pub fn assume(self) -> Result<(), String> {
        nix::unistd::setfsgid(Gid::from_raw(self.gid));
        nix::unistd::setfsuid(Uid::from_raw(self.uid));
        // setfsuid/setfsgid return the previous value; an invalid id changes nothing and
        // reports the current one.
        let fsuid = nix::unistd::setfsuid(Uid::from_raw(u32::MAX)).as_raw();
        let fsgid = nix::unistd::setfsgid(Gid::from_raw(u32::MAX)).as_raw();
        if (fsuid, fsgid) != (self.uid, self.gid) {
            return Err(format!(
                "could not switch to fsuid/fsgid {}/{} (still {fsuid}/{fsgid})",
                self.uid, self.gid
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for Ident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "uid {}", self.uid)
    }
}

// ---------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------

pub fn domain_of(addr: &SocketAddr) -> AddressFamily {
    match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    }
}

pub fn bind_fd(fd: &OwnedFd, addr: SocketAddr) -> nix::Result<()> {
    match addr {
        SocketAddr::V4(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(a)),
    }
}

/// A socket of `ty` for `addr`'s family, `SO_REUSEADDR`, IPv6-only for IPv6 (so IPv4 and
/// IPv6 listeners never share a port), optionally `IP_TRANSPARENT`, bound to `addr`.
pub fn bound_socket(ty: SockType, addr: SocketAddr, transparent: bool) -> nix::Result<OwnedFd> {
    let proto = match ty {
        SockType::Datagram => SockProtocol::Udp,
        _ => SockProtocol::Tcp,
    };
    let fd = socket::socket(domain_of(&addr), ty, SockFlag::SOCK_CLOEXEC, proto)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    if transparent {
        // SOL_IP/IP_TRANSPARENT also applies to IPv6 sockets on Linux.
        socket::setsockopt(&fd, sockopt::IpTransparent, &true)?;
    }
    bind_fd(&fd, addr)?;
    Ok(fd)
}

/// The destination a connection was originally addressed to, from conntrack.
pub fn original_dst(stream: &TcpStream, local: &SocketAddr) -> Option<SocketAddr> {
    if local.is_ipv4() {
        let sa = socket::getsockopt(stream, sockopt::OriginalDst).ok()?;
        Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr))),
            u16::from_be(sa.sin_port),
        ))
    } else {
        let sa = socket::getsockopt(stream, sockopt::Ip6tOriginalDst).ok()?;
        Some(SocketAddr::new(
            IpAddr::V6(Ipv6Addr::from(sa.sin6_addr.s6_addr)),
            u16::from_be(sa.sin6_port),
        ))
    }
}

// ---------------------------------------------------------------------------
// TCP listeners and clients
// ---------------------------------------------------------------------------

/// What a listener saw of one connection (also what it tells the client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Landing {
    /// The listener's label, e.g. `pod:15001`.
    pub label: String,
    /// Local address of the accepted socket.
    pub local: SocketAddr,
    /// `SO_ORIGINAL_DST`; `None` if conntrack had no answer.
    pub orig: Option<SocketAddr>,
    /// The client's address as the listener saw it.
    pub peer: SocketAddr,
}

impl Landing {
    pub fn to_line(&self) -> String {
        let orig = self.orig.map_or("none".to_string(), |o| o.to_string());
        format!("{}|{}|{}|{}\n", self.label, self.local, orig, self.peer)
    }

    pub fn parse(line: &str) -> Result<Landing, String> {
        let f: Vec<&str> = line.trim_end().split('|').collect();
        let bad = || format!("malformed listener reply {line:?}");
        if f.len() != 4 {
            return Err(bad());
        }
        Ok(Landing {
            label: f[0].to_string(),
            local: f[1].parse().map_err(|_| bad())?,
            orig: if f[2] == "none" {
                None
            } else {
                Some(f[2].parse().map_err(|_| bad())?)
            },
            peer: f[3].parse().map_err(|_| bad())?,
        })
    }
}

impl std::fmt::Display for Landing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let orig = self.orig.map_or("none".to_string(), |o| o.to_string());
        write!(
            f,
            "{} (local {}, original dst {orig}, from {})",
            self.label, self.local, self.peer
        )
    }
}

/// A TCP listener in a namespace, run by a thread until dropped. Every accepted connection
/// gets its [`Landing`] line and is closed.
pub struct Listener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    accepted: Arc<Mutex<Vec<Landing>>>,
}

impl Listener {
    /// Listens on `addr` in namespace `ns`; returns once the socket listens. Panics if it
    /// cannot (with the reason).
    pub fn tcp(ns: &str, label: &str, addr: SocketAddr) -> Listener {
        Listener::start(ns, label, addr, false)
    }

    /// Like [`Listener::tcp`], with `IP_TRANSPARENT` (a TPROXY target).
    pub fn transparent(ns: &str, label: &str, addr: SocketAddr) -> Listener {
        Listener::start(ns, label, addr, true)
    }

    pub fn start(ns: &str, label: &str, addr: SocketAddr, transparent: bool) -> Listener {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (ns_s, label_s) = (ns.to_string(), label.to_string());
        let (stop_t, accepted_t) = (stop.clone(), accepted.clone());
        let thread = thread::spawn(move || {
            let listener = match (|| -> Result<TcpListener, String> {
                enter_netns(&ns_s)?;
                let fd = bound_socket(SockType::Stream, addr, transparent)
                    .map_err(|e| format!("bind {addr}: {e}"))?;
                socket::listen(&fd, Backlog::new(64).expect("valid backlog"))
                    .map_err(|e| format!("listen {addr}: {e}"))?;
                let l = TcpListener::from(fd);
                l.set_nonblocking(true).map_err(|e| e.to_string())?;
                Ok(l)
            })() {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while !stop_t.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_write_timeout(Some(TIMEOUT));
                        let local = stream.local_addr().unwrap_or(addr);
                        let landing = Landing {
                            label: label_s.clone(),
                            orig: original_dst(&stream, &local),
                            local,
                            peer,
                        };
                        let line = landing.to_line();
                        // Record before replying: the client may check the record after the reply.
                        accepted_t
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(landing);
                        let _ = (&stream).write_all(line.as_bytes());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => thread::sleep(POLL),
                    Err(_) => thread::sleep(POLL),
                }
            }
        });
        match ready_rx.recv_timeout(TIMEOUT * 5) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                panic!("listener {label} in {ns}: {e}");
            }
            Err(e) => panic!("listener {label} in {ns} did not start: {e}"),
        }
        Listener {
            stop,
            thread: Some(thread),
            accepted,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> Vec<Landing> {
        self.accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects to `dst` from namespace `ns` with a socket created as `who`, optionally bound to
/// source address `src` first, and returns the landing line of the listener that accepted
/// the connection. Errors: refused, timed out (after [`TIMEOUT`]), no reply.
pub fn connect(
    ns: &str,
    who: Ident,
    dst: SocketAddr,
    src: Option<IpAddr>,
) -> Result<Landing, String> {
    run_in_netns(ns, || -> Result<Landing, String> {
        who.assume()?;
        let fd = socket::socket(
            domain_of(&dst),
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::Tcp,
        )
        .map_err(|e| format!("socket: {e}"))?;
        // A blocking connect gives up after SO_SNDTIMEO (EINPROGRESS), see socket(7).
        socket::setsockopt(
            &fd,
            sockopt::SendTimeout,
            &TimeVal::milliseconds(TIMEOUT.as_millis() as i64),
        )
        .map_err(|e| format!("SO_SNDTIMEO: {e}"))?;
        if let Some(src) = src {
            bind_fd(&fd, SocketAddr::new(src, 0)).map_err(|e| format!("bind {src}: {e}"))?;
        }
        match dst {
            SocketAddr::V4(a) => socket::connect(fd.as_raw_fd(), &SockaddrIn::from(a)),
            SocketAddr::V6(a) => socket::connect(fd.as_raw_fd(), &SockaddrIn6::from(a)),
        }
        .map_err(|e| match e {
            nix::errno::Errno::EINPROGRESS | nix::errno::Errno::EAGAIN => {
                format!("connect timed out after {TIMEOUT:?}")
            }
            e => format!("connect: {e}"),
        })?;
        let stream = TcpStream::from(fd);
        stream
            .set_read_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .map_err(|e| format!("connected, but reading the listener's reply: {e}"))?;
        if line.is_empty() {
            return Err("connected, but the connection was closed without a reply \
                 (accepted by something other than a test listener?)"
                .to_string());
        }
        Landing::parse(&line)
    })?
}

// ---------------------------------------------------------------------------
// UDP
// ---------------------------------------------------------------------------

/// A UDP socket in a namespace, run by a thread until dropped. Every datagram is recorded
/// as `(payload, from)` and answered with `label|local|payload`.
pub struct UdpListener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    received: Arc<Mutex<Vec<(String, SocketAddr)>>>,
}

impl UdpListener {
    /// Binds `addr` in `ns` with a socket created as `owner` (the DNS proxy runs as the
    /// proxy user, which the conntrack-zone rules match on). Panics if it cannot.
    pub fn start(ns: &str, label: &str, addr: SocketAddr, owner: Ident) -> UdpListener {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (ns_s, label_s) = (ns.to_string(), label.to_string());
        let (stop_t, received_t) = (stop.clone(), received.clone());
        let thread = thread::spawn(move || {
            let sock = match (|| -> Result<UdpSocket, String> {
                enter_netns(&ns_s)?;
                owner.assume()?;
                let fd = bound_socket(SockType::Datagram, addr, false)
                    .map_err(|e| format!("bind udp {addr}: {e}"))?;
                let s = UdpSocket::from(fd);
                s.set_read_timeout(Some(POLL * 4))
                    .map_err(|e| e.to_string())?;
                Ok(s)
            })() {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut buf = [0u8; 512];
            while !stop_t.load(Ordering::SeqCst) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let payload = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let reply = format!("{label_s}|{addr}|{payload}");
                    // Record before replying: the client checks the record after the reply.
                    received_t
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((payload, from));
                    let _ = sock.send_to(reply.as_bytes(), from);
                }
            }
        });
        match ready_rx.recv_timeout(TIMEOUT * 5) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                panic!("udp listener {label} in {ns}: {e}");
            }
            Err(e) => panic!("udp listener {label} in {ns} did not start: {e}"),
        }
        UdpListener {
            stop,
            thread: Some(thread),
            received,
        }
    }

    /// The sender of the datagram carrying `payload`, if it arrived here.
    pub fn got(&self, payload: &str) -> Option<SocketAddr> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(p, _)| p == payload)
            .map(|(_, from)| *from)
    }
}

impl Drop for UdpListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `payload` over UDP from `ns` as `who` to `dst` (connected socket) and returns the
/// reply's text, or an error (e.g. no reply within [`TIMEOUT`]).
pub fn udp_exchange(
    ns: &str,
    who: Ident,
    dst: SocketAddr,
    payload: &str,
) -> Result<String, String> {
    run_in_netns(ns, || -> Result<String, String> {
        who.assume()?;
        let any: SocketAddr = if dst.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let s = UdpSocket::bind(any).map_err(|e| format!("bind: {e}"))?;
        s.connect(dst).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        s.send(payload.as_bytes())
            .map_err(|e| format!("send: {e}"))?;
        let mut buf = [0u8; 512];
        let n = s
            .recv(&mut buf)
            .map_err(|e| format!("no reply from {dst}: {e}"))?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })?
}

pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}
