//! The `--dry-run` scripts, run twice in one fresh namespace: the second run exits 0 and
//! changes nothing, for both backends, TPROXY dual-stack and REDIRECT.

use std::process::Command;

use crate::common::*;

/// TPROXY, dual-stack, with excluded and kube-virt interfaces (rules in built-in chains
/// without an ISTIO_* jump, and a literal `eth*`).
const TPROXY: &[&str] = &[
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "TPROXY",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021",
    "-c",
    "eth9,eth*",
    "-k",
    "eth1",
];

/// The kernel state a script changes: for iptables its rules (iptables-nft's own nft listing
/// orders chains by creation, which a re-run changes), for nft our tables; and the routing.
fn snapshot(nft: bool) -> &'static str {
    if nft {
        "snap() { nft list ruleset; ip -4 rule; ip -6 rule; ip -4 route show table all; \
         ip -6 route show table all; ip -6 addr show dev lo; }"
    } else {
        "snap() { iptables-save | sed '/^#/d'; ip6tables-save | sed '/^#/d'; ip -4 rule; \
         ip -6 rule; ip -4 route show table all; ip -6 route show table all; \
         ip -6 addr show dev lo; }"
    }
}

fn runs_twice(nft: bool, args: &[&str], ipv6: bool) {
    let mut argv = vec!["--dry-run"];
    if nft {
        argv.push("--native-nftables");
    }
    argv.extend(args);
    let env = if ipv6 {
        "ENABLE_INBOUND_IPV6=true "
    } else {
        ""
    };
    let script = format!(
        "ip link set lo up\n\
         {}\n\
         {env}{} > \"$NS_OUT/script.sh\" 2>/dev/null\n\
         sh \"$NS_OUT/script.sh\" > /dev/null 2>&1\n\
         snap > \"$NS_OUT/first\" 2>/dev/null\n\
         set +e\n\
         sh \"$NS_OUT/script.sh\" > \"$NS_OUT/second.log\" 2>&1\n\
         echo $? > \"$NS_OUT/rc\"\n\
         set -e\n\
         snap > \"$NS_OUT/second\" 2>/dev/null\n",
        snapshot(nft),
        shell_command(std::iter::once(BIN).chain(argv.iter().copied())),
    );
    let out = run_in_fresh_ns_ok(&script).unwrap_or_else(|e| panic!("{e}"));
    let what = format!("nft={nft} ipv6={ipv6} {args:?}");
    assert_eq!(
        out.file("rc").unwrap().trim(),
        "0",
        "{what}: the second run failed\n{}",
        out.describe()
    );
    let (first, second) = (out.file("first").unwrap(), out.file("second").unwrap());
    assert!(
        first.contains("ISTIO_") || first.contains("istio-proxy-nat"),
        "{what}: the first run applied nothing\n{}",
        out.describe()
    );
    if let Some(diff) = compare_lines(
        "after the first run",
        &first.lines().collect::<Vec<_>>(),
        "after the second run",
        &second.lines().collect::<Vec<_>>(),
    ) {
        panic!(
            "{what}: the second run changed the state:\n{diff}\n{}",
            out.describe()
        );
    }
    if args.contains(&"TPROXY") {
        let rules = first
            .lines()
            .filter(|l| l.contains("fwmark 0x539 lookup 133"))
            .count();
        assert_eq!(
            rules,
            if ipv6 { 2 } else { 1 },
            "{what}\n{}",
            out.describe()
        );
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn the_iptables_script_runs_twice() {
    if skip_unless_root("the_iptables_script_runs_twice") {
        return;
    }
    runs_twice(false, TPROXY, true);
    runs_twice(false, SEED, false);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn the_nftables_script_runs_twice() {
    if skip_unless_root("the_nftables_script_runs_twice") {
        return;
    }
    runs_twice(true, TPROXY, true);
    runs_twice(true, SEED, false);
}

/// The script makes the `ip` steps in the order of the real apply: each route before the
/// rule that looks it up.
#[test]
fn routes_come_before_the_rules_that_use_them() {
    for nft in [false, true] {
        let mut cmd = Command::new(BIN);
        cmd.arg("--dry-run")
            .args(nft.then_some("--native-nftables"))
            .args(TPROXY)
            .env_clear()
            .env("PATH", sane_path())
            .env("ENABLE_INBOUND_IPV6", "true");
        let out = run_with_timeout(&mut cmd, DEFAULT_TIMEOUT).unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        let at = |needle: &str| s.find(needle).unwrap_or_else(|| panic!("{needle} in {s}"));
        for fam in ["-4", "-6"] {
            assert!(
                at(&format!(
                    "|| ip {fam} route add local default dev lo table 133"
                )) < at(&format!("|| ip {fam} rule add fwmark 1337 lookup 133")),
                "{s}"
            );
        }
    }
}
