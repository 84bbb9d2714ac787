//! Fuzzing as a standing test: generated command lines and environments, run through the
//! binary with `--dry-run`.
//!
//! For every generated input:
//! - the binary does not panic and exits 0 (accepted) or 2 (refused at the door);
//! - an accepted config prints a script in which no value reaches the shell outside the
//!   quoted heredocs (every other line is a comment, `set -e`, or an `ip` command made of
//!   fixed words and numbers; the cleanup script is the fixed one but for its numbers);
//! - (as root, in a fresh network namespace) every accepted config's payloads pass
//!   `iptables-restore --test` and `ip6tables-restore --test`.
//!
//! `FUZZ_SEED=<u64>` replays a run (the seed is printed); `FUZZ_CASES` sets the number of
//! generated inputs (default 500).

use crate::common;

use std::fmt::Write as _;
use std::fs;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

use common::{BIN, TempDir, shell_command};

/// One generated input.
#[derive(Debug, Clone)]
struct Input {
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Input {
    fn describe(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.env {
            let _ = write!(s, "{k}={} ", shell_command([v]));
        }
        s.push_str("istio-iptables ");
        s.push_str(&shell_command(self.args.iter()));
        s
    }
}

/// An accepted input with its IPv4 and IPv6 payloads.
type Accepted = (Input, Vec<String>, Vec<String>);

/// Characters that no valid value of ours holds, so a value carrying one is refused.
const BAD: &[&str] = &[
    ";", " ", "$", "'", "\"", "\\", "\n", "`", "|", "&", "(", ")", "<", ">", "#", "*", "\t", "\r",
    "é", "\u{0}", "EOF\n",
];

fn garbage() -> impl Strategy<Value = String> {
    // Non-empty around the bad character, without commas: no list item trims or splits
    // into a valid value.
    (
        "[a-zA-Z0-9._:/-]{1,6}",
        prop::sample::select(BAD),
        "[a-zA-Z0-9._:/-]{1,6}",
    )
        .prop_map(|(a, b, c)| format!("{a}{b}{c}"))
        // NUL cannot be passed in argv or env.
        .prop_map(|s| s.replace('\u{0}', "\u{1}"))
}

fn port() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => (1u32..=65535).prop_map(|p| p.to_string()),
        1 => Just("0".to_string()),
        1 => Just("65536".to_string()),
        12 => (1u32..=65535, 1u32..=65535).prop_map(|(a, b)| format!("{}:{}", a.min(b), a.max(b))),
        1 => (1u32..=65535, 1u32..=65535).prop_map(|(a, b)| format!("{a}:{b}")),
        12 => Just("15001".to_string()),
        1 => garbage(),
    ]
}

fn list<S: Strategy<Value = String>>(item: S, max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(item, 0..max).prop_map(|v| v.join(","))
}

fn ports() -> impl Strategy<Value = String> {
    prop_oneof![Just("*".to_string()), Just(String::new()), list(port(), 8)]
}

fn cidr() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, m)| format!(
            "{}.{}.{}.{}/{m}",
            a[0], a[1], a[2], a[3]
        )),
        12 => any::<[u8; 4]>().prop_map(|a| format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])),
        12 => (any::<[u16; 8]>(), 0u8..=128).prop_map(|(a, m)| format!(
            "{}/{m}",
            std::net::Ipv6Addr::from(a)
        )),
        12 => Just("127.0.0.1/8".to_string()),
        12 => Just("::1".to_string()),
        1 => Just("*".to_string()),
        1 => Just("10.0.0.0/33".to_string()),
        1 => Just("::/129".to_string()),
        1 => garbage(),
    ]
}

fn iface() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => "[a-z][a-z0-9._-]{0,14}\\+?",
        12 => Just("lo".to_string()),
        1 => Just("abcdefghijklmnop".to_string()),
        1 => garbage(),
    ]
}

fn owner() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => (0u32..=70000).prop_map(|n| n.to_string()),
        12 => Just("4294967294".to_string()),
        1 => Just("4294967295".to_string()),
        1 => Just("99999999999".to_string()),
        // Names that exist here (a dry run prints names; restore --test resolves them).
        12 => prop::sample::select(vec!["root", "daemon"]).prop_map(str::to_string),
        1 => garbage(),
    ]
}

fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => any::<u32>().prop_map(|n| n.to_string()),
        12 => (0u32..300).prop_map(|n| n.to_string()),
        1 => Just("4294967296".to_string()),
        1 => garbage(),
    ]
}

fn boolean() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "true", "false", "1", "0", "T", "F", "True", "false", "true", "maybe",
    ])
    .prop_map(str::to_string)
}

/// One flag with its value (bool flags as `--flag` or `--flag=value`).
fn flag(resolv: String) -> impl Strategy<Value = Vec<String>> {
    let valued = |f: &'static str, v: BoxedStrategy<String>| {
        v.prop_map(move |v| vec![f.to_string(), v]).boxed()
    };
    let switch = |f: &'static str| {
        prop_oneof![
            Just(vec![f.to_string()]),
            boolean().prop_map(move |b| vec![format!("{f}={b}")]),
        ]
        .boxed()
    };
    prop_oneof![
        valued("-p", port().boxed()),
        valued("-z", port().boxed()),
        valued("-e", port().boxed()),
        valued("-u", list(owner(), 4).boxed()),
        valued("-g", list(owner(), 4).boxed()),
        valued(
            "-m",
            prop_oneof![
                4 => Just("REDIRECT".to_string()),
                4 => Just("TPROXY".to_string()),
                2 => Just(String::new()),
                1 => garbage()
            ]
            .boxed()
        ),
        valued("-b", ports().boxed()),
        valued("-d", ports().boxed()),
        valued("-q", ports().boxed()),
        valued("-o", ports().boxed()),
        valued(
            "-i",
            prop_oneof![Just("*".to_string()), list(cidr(), 6)].boxed()
        ),
        valued("-x", list(cidr(), 6).boxed()),
        valued("-c", list(iface(), 3).boxed()),
        valued("-k", list(iface(), 3).boxed()),
        valued("-t", number().boxed()),
        valued("-r", number().boxed()),
        switch("--redirect-dns"),
        switch("--capture-all-dns"),
        switch("--drop-invalid"),
        switch("--dual-stack"),
        switch("--cleanup-only"),
        Just(vec!["--resolv-conf".to_string(), resolv]).boxed(),
        // Whatever clap makes of it.
        prop::sample::select(vec![
            "--envoy-prot",
            "-",
            "--",
            "-nX",
            "explain",
            "--reconcile=x"
        ])
        .prop_map(|s| vec![s.to_string()])
        .boxed(),
    ]
}

fn env_var() -> impl Strategy<Value = (String, String)> {
    let var = |k: &'static str, v: BoxedStrategy<String>| v.prop_map(move |v| (k.to_string(), v));
    prop_oneof![
        var("ENABLE_INBOUND_IPV6", boolean().boxed()),
        var("ISTIO_OUTBOUND_OWNER_GROUPS", list(owner(), 60).boxed()),
        var(
            "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
            list(owner(), 70).boxed()
        ),
        var(
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
            prop_oneof![
                3 => (any::<[u8; 3]>(), 8u8..=32)
                    .prop_map(|(a, m)| format!("127.{}.{}.{}/{m}", a[0], a[1], a[2])),
                1 => cidr(),
            ]
            .boxed()
        ),
        var(
            "ENVOY_USER",
            prop_oneof![Just("root".to_string()), garbage()].boxed()
        ),
        var("ENVOY_PORT", port().boxed()),
        var("ISTIO_SERVICE_CIDR", list(cidr(), 4).boxed()),
        var("ISTIO_INBOUND_PORTS", ports().boxed()),
        var("REDIRECT_DNS", boolean().boxed()),
        var("INVALID_DROP", boolean().boxed()),
    ]
}

fn input(resolv: String) -> impl Strategy<Value = Input> {
    (
        prop::collection::vec(flag(resolv), 0..7),
        prop::collection::vec(env_var(), 0..4),
        prop::bool::weighted(0.3),
    )
        .prop_map(|(flags, env, v6)| {
            let mut args = vec!["--dry-run".to_string()];
            // A flag given twice is clap's refusal, already covered by the junk tokens.
            let mut seen = std::collections::BTreeSet::new();
            for f in flags {
                let name = f[0].split('=').next().unwrap_or_default().to_string();
                if name.starts_with('-') && name.len() > 1 && !seen.insert(name) {
                    continue;
                }
                args.extend(f);
            }
            let mut env = env;
            if v6 {
                env.insert(0, ("ENABLE_INBOUND_IPV6".into(), "true".into()));
            }
            Input { args, env }
        })
}

/// Lines outside heredocs with digit runs replaced by `N`, for comparing cleanup scripts.
fn shape(script: &str) -> Vec<String> {
    script
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let mut out = String::new();
            let mut in_digits = false;
            for c in l.chars() {
                if c.is_ascii_digit() {
                    if !in_digits {
                        out.push('N');
                    }
                    in_digits = true;
                } else {
                    in_digits = false;
                    out.push(c);
                }
            }
            out
        })
        .collect()
}

/// The apply script: payloads per family, or why the script is unsafe.
/// Whether each word of `line` is plain or one single-quoted string: no value reaches the
/// shell as anything but one argument.
fn undo_words_are_safe(line: &str) -> bool {
    line.split(' ').all(|w| {
        let quoted = w.len() >= 2
            && w.starts_with('\'')
            && w.ends_with('\'')
            && !w[1..w.len() - 1].contains('\'');
        quoted
            || (!w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:,=+@%".contains(c)))
    })
}

fn payloads(script: &str) -> Result<(Vec<String>, Vec<String>), String> {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    let mut lines = script.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let family = match line {
            "iptables-restore --noflush <<'EOF'" => &mut v4,
            "ip6tables-restore --noflush <<'EOF'" => &mut v6,
            "#!/bin/sh" | "set -e" => continue,
            l if l.starts_with('#') => continue,
            // An ip step run only when missing: `CHECK || ip ...`, numbers its only values.
            l if l.split_once(" || ").is_some_and(|(check, ip)| {
                check.starts_with("ip ")
                    && check
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || " -:/.'^|>&".contains(c))
                    && ip.starts_with("ip ")
                    && ip
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || " -:/".contains(c))
            }) =>
            {
                continue;
            }
            // The fixed functions of the second-run guard: indented lines and their frame.
            l if l.starts_with("    ")
                || l == "}"
                || l == "istio_undo_rule() {"
                || l == "istio_undo_chains() {" =>
            {
                continue;
            }
            // A call of them: every word plain or in single quotes (no quote inside).
            l if (l.starts_with("istio_undo_rule ") || l.starts_with("istio_undo_chains "))
                && undo_words_are_safe(l) =>
            {
                continue;
            }
            l => {
                return Err(format!(
                    "line {}: not a comment, heredoc or ip command: {l:?}",
                    n + 1
                ));
            }
        };
        let mut body = String::new();
        loop {
            let Some((m, l)) = lines.next() else {
                return Err(format!("heredoc at line {} never ends", n + 1));
            };
            if l == "EOF" {
                break;
            }
            let ok = l.starts_with('*')
                || l.starts_with(':')
                || l.starts_with("-A ")
                || l.starts_with("-I ")
                || l.starts_with("-N ")
                || l == "COMMIT";
            if !ok {
                return Err(format!("line {}: not a payload line: {l:?}", m + 1));
            }
            body.push_str(l);
            body.push('\n');
        }
        family.push(body);
    }
    Ok((v4, v6))
}

fn seed() -> u64 {
    match std::env::var("FUZZ_SEED") {
        Ok(s) => s.trim().parse().expect("FUZZ_SEED must be a u64"),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}

#[test]
fn generated_command_lines_never_panic_and_yield_safe_valid_scripts() {
    let seed = seed();
    let cases: u32 = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    eprintln!("fuzz: seed {seed} ({cases} cases); replay with FUZZ_SEED={seed}");

    let tmp = TempDir::new("istio-iptables-fuzz");
    let resolv = tmp.path().join("resolv.conf");
    fs::write(
        &resolv,
        "nameserver 10.96.0.10\nnameserver fd00::10\nnameserver 10.96.0.10\nnameserver x\n",
    )
    .unwrap();
    let reference_cleanup = {
        let out = Command::new(BIN)
            .args(["--dry-run", "--cleanup-only"])
            .env_clear()
            .output()
            .expect("run the binary");
        shape(&String::from_utf8_lossy(&out.stdout))
    };

    let accepted: Mutex<Vec<Accepted>> = Mutex::new(Vec::new());
    let counts = Mutex::new((0u32, 0u32));
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 200,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
    let result = runner.run(&input(resolv.to_string_lossy().into_owned()), |inp| {
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .env("PATH", common::sane_path())
            .envs(inp.env.iter().map(|(k, v)| (k, v)))
            .args(&inp.args)
            .stdin(Stdio::null());
        let out = common::run_with_timeout(&mut cmd, Duration::from_secs(30))
            .map_err(|e| TestCaseError::fail(format!("{}: {e}", inp.describe())))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let code = out.status.code();
        if stderr.contains("panicked") || !matches!(code, Some(0) | Some(2)) {
            return Err(TestCaseError::fail(format!(
                "{}: exit {:?}\n{stderr}",
                inp.describe(),
                out.status
            )));
        }
        {
            let mut c = counts.lock().unwrap();
            c.0 += 1;
            if code == Some(2) {
                c.1 += 1;
            }
        }
        if code == Some(2) {
            if !stdout.is_empty() {
                return Err(TestCaseError::fail(format!(
                    "{}: refused but printed {stdout}",
                    inp.describe()
                )));
            }
            return Ok(());
        }
        if stdout.contains("(--dry-run --cleanup-only)") {
            if shape(&stdout) != reference_cleanup {
                return Err(TestCaseError::fail(format!(
                    "{}: the cleanup script differs from the fixed one by more than numbers:\n{stdout}",
                    inp.describe()
                )));
            }
            return Ok(());
        }
        let (v4, v6) = payloads(&stdout)
            .map_err(|e| TestCaseError::fail(format!("{}: {e}\n{stdout}", inp.describe())))?;
        if v4.is_empty() {
            return Err(TestCaseError::fail(format!(
                "{}: no IPv4 payload:\n{stdout}",
                inp.describe()
            )));
        }
        accepted.lock().unwrap().push((inp, v4, v6));
        Ok(())
    });
    if let Err(e) = result {
        panic!("fuzz (FUZZ_SEED={seed}): {e}");
    }
    let accepted = accepted.into_inner().unwrap();
    let (total, refused) = counts.into_inner().unwrap();
    eprintln!(
        "fuzz: {total} runs, {refused} refused at the door, {} accepted configs",
        accepted.len()
    );
    assert!(
        !accepted.is_empty() && refused > 0,
        "the generator should produce both accepted and refused inputs"
    );

    if common::skip_unless_root("fuzz: iptables-restore --test of the accepted payloads") {
        return;
    }
    // One namespace, every payload tested there.
    let dir = tmp.path().join("payloads");
    fs::create_dir(&dir).unwrap();
    for (i, (_, v4, v6)) in accepted.iter().enumerate() {
        fs::write(dir.join(format!("{i}.v4")), v4.concat()).unwrap();
        if !v6.is_empty() {
            fs::write(dir.join(format!("{i}.v6")), v6.concat()).unwrap();
        }
    }
    let script = format!(
        "set +x\n\
         mount -t tmpfs tmpfs /run # a private xtables lock\n\
         for f in {dir}/*.v4; do\n\
           iptables-restore --test < \"$f\" 2>> \"$NS_OUT/errors\" || basename \"$f\" >> \"$NS_OUT/failed\"\n\
         done\n\
         for f in {dir}/*.v6; do\n\
           [ -e \"$f\" ] || continue\n\
           ip6tables-restore --test < \"$f\" 2>> \"$NS_OUT/errors\" || basename \"$f\" >> \"$NS_OUT/failed\"\n\
         done\n\
         echo done > \"$NS_OUT/done\"\n",
        dir = dir.display()
    );
    let out = common::run_in_fresh_ns(&script);
    assert!(
        out.success() && out.files.contains_key("done"),
        "{}",
        out.describe()
    );
    if let Some(failed) = out.files.get("failed") {
        let mut report = String::new();
        for name in failed.lines().take(5) {
            let (i, fam) = name.split_once('.').unwrap();
            let (inp, v4, v6) = &accepted[i.parse::<usize>().unwrap()];
            let payload = if fam == "v4" {
                v4.concat()
            } else {
                v6.concat()
            };
            let _ = writeln!(report, "--- {} ({fam}) ---\n{payload}", inp.describe());
        }
        panic!(
            "fuzz (FUZZ_SEED={seed}): {} payloads refused by *tables-restore --test:\n{report}\n--- errors ---\n{}",
            failed.lines().count(),
            out.files.get("errors").cloned().unwrap_or_default()
        );
    }
}
