//! The release image (`Dockerfile`), without a container engine: its root filesystem built by
//! the Dockerfile's own steps, its size, its arm64 twin, and its entrypoint run in the two
//! containers Istio makes from it, on this kernel.
//!
//! **The root filesystem.** The Dockerfile's Debian stage installs `iptables nftables` on
//! `debian:bookworm-slim` and runs `image/rootfs.sh`, whose directory is the final `FROM
//! scratch` stage. Here that script runs on this host, which must be the same Debian release
//! with the same packages installed (checked against the Dockerfile; CI runs on a fresh
//! bookworm): the same files, without a debootstrap's minutes. The binary is the one the
//! Dockerfile builds, the release musl build (`cargo build --release --target
//! x86_64-unknown-linux-musl`, which must be newer than the sources).
//!
//! **The containers.** Each run is `ip netns exec POD sh -c ...` (a fresh network namespace
//! of a [`Topology`], and a private mount namespace) that mounts the root filesystem
//! read-only (an overlay of it and a layer with what the container runtime adds: the mount
//! points' contents, `/etc/resolv.conf`, and the test's `setpriv` in `/.harness`), with
//! `/proc`, a read-only `/sys`, a `/dev` of the runtime's six devices and, for `istio-init`
//! only, a writable `/run` (the container's writable layer), then
//! `env -i PATH=<the image's> chroot ROOT setpriv ... /usr/local/bin/istio-iptables ARGS`.
//! setpriv sets the uid, the bounding set (what a root process gets on exec: what Kubernetes'
//! `capabilities: {drop: [ALL], add: [...]}` leaves) and no_new_privs
//! (`allowPrivilegeEscalation: false`). It is the host's, run by the image's loader with its
//! one extra library from `/.harness/lib` (`--library-path`, not inherited by what it runs):
//! nothing of `/.harness` is on the entrypoint's PATH or library path.
//!
//! - `istio-init`: uid 0, NET_ADMIN and NET_RAW, no_new_privs.
//! - `istio-validation` (Istio CNI): uid 1337, no capabilities, no writable path at all.

use crate::common::{
    self, Backend, DEFAULT_TIMEOUT, SEED, SEED_SCENARIOS, TPROXY_SCENARIOS, TempDir, Topology,
    case_dirs, parse_args_file, parse_env_file, proxy_flags, run_with_timeout, sa, shell_command,
    shell_quote, skip_unless_root,
};
use crate::traffic::{Checks, context, tcp_listeners};

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

/// At most this many bytes in the image's root filesystem (the goal: 15 MiB).
const MAX_IMAGE_BYTES: u64 = 15 * 1024 * 1024;

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------
// The Dockerfile
// ---------------------------------------------------------------------------

/// What the Dockerfile says the image is made of.
#[derive(Debug)]
struct Dockerfile {
    /// The Debian stage's base, e.g. `debian:bookworm-slim`.
    debian_base: String,
    /// What that stage installs.
    packages: Vec<String>,
    /// The final stage's `ENV PATH=`.
    path: String,
    /// The final stage's `ENTRYPOINT` program.
    entrypoint: String,
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn instructions() -> Vec<String> {
    let text = fs::read_to_string(crate_dir().join("Dockerfile")).expect("read Dockerfile");
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => {
                cur.push_str(head);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                out.push(std::mem::take(&mut cur));
            }
        }
    }
    out
}

/// Reads the stages: the Debian one runs `image/rootfs.sh` into `/rootfs`, the final one is
/// `FROM scratch` holding exactly that directory. Panics when the Dockerfile is built
/// otherwise (this test would then not build what it builds).
fn dockerfile() -> Dockerfile {
    let ins = instructions();
    let stages: Vec<Vec<&String>> = ins.iter().fold(Vec::new(), |mut acc, i| {
        if i.starts_with("FROM ") {
            acc.push(Vec::new());
        }
        if let Some(stage) = acc.last_mut() {
            stage.push(i);
        }
        acc
    });
    let debian = stages
        .iter()
        .find(|s| {
            s.iter()
                .any(|i| i.contains("rootfs.sh /istio-iptables /rootfs"))
        })
        .expect("a Dockerfile stage runs `rootfs.sh /istio-iptables /rootfs`");
    assert!(
        debian
            .iter()
            .any(|i| *i == "COPY image/rootfs.sh /rootfs.sh"),
        "the Debian stage copies image/rootfs.sh: {debian:#?}"
    );
    let from: Vec<&str> = debian[0].split_whitespace().collect();
    assert_eq!(
        from.get(2..),
        Some(&["AS", "rootfs"][..]),
        "the Debian stage is named rootfs: {}",
        debian[0]
    );
    let install = debian
        .iter()
        .find(|i| i.contains("apt-get install"))
        .expect("the Debian stage installs packages");
    let after = install
        .split("--no-install-recommends")
        .nth(1)
        .expect("no recommends");
    let packages = after
        .split("&&")
        .next()
        .unwrap()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let last = stages.last().expect("stages");
    assert_eq!(last[0].as_str(), "FROM scratch", "the final stage");
    let copies: Vec<&&String> = last.iter().filter(|i| i.starts_with("COPY")).collect();
    assert_eq!(
        copies,
        [&&"COPY --from=rootfs /rootfs/ /".to_string()],
        "the final stage holds rootfs.sh's directory and nothing else"
    );
    let path = last
        .iter()
        .find_map(|i| i.strip_prefix("ENV PATH="))
        .expect("the final stage sets PATH")
        .to_string();
    let entrypoint = last
        .iter()
        .find_map(|i| i.strip_prefix("ENTRYPOINT [\""))
        .and_then(|e| e.strip_suffix("\"]"))
        .expect("ENTRYPOINT [\"program\"]")
        .to_string();
    Dockerfile {
        debian_base: from[1].to_string(),
        packages,
        path,
        entrypoint,
    }
}

/// Panics unless this host is the Debian release of the Dockerfile's stage, with its
/// packages installed: rootfs.sh then collects the image's files from here.
fn check_host_is_the_debian_stage(d: &Dockerfile) {
    let release = d
        .debian_base
        .strip_prefix("debian:")
        .and_then(|t| t.split('-').next())
        .unwrap_or_else(|| panic!("the Debian stage's base is not debian:*: {}", d.debian_base));
    let os = fs::read_to_string("/etc/os-release").unwrap_or_default();
    let here = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .unwrap_or("");
    assert_eq!(
        here, release,
        "the image test builds the image's files from this host: it must be Debian {release} \
         (the Dockerfile's {}), as CI is",
        d.debian_base
    );
    for p in &d.packages {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", p])
            .output()
            .expect("dpkg-query");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("install ok installed"),
            "the Dockerfile's Debian stage installs {p}; install it here: apt-get install {}",
            d.packages.join(" ")
        );
    }
}

// ---------------------------------------------------------------------------
// The binaries
// ---------------------------------------------------------------------------

/// The release build for `triple`, which the Dockerfile puts in the image; panics with the
/// command to build it when it is missing or older than the sources.
fn release_binary(triple: &str) -> PathBuf {
    // BIN is <target>/x86_64-unknown-linux-musl/debug/istio-iptables.
    let target = Path::new(common::BIN)
        .ancestors()
        .nth(3)
        .expect("the target directory");
    let bin = target.join(triple).join("release/istio-iptables");
    let build = format!("cargo build --release --locked --target {triple}");
    let built = fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}: build it first: {build}", bin.display()));
    let newest = newest_source();
    assert!(
        built >= newest,
        "{} is older than the sources: build it again: {build}",
        bin.display()
    );
    bin
}

/// The newest modification time of what the binary is built from.
fn newest_source() -> SystemTime {
    fn walk(p: &Path, newest: &mut SystemTime) {
        let Ok(m) = fs::metadata(p) else { return };
        if m.is_dir() {
            for e in fs::read_dir(p).into_iter().flatten().flatten() {
                walk(&e.path(), newest);
            }
        } else if let Ok(t) = m.modified() {
            *newest = (*newest).max(t);
        }
    }
    let mut newest = SystemTime::UNIX_EPOCH;
    for p in ["src", "Cargo.toml", "Cargo.lock", "build.rs"] {
        walk(&crate_dir().join(p), &mut newest);
    }
    newest
}

// ---------------------------------------------------------------------------
// The image's root filesystem, and running its entrypoint
// ---------------------------------------------------------------------------

/// The image's root filesystem (`rootfs/`, as rootfs.sh collects it) and the layer the
/// "container runtime" adds over it (`runtime/`).
struct Image {
    dir: TempDir,
    dockerfile: Dockerfile,
    /// The programs' loader, which runs the harness's setpriv.
    loader: String,
}

/// How Istio's injector runs the container.
#[derive(Debug, Clone, Copy)]
struct SecurityContext {
    uid: u32,
    /// What `capabilities.add` leaves after `drop: [ALL]`.
    caps: &'static [&'static str],
    /// A writable `/run` (the container's writable layer; Istio's `istio-init` has
    /// `readOnlyRootFilesystem: false`).
    writable_run: bool,
}

/// `istio-init`.
const ISTIO_INIT: SecurityContext = SecurityContext {
    uid: 0,
    caps: &["NET_ADMIN", "NET_RAW"],
    writable_run: true,
};

/// `istio-init` granted only NET_ADMIN.
const NET_ADMIN_ONLY: SecurityContext = SecurityContext {
    caps: &["NET_ADMIN"],
    ..ISTIO_INIT
};

/// `istio-validation`: uid 1337, no capabilities, read-only root filesystem, no `/tmp`.
const ISTIO_VALIDATION: SecurityContext = SecurityContext {
    uid: 1337,
    caps: &[],
    writable_run: false,
};

/// The first path ldd resolves for `program` whose name starts with `prefix`.
fn ldd_path(program: &str, prefix: &str) -> String {
    let out = Command::new("ldd").arg(program).output().expect("ldd");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .flat_map(str::split_whitespace)
        .find(|w| {
            w.starts_with('/')
                && Path::new(w)
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .unwrap_or_else(|| panic!("ldd {program}: no {prefix}*"))
        .to_string()
}

impl Image {
    /// Runs the Dockerfile's Debian stage's script on this host; panics with its output
    /// when it fails.
    fn build() -> Image {
        let dockerfile = dockerfile();
        check_host_is_the_debian_stage(&dockerfile);
        let bin = release_binary("x86_64-unknown-linux-musl");
        let dir = TempDir::new("istio-iptables-image");
        let rootfs = dir.path().join("rootfs");
        let out = Command::new("sh")
            .arg(crate_dir().join("image/rootfs.sh"))
            .arg(&bin)
            .arg(&rootfs)
            .output()
            .expect("run image/rootfs.sh");
        assert!(
            out.status.success(),
            "image/rootfs.sh failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // What the runtime adds: /etc/resolv.conf (kubelet's) and the harness.
        let runtime = dir.path().join("runtime");
        fs::create_dir_all(runtime.join(".harness/lib")).unwrap();
        fs::create_dir_all(runtime.join("etc")).unwrap();
        fs::write(runtime.join("etc/resolv.conf"), "").unwrap();
        fs::copy("/usr/bin/setpriv", runtime.join(".harness/setpriv")).expect("setpriv");
        let capng = ldd_path("/usr/bin/setpriv", "libcap-ng.so");
        fs::copy(&capng, runtime.join(".harness/lib/libcap-ng.so.0")).expect("libcap-ng");
        let loader = ldd_path("/usr/bin/setpriv", "ld-linux");
        Image {
            dir,
            dockerfile,
            loader,
        }
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// Sets the container's `/etc/resolv.conf`.
    fn resolv_conf(&self, text: &str) {
        fs::write(self.dir.path().join("runtime/etc/resolv.conf"), text).unwrap();
    }

    /// Runs the entrypoint with `args` and `env` in network namespace `ns` of `t`, as a
    /// container with `ctx`.
    fn run(
        &self,
        t: &Topology,
        ns: &str,
        ctx: SecurityContext,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Output {
        static N: AtomicUsize = AtomicUsize::new(0);
        let root = self
            .dir
            .path()
            .join(format!("mnt-{}", N.fetch_add(1, Ordering::SeqCst)));
        fs::create_dir(&root).unwrap();
        let q = |p: &Path| shell_quote(p);
        let mut script = format!(
            "set -e\nR={root}\n\
             mount -t overlay overlay -o lowerdir={runtime}:{rootfs} \"$R\"\n\
             mount -t proc proc \"$R/proc\"\n\
             mount -t sysfs -o ro sysfs \"$R/sys\"\n\
             mount -t tmpfs -o mode=755 tmpfs \"$R/dev\"\n\
             for d in null zero full random urandom tty; do\n\
               touch \"$R/dev/$d\"; mount --bind \"/dev/$d\" \"$R/dev/$d\"\n\
             done\n",
            root = q(&root),
            runtime = q(&self.dir.path().join("runtime")),
            rootfs = q(&self.rootfs()),
        );
        if ctx.writable_run {
            script.push_str("mount -t tmpfs -o mode=755 tmpfs \"$R/run\"\n");
        }
        let bounding: String = std::iter::once("-all".to_string())
            .chain(ctx.caps.iter().map(|c| format!("+{}", c.to_lowercase())))
            .collect::<Vec<_>>()
            .join(",");
        let mut words: Vec<String> = vec!["env".into(), "-i".into()];
        words.push(format!("PATH={}", self.dockerfile.path));
        words.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        words.extend(
            [
                "chroot",
                "$R",
                &self.loader,
                "--library-path",
                "/.harness/lib",
                "/.harness/setpriv",
                &format!("--reuid={}", ctx.uid),
                &format!("--regid={}", ctx.uid),
                "--clear-groups",
                "--inh-caps=-all",
                &format!("--bounding-set={bounding}"),
                "--no-new-privs",
                "--",
                &self.dockerfile.entrypoint,
            ]
            .map(str::to_string),
        );
        words.extend(args.iter().map(|a| a.to_string()));
        // `$R` stays a variable: quote every other word.
        let line = words
            .iter()
            .map(|w| {
                if w == "$R" {
                    "\"$R\"".into()
                } else {
                    shell_quote(w)
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        script.push_str(&format!("exec {line}\n"));
        t.exec(ns, "sh", &["-c", &script], &[])
    }

    /// Like [`Image::run`], but panics unless it exits 0; returns the log.
    fn run_ok(
        &self,
        t: &Topology,
        ns: &str,
        ctx: SecurityContext,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> String {
        let out = self.run(t, ns, ctx, env, args);
        let log = log_of(&out);
        assert!(
            out.status.success(),
            "the image's `istio-iptables {}` ({ctx:?}, env {env:?}) failed with {}\n\
             --- log ---\n{log}",
            shell_command(args),
            out.status
        );
        log
    }

    /// Applies `args` with `ctx`, then again: the second run must leave every rule as the
    /// first left it, and commit nothing (its closing line names no iptables place and no
    /// nftables table) and change no route. Returns the first run's log.
    fn apply_twice(
        &self,
        t: &Topology,
        ctx: SecurityContext,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> String {
        let log = self.run_ok(t, &t.pod, ctx, env, args);
        let before = state(t);
        let again = self.run_ok(t, &t.pod, ctx, env, args);
        assert_eq!(
            before,
            state(t),
            "the re-run changed the rules; its log:\n{again}"
        );
        let done = again
            .lines()
            .find(|l| l.contains("capture rules are in place"))
            .unwrap_or_else(|| panic!("no closing line in the re-run's log:\n{again}"));
        assert!(
            !done.contains("iptables=")
                && !done.contains("nftables=")
                && done.contains("routes=0 "),
            "the re-run changed something: {done}"
        );
        log
    }
}

/// The seed command with the legacy flavour forced.
fn legacy_seed() -> Vec<&'static str> {
    let mut legacy = vec!["--force-iptables-binary", "legacy"];
    legacy.extend_from_slice(SEED);
    legacy
}

/// Every rule of the pod (both iptables flavours, nft, policy routing), read with the host's
/// programs.
fn state(t: &Topology) -> String {
    let mut s = String::new();
    for (p, args) in [
        ("iptables-nft-save", &[][..]),
        ("ip6tables-nft-save", &[]),
        ("iptables-legacy-save", &[]),
        ("ip6tables-legacy-save", &[]),
        ("nft", &["list", "ruleset"]),
        ("ip", &["-4", "rule"]),
        ("ip", &["-6", "rule"]),
    ] {
        let out = t.exec(&t.pod, p, args, &[]);
        s.push_str(&format!("--- {p} {}\n", args.join(" ")));
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            // Counters (`[0:0]`, nft's `counter packets N bytes M`: IPv6 neighbour discovery
            // goes on) and the save's timestamp comments change between reads.
            if l.starts_with('#') {
                continue;
            }
            let mut words = l.split(" [").next().unwrap_or(l).split_whitespace();
            while let Some(w) = words.next() {
                s.push_str(w);
                s.push(' ');
                if w == "packets" || w == "bytes" {
                    words.next();
                }
            }
            s.push('\n');
        }
    }
    s
}

/// What a run wrote: the apply command logs to stdout, as Istio's does; errors of the shell
/// around it go to stderr.
fn log_of(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// The root filesystem is at most 15 MiB and holds no shell, package manager or other
/// program than the entrypoint, nft and the two xtables multi-binaries; /etc holds root and
/// istio-proxy only.
#[test]
#[ignore = "needs the release musl build (README: Build and test)"]
fn image_rootfs_is_small_and_holds_only_what_runs() {
    let image = Image::build();
    let root = image.rootfs();
    let mut total = 0;
    let mut programs = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap().flatten() {
            let m = fs::symlink_metadata(e.path()).unwrap();
            let rel = e
                .path()
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                total += m.len();
                use std::os::unix::fs::PermissionsExt;
                let lib = rel.contains(".so");
                if m.permissions().mode() & 0o111 != 0 && !lib {
                    programs.push(rel);
                }
            }
        }
    }
    programs.sort();
    eprintln!(
        "image root filesystem: {total} bytes ({:.1} MiB)",
        total as f64 / 1048576.0
    );
    assert!(
        total <= MAX_IMAGE_BYTES,
        "the image holds {total} bytes, more than {MAX_IMAGE_BYTES}"
    );
    assert_eq!(
        programs,
        [
            "usr/local/bin/istio-iptables",
            "usr/sbin/nft",
            "usr/sbin/xtables-legacy-multi",
            "usr/sbin/xtables-nft-multi"
        ],
        "the image's programs"
    );
    assert_eq!(
        fs::read_to_string(root.join("etc/passwd")).unwrap(),
        "root:x:0:0:root:/:/nonexistent\nistio-proxy:x:1337:1337:istio-proxy:/:/nonexistent\n"
    );
    assert_eq!(
        fs::read_to_string(root.join("etc/group")).unwrap(),
        "root:x:0:\nistio-proxy:x:1337:\n"
    );
    let mut etc: Vec<String> = fs::read_dir(root.join("etc"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    etc.sort();
    assert_eq!(etc, ["group", "passwd"]);
}

/// The arm64 binary (cross-built, run under qemu-aarch64) prints the same `--dry-run` script
/// as the amd64 one, and exits alike, for every conformance case of both backends.
#[test]
#[ignore = "needs the release musl builds for both targets and qemu-aarch64 (README: Build and test)"]
fn image_arm64_dry_run_equals_amd64() {
    let amd64 = release_binary("x86_64-unknown-linux-musl");
    let arm64 = release_binary("aarch64-unknown-linux-musl");
    let qemu = Command::new("qemu-aarch64").arg("--version").output();
    assert!(
        qemu.is_ok_and(|o| o.status.success()),
        "qemu-aarch64 is not installed (Debian: apt-get install qemu-user)"
    );
    let mut compared = 0;
    let mut failures = Vec::new();
    for data in [
        "istio",
        "istio-more",
        "istio-nftables",
        "istio-nftables-more",
    ] {
        for dir in case_dirs(&crate_dir().join("tests/data").join(data)) {
            let args = parse_args_file(&fs::read_to_string(dir.join("args")).unwrap());
            let env = match fs::read_to_string(dir.join("env")) {
                Ok(e) => parse_env_file(&e).unwrap(),
                Err(_) => Vec::new(),
            };
            let run = |program: &Path, qemu: bool| {
                let mut cmd = if qemu {
                    let mut c = Command::new("qemu-aarch64");
                    c.arg(program);
                    c
                } else {
                    Command::new(program)
                };
                cmd.args(&args)
                    .arg("--dry-run")
                    .current_dir(&dir)
                    .env_clear()
                    .env("PATH", common::sane_path())
                    .envs(env.iter().cloned());
                run_with_timeout(&mut cmd, DEFAULT_TIMEOUT).unwrap()
            };
            let (a, b) = (run(&amd64, false), run(&arm64, true));
            compared += 1;
            if a.status.code() != b.status.code() || a.stdout != b.stdout {
                failures.push(format!(
                    "{data}/{}: amd64 {} / arm64 {}\n{}",
                    dir.file_name().unwrap().to_string_lossy(),
                    a.status,
                    b.status,
                    common::line_diff(
                        &String::from_utf8_lossy(&a.stdout)
                            .lines()
                            .collect::<Vec<_>>(),
                        &String::from_utf8_lossy(&b.stdout)
                            .lines()
                            .collect::<Vec<_>>()
                    )
                ));
            } else if !a.status.success() || a.stdout.is_empty() {
                failures.push(format!(
                    "{data}/{}: no script ({})",
                    dir.display(),
                    a.status
                ));
            }
        }
    }
    assert!(compared > 50, "only {compared} cases");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// `istio-init` with the seed command (REDIRECT, the nft flavour): applies, re-runs
/// cleanly, and real traffic is captured as the seed scenarios say.
#[test]
#[ignore = "needs root and network namespaces"]
fn image_istio_init_seed_redirect_traffic() {
    if skip_unless_root("image_istio_init_seed_redirect_traffic") {
        return;
    }
    let image = Image::build();
    let t = Topology::new("img-seed");
    let log = image.apply_twice(&t, ISTIO_INIT, &[], SEED);
    let any: IpAddr = Ipv4Addr::UNSPECIFIED.into();
    let _listeners = tcp_listeners(
        &t,
        any,
        &[
            ("pod", 15001),
            ("pod", 15006),
            ("pod", 8080),
            ("pod", 15090),
            ("pod", 15008),
            ("peer", 80),
        ],
    );
    let mut c = Checks::new("image_istio_init_seed_redirect_traffic");
    c.table(&t, false, SEED_SCENARIOS);
    c.finish(|| context(&t, Backend::Iptables, &log));
}

/// `istio-init` with TPROXY, dual stack and DNS capture: applies, re-runs cleanly, and real
/// inbound traffic of both families reaches the transparent listener.
#[test]
#[ignore = "needs root and network namespaces"]
fn image_istio_init_tproxy_dual_stack_dns_traffic() {
    if skip_unless_root("image_istio_init_tproxy_dual_stack_dns_traffic") {
        return;
    }
    let image = Image::build();
    let t = Topology::new("img-tproxy");
    image.resolv_conf(&format!(
        "nameserver {}\nnameserver {}\n",
        t.peer_v4, t.peer_v6
    ));
    let args = proxy_flags(
        "TPROXY",
        &[
            "-i",
            "*",
            "-x",
            "",
            "-b",
            "*",
            "-d",
            "15090,15020",
            "--redirect-dns",
            "--dual-stack",
        ],
    );
    let env = [("ENABLE_INBOUND_IPV6", "true")];
    let log = image.apply_twice(&t, ISTIO_INIT, &env, &args);
    let rules = state(&t);
    for needle in ["TPROXY", "--to-ports 15053", "ip6tables"] {
        assert!(
            rules.contains(needle),
            "no {needle:?} in the rules:\n{rules}"
        );
    }
    let mut c = Checks::new("image_istio_init_tproxy_dual_stack_dns_traffic");
    let mut listeners = Vec::new();
    for v6 in [false, true] {
        let any: IpAddr = if v6 {
            Ipv6Addr::UNSPECIFIED.into()
        } else {
            Ipv4Addr::UNSPECIFIED.into()
        };
        listeners.push(common::Listener::transparent(
            &t.pod,
            "pod:15006",
            sa(any, 15006),
        ));
        listeners.extend(tcp_listeners(
            &t,
            any,
            &[("pod", 15001), ("pod", 8080), ("pod", 15090), ("peer", 80)],
        ));
        c.table(&t, v6, TPROXY_SCENARIOS);
    }
    drop(listeners);
    c.finish(|| context(&t, Backend::Iptables, &log));
}

/// With NET_ADMIN alone: `--native-nftables` and the nft flavour apply and re-run cleanly;
/// the legacy flavour is refused before anything runs, naming NET_RAW and the pod-spec fix.
#[test]
#[ignore = "needs root and network namespaces"]
fn image_net_admin_alone_runs_nftables_and_iptables_nft() {
    if skip_unless_root("image_net_admin_alone_runs_nftables_and_iptables_nft") {
        return;
    }
    let image = Image::build();
    let t = Topology::new("img-nft");
    let mut native = vec!["--native-nftables"];
    native.extend_from_slice(&common::seed_with("-m", "TPROXY"));
    image.apply_twice(
        &t,
        NET_ADMIN_ONLY,
        &[("ENABLE_INBOUND_IPV6", "true")],
        &native,
    );
    t.capture_is_in(Backend::Nft, &t.pod).unwrap();

    let t = Topology::new("img-nftflavour");
    image.apply_twice(&t, NET_ADMIN_ONLY, &[], SEED);
    assert!(state(&t).contains("-A ISTIO_OUTPUT"), "{}", state(&t));

    let t = Topology::new("img-legacy-caps");
    let legacy = legacy_seed();
    let out = image.run(&t, &t.pod, NET_ADMIN_ONLY, &[], &legacy);
    let err = log_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("lacks CAP_NET_RAW, which")
            && err.contains("{capabilities: {add: [NET_RAW]}}"),
        "{err}"
    );
    assert!(!state(&t).contains("ISTIO"), "{}", state(&t));
}

/// The legacy flavour in `istio-init` applies and re-runs cleanly; with a read-only `/run`
/// it fails naming the xtables lock and the fix, and nothing stays applied.
#[test]
#[ignore = "needs root and network namespaces"]
fn image_istio_init_legacy_flavour() {
    if skip_unless_root("image_istio_init_legacy_flavour") {
        return;
    }
    let image = Image::build();
    let legacy = legacy_seed();
    let t = Topology::new("img-legacy");
    image.apply_twice(&t, ISTIO_INIT, &[], &legacy);
    let out = t.exec(&t.pod, "iptables-legacy-save", &[], &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("-A ISTIO_OUTPUT"),
        "{}",
        state(&t)
    );

    let t = Topology::new("img-legacy-ro");
    let read_only_run = SecurityContext {
        writable_run: false,
        ..ISTIO_INIT
    };
    let out = image.run(&t, &t.pod, read_only_run, &[], &legacy);
    let err = log_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("/run/xtables.lock") && err.contains("need a writable /run"),
        "{err}"
    );
    assert!(!state(&t).contains("-A ISTIO"), "{}", state(&t));
}

/// `istio-validation`: uid 1337, no capabilities, read-only root and no `/tmp`. It cannot
/// apply (no CAP_NET_ADMIN: the context is what it claims); `--run-validation
/// --skip-rule-apply` exits 0 where `istio-init` put the rules, 126 where there are none.
#[test]
#[ignore = "needs root and network namespaces"]
fn image_istio_validation() {
    if skip_unless_root("image_istio_validation") {
        return;
    }
    let image = Image::build();
    let t = Topology::new("img-valid");
    let out = image.run(&t, &t.pod, ISTIO_VALIDATION, &[], SEED);
    assert_eq!(out.status.code(), Some(1), "{}", log_of(&out));
    assert!(
        log_of(&out).contains("lacks CAP_NET_ADMIN"),
        "{}",
        log_of(&out)
    );

    image.run_ok(&t, &t.pod, ISTIO_INIT, &[], SEED);
    let validate = [
        "--run-validation",
        "--skip-rule-apply",
        "--probe-timeout",
        "2s",
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        "1337",
    ];
    let out = image.run(&t, &t.pod, ISTIO_VALIDATION, &[], &validate);
    assert_eq!(out.status.code(), Some(0), "{}", log_of(&out));
    let out = image.run(&t, &t.peer, ISTIO_VALIDATION, &[], &validate);
    assert_eq!(out.status.code(), Some(126), "{}", log_of(&out));
}
