//! Fresh network + mount namespaces for one script, and the two-namespace topology
//! real traffic crosses.

use super::*;

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
    /// `ip6tables-save`, `ip rule`, addresses ([`Topology::describe_for`] the iptables
    /// backend).
    pub fn describe(&self, ns: &str) -> String {
        self.describe_for(Backend::Iptables, ns)
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
