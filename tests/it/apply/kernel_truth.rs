//! What `iptables-nft-save` hides (issue 21, cases 1-4 and 8), on a real kernel: a dormant
//! table, a table it calls incompatible, a partial save, a `/0` that iptables stores as no
//! address match. Each run is read against nf_tables' own structure over netlink; real
//! traffic shows what captures.

use super::every_place::{
    lands, listeners, run_ok as run_in, sh as sh_in, text, with_excluded_8080,
};
use crate::common::{BIN, SEED, Topology, seed_with, skip_unless_root};

fn sh(t: &Topology, cmd: &str) -> String {
    sh_in(t, &t.pod, cmd)
}

/// Runs the binary in the pod (IPv4 only), with `args`.
fn run(t: &Topology, args: &[&str]) -> std::process::Output {
    t.run_bin(&t.pod, false, args)
}

fn run_ok(t: &Topology, args: &[&str]) -> String {
    run_in(t, false, args)
}

fn with(first: &[&'static str], rest: &[&'static str]) -> Vec<&'static str> {
    first.iter().chain(rest).copied().collect()
}

fn lands_8080(t: &Topology) -> String {
    lands(t, false, 8080)
}

/// Case 1: a dormant nat table switches the capture off; iptables-nft-save prints it as
/// live. verify sees it, and a re-run wakes the table (it holds our chains) and captures.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_dormant_table_of_ours_is_seen_and_woken() {
    if skip_unless_root("a_dormant_table_of_ours_is_seen_and_woken") {
        return;
    }
    let t = Topology::new("dormant");
    let _l = listeners(&t);
    run_ok(&t, SEED);
    assert_eq!(lands_8080(&t), "pod:15006");
    sh(&t, "nft add table ip nat '{ flags dormant; }'");
    assert_eq!(
        lands_8080(&t),
        "pod:8080",
        "a dormant table captures nothing"
    );

    let v = run(&t, &with(&["verify"], SEED));
    assert_eq!(v.status.code(), Some(3), "{}", text(&v));
    let out = String::from_utf8_lossy(&v.stdout);
    assert!(out.contains("IPv4 iptables-nft nat:"), "{out}");
    assert!(out.contains("flags dormant"), "{out}");

    let log = run_ok(&t, SEED);
    assert!(log.contains("waking the dormant IPv4"), "{log}");
    assert!(!log.contains("nothing to commit"), "{log}");
    assert_eq!(lands_8080(&t), "pod:15006", "captured again");
    let v = run(&t, &with(&["verify"], SEED));
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    assert!(!sh(&t, "nft list table ip nat").contains("dormant"));
}

/// A dormant nat table holding no chain of ours is not ours to wake: rules written there
/// would capture nothing, so the run refuses and changes nothing.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_dormant_table_of_someone_else_is_refused() {
    if skip_unless_root("a_dormant_table_of_someone_else_is_refused") {
        return;
    }
    let t = Topology::new("dormant2");
    sh(
        &t,
        "iptables-nft -t nat -A OUTPUT -p udp --dport 9 -j RETURN && \
         nft add table ip nat '{ flags dormant; }'",
    );
    let before = sh(&t, "nft list ruleset");
    let o = run(&t, SEED);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("table nat is dormant") && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(sh(&t, "nft list ruleset"), before);
}

/// Case 2: one rule iptables cannot print makes iptables-nft-save show only "incompatible".
/// Cleanup, apply, a switch to native nftables all refuse and name the table, leaving the
/// (still capturing) rules as they are; verify says the table cannot be read.
#[test]
#[ignore = "needs root and network namespaces"]
fn an_incompatible_table_is_never_read_as_absent() {
    if skip_unless_root("an_incompatible_table_is_never_read_as_absent") {
        return;
    }
    let t = Topology::new("incompat");
    let _l = listeners(&t);
    run_ok(&t, SEED);
    sh(
        &t,
        "nft insert rule ip nat OUTPUT ct state invalid counter drop",
    );
    assert!(sh(&t, "iptables-nft-save").contains("incompatible"));
    let ruleset = sh(&t, "nft list ruleset");

    for (what, args) in [
        ("cleanup", with(&["--cleanup-only"], &[])),
        ("apply", SEED.to_vec()),
        ("switch", with(&["--native-nftables"], SEED)),
    ] {
        let o = run(&t, &args);
        assert_eq!(o.status.code(), Some(1), "{what}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("cannot be read safely") && err.contains("table nat"),
            "{what}: {err}"
        );
        assert_eq!(
            sh(&t, "nft list ruleset"),
            ruleset,
            "{what} changed nothing"
        );
    }
    assert_eq!(
        lands_8080(&t),
        "pod:15006",
        "the capture is still live, as said"
    );

    let v = run(&t, &with(&["verify"], SEED));
    assert_eq!(v.status.code(), Some(3), "{}", text(&v));
    let out = String::from_utf8_lossy(&v.stdout);
    assert!(out.contains("cannot be read safely"), "{out}");
    assert!(
        !out.contains("missing"),
        "the rules are there, not missing: {out}"
    );
}

/// Case 3: a dual-stack apply whose IPv6 nat table cannot be read refuses before the IPv4
/// commit: nothing is changed in either family.
#[test]
#[ignore = "needs root and network namespaces"]
fn an_unreadable_ipv6_table_stops_the_run_before_ipv4_changes() {
    if skip_unless_root("an_unreadable_ipv6_table_stops_the_run_before_ipv4_changes") {
        return;
    }
    let t = Topology::new("incompat6");
    sh(
        &t,
        "nft add table ip6 nat && \
         nft add chain ip6 nat OUTPUT '{ type nat hook output priority -100; }' && \
         nft add rule ip6 nat OUTPUT ct state invalid counter drop",
    );
    let before = sh(&t, "nft list ruleset");
    let o = t.run_bin(&t.pod, true, SEED);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("IPv6 tables of ip6tables-nft-save cannot be read safely"),
        "{err}"
    );
    assert_eq!(sh(&t, "nft list ruleset"), before, "IPv4 is not committed");
}

/// Case 4: a save that exits 0 but leaves out the nat table (a wrapper) is caught by the
/// kernel's own list: the run changes nothing, and the earlier capture and a foreign rule
/// stay (no whole-table delete).
#[test]
#[ignore = "needs root and network namespaces"]
fn a_partial_save_changes_nothing() {
    if skip_unless_root("a_partial_save_changes_nothing") {
        return;
    }
    let t = Topology::new("partial");
    run_ok(&t, SEED);
    sh(
        &t,
        "iptables-nft -t nat -N KUBE-SERVICES && iptables-nft -t nat -A OUTPUT -j KUBE-SERVICES",
    );
    let dir = tempdir();
    let real = which("iptables-nft-save");
    let wrapper = format!("{dir}/iptables-nft-save");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n{real} \"$@\" | awk '/^\\*nat/{{skip=1}} !skip{{print}} /^COMMIT/{{skip=0}}'\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let before = sh(&t, "nft list ruleset");
    let path = format!("{dir}:{}", crate::common::DEFAULT_PATH);
    let o = t.exec(
        &t.pod,
        BIN,
        &with_excluded_8080(),
        &[("PATH", &path), ("ENABLE_INBOUND_IPV6", "false")],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("table nat: the kernel holds it, iptables-nft-save leaves it out"),
        "{err}"
    );
    assert_eq!(sh(&t, "nft list ruleset"), before);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Case 8: `-i 0.0.0.0/0` and `-x 0.0.0.0/0` are stored by iptables as no address match: a
/// re-run finds them in place, verify reports no drift.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_zero_prefix_settles() {
    if skip_unless_root("a_zero_prefix_settles") {
        return;
    }
    let t = Topology::new("slash0");
    let mut args = seed_with("-i", "0.0.0.0/0");
    let x = args.iter().position(|a| *a == "-x").expect("SEED has -x");
    args[x + 1] = "0.0.0.0/0";
    for backend in [&[][..], &["--native-nftables"][..]] {
        let a = with(backend, &args);
        run_ok(&t, &a);
        let log = run_ok(&t, &a);
        assert!(
            log.contains("already in place") || log.contains("nothing to commit"),
            "{backend:?}: {log}"
        );
        let v = run(&t, &with(&["verify"], &a));
        assert_eq!(v.status.code(), Some(0), "{backend:?}: {}", text(&v));
    }
}

fn tempdir() -> String {
    let dir = std::env::temp_dir().join(format!("istio-iptables-partial-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.to_string_lossy().into_owned()
}

fn which(program: &str) -> String {
    crate::common::DEFAULT_PATH
        .split(':')
        .map(|d| std::path::Path::new(d).join(program))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{program} not found"))
        .to_string_lossy()
        .into_owned()
}
