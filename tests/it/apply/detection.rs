//! Backend detection and process count.

use super::*;

#[test]
#[ignore = "needs root and network namespaces"]
fn fresh_apply_runs_at_most_two_processes_for_ipv4_and_none_for_ipv6() {
    if skip_unless_root("fresh_apply_runs_at_most_two_processes_for_ipv4_and_none_for_ipv6") {
        return;
    }
    let (p, report) = count_processes(V4, SEED);
    assert!(
        p.v4.len() <= 2,
        "IPv4: {} processes, want at most 2\n{report}",
        p.v4.len()
    );
    assert!(
        p.v4.iter().any(|l| l.contains("restore")),
        "IPv4: no restore ran\n{report}"
    );
    assert!(p.v6.is_empty(), "IPv6 is off but ip6tables ran\n{report}");
    assert!(
        p.ip.is_empty() && p.other.is_empty(),
        "REDIRECT without IPv6 needs no ip/nft/other process\n{report}"
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn fresh_apply_with_ipv6_runs_at_most_two_processes_per_family() {
    if skip_unless_root("fresh_apply_with_ipv6_runs_at_most_two_processes_per_family") {
        return;
    }
    let (p, report) = count_processes(V6, SEED);
    assert!(p.v4.len() <= 2, "IPv4: {} processes\n{report}", p.v4.len());
    assert!(p.v6.len() <= 2, "IPv6: {} processes\n{report}", p.v6.len());
    assert!(
        p.v6.iter().any(|l| l.contains("restore")),
        "IPv6: no restore ran\n{report}"
    );
    // The ::6 address: one `ip` to look, one to add (counted apart from iptables).
    assert!(
        p.ip.len() <= 2 && p.ip.iter().all(|l| l.contains("addr")),
        "expected at most 2 `ip ... addr` processes for ::6, got {}\n{report}",
        p.ip.len()
    );
    assert!(p.other.is_empty(), "unexpected processes\n{report}");
}

#[test]
#[ignore = "needs root and network namespaces"]
fn legacy_tables_in_the_namespace_select_legacy() {
    let test = "legacy_tables_in_the_namespace_select_legacy";
    if skip_unless_root(test) || skip_unless_installed(test, &["iptables-legacy"]) {
        return;
    }
    let ns = Script::new()
        .sh("iptables-legacy -t filter -A INPUT -j ACCEPT")
        .run("apply", V4, SEED)
        .snap("after")
        .exec();
    let ctx = ns.context();
    let run = ns.run_rc("apply", 0);
    assert!(
        run.logs().contains("iptables-legacy-restore") && run.logs().contains("legacy tables"),
        "the log should name iptables-legacy-restore and why\n{}",
        run.describe()
    );
    let st = ns.state("after");
    assert!(
        st.get("v4-legacy").contains("-A ISTIO_OUTPUT"),
        "rules should be in iptables-legacy-save\n{}\n{ctx}",
        st.describe()
    );
    assert!(
        st.get("v4-legacy").contains("-A INPUT -j ACCEPT"),
        "the foreign legacy rule must stay\n{}",
        st.describe()
    );
    assert!(
        !st.get("v4-nft").contains("ISTIO"),
        "nothing may go to nft\n{}",
        st.describe()
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn force_iptables_binary_overrides_detection() {
    let test = "force_iptables_binary_overrides_detection";
    if skip_unless_root(test) || skip_unless_installed(test, &["iptables-legacy"]) {
        return;
    }
    for (setup, forced, other) in [
        // Legacy tables present, nft forced.
        (
            "iptables-legacy -t filter -A INPUT -j ACCEPT",
            "nft",
            "legacy",
        ),
        // No legacy tables, legacy forced.
        ("", "legacy", "nft"),
    ] {
        let ns = Script::new()
            .sh(setup)
            .run("apply", V4, &seed_forcing(forced))
            .snap("after")
            .exec();
        let run = ns.run_rc("apply", 0);
        let st = ns.state("after");
        assert!(
            run.logs().contains(&format!("iptables-{forced}-restore"))
                && run.logs().contains("forced"),
            "{}",
            run.describe()
        );
        assert!(
            st.get(&format!("v4-{forced}")).contains("-A ISTIO_OUTPUT")
                && !st.get(&format!("v4-{other}")).contains("ISTIO"),
            "--force-iptables-binary {forced}: rules must be in {forced} only\n{}\n{}",
            st.describe(),
            ns.context()
        );
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn detection_leaves_no_trace() {
    if skip_unless_root("detection_leaves_no_trace") {
        return;
    }
    let ns = Script::new()
        .snap("before")
        .run("skip", V4, &cat(SEED, &["--skip-rule-apply"]))
        .snap("after-skip")
        .run("apply", V4, SEED)
        .snap("after-apply")
        .exec();
    let ctx = ns.context();
    ns.run_rc("skip", 0);
    ns.run_rc("apply", 0);
    let before = ns.state("before");
    for part in TABLES {
        assert_eq!(
            before.get(part),
            "",
            "a fresh namespace has no {part} state\n{}",
            before.describe()
        );
    }
    assert_same(
        "--skip-rule-apply must change nothing",
        &before,
        &ns.state("after-skip"),
        &ctx,
    );
    // A real apply on nft: detection loaded no legacy table and ran nothing for it.
    let after = ns.state("after-apply");
    assert_same(
        "applying on nft must not create legacy tables",
        &before.only(&["v4-legacy", "v6-legacy", "legacy-names4", "legacy-names6"]),
        &after.only(&["v4-legacy", "v6-legacy", "legacy-names4", "legacy-names6"]),
        &ctx,
    );
}
