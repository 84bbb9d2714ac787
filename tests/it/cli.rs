//! The command line, seen from outside: flags, env vars, defaults, error messages, and the
//! promise that bad input changes nothing.
//!
//! Every test drives the built binary. Each run gets a fresh [`Sandbox`]: a temp dir whose
//! `bin/` holds shell shims named like the programs the tool may run (iptables-restore, ip,
//! nsenter, ...). Each shim appends its name and arguments to `calls.log`, saves its stdin
//! next to it and exits 0. The binary runs with a cleared environment whose PATH is *only*
//! that `bin/` dir, so:
//! - nothing from the developer's environment (ENVOY_PORT, RUST_LOG, ...) leaks in;
//! - no test can touch the host's real rules, even when the suite runs as root: a program
//!   the tool was not expected to run fails with "not found" instead of running for real;
//! - a test can prove exactly what was (or was not) executed.
//!
//! `ENABLE_INBOUND_IPV6=false` is always set (no test here is about IPv6), so the result never
//! depends on the addresses of the machine the tests run on.
//!
//! To add a bad-input case, add one line to [`bad_inputs`].

use crate::common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::RwLock;
use std::thread;
use std::time::{Duration, Instant};

use common::{BIN, SEED, SHIMMED_PROGRAMS, TempDir};

/// How long one run of the binary may take before the test fails (a shim waiting on stdin
/// forever, say).
const TIMEOUT: Duration = Duration::from_secs(60);

/// A user name that exists nowhere, so that the proxy uid default is the built-in 1337.
const NO_SUCH_USER: &str = "no-such-user-istio-iptables-cli-test";

/// The IPv4 rule every outbound-capturing payload has (`-i '*'`).
const CAPTURE_ALL_OUTBOUND_RULE: &str = "-A ISTIO_OUTPUT -j ISTIO_REDIRECT";

// ---------------------------------------------------------------------------------------------
// Test harness: temp dirs, the shim sandbox, running the binary.
// ---------------------------------------------------------------------------------------------

/// Writing an executable while another thread forks can leave a copy of the write fd in the
/// child until it execs; exec'ing the file then fails with ETXTBSY. Shims are written under
/// the write lock, and every spawn happens under the read lock.
static SPAWN_LOCK: RwLock<()> = RwLock::new(());

/// A temp dir with the shims in `bin/`, the call log and the saved stdins.
struct Sandbox {
    dir: TempDir,
}

/// One recorded run of a shim.
#[derive(Debug)]
struct Call {
    /// The program name (the shim's file name).
    name: String,
    /// Its arguments.
    args: Vec<String>,
    /// What it read on stdin.
    stdin: String,
}

impl Call {
    fn has_arg(&self, arg: &str) -> bool {
        self.args.iter().any(|a| a == arg)
    }

    /// `Some("v4")`/`Some("v6")` for an iptables-family program.
    fn family(&self) -> Option<&'static str> {
        if self.name.starts_with("ip6tables") {
            Some("v6")
        } else if self.name.starts_with("iptables") {
            Some("v4")
        } else {
            None
        }
    }

    /// An iptables-restore of any flavour that does something (not `--version`).
    fn is_restore_of(&self, family: &str) -> bool {
        self.family() == Some(family) && self.name.ends_with("-restore") && !self.is_version()
    }

    fn is_version(&self) -> bool {
        self.has_arg("--version") || self.has_arg("-V")
    }

    /// Calls that cannot change anything: `*-save` and `--version`.
    fn is_read_only(&self) -> bool {
        self.is_version() || (self.family().is_some() && self.name.ends_with("-save"))
    }
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.name)?;
        for a in &self.args {
            write!(f, " {a}")?;
        }
        if !self.stdin.is_empty() {
            write!(f, " <<< ({} bytes of stdin)", self.stdin.len())?;
        }
        Ok(())
    }
}

/// What a run of the binary produced.
struct Run {
    /// The command, for messages.
    what: String,
    /// Exit code (`None` when killed by a signal).
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Panics unless the run exited 0; returns stdout.
    fn success(&self) -> &str {
        assert_eq!(
            self.code,
            Some(0),
            "`{}` should exit 0\n{}",
            self.what,
            self.dump()
        );
        &self.stdout
    }

    /// Stdout and stderr, for failure messages.
    fn dump(&self) -> String {
        format!(
            "exit code: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Single-quotes `s` for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The shim for `name`, logging into `dir`.
fn shim_script(name: &str, dir: &Path) -> String {
    let version = match name {
        "ip" => "ip utility, iproute2-6.1.0".to_string(),
        "nsenter" => "nsenter from util-linux 2.38.1".to_string(),
        n if n.contains("legacy") => format!("{n} v1.8.9 (legacy)"),
        n => format!("{n} v1.8.9 (nf_tables)"),
    };
    let dir = sh_quote(&dir.display().to_string());
    let name_q = sh_quote(name);
    let version = sh_quote(&version);
    // One log line per call: pid, name and arguments, tab separated (arguments are joined
    // with a unit separator so that an argument with spaces stays one argument).
    format!(
        r#"#!/bin/sh
# Test stand-in for {name}: records the call and its stdin, changes nothing.
PATH=/usr/bin:/bin
dir={dir}
args=
for a in "$@"; do args="$args$(printf '\037')$a"; done
printf '%s\t%s\t%s\n' "$$" {name_q} "$args" >> "$dir/calls.log"
cat > "$dir/stdin.$$"
for a in "$@"; do
    if [ "$a" = --version ]; then echo {version}; break; fi
done
exit 0
"#
    )
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = TempDir::new("istio-iptables-cli-test");
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).expect("create the shim dir");
        let _guard = SPAWN_LOCK.write().unwrap_or_else(|e| e.into_inner());
        for name in SHIMMED_PROGRAMS {
            let path = bin.join(name);
            fs::write(&path, shim_script(name, dir.path()))
                .unwrap_or_else(|e| panic!("write shim {}: {e}", path.display()));
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                .unwrap_or_else(|e| panic!("chmod shim {}: {e}", path.display()));
        }
        Sandbox { dir }
    }

    fn bin_dir(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("calls.log")
    }

    /// Lets any user write the call log (for runs as another user).
    fn make_world_writable(&self) {
        fs::set_permissions(self.dir.path(), fs::Permissions::from_mode(0o777))
            .expect("chmod the sandbox");
    }

    /// A file in the sandbox (e.g. a resolv.conf).
    fn write_file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// The binary with `args`, a cleared environment, PATH = the shims only,
    /// `ENABLE_INBOUND_IPV6=false`, then `env` (which may override the latter).
    fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .env("PATH", self.bin_dir())
            .env("ENABLE_INBOUND_IPV6", "false")
            .envs(env.iter().copied())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs the binary (see [`Sandbox::command`]).
    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        exec(self.command(args, env), &describe(args, env))
    }

    /// Every shim call so far, in order.
    fn calls(&self) -> Vec<Call> {
        let log = match fs::read_to_string(self.log_path()) {
            Ok(log) => log,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => panic!("read {}: {e}", self.log_path().display()),
        };
        log.lines()
            .map(|line| {
                let mut fields = line.splitn(3, '\t');
                let (pid, name, args) = (
                    fields.next().unwrap_or_default(),
                    fields.next().unwrap_or_default(),
                    fields.next().unwrap_or_default(),
                );
                let stdin = fs::read_to_string(self.dir.path().join(format!("stdin.{pid}")))
                    .unwrap_or_default();
                Call {
                    name: name.to_string(),
                    args: args
                        .split('\u{1f}')
                        .filter(|a| !a.is_empty())
                        .map(str::to_string)
                        .collect(),
                    stdin,
                }
            })
            .collect()
    }

    /// The call log, raw (empty when nothing ran).
    fn raw_log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

/// `K=V ... istio-iptables ARGS`, quoted, for messages.
fn describe(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (k, v) in env {
        let v = if v.chars().count() > 60 {
            format!("{}...", v.chars().take(60).collect::<String>())
        } else {
            v.to_string()
        };
        s.push_str(&format!("{k}={v:?} "));
    }
    s.push_str("istio-iptables");
    for a in args {
        s.push_str(&format!(" {a:?}"));
    }
    s
}

/// Runs `cmd` (stdout and stderr piped), failing the test after [`TIMEOUT`].
fn exec(mut cmd: Command, what: &str) -> Run {
    let mut child = {
        let _guard = SPAWN_LOCK.read().unwrap_or_else(|e| e.into_inner());
        cmd.spawn()
            .unwrap_or_else(|e| panic!("cannot start `{what}` ({BIN}): {e}"))
    };
    fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<String> {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the binary") {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{what}` did not finish within {TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(5));
    };
    Run {
        what: what.to_string(),
        code: status.code(),
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Whether `text` contains `token` with no identifier character (`[A-Za-z0-9_-]`) glued to
/// either side, so that `"0"` is not found inside `15001`.
fn contains_token(text: &str, token: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    text.match_indices(token).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + token.len()..].chars().next();
        !before.is_some_and(word) && !after.is_some_and(word)
    })
}

/// Runs `--dry-run` with the given env and returns the script (asserting exit 0).
fn dry_run_script(env: &[(&str, &str)], args: &[&str]) -> String {
    let sandbox = Sandbox::new();
    let mut full = vec!["--dry-run"];
    full.extend_from_slice(args);
    let run = sandbox.run(&full, env);
    let script = run.success().to_string();
    assert!(
        sandbox.raw_log().is_empty(),
        "`{}` is a dry run and must execute nothing, but ran:\n{}",
        run.what,
        sandbox.raw_log()
    );
    script
}

/// Asserts that setting `env` makes the dry-run script contain `needle`, while the same run
/// without it does not (so the env var, not a default, produced it).
fn assert_env_changes_script(env: &[(&str, &str)], args: &[&str], needle: &str) {
    let with = dry_run_script(env, args);
    assert!(
        with.contains(needle),
        "with {env:?} and {args:?}, the dry-run script should contain `{needle}`:\n{with}"
    );
    let without = dry_run_script(&[], args);
    assert!(
        !without.contains(needle),
        "control run without {env:?} should not contain `{needle}` (the test proves nothing \
         otherwise):\n{without}"
    );
}

// ---------------------------------------------------------------------------------------------
// --help
// ---------------------------------------------------------------------------------------------

/// Short letter, long name, env var, default shown in --help.
type FlagSpec = (
    Option<char>,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
);

/// Every flag of Istio's istio-iptables. A flag removed, renamed, or losing its short letter,
/// env var or default makes `help_lists_every_flag_with_its_env_var_and_default` fail; so does
/// a new flag missing from this list.
#[rustfmt::skip]
const FLAGS: &[FlagSpec] = &[
    (Some('p'), "envoy-port",                         Some("ENVOY_PORT"),                         Some("15001")),
    (Some('z'), "inbound-capture-port",               Some("INBOUND_CAPTURE_PORT"),               Some("15006")),
    (Some('e'), "inbound-tunnel-port",                Some("INBOUND_TUNNEL_PORT"),                Some("15008")),
    (Some('u'), "proxy-uid",                          Some("PROXY_UID"),                          None),
    (Some('g'), "proxy-gid",                          Some("PROXY_GID"),                          None),
    (Some('m'), "istio-inbound-interception-mode",    Some("ISTIO_INBOUND_INTERCEPTION_MODE"),    None),
    (Some('b'), "istio-inbound-ports",                Some("ISTIO_INBOUND_PORTS"),                None),
    (Some('d'), "istio-local-exclude-ports",          Some("ISTIO_LOCAL_EXCLUDE_PORTS"),          None),
    (Some('c'), "istio-exclude-interfaces",           Some("ISTIO_EXCLUDE_INTERFACES"),           None),
    (Some('i'), "istio-service-cidr",                 Some("ISTIO_SERVICE_CIDR"),                 None),
    (Some('x'), "istio-service-exclude-cidr",         Some("ISTIO_SERVICE_EXCLUDE_CIDR"),         None),
    (Some('q'), "istio-outbound-ports",               Some("ISTIO_OUTBOUND_PORTS"),               None),
    (Some('o'), "istio-local-outbound-ports-exclude", Some("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE"), None),
    (Some('k'), "kube-virt-interfaces",               Some("KUBE_VIRT_INTERFACES"),               None),
    (Some('t'), "istio-inbound-tproxy-mark",          Some("ISTIO_INBOUND_TPROXY_MARK"),          Some("1337")),
    (Some('r'), "istio-inbound-tproxy-route-table",   Some("ISTIO_INBOUND_TPROXY_ROUTE_TABLE"),   Some("133")),
    (Some('n'), "dry-run",                            Some("DRY_RUN"),                            Some("false")),
    (None,      "redirect-dns",                       Some("REDIRECT_DNS"),                       Some("false")),
    (None,      "capture-all-dns",                    Some("CAPTURE_ALL_DNS"),                    Some("false")),
    (None,      "drop-invalid",                       Some("DROP_INVALID"),                       Some("false")),
    (None,      "dual-stack",                         Some("DUAL_STACK"),                         Some("false")),
    (None,      "skip-rule-apply",                    Some("SKIP_RULE_APPLY"),                    Some("false")),
    (None,      "run-validation",                     Some("RUN_VALIDATION"),                     Some("false")),
    (None,      "iptables-probe-port",                Some("IPTABLES_PROBE_PORT"),                Some("15002")),
    (None,      "probe-timeout",                      Some("PROBE_TIMEOUT"),                      Some("5s")),
    (None,      "network-namespace",                  Some("NETWORK_NAMESPACE"),                  None),
    (None,      "cni-mode",                           Some("CNI_MODE"),                           Some("false")),
    (None,      "reconcile",                          Some("RECONCILE"),                          Some("true")),
    (None,      "cleanup-only",                       Some("CLEANUP_ONLY"),                       Some("false")),
    (None,      "force-apply",                        Some("FORCE_APPLY"),                        Some("false")),
    (None,      "native-nftables",                    Some("NATIVE_NFTABLES"),                    Some("false")),
    (None,      "exclusion-sets",                     Some("EXCLUSION_SETS"),                     Some("false")),
    (None,      "force-iptables-binary",              Some("FORCE_IPTABLES_BINARY"),              None),
    (None,      "resolv-conf",                        None,                                       Some("/etc/resolv.conf")),
    (Some('v'), "verbose",                            None,                                       None),
    // Istio's logging flags (pkg/log): no env vars, as in Istio.
    (None,      "log_output_level",                   None,                                       Some("default:info")),
    (None,      "log_as_json",                        None,                                       Some("false")),
    (None,      "log_caller",                         None,                                       None),
    (None,      "log_target",                         None,                                       None),
    (None,      "log_stacktrace_level",               None,                                       Some("default:none")),
    (None,      "log_rotate",                         None,                                       None),
    (None,      "log_rotate_max_age",                 None,                                       Some("30")),
    (None,      "log_rotate_max_size",                None,                                       Some("104857600")),
    (None,      "log_rotate_max_backups",             None,                                       Some("1000")),
    (None,      "vklog",                              None,                                       Some("0")),
];

/// Splits clap's long help into entries: (header line, header + description).
/// A header is a line starting with `-` indented by at most 6 columns; descriptions are
/// indented further.
fn help_entries(help: &str) -> Vec<(String, String)> {
    let mut entries: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if trimmed.starts_with('-') && indent <= 6 {
            entries.push((trimmed.to_string(), format!("{line}\n")));
        } else if let Some((_, body)) = entries.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    entries
}

/// The long flag names (without `--`) of a help header such as `-p, --envoy-port <PORT>`.
fn header_long_name(header: &str) -> Option<&str> {
    let i = header.find("--")?;
    let rest = &header[i + 2..];
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

#[test]
fn help_lists_every_flag_with_its_env_var_and_default() {
    let run = Sandbox::new().run(&["--help"], &[]);
    let help = run.success();
    assert!(
        run.stderr.is_empty(),
        "--help should print nothing on stderr, got:\n{}",
        run.stderr
    );
    let entries = help_entries(help);
    let mut problems = Vec::new();
    for &(short, long, env, default) in FLAGS {
        let Some((header, body)) = entries
            .iter()
            .find(|(h, _)| header_long_name(h) == Some(long))
        else {
            problems.push(format!("--{long} is not listed"));
            continue;
        };
        if let Some(c) = short
            && !header.starts_with(&format!("-{c}, --{long}"))
        {
            problems.push(format!(
                "--{long} should have the short flag -{c} (Istio's), header is `{header}`"
            ));
        }
        match env {
            Some(env) if !contains_token(body, env) => {
                problems.push(format!("--{long} should name its env var {env}:\n{body}"))
            }
            None if body.contains("env:") => problems.push(format!(
                "--{long} should have no env var (Istio has none):\n{body}"
            )),
            _ => {}
        }
        if let Some(default) = default
            && !body.contains(&format!("default: {default}"))
        {
            problems.push(format!(
                "--{long} should show its default `{default}`:\n{body}"
            ));
        }
    }
    for (header, _) in &entries {
        let Some(long) = header_long_name(header) else {
            continue;
        };
        if !matches!(long, "help" | "version") && !FLAGS.iter().any(|f| f.1 == long) {
            problems.push(format!(
                "--{long} is in --help but not in this test's FLAGS list: add it (with its env \
                 var and default)"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "--help is missing or misdescribing flags:\n- {}\n\nfull help:\n{help}",
        problems.join("\n- ")
    );
}

// ---------------------------------------------------------------------------------------------
// Env vars, flags and defaults
// ---------------------------------------------------------------------------------------------

#[test]
fn envoy_port_env_sets_the_outbound_redirect_port() {
    assert_env_changes_script(&[("ENVOY_PORT", "15111")], &[], "--to-ports 15111");
}

#[test]
fn inbound_capture_port_env_sets_the_inbound_redirect_port() {
    assert_env_changes_script(
        &[("INBOUND_CAPTURE_PORT", "15116")],
        &[],
        "--to-ports 15116",
    );
}

#[test]
fn istio_inbound_ports_env_captures_those_ports() {
    assert_env_changes_script(
        &[("ISTIO_INBOUND_PORTS", "8080")],
        &[],
        "--dport 8080 -j ISTIO_IN_REDIRECT",
    );
}

#[test]
fn istio_service_cidr_env_captures_that_range() {
    assert_env_changes_script(
        &[("ISTIO_SERVICE_CIDR", "10.96.0.0/12")],
        &[],
        "-d 10.96.0.0/12 -j ISTIO_REDIRECT",
    );
}

#[test]
fn interception_mode_env_selects_tproxy() {
    assert_env_changes_script(
        &[("ISTIO_INBOUND_INTERCEPTION_MODE", "TPROXY")],
        &["-b", "8080"],
        "TPROXY --tproxy-mark",
    );
}

#[test]
fn dry_run_env_takes_go_bool_spellings() {
    for value in ["1", "t", "True", "TRUE", "true"] {
        let sandbox = Sandbox::new();
        let run = sandbox.run(&[], &[("DRY_RUN", value)]);
        let script = run.success();
        assert!(
            script.starts_with("#!/bin/sh\n"),
            "DRY_RUN={value} (no flag) should print the dry-run script; got:\n{}",
            run.dump()
        );
        assert!(
            sandbox.raw_log().is_empty(),
            "DRY_RUN={value} must execute nothing, but ran:\n{}",
            sandbox.raw_log()
        );
    }
    // And a false spelling really means false: the rules are applied (to the shims).
    let sandbox = Sandbox::new();
    let run = sandbox.run(&[], &[("DRY_RUN", "False")]);
    assert!(
        !run.stdout.starts_with("#!/bin/sh"),
        "DRY_RUN=False should not be a dry run; got:\n{}",
        run.dump()
    );
    assert!(
        sandbox.calls().iter().any(|c| c.is_restore_of("v4")),
        "DRY_RUN=False should apply the rules (run iptables-restore); calls:\n{}\n{}",
        sandbox.raw_log(),
        run.dump()
    );
}

#[test]
fn dns_capture_alias_env_redirects_resolv_conf_servers() {
    let sandbox = Sandbox::new();
    let resolv = sandbox.write_file(
        "resolv.conf",
        "search default.svc.cluster.local\nnameserver 10.200.0.53\noptions ndots:5\n",
    );
    let resolv = resolv.to_str().expect("utf-8 temp path");
    let needle = "-d 10.200.0.53/32 -j REDIRECT --to-ports 15053";
    for env in [("ISTIO_META_DNS_CAPTURE", "true"), ("REDIRECT_DNS", "true")] {
        assert_env_changes_script(&[env], &["--resolv-conf", resolv], needle);
    }
}

#[test]
fn invalid_drop_alias_env_adds_the_drop_chain() {
    assert_env_changes_script(&[("INVALID_DROP", "1")], &[], "ISTIO_DROP");
    assert_env_changes_script(&[("DROP_INVALID", "true")], &[], "ISTIO_DROP");
}

#[test]
fn flag_beats_env() {
    let script = dry_run_script(&[("ENVOY_PORT", "15111")], &["-p", "15222"]);
    assert!(
        script.contains("--to-ports 15222"),
        "-p 15222 should win over ENVOY_PORT=15111:\n{script}"
    );
    assert!(
        !script.contains("15111"),
        "ENVOY_PORT=15111 should be ignored when -p is given:\n{script}"
    );

    // The same for a boolean: the flag wins over a false env value.
    let sandbox = Sandbox::new();
    let run = sandbox.run(&["--dry-run"], &[("DRY_RUN", "false")]);
    assert!(
        run.success().starts_with("#!/bin/sh\n"),
        "--dry-run should win over DRY_RUN=false:\n{}",
        run.dump()
    );
    assert!(
        sandbox.raw_log().is_empty(),
        "--dry-run with DRY_RUN=false must execute nothing, but ran:\n{}",
        sandbox.raw_log()
    );
}

#[test]
fn defaults_match_istio() {
    let script = dry_run_script(&[("ENVOY_USER", NO_SUCH_USER)], &[]);
    for needle in [
        "--to-ports 15001",
        "--to-ports 15006",
        "--dport 15008 -j RETURN",
        "--uid-owner 1337",
        "--gid-owner 1337",
    ] {
        assert!(
            script.contains(needle),
            "with no flags (and no user {NO_SUCH_USER}), the script should contain `{needle}`:\n\
             {script}"
        );
    }
}

#[test]
fn proxy_gid_defaults_to_the_proxy_uid() {
    let script = dry_run_script(&[], &["-u", "4242"]);
    assert!(
        script.contains("--gid-owner 4242"),
        "-u 4242 without -g should make the gid 4242 too:\n{script}"
    );
    for stale in ["--uid-owner 1337", "--gid-owner 1337"] {
        assert!(
            !script.contains(stale),
            "-u 4242 should replace every 1337 owner match, found `{stale}`:\n{script}"
        );
    }
}

#[test]
fn envoy_user_names_the_default_proxy_uid() {
    // root is uid 0 on every Linux system.
    let script = dry_run_script(&[("ENVOY_USER", "root")], &[]);
    assert!(
        script.contains("--uid-owner 0 "),
        "ENVOY_USER=root should make the default proxy uid 0:\n{script}"
    );
}

// ---------------------------------------------------------------------------------------------
// Values as Istio reads them
// ---------------------------------------------------------------------------------------------

/// The env vars of issue 23 that stopped a run when empty. Kubernetes and Helm render an
/// absent value as `VAR=`: empty means unset, the default applies.
const EMPTY_MEANS_UNSET: &[&str] = &[
    "ENVOY_PORT",
    "INBOUND_CAPTURE_PORT",
    "INBOUND_TUNNEL_PORT",
    "REDIRECT_DNS",
    "ISTIO_META_DNS_CAPTURE",
    "DUAL_STACK",
    "ISTIO_DUAL_STACK",
    "RECONCILE",
    "PROBE_TIMEOUT",
    "IPTABLES_PROBE_PORT",
    "ISTIO_INBOUND_TPROXY_MARK",
    "ISTIO_INBOUND_TPROXY_ROUTE_TABLE",
    "IPTABLES_LOCK_WAIT_SECONDS",
    "IPTABLES_PROGRAM_TIMEOUT_SECONDS",
    "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
    "ISTIO_OUTBOUND_OWNER_GROUPS",
    "PROXY_UID",
    "DRY_RUN",
    "CLEANUP_ONLY",
];

/// The payloads fed to the iptables-restore shims of one run.
fn restore_payloads(sandbox: &Sandbox) -> Vec<String> {
    sandbox
        .calls()
        .iter()
        .filter(|c| c.is_restore_of("v4") || c.is_restore_of("v6"))
        .map(|c| c.stdin.clone())
        .collect()
}

#[test]
fn an_empty_env_var_is_unset() {
    let args = ["-i", "*", "-b", "*", "-m", "TPROXY"];
    let reference = Sandbox::new();
    let run = reference.run(&args, &[]);
    run.success();
    assert_eq!(run.stderr, "", "the reference run warns of nothing");
    let payloads = restore_payloads(&reference);
    assert!(!payloads.is_empty());
    // ENABLE_INBOUND_IPV6 (set to false by the sandbox) empty is unset: IPv6 is detected.
    let detected = |env: &[(&str, &str)], remove: bool| {
        let sandbox = Sandbox::new();
        let mut cmd = sandbox.command(&args, env);
        if remove {
            cmd.env_remove("ENABLE_INBOUND_IPV6");
        }
        exec(cmd, "ENABLE_INBOUND_IPV6").success();
        restore_payloads(&sandbox)
    };
    assert_eq!(
        detected(&[("ENABLE_INBOUND_IPV6", "")], false),
        detected(&[], true)
    );
    for var in EMPTY_MEANS_UNSET {
        for empty in ["", "  "] {
            let sandbox = Sandbox::new();
            let run = sandbox.run(&args, &[(var, empty)]);
            run.success();
            assert_eq!(
                run.stderr,
                "",
                "{var}={empty:?}: no error, no warning\n{}",
                run.dump()
            );
            assert_eq!(
                restore_payloads(&sandbox),
                payloads,
                "{var}={empty:?} should apply the rules of the defaults"
            );
        }
    }
}

/// Warnings go to stderr (apply mode); each one line with Istio's `TIME<TAB>warn<TAB>msg`.
fn warnings(run: &Run) -> Vec<&str> {
    run.stderr
        .lines()
        .filter(|l| l.split('\t').nth(1) == Some("warn"))
        .collect()
}

/// Istio's pkg/flag drops an env value its `Set` refuses (a boolean, a duration, a port) and
/// keeps the default; pilot-agent reads ISTIO_META_DNS_CAPTURE the same way, so agent and
/// rules agree. We do the same, with a warning naming the variable.
#[test]
fn an_env_value_that_does_not_parse_is_ignored_with_a_warning_as_istio_does() {
    let sandbox = Sandbox::new();
    let resolv = sandbox.write_file("resolv.conf", "nameserver 10.200.0.53\n");
    let resolv = resolv.to_str().unwrap();
    let dns = "--to-ports 15053";
    let args = ["-i", "*", "--resolv-conf", resolv];
    /// The env, whether DNS is captured, what the one warning says.
    type Case<'a> = (&'a [(&'a str, &'a str)], bool, &'a [&'a str]);
    let cases: &[Case] = &[
        (
            &[("ISTIO_META_DNS_CAPTURE", "yes")],
            false,
            &["ISTIO_META_DNS_CAPTURE=\"yes\"", "its default"],
        ),
        (&[("REDIRECT_DNS", "on")], false, &["REDIRECT_DNS=\"on\""]),
        // The alias does not parse: the flag's own variable is next, as in Istio.
        (
            &[("ISTIO_META_DNS_CAPTURE", "yes"), ("REDIRECT_DNS", "true")],
            true,
            &["ISTIO_META_DNS_CAPTURE", "from REDIRECT_DNS"],
        ),
    ];
    for (env, captured, mentions) in cases {
        let run = Sandbox::new().run(&[&["--dry-run"][..], &args].concat(), env);
        let script = run.success();
        assert_eq!(script.contains(dns), *captured, "{env:?}: {}", run.dump());
        let w = warnings(&run);
        assert_eq!(w.len(), 1, "{env:?}: one warning\n{}", run.dump());
        for m in *mentions {
            assert!(
                w[0].contains(m),
                "{env:?}: the warning should say {m:?}: {}",
                w[0]
            );
        }
        assert!(w[0].contains(BOOLEANS), "{}", w[0]);
    }
    for (var, value, flag) in [
        ("PROBE_TIMEOUT", "forever", "--probe-timeout is 5s"),
        (
            "IPTABLES_PROBE_PORT",
            "http",
            "--iptables-probe-port is 15002",
        ),
        ("ENABLE_INBOUND_IPV6", "maybe", "ENABLE_INBOUND_IPV6"),
        ("RECONCILE", "yes", "--reconcile is true"),
    ] {
        let sandbox = Sandbox::new();
        let run = sandbox.run(SEED, &[(var, value)]);
        run.success();
        let w = warnings(&run);
        // (Unset, ENABLE_INBOUND_IPV6 lets IPv6 be detected, which may warn in turn.)
        assert!(
            (w.len() == 1 || var == "ENABLE_INBOUND_IPV6")
                && w[0].contains(value)
                && w[0].contains(flag),
            "{var}={value}: {}",
            run.dump()
        );
        assert!(sandbox.calls().iter().any(|c| c.is_restore_of("v4")));
    }
}

/// Go's boolean spellings: the one wording of every message about a boolean.
const BOOLEANS: &str = "1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False";

/// Istio binds `ISTIO_META_DNS_CAPTURE`, `ISTIO_DUAL_STACK` and `INVALID_DROP` with
/// `AdditionalEnv` after `BindEnv`: the alias sets the flag last, so it wins over the flag's
/// own variable; the command line wins over both.
#[test]
fn an_env_alias_wins_over_the_flags_own_variable_as_in_istio() {
    let sandbox = Sandbox::new();
    let resolv = sandbox.write_file("resolv.conf", "nameserver 10.200.0.53\n");
    let resolv = resolv.to_str().unwrap();
    let args = ["-i", "*", "--resolv-conf", resolv];
    let dns = "-d 10.200.0.53/32 -j REDIRECT --to-ports 15053";
    let with =
        |env: &[(&str, &str)], extra: &[&str]| dry_run_script(env, &[&args[..], extra].concat());
    assert!(
        with(
            &[
                ("REDIRECT_DNS", "false"),
                ("ISTIO_META_DNS_CAPTURE", "true")
            ],
            &[]
        )
        .contains(dns)
    );
    assert!(
        !with(
            &[
                ("REDIRECT_DNS", "true"),
                ("ISTIO_META_DNS_CAPTURE", "false")
            ],
            &[]
        )
        .contains(dns)
    );
    assert!(
        !with(
            &[("ISTIO_META_DNS_CAPTURE", "true")],
            &["--redirect-dns=false"]
        )
        .contains(dns)
    );
    assert!(
        with(&[("DROP_INVALID", "false"), ("INVALID_DROP", "true")], &[]).contains("ISTIO_DROP")
    );
    assert!(
        !with(&[("DROP_INVALID", "true"), ("INVALID_DROP", "false")], &[]).contains("ISTIO_DROP")
    );
    // (Dual stack shows in the script's config header.)
    assert!(
        with(
            &[("DUAL_STACK", "false"), ("ISTIO_DUAL_STACK", "true")],
            &[]
        )
        .contains("DUAL_STACK=true")
    );
    assert!(
        with(
            &[("DUAL_STACK", "true"), ("ISTIO_DUAL_STACK", "false")],
            &[]
        )
        .contains("DUAL_STACK=false")
    );
}

/// Overlays and webhooks that append arguments repeat flags; Istio's pflag takes the last.
#[test]
fn a_repeated_flag_takes_its_last_value_with_a_warning() {
    let sandbox = Sandbox::new();
    let mut args = SEED.to_vec();
    args.extend(["-p", "15111", "--istio-service-exclude-cidr=10.0.0.0/8"]);
    let run = sandbox.run(&args, &[]);
    run.success();
    let payload = restore_payloads(&sandbox).join("");
    assert!(payload.contains("--to-ports 15111"), "{payload}");
    assert!(!payload.contains("--to-ports 15001"), "{payload}");
    assert!(payload.contains("-d 10.0.0.0/8 -j RETURN"), "{payload}");
    let w = warnings(&run);
    assert_eq!(w.len(), 2, "{}", run.dump());
    assert!(
        w[0].contains("--envoy-port") && w[0].contains("\"15111\""),
        "{}",
        w[0]
    );
    assert!(
        w[1].contains("--istio-service-exclude-cidr") && w[1].contains("2 times"),
        "{}",
        w[1]
    );
    // A repeated flag with a bad last value: still refused, with one line.
    let run = sandbox.run(&["-p", "15001", "-p", "x"], &[]);
    assert_eq!(
        (run.code, run.stderr.lines().count()),
        (Some(2), 1),
        "{}",
        run.dump()
    );
}

/// Interface lists are trimmed like ports and CIDRs: the annotation
/// `traffic.sidecar.istio.io/excludeInterfaces: "eth1, eth2"` must not crash-loop the pod.
#[test]
fn interface_lists_are_trimmed_like_every_list() {
    let spaced = Sandbox::new();
    let run = spaced.run(&["-i", "*", "-c", "eth1, eth2 ", "-k", " virt0,virt1"], &[]);
    run.success();
    let plain = Sandbox::new();
    plain
        .run(&["-i", "*", "-c", "eth1,eth2", "-k", "virt0,virt1"], &[])
        .success();
    let payloads = restore_payloads(&spaced);
    assert!(
        payloads.join("").contains("-i eth2 -j RETURN"),
        "{payloads:?}"
    );
    assert_eq!(payloads, restore_payloads(&plain));
    // The env var, as the injector may pass it.
    let env = Sandbox::new();
    env.run(
        &["-i", "*", "-k", "virt0,virt1"],
        &[("ISTIO_EXCLUDE_INTERFACES", " eth1 , eth2")],
    )
    .success();
    assert_eq!(restore_payloads(&env), payloads);
}

/// Accepted (Istio accepts them), but each does less or more than it seems to: one warning.
#[test]
fn settings_that_do_not_do_what_they_seem_to_are_warned_about() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["-i", "*", "-x", "10.0.0.0/8,0.0.0.0/0"],
            "every IPv4 destination is excluded",
        ),
        (&["-i", "*", "-u", "0"], "--proxy-uid includes 0 (root)"),
        (
            &["-i", "*", "-u", "1337", "-g", "0"],
            "--proxy-gid includes 0 (root)",
        ),
        (
            &["-i", "*", "-p", "15006", "-z", "15006"],
            "are the same port",
        ),
        (&["-b", "8080,9000:9100", "-d", "15090,9050"], "ports=9050"),
    ];
    for (args, warning) in cases {
        let sandbox = Sandbox::new();
        let run = sandbox.run(args, &[]);
        run.success();
        let w = warnings(&run);
        assert!(
            w.len() == 1 && w[0].contains(warning),
            "{args:?}: {}",
            run.dump()
        );
        assert!(!restore_payloads(&sandbox).is_empty());
    }
    // The injector's usual -d with -b '*', or -d ports that -b does not list: no warning.
    for args in [SEED, &["-b", "8080", "-d", "15090,15021,15020"]] {
        let run = Sandbox::new().run(args, &[]);
        run.success();
        assert!(warnings(&run).is_empty(), "{args:?}: {}", run.dump());
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------

/// One bad input.
struct Bad {
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Tokens the one-line error must contain: the flag (or env var) and the bad value.
    mentions: Vec<String>,
    /// Also run it with `--dry-run` (off when the case is about the dry-run switch itself).
    with_dry_run_flag: bool,
    /// A clap error: clap's whole message (several lines: the tip, the usage) is printed.
    clap: bool,
}

fn bad(args: &[&str], env: &[(&str, &str)], mentions: &[&str]) -> Bad {
    Bad {
        args: args.iter().map(|s| s.to_string()).collect(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        mentions: mentions.iter().map(|s| s.to_string()).collect(),
        with_dry_run_flag: true,
        clap: false,
    }
}

impl Bad {
    /// For cases where adding `--dry-run` would change the case itself (`DRY_RUN=maybe`: the
    /// flag would override the env var).
    fn not_with_dry_run_flag(mut self) -> Bad {
        self.with_dry_run_flag = false;
        self
    }

    /// Refused by clap: its whole message, several lines, is expected.
    fn clap(mut self) -> Bad {
        self.clap = true;
        self
    }
}

/// Every input that must be refused with exit code 2, one line of stderr (clap's whole
/// message for what clap refuses), nothing on stdout and nothing executed. Add a case here in
/// one line.
#[rustfmt::skip] // one case per line
fn bad_inputs() -> Vec<Bad> {
    let groups = |n: u32| (1..=n).map(|g| g.to_string()).collect::<Vec<_>>().join(",");
    let (groups_50, groups_65) = (groups(50), groups(65));
    vec![
        //  flags                                 env                                                   the error mentions
        bad(&["-p", "70000"],                     &[],                                                  &["--envoy-port", "70000"]),
        bad(&["-p", "abc"],                       &[],                                                  &["--envoy-port", "abc"]),
        bad(&["-p"],                              &[],                                                  &["--envoy-port"]).clap(),
        bad(&["--envoy-prot", "1"],               &[],                                                  &["--envoy-prot", "a similar argument exists", "--envoy-port"]).clap(),
        bad(&["explain"],                         &[],                                                  &["--direction", "--dst"]).clap(),
        bad(&["explain", "--direction", "up", "--dst", "10.0.0.1:80"], &[],                             &["up", "inbound", "outbound"]).clap(),
        bad(&["-z", "0"],                         &[],                                                  &["--inbound-capture-port", "0"]),
        bad(&["-m", "FOO"],                       &[],                                                  &["--istio-inbound-interception-mode", "FOO"]),
        bad(&["-i", "10.0.0.0/33"],               &[],                                                  &["--istio-service-cidr", "10.0.0.0/33"]),
        bad(&["-i", "300.1.1.1/8"],               &[],                                                  &["--istio-service-cidr", "300.1.1.1/8"]),
        bad(&["-x", "*"],                         &[],                                                  &["--istio-service-exclude-cidr", "*"]),
        bad(&["-b", "80,abc"],                    &[],                                                  &["--istio-inbound-ports", "80,abc"]),
        bad(&["-b", "90:80"],                     &[],                                                  &["--istio-inbound-ports", "90:80"]),
        bad(&["-c", "eth0 -j DROP"],              &[],                                                  &["--istio-exclude-interfaces", "eth0 -j DROP"]),
        // The newline must come out escaped, keeping the message on one line.
        bad(&["-c", "eth\n0"],                    &[],                                                  &["--istio-exclude-interfaces", r"eth\n0"]),
        bad(&["-k", "abcdefghijklmnop"],          &[],                                                  &["--kube-virt-interfaces", "abcdefghijklmnop"]),
        bad(&["-t", "abc"],                       &[],                                                  &["--istio-inbound-tproxy-mark", "abc"]),
        bad(&["-r", "0"],                         &[],                                                  &["--istio-inbound-tproxy-route-table", "0"]),
        bad(&["-u", "1337;rm"],                   &[],                                                  &["--proxy-uid", "1337;rm"]),
        // (uid_t)-1 means "no id": iptables refuses it.
        bad(&["-u", "4294967295"],                &[],                                                  &["--proxy-uid", "4294967295"]),
        bad(&["-g", "0,4294967295"],              &[],                                                  &["--proxy-gid", "4294967295"]),
        bad(&["-u", "4294967296"],                &[],                                                  &["--proxy-uid", "4294967296"]),
        // Names must exist (a dry run prints them as given: the script may run elsewhere).
        bad(&["-u", "no-such-user-9"],            &[],                                                  &["--proxy-uid", "no-such-user-9"]).not_with_dry_run_flag(),
        bad(&["-u", "0", "-g", "no-such-group-9"], &[],                                                 &["--proxy-gid", "no-such-group-9"]).not_with_dry_run_flag(),
        bad(&["-u", "root"],                      &[("PROXY_GID", "no-such-group-9")],                  &["PROXY_GID", "no-such-group-9"]).not_with_dry_run_flag(),
        bad(&["--force-iptables-binary", "foo"],  &[],                                                  &["--force-iptables-binary", "foo"]),
        bad(&["--probe-timeout", "forever"],      &[],                                                  &["--probe-timeout", "forever"]),
        bad(&["--no-such-flag"],                  &[],                                                  &["--no-such-flag"]).clap(),
        bad(&["--native-nftables=maybe"],         &[],                                                  &["--native-nftables", "maybe"]),
        // On the command line a boolean must parse (Istio's pflag refuses it too).
        bad(&["--redirect-dns=yes"],              &[],                                                  &["--redirect-dns", "yes", BOOLEANS]),
        bad(&["-d", "8000-8080"],                 &[],                                                  &["--istio-local-exclude-ports", "8000-8080", "8000:8080"]),
        bad(&["-c", "eth0, eth 1"],               &[],                                                  &["--istio-exclude-interfaces", "eth 1"]),
        bad(&[],                                  &[("ENVOY_PORT", "abc")],                             &["ENVOY_PORT", "abc"]),
        bad(&[],                                  &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "10.0.0.1/32")], &["ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "10.0.0.1/32"]),
        // One rule of `! --gid-owner` matches: iptables-restore parses at most 49 of them.
        bad(&[],                                  &[("ISTIO_OUTBOUND_OWNER_GROUPS", &groups_50)],       &["ISTIO_OUTBOUND_OWNER_GROUPS", "49"]),
        bad(&[],                                  &[("ISTIO_OUTBOUND_OWNER_GROUPS", &groups_65)],       &["ISTIO_OUTBOUND_OWNER_GROUPS", "49"]),
        bad(&[],                                  &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "4294967295")], &["ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "4294967295"]),
        // Owner group names must exist before anything runs, as -u/-g names must.
        bad(&[],                                  &[("ISTIO_OUTBOUND_OWNER_GROUPS", "root,no-such-group-9")], &["ISTIO_OUTBOUND_OWNER_GROUPS", "no-such-group-9"]).not_with_dry_run_flag(),
        bad(&[],                                  &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "no-such-group-9")], &["ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "no-such-group-9"]).not_with_dry_run_flag(),
        // A `--dry-run` flag would override (DRY_RUN) or duplicate (--dry-run=) these.
        // The run-mode switches are refused from env too: their default applies the rules.
        bad(&[],                                  &[("DRY_RUN", "maybe")],                              &["DRY_RUN", "maybe"]).not_with_dry_run_flag(),
        bad(&[],                                  &[("CLEANUP_ONLY", "yes")],                           &["CLEANUP_ONLY", "yes"]),
        bad(&[],                                  &[("SKIP_RULE_APPLY", "yes")],                        &["SKIP_RULE_APPLY", "yes"]),
        bad(&["--dry-run=maybe"],                 &[],                                                  &["--dry-run", "maybe"]).not_with_dry_run_flag(),
    ]
}

/// Runs one bad case; returns what is wrong with the outcome, if anything.
fn check_bad(case: &Bad, dry_run_flag: bool) -> Option<String> {
    let sandbox = Sandbox::new();
    let mut args: Vec<&str> = Vec::new();
    if dry_run_flag {
        // First, so that it can never be taken as the value of the case's last flag.
        args.push("--dry-run");
    }
    args.extend(case.args.iter().map(String::as_str));
    let env: Vec<(&str, &str)> = case
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let run = sandbox.run(&args, &env);

    let mut wrong = Vec::new();
    if run.code != Some(2) {
        wrong.push(format!("exit code should be 2, is {:?}", run.code));
    }
    if !run.stdout.is_empty() {
        wrong.push("stdout should be empty".to_string());
    }
    let lines = run.stderr.lines().count();
    if lines != 1 && !case.clap {
        wrong.push(format!("stderr should be exactly one line, has {lines}"));
    }
    if case.clap && !run.stderr.starts_with("istio-iptables: error: ") {
        wrong.push("stderr should start with `istio-iptables: error: `".to_string());
    }
    for token in &case.mentions {
        if !contains_token(&run.stderr, token) {
            wrong.push(format!("stderr should mention {token:?}"));
        }
    }
    let log = sandbox.raw_log();
    if !log.is_empty() {
        wrong.push(format!(
            "nothing may be executed on bad input, but these ran:\n{log}"
        ));
    }
    (!wrong.is_empty())
        .then(|| format!("`{}`:\n  {}\n{}", run.what, wrong.join("\n  "), run.dump()))
}

#[test]
fn bad_input_exits_2_with_one_line_and_runs_nothing() {
    let mut failures = Vec::new();
    let mut runs = 0;
    for case in bad_inputs() {
        for dry_run_flag in [false, true] {
            if dry_run_flag && !case.with_dry_run_flag {
                continue;
            }
            runs += 1;
            failures.extend(check_bad(&case, dry_run_flag));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {runs} bad-input runs misbehaved:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Applying (through the shims) and dry runs
// ---------------------------------------------------------------------------------------------

#[test]
fn apply_feeds_one_iptables_restore_and_no_ip6tables_restore() {
    let sandbox = Sandbox::new();
    let run = sandbox.run(SEED, &[]);
    run.success();
    let calls = sandbox.calls();
    let listing = calls
        .iter()
        .map(|c| format!("  {c}"))
        .collect::<Vec<_>>()
        .join("\n");

    let v4: Vec<&Call> = calls.iter().filter(|c| c.is_restore_of("v4")).collect();
    assert_eq!(
        v4.len(),
        1,
        "`{}` should run exactly one iptables-restore (any flavour); calls:\n{listing}",
        run.what
    );
    let restore = v4[0];
    assert!(
        restore.has_arg("--noflush"),
        "{} must be run with --noflush (it would wipe the pod's other rules otherwise): {restore}",
        restore.name
    );
    assert!(
        restore.stdin.contains(CAPTURE_ALL_OUTBOUND_RULE),
        "the payload fed to {} should contain `{CAPTURE_ALL_OUTBOUND_RULE}`:\n{}",
        restore.name,
        restore.stdin
    );
    assert!(
        restore.stdin.trim_end().ends_with("COMMIT"),
        "the payload fed to {} should end with COMMIT:\n{}",
        restore.name,
        restore.stdin
    );

    let v6: Vec<&Call> = calls.iter().filter(|c| c.is_restore_of("v6")).collect();
    assert!(
        v6.is_empty(),
        "with ENABLE_INBOUND_IPV6=false no ip6tables-restore may run; calls:\n{listing}"
    );

    let unexpected: Vec<String> = calls
        .iter()
        .filter(|c| !c.is_restore_of("v4") && !c.is_read_only())
        .map(|c| format!("  {c}"))
        .collect();
    assert!(
        unexpected.is_empty(),
        "in REDIRECT mode the only change should be the iptables-restore; besides read-only \
         calls (*-save, --version), these ran:\n{}\nall calls:\n{listing}",
        unexpected.join("\n")
    );
}

/// Whether a user with no special rights can reach and run `path` (every parent dir is
/// searchable by others, and the file is executable by others).
fn runnable_by_others(path: &Path) -> bool {
    let file_ok = fs::metadata(path).is_ok_and(|m| m.mode() & 0o001 != 0);
    file_ok
        && path
            .ancestors()
            .skip(1)
            .all(|dir| fs::metadata(dir).is_ok_and(|m| m.mode() & 0o001 != 0))
}

#[test]
fn dry_run_needs_no_privileges_and_runs_nothing() {
    let sandbox = Sandbox::new();
    // TPROXY with capture of every inbound port: the plan also has `ip` commands, which a
    // dry run must print, not run.
    let args = ["--dry-run", "-m", "TPROXY", "-b", "*", "-i", "*"];
    let mut cmd = sandbox.command(&args, &[]);
    let we_are_root = fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let as_nobody = we_are_root && runnable_by_others(Path::new(BIN));
    if as_nobody {
        // Really drop privileges, so that "works as non-root" is tested even under sudo.
        sandbox.make_world_writable();
        cmd.uid(65534).gid(65534);
    } else if we_are_root {
        eprintln!(
            "note: {BIN} is not reachable by other users; running the dry run as root, which \
             still checks that nothing is executed"
        );
    }
    let what = format!(
        "{}{}",
        describe(&args, &[]),
        if as_nobody { " (as uid 65534)" } else { "" }
    );
    let run = exec(cmd, &what);
    let script = run.success();
    assert!(
        script.starts_with("#!/bin/sh\n"),
        "`{what}` should print a sh script:\n{}",
        run.dump()
    );
    assert!(
        script.contains("route add local default dev lo table 133"),
        "the TPROXY dry run should print (not run) its ip route command:\n{script}"
    );
    assert!(
        sandbox.raw_log().is_empty(),
        "`{what}` must execute nothing, but ran:\n{}",
        sandbox.raw_log()
    );
}
