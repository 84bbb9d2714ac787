//! Every place our state can live (issue 20): the other iptables flavour, the IPv6 family
//! once IPv6 is off, foreign look-alikes of our rules, and detection, each on a real kernel,
//! with real traffic where capture is at stake. The pod and its peer are a [`Topology`];
//! connections land on labelled listeners (see `traffic.rs`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Output;

use super::skip_unless_installed;
use crate::common::{APP, Listener, SEED, Topology, connect, sa, skip_unless_root};

pub(super) fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs the binary in the pod; panics unless it exits 0. Returns its log (stdout and
/// stderr).
pub(super) fn run_ok(t: &Topology, ipv6: bool, args: &[&str]) -> String {
    let o = t.run_bin(&t.pod, ipv6, args);
    assert!(o.status.success(), "{args:?}: {}", text(&o));
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs a shell command in `ns`; panics unless it succeeds.
pub(super) fn sh(t: &Topology, ns: &str, cmd: &str) -> String {
    let o = t.exec(ns, "sh", &["-c", cmd], &[]);
    assert!(o.status.success(), "`{cmd}` in {ns}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Where a TCP connection from the peer to the pod's `port` lands (a listener's label).
pub(super) fn lands(t: &Topology, v6: bool, port: u16) -> String {
    let dst: IpAddr = if v6 { t.pod_v6.into() } else { t.pod_v4.into() };
    match connect(&t.peer, APP, sa(dst, port), None) {
        Ok(l) => l.label,
        Err(e) => format!("no connection: {e}"),
    }
}

/// Listeners on the proxy's inbound port and the app's 8080, both families.
pub(super) fn listeners(t: &Topology) -> Vec<Listener> {
    let mut out = Vec::new();
    for any in [
        IpAddr::from(Ipv4Addr::UNSPECIFIED),
        Ipv6Addr::UNSPECIFIED.into(),
    ] {
        for port in [15006, 8080] {
            out.push(Listener::tcp(&t.pod, &format!("pod:{port}"), sa(any, port)));
        }
    }
    out
}

pub(super) fn with_excluded_8080() -> Vec<&'static str> {
    let mut a: Vec<&str> = SEED.to_vec();
    let d = a.iter().position(|x| *x == "-d").expect("SEED has -d");
    a[d + 1] = "15090,15021,15020,8080";
    a
}

/// Case 1: the injector's command in the nft flavour, then another program creates a legacy
/// table with a rule, then a re-run that excludes 8080. The new rules go to legacy (Istio's
/// detection), and the nft copy goes too: 8080 really is excluded; verify agrees.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_flavour_flip_leaves_no_capture_in_the_old_flavour() {
    let test = "a_flavour_flip_leaves_no_capture_in_the_old_flavour";
    if skip_unless_root(test) || skip_unless_installed(test, &["iptables-legacy"]) {
        return;
    }
    let t = Topology::new("flip");
    let _l = listeners(&t);
    run_ok(&t, false, SEED);
    assert_eq!(
        lands(&t, false, 8080),
        "pod:15006",
        "the seed captures 8080"
    );
    sh(
        &t,
        &t.pod,
        "iptables-legacy -t filter -A INPUT -p tcp --dport 2375 -j ACCEPT",
    );
    // Verify of the seed now: the rules belong in legacy; the nft copy is stale.
    let mut verify = vec!["verify"];
    verify.extend_from_slice(SEED);
    let v = t.run_bin(&t.pod, false, &verify);
    assert_eq!(v.status.code(), Some(3), "{}", text(&v));
    let out = String::from_utf8_lossy(&v.stdout);
    assert!(out.contains("IPv4 iptables-nft nat"), "{out}");
    assert!(out.contains("IPv4 iptables-legacy nat"), "{out}");

    let args = with_excluded_8080();
    let log = run_ok(&t, false, &args);
    assert!(log.contains("removing stale IPv4 ISTIO_* rules"), "{log}");
    let nft = sh(&t, &t.pod, "iptables-nft-save");
    assert!(
        !nft.contains("ISTIO_"),
        "the nft copy must go:\n{nft}\n{log}"
    );
    let legacy = sh(&t, &t.pod, "iptables-legacy-save");
    assert!(
        legacy.contains("ISTIO_INBOUND") && legacy.contains("--dport 2375 -j ACCEPT"),
        "{legacy}"
    );
    assert_eq!(lands(&t, false, 8080), "pod:8080", "8080 is excluded now");
    assert_eq!(
        lands(&t, false, 9090),
        "pod:15006",
        "other ports are still captured"
    );
    let mut verify = vec!["verify"];
    verify.extend_from_slice(&args);
    let v = t.run_bin(&t.pod, false, &verify);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
}

/// Case 2: dual-stack, then IPv6 off: the whole IPv6 capture goes
/// (ip6tables rules and `::6`), so IPv6 traffic to 8080 reaches the app; verify agrees.
#[test]
#[ignore = "needs root and network namespaces"]
fn ipv6_turned_off_removes_the_ipv6_capture() {
    let test = "ipv6_turned_off_removes_the_ipv6_capture";
    if skip_unless_root(test) {
        return;
    }
    let t = Topology::new("v6off");
    let _l = listeners(&t);
    run_ok(&t, true, SEED);
    assert_eq!(lands(&t, true, 8080), "pod:15006", "IPv6 is captured first");
    // verify of the IPv4-only config over the dual-stack state: the IPv6 copy is drift.
    let mut verify = vec!["verify"];
    verify.extend_from_slice(SEED);
    let v = t.run_bin(&t.pod, false, &verify);
    assert_eq!(v.status.code(), Some(3), "{}", text(&v));
    let out = String::from_utf8_lossy(&v.stdout);
    assert!(out.contains("IPv6 ip6tables-nft nat"), "{out}");
    assert!(out.contains("::6/128"), "{out}");

    let log = run_ok(&t, false, SEED);
    let v6 = sh(&t, &t.pod, "ip6tables-nft-save");
    assert!(!v6.contains("ISTIO_"), "{v6}\n{log}");
    let lo = sh(&t, &t.pod, "ip -6 addr show dev lo");
    assert!(!lo.contains("::6/128"), "{lo}\n{log}");
    assert_eq!(
        lands(&t, true, 8080),
        "pod:8080",
        "IPv6 is not captured now"
    );
    assert_eq!(lands(&t, false, 8080), "pod:15006", "IPv4 still is");
    let v = t.run_bin(&t.pod, false, &verify);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
}

/// Case 3: foreign rules that look like ours (`-c eth9`'s RETURNs, a TPROXY mark rule with
/// another mark), there before our first run: an identical re-run commits nothing and keeps
/// them; a cleanup keeps them and names the ones of our shape.
#[test]
#[ignore = "needs root and network namespaces"]
fn identical_rerun_keeps_foreign_look_alikes() {
    let test = "identical_rerun_keeps_foreign_look_alikes";
    if skip_unless_root(test) {
        return;
    }
    let t = Topology::new("alike");
    let foreign = [
        "-t nat -A PREROUTING -i eth9 -j RETURN",
        "-t nat -A OUTPUT -o eth9 -j RETURN",
        "-t mangle -A PREROUTING -p tcp -m mark --mark 0x1 -j CONNMARK --save-mark",
    ];
    for f in foreign {
        sh(&t, &t.pod, &format!("iptables-nft {f}"));
    }
    let mut args: Vec<&str> = SEED.to_vec();
    // -m given twice would be refused: take the seed's out.
    let m = args.iter().position(|x| *x == "-m").expect("SEED has -m");
    args.drain(m..m + 2);
    args.extend_from_slice(&["-m", "TPROXY", "-c", "eth9"]);
    run_ok(&t, false, &args);
    let second = run_ok(&t, false, &args);
    assert!(
        second.contains("IPv4 rules are already in place: nothing to commit"),
        "{second}"
    );
    let save = sh(&t, &t.pod, "iptables-nft-save");
    for rule in [
        "-A PREROUTING -i eth9 -j RETURN",
        "-A OUTPUT -o eth9 -j RETURN",
        "--mark 0x1 -j CONNMARK --save-mark",
    ] {
        assert!(save.contains(rule), "`{rule}` must stay\n{save}");
    }
    let cleanup = run_ok(&t, false, &["--cleanup-only"]);
    let save = sh(&t, &t.pod, "iptables-nft-save");
    assert!(!save.contains("ISTIO_"), "{save}");
    for rule in [
        "-A PREROUTING -i eth9 -j RETURN",
        "-A OUTPUT -o eth9 -j RETURN",
    ] {
        assert!(save.contains(rule), "`{rule}` must stay\n{save}");
        assert!(cleanup.contains("kept IPv4 nat"), "{cleanup}");
        assert!(
            cleanup.contains(rule),
            "the warning names `{rule}`\n{cleanup}"
        );
    }
    assert!(
        save.contains("--mark 0x1 -j CONNMARK --save-mark"),
        "{save}"
    );
}

/// Case 4: empty legacy tables (what a mere `iptables-legacy -L` creates) do not make
/// detection choose legacy (istio#61024): the rules go to nft.
#[test]
#[ignore = "needs root and network namespaces"]
fn empty_legacy_tables_choose_nft() {
    let test = "empty_legacy_tables_choose_nft";
    if skip_unless_root(test) || skip_unless_installed(test, &["iptables-legacy"]) {
        return;
    }
    let t = Topology::new("emptyleg");
    sh(
        &t,
        &t.pod,
        "iptables-legacy -t nat -L >/dev/null && iptables-legacy -t filter -L >/dev/null",
    );
    let names = sh(&t, &t.pod, "cat /proc/net/ip_tables_names");
    assert!(names.contains("nat") && names.contains("filter"), "{names}");
    let log = run_ok(&t, false, SEED);
    assert!(log.contains("no legacy rules in this namespace"), "{log}");
    let nft = sh(&t, &t.pod, "iptables-nft-save");
    assert!(nft.contains("ISTIO_INBOUND"), "{nft}\n{log}");
    let legacy = sh(&t, &t.pod, "iptables-legacy-save");
    assert!(!legacy.contains("ISTIO_"), "{legacy}");
}

/// Case 1, forced: `--force-iptables-binary legacy` over the nft flavour's rules, then a
/// REDIRECT → TPROXY reconfigure: the old flavour's capture goes each time, so only one
/// flavour ever captures.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_forced_flavour_takes_the_capture_over_from_the_other() {
    let test = "a_forced_flavour_takes_the_capture_over_from_the_other";
    if skip_unless_root(test) || skip_unless_installed(test, &["iptables-legacy"]) {
        return;
    }
    let t = Topology::new("force");
    run_ok(&t, false, SEED);
    let mut legacy: Vec<&str> = SEED.to_vec();
    legacy.extend_from_slice(&["--force-iptables-binary", "legacy"]);
    run_ok(&t, false, &legacy);
    let nft = sh(&t, &t.pod, "iptables-nft-save");
    assert!(!nft.contains("ISTIO_"), "the nft copy must go:\n{nft}");
    assert!(sh(&t, &t.pod, "iptables-legacy-save").contains("ISTIO_REDIRECT"));
    // Back to nft (detection would now pick legacy: force it), in TPROXY mode.
    let m = legacy.iter().position(|x| *x == "-m").expect("SEED has -m");
    legacy[m + 1] = "TPROXY";
    let f = legacy.len() - 1;
    legacy[f] = "nft";
    let log = run_ok(&t, false, &legacy);
    let old = sh(&t, &t.pod, "iptables-legacy-save");
    assert!(
        !old.contains("ISTIO_"),
        "the legacy copy must go:\n{old}\n{log}"
    );
    let nft = sh(&t, &t.pod, "iptables-nft-save");
    assert!(
        nft.contains("ISTIO_TPROXY") && nft.contains("-j TPROXY"),
        "{nft}"
    );
    let mut verify = vec!["verify"];
    verify.extend_from_slice(&legacy);
    let v = t.run_bin(&t.pod, false, &verify);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
}

/// A failure while removing the stale IPv6 copy (IPv6 now off), after the IPv4 change was
/// committed: everything comes back, IPv4 included, and the error says so.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_failed_stale_removal_restores_the_committed_place() {
    if skip_unless_root("a_failed_stale_removal_restores_the_committed_place") {
        return;
    }
    let run = super::rollback::assert_rollback(
        &super::rollback::existing_state_setup(),
        super::Fail::Ip6tablesRestoreNoflush,
        super::V4,
        SEED,
    );
    let line = run.one_error();
    assert!(
        line.contains("stale IPv6 ISTIO_* rules") && line.contains("IPv4"),
        "the error names the stale removal and what was restored: {line}"
    );
}
