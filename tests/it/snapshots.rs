//! Snapshots (insta) of the text this tool generates: `--help`, the dry-run script of each
//! conformance case, the one line bad input gets, explain's text and JSON, and verify's text
//! and JSON on drifted rules (each for iptables and for `--native-nftables`). A change of rule
//! order or wording shows up as a diff of a file in `tests/it/snapshots/`; when the change is
//! meant, review it and write the new snapshots with
//! `INSTA_UPDATE=always cargo test --test it snapshots:: -- --include-ignored` (or `cargo insta
//! review`). Under CI (`CI=true`) a missing or different snapshot fails.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use common::{
    BIN, Case, SEED, case_command, istio_cases_dir, read_cases, run_in_fresh_ns, shell_command,
    skip_unless_root,
};

/// Env vars of one run.
type Env = &'static [(&'static str, &'static str)];

/// Runs the binary with only `env` set (no inherited env var changes a default or a value).
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run the binary")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr without the time at the start of each log line.
fn stderr_untimed(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| match l.split_once('\t') {
            Some((time, rest)) if time.ends_with('Z') => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn help() {
    for (name, args) in [
        ("help", &["--help"][..]),
        ("help_explain", &["explain", "--help"][..]),
        ("help_verify", &["verify", "--help"][..]),
    ] {
        let out = run(args, &[]);
        assert!(out.status.success(), "{name}: {out:?}");
        insta::assert_snapshot!(name, stdout(&out));
    }
}

/// Every kind of bad input: the exit code and the one line that names the flag (or env
/// var) and the value.
#[test]
fn bad_input_error_lines() {
    let cases: &[(&[&str], Env)] = &[
        (&["-p", "0"], &[]),
        (&["-p", "70000"], &[]),
        (&["-z", "x"], &[]),
        (&["-m", "FOO"], &[]),
        (&["-b", "80,x"], &[]),
        (&["-d", "90:80"], &[]),
        (&["-q", "*"], &[]),
        (&["-i", "10.0.0.0/33"], &[]),
        (&["-x", "not-a-cidr"], &[]),
        (&["-u", "bad name"], &[]),
        (&["-c=-eth0"], &[]),
        (&["-k", "a/b"], &[]),
        (&["-t=-1"], &[]),
        (&["--probe-timeout", "5x"], &[]),
        (&["--redirect-dns=maybe"], &[]),
        (&[], &[("ENVOY_PORT", "abc")]),
        (&[], &[("IPTABLES_LOCK_WAIT_SECONDS", "soon")]),
        (&["-d", "8000-8080"], &[]),
        (&["-c", "eth0, eth 1"], &[]),
        (&[], &[("CLEANUP_ONLY", "yes")]),
        (&["--no-such-flag"], &[]),
    ];
    let mut report = String::new();
    for (args, env) in cases {
        let mut argv = vec!["--dry-run"];
        argv.extend_from_slice(args);
        let out = run(&argv, env);
        report.push_str(&format!(
            "$ {}{}\nexit {}\n{}\n\n",
            env.iter()
                .map(|(k, v)| format!("{k}={v} "))
                .collect::<String>(),
            argv.join(" "),
            out.status.code().unwrap_or(-1),
            stderr_untimed(&out)
        ));
    }
    insta::assert_snapshot!("bad_input", report);
}

/// The packets explained by the snapshot tests: (name, packet flags).
const EXPLAINED: &[(&str, &[&str])] = &[
    (
        "outbound",
        &["--direction", "outbound", "--dst", "10.1.2.3:80"],
    ),
    (
        "inbound",
        &["--direction", "inbound", "--dst", "10.0.0.5:8080"],
    ),
    (
        "inbound_excluded",
        &["--direction", "inbound", "--dst", "10.0.0.5:15090"],
    ),
    (
        "proxy_own",
        &[
            "--direction",
            "outbound",
            "--dst",
            "10.1.2.3:80",
            "--uid",
            "1337",
        ],
    ),
];

/// Snapshots `explain BACKEND PACKET --output text|json SEED` as `PREFIX_NAME_OUTPUT`.
fn explain_snapshots(prefix: &str, backend: &[&str], packets: &[(&str, &[&str])]) {
    let env = [("ENABLE_INBOUND_IPV6", "false")];
    for (name, packet) in packets {
        for output in ["text", "json"] {
            let mut args = vec!["explain"];
            args.extend_from_slice(backend);
            args.extend_from_slice(packet);
            args.extend_from_slice(&["--output", output]);
            args.extend_from_slice(SEED);
            let out = run(&args, &env);
            assert!(out.status.success(), "{name}: {out:?}");
            insta::assert_snapshot!(format!("{prefix}_{name}_{output}"), stdout(&out));
        }
    }
}

/// `explain` of the config's rules (no kernel), as text and as JSON.
#[test]
fn explain_text_and_json() {
    explain_snapshots("explain", &[], EXPLAINED);
}

/// `explain --native-nftables` of the config's nftables rules (no kernel), as text and as
/// JSON: the same packets as [`explain_text_and_json`], and IPv6 with IPv6 off.
#[test]
fn explain_nft_text_and_json() {
    explain_snapshots("explain_nft", &["--native-nftables"], EXPLAINED);
    explain_snapshots(
        "explain_nft",
        &["--native-nftables"],
        &[(
            "ipv6_off",
            &["--direction", "outbound", "--dst", "[fd00::1]:80"],
        )],
    );
}

/// The dry-run script of `case`, in a fresh network namespace (so that IPv6 detection and
/// the rest of the host cannot change it).
fn dry_run_in_fresh_ns(case: &Case) -> String {
    let cmd = case_command(case, &["--dry-run"]);
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(ToOwned::to_owned).collect();
    let mut unshare = Command::new("unshare");
    unshare.arg("--net").arg("--").arg(program).args(args);
    unshare.current_dir(cmd.get_current_dir().unwrap_or(Path::new(".")));
    unshare.env_clear();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            unshare.env(k, v);
        }
    }
    let out = unshare.output().expect("run unshare");
    assert!(out.status.success(), "{}: {out:?}", case.name);
    stdout(&out)
}

#[test]
#[ignore = "needs root and network namespaces"]
fn dry_run_script_of_each_conformance_case() {
    if skip_unless_root("dry_run_script_of_each_conformance_case") {
        return;
    }
    for dir in ["istio", "istio-more"] {
        let root = istio_cases_dir().parent().expect("tests/data").join(dir);
        for case in read_cases(&root) {
            let script = dry_run_in_fresh_ns(&case);
            insta::assert_snapshot!(format!("dry_run_{dir}_{}", case.name), script);
        }
    }
}

/// Snapshots the exit code and stdout of `verify BACKEND SEED`, as text and as JSON, in a
/// fresh namespace after `setup` (shell with `{BIN}` and `{seed}` filled in), as
/// `PREFIX_text` and `PREFIX_json`.
fn verify_after(prefix: &str, backend: &str, setup: &str) {
    let mut script = setup.to_string();
    for output in ["text", "json"] {
        script.push_str(&format!(
            "rc=0; {BIN} verify {backend} --output {output} {seed} > \"$NS_OUT/{output}\" \
             2> /dev/null || rc=$?\necho $rc > \"$NS_OUT/{output}-rc\"\n",
            seed = shell_command(SEED.iter().copied()),
        ));
    }
    let out = run_in_fresh_ns(&script);
    assert!(out.success(), "{}", out.describe());
    for output in ["text", "json"] {
        let report = format!(
            "exit {}\n{}",
            out.file(&format!("{output}-rc")).unwrap().trim(),
            out.file(output).unwrap()
        );
        insta::assert_snapshot!(format!("{prefix}_{output}"), report);
    }
}

/// `verify` of the seed's rules after drift: in a fresh namespace, the seed applied (IPv4
/// only; a fresh namespace has no legacy tables, so the nft backend), then one of its rules
/// deleted and a foreign rule added. Nothing in the output names the host (no backend, no
/// time).
#[test]
#[ignore = "needs root and network namespaces"]
fn verify_text_and_json_after_drift() {
    if skip_unless_root("verify_text_and_json_after_drift") {
        return;
    }
    let seed = shell_command(SEED.iter().copied());
    let setup = format!(
        "mount -t tmpfs tmpfs /run # a private xtables lock\n\
         ip link set lo up\n\
         export ENABLE_INBOUND_IPV6=false\n\
         {BIN} {seed} 2> /dev/null\n\
         iptables-nft -t nat -D ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN\n\
         iptables-nft -t nat -A ISTIO_INBOUND -p tcp --dport 9999 -j RETURN\n"
    );
    verify_after("verify_drift", "", &setup);
}

/// `verify --native-nftables` of the seed's nftables rules after drift: in a fresh
/// namespace, the seed's transaction applied (the dry-run script), then a rule deleted by
/// its handle and an unwanted chain with a rule added.
#[test]
#[ignore = "needs root and network namespaces"]
fn verify_nft_text_and_json_after_drift() {
    if skip_unless_root("verify_nft_text_and_json_after_drift") {
        return;
    }
    let seed = shell_command(SEED.iter().copied());
    let setup = format!(
        "ip link set lo up\n\
         export ENABLE_INBOUND_IPV6=false\n\
         {BIN} --dry-run --native-nftables {seed} > apply.sh 2> /dev/null\n\
         sh -e apply.sh\n\
         h=$(nft -a list chain inet istio-proxy-nat istio-output | grep 'skuid != 1337' | sed 's/.*# handle //')\n\
         nft delete rule inet istio-proxy-nat istio-output handle $h\n\
         nft add chain inet istio-proxy-nat stray\n\
         nft add rule inet istio-proxy-nat stray tcp dport 9999 counter return\n"
    );
    verify_after("verify_nft_drift", "--native-nftables", &setup);
}
