//! What `kubectl logs` shows: the closing lines name what they say, a held xtables lock and
//! an unopenable `--log_target` are said; the help and completion of two flags.

use std::process::Command;

use crate::common::*;

fn bin(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_clear().env("PATH", sane_path());
    run_with_timeout(&mut cmd, DEFAULT_TIMEOUT).expect("run the binary")
}

#[test]
fn an_unopenable_log_target_is_said_on_stderr() {
    let out = bin(&[
        "--dry-run",
        "-b",
        "*",
        "--log_target",
        "/nonexistent/dir/x.log",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        describe_output("dry-run", &out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "warn\t--log_target /nonexistent/dir/x.log: cannot open it (No such file or directory"
        ) && stderr.contains("its lines go to stderr instead"),
        "{stderr}"
    );
}

#[test]
fn the_tunnel_port_is_captured_in_tproxy_mode_and_force_binary_completes_its_values() {
    let help = String::from_utf8_lossy(&bin(&["--help"]).stdout).into_owned();
    assert!(
        help.contains(
            "Istio tunnel port for inbound TCP traffic (never captured in REDIRECT mode)"
        ),
        "{help}"
    );
    let bash = String::from_utf8_lossy(&bin(&["completion", "bash"]).stdout).into_owned();
    let arm = bash
        .split("--force-iptables-binary)")
        .nth(1)
        .expect("an arm for --force-iptables-binary");
    let first = arm.lines().nth(1).unwrap_or_default();
    assert!(first.contains("compgen -W \"legacy nft\""), "{first}");
}

/// The line of `log` whose message is `msg`.
fn line<'a>(log: &'a str, msg: &str) -> &'a str {
    log.lines()
        .find(|l| l.contains(&format!("\t{msg}")))
        .unwrap_or_else(|| panic!("no {msg:?} line in\n{log}"))
}

#[test]
#[ignore = "needs root and network namespaces"]
fn closing_lines_name_what_changed() {
    if skip_unless_root("closing_lines_name_what_changed") {
        return;
    }
    let seed = |pre: &[&str]| shell_command([BIN].iter().chain(pre).chain(SEED));
    let script = format!(
        "{} > \"$NS_OUT/nft\" 2>&1\n\
         {} > \"$NS_OUT/switch\" 2>&1\n\
         {} > \"$NS_OUT/again\" 2>&1\n\
         {} > \"$NS_OUT/legacy\" 2>&1\n\
         {} > \"$NS_OUT/cleanup\" 2>&1\n",
        seed(&["--native-nftables"]),
        seed(&["--force-iptables-binary", "nft"]),
        seed(&["--force-iptables-binary", "nft"]),
        seed(&["--force-iptables-binary", "legacy"]),
        shell_command([BIN, "--cleanup-only"]),
    );
    let out = run_in_fresh_ns_ok(&script).unwrap_or_else(|e| panic!("{e}"));
    let done = |file: &str| line(out.file(file).unwrap(), "capture rules are in place").to_string();
    let nft = done("nft");
    assert!(nft.contains("\tnftables=istio-proxy-nat "), "{nft}");
    assert!(
        !nft.contains("iptables=") && !nft.contains("removed"),
        "{nft}"
    );
    let switch = done("switch");
    assert!(
        switch.contains("\tiptables=iptables-nft ")
            && switch.contains(" nftables_removed=istio-proxy-nat ")
            && !switch.contains(" nftables="),
        "{switch}"
    );
    let again = done("again");
    assert!(
        !again.contains("nftables") && !again.contains("iptables="),
        "{again}"
    );
    // The flavour flip writes legacy and removes the nft flavour's rules.
    let legacy = done("legacy");
    assert!(
        legacy.contains("\tiptables=iptables-legacy,iptables-nft "),
        "{legacy}"
    );
    let cleanup = line(out.file("cleanup").unwrap(), "cleanup done");
    assert!(cleanup.contains("\tiptables=iptables-legacy"), "{cleanup}");
    assert!(!cleanup.contains("IPv4"), "{cleanup}");
}

#[test]
#[ignore = "needs root and network namespaces"]
fn a_held_xtables_lock_is_said() {
    if skip_unless_root("a_held_xtables_lock_is_said") {
        return;
    }
    let script = format!(
        "export XTABLES_LOCKFILE=\"$NS_TMP/xtables.lock\"\n\
         ( exec 9>\"$XTABLES_LOCKFILE\"; flock -x 9; exec sleep 2 ) &\n\
         i=0; while flock -n \"$XTABLES_LOCKFILE\" true; do i=$((i+1)); [ $i -lt 500 ]; sleep 0.01; done\n\
         {} > \"$NS_OUT/log\" 2>&1\n",
        shell_command(
            [BIN, "--force-iptables-binary", "legacy"]
                .iter()
                .chain(SEED)
        ),
    );
    let out = run_in_fresh_ns_ok(&script).unwrap_or_else(|e| panic!("{e}"));
    let log = out.file("log").unwrap();
    let said = line(log, "the xtables lock ");
    assert!(
        said.contains("xtables.lock is held by pid ")
            && said.contains("(sleep, uid 0)")
            && said.contains("iptables-legacy-restore waits for it up to 30 s"),
        "{said}"
    );
    line(log, "capture rules are in place");
}
