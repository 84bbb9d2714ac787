//! Privileges (root, namespaces available), temporary directories, running processes
//! with a timeout.

use super::*;

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

/// The programs the binary may run (iptables in every flavour, `ip`, `nsenter`): the CLI tests
/// put a recording shim for each first in PATH, to prove what ran, or that nothing did.
pub const SHIMMED_PROGRAMS: &[&str] = &[
    "iptables",
    "iptables-save",
    "iptables-restore",
    "ip6tables",
    "ip6tables-save",
    "ip6tables-restore",
    "iptables-legacy-save",
    "iptables-legacy-restore",
    "iptables-nft-save",
    "iptables-nft-restore",
    "ip6tables-legacy-save",
    "ip6tables-legacy-restore",
    "ip6tables-nft-save",
    "ip6tables-nft-restore",
    "ip",
    "nsenter",
];
