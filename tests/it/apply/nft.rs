//! Native nftables (`--native-nftables`).

use super::changed_config::assert_transition;
use super::cleanup::assert_cleanup_restores;
use super::concurrency::assert_concurrent_runs_converge;
use super::rollback::{assert_rollback, existing_state_setup};
use super::*;

/// `args` with `--native-nftables` first.
fn nft<'a>(args: &[&'a str]) -> Vec<&'a str> {
    cat(&["--native-nftables"], args)
}

/// TPROXY with IPv6, DNS capture and an excluded interface: all three tables, routes and
/// `::6`.
const NFT_FULL: &[&str] = &[
    "--native-nftables",
    "-m",
    "TPROXY",
    "-b",
    "*",
    "-d",
    "15090",
    "-c",
    "eth9",
    "--drop-invalid",
    "--redirect-dns",
    "--capture-all-dns",
];

/// Foreign nft state next to ours: an inet table of another tool.
const FOREIGN_NFT: &str = "nft add table inet foreign\n\
    nft add chain inet foreign out '{ type filter hook output priority 0 ; }'\n\
    nft add rule inet foreign out tcp dport 9999 counter accept\n";

#[test]
#[ignore = "needs root and network namespaces"]
fn nft_seed_runs_only_nft_and_a_rerun_changes_nothing() {
    if skip_unless_root("nft_seed_runs_only_nft_and_a_rerun_changes_nothing") {
        return;
    }
    let ns = Script::new()
        .shims(Fail::Nothing)
        .run("first", V4, &nft(SEED))
        .snap("first")
        .run("second", V4, &nft(SEED))
        .snap("second")
        .exec();
    let ctx = ns.context();
    let first = ns.run_rc("first", 0);
    assert_eq!(first.execs, ["nft -f -"], "{}", first.describe());
    let second = ns.run_rc("second", 0);
    assert_eq!(
        second.execs,
        ["nft list ruleset inet"],
        "a re-run reads the ruleset once and commits nothing\n{}",
        second.describe()
    );
    assert!(
        second.logs().contains("already in place"),
        "{}",
        second.describe()
    );
    assert_same("a re-run", &ns.state("first"), &ns.state("second"), &ctx);
    let fresh = ns.state("first");
    assert!(
        fresh
            .get("nft-inet")
            .contains("table inet istio-proxy-nat {")
    );
    assert!(
        !fresh.get("v4-nft").contains("ISTIO_"),
        "{}",
        fresh.describe()
    );
}

/// nft names protocols from /etc/protocols, which an image without Debian's netbase lacks: it
/// then lists `meta l4proto 6`. A re-run still finds its rules in place, and verify agrees.
#[test]
#[ignore = "needs root and network namespaces"]
fn nft_rerun_without_etc_protocols_changes_nothing() {
    if skip_unless_root("nft_rerun_without_etc_protocols_changes_nothing") {
        return;
    }
    let ns = Script::new()
        .sh("mount --bind /dev/null /etc/protocols")
        .run("first", V4, NFT_FULL)
        .snap("first")
        .run("second", V4, NFT_FULL)
        .snap("second")
        .sh(&format!(
            "{} verify {} > \"$NS_OUT/verify\" 2>&1 || echo \"exit $?\" >> \"$NS_OUT/verify\"",
            BIN,
            shell_command(NFT_FULL)
        ))
        .exec();
    let ctx = ns.context();
    ns.run_rc("first", 0);
    let second = ns.run_rc("second", 0);
    assert!(
        second.logs().contains("already in place") && !second.logs().contains("nftables="),
        "{}",
        second.describe()
    );
    assert_same("a re-run", &ns.state("first"), &ns.state("second"), &ctx);
    let verify = ns.out.file("verify").unwrap_or_default();
    assert!(verify.contains("OK:"), "verify: {verify}");
}

#[test]
#[ignore = "needs root and network namespaces"]
fn nft_changed_config_equals_fresh_apply() {
    if skip_unless_root("nft_changed_config_equals_fresh_apply") {
        return;
    }
    // Istio would leave the mangle and raw tables and the TPROXY routing in place.
    let (fresh, _) = assert_transition(V6, NFT_FULL, &nft(SEED), PARTS);
    assert!(!fresh.get("nft-inet").contains("istio-proxy-mangle"));
    assert_transition(V6, &nft(SEED), NFT_FULL, PARTS);
    assert_transition(V4, &nft(SEED), &nft(&seed_with("-b", "8080")), PARTS);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn nft_backend_switch_both_ways_equals_fresh_apply() {
    if skip_unless_root("nft_backend_switch_both_ways_equals_fresh_apply") {
        return;
    }
    let iptables = &NFT_FULL[1..];
    let (fresh_nft, _) = assert_transition(V6, iptables, NFT_FULL, PARTS);
    for part in TABLES {
        assert!(
            !fresh_nft.get(part).contains("ISTIO_"),
            "{}",
            fresh_nft.describe()
        );
    }
    let (fresh_ipt, _) = assert_transition(V6, NFT_FULL, iptables, PARTS);
    assert!(
        !fresh_ipt.get("nft-inet").contains("istio-proxy"),
        "{}",
        fresh_ipt.describe()
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn nft_half_applied_or_tampered_tables_are_repaired_by_one_run() {
    if skip_unless_root("nft_half_applied_or_tampered_tables_are_repaired_by_one_run") {
        return;
    }
    let fresh = fresh_state(V6, NFT_FULL);
    let apply = shell_command(cat(&[BIN], NFT_FULL));
    let first = format!(
        "env -i PATH={} ENABLE_INBOUND_IPV6=true {apply} >/dev/null\n",
        shell_quote(sane_path())
    );
    for damage in [
        // A rule gone.
        "h=$(nft -a list chain inet istio-proxy-nat istio-output | awk '/skuid/ {print $NF; exit}')\n\
         nft delete rule inet istio-proxy-nat istio-output handle $h",
        // A rule of someone else's in our chain.
        "nft add rule inet istio-proxy-nat istio-output tcp dport 1234 counter return",
        // A table emptied, another dropped.
        "nft flush table inet istio-proxy-mangle\nnft delete table inet istio-proxy-raw",
        // A chain of ours missing its hook (written by an older tool).
        "nft delete table inet istio-proxy-raw\nnft add table inet istio-proxy-raw\n\
         nft add chain inet istio-proxy-raw output",
        // Only the first table written (a run killed before Istio's second table).
        "nft delete table inet istio-proxy-mangle\nnft delete table inet istio-proxy-raw",
    ] {
        let ns = Script::new()
            .sh(&first)
            .sh(damage)
            .snap("damaged")
            .run("repair", V6, NFT_FULL)
            .snap("repaired")
            .exec();
        let ctx = ns.context();
        ns.run_rc("repair", 0);
        assert_ne!(
            ns.state("damaged").parts,
            fresh.parts,
            "the damage did nothing: {damage}"
        );
        let mut got = ns.state("repaired");
        got.label = format!("repaired after `{damage}`");
        assert_same("one run repairs the tables", &fresh, &got, &ctx);
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn nft_cleanup_restores_foreign_state_exactly() {
    if skip_unless_root("nft_cleanup_restores_foreign_state_exactly") {
        return;
    }
    let setup = format!(
        "{}{FOREIGN_NFT}ip -4 rule add fwmark 7 lookup 77\n",
        foreign_rules("iptables-nft")
    );
    let ns = assert_cleanup_restores(
        &setup,
        V6,
        NFT_FULL,
        &["--cleanup-only", "--native-nftables"],
    );
    let cleanup = ns.run("cleanup");
    assert!(
        cleanup.logs().contains("cleanup done"),
        "{}",
        cleanup.describe()
    );
    // The iptables cleanup removes the nft tables too: a pod never keeps a capture.
    assert_cleanup_restores(&setup, V6, NFT_FULL, &["--cleanup-only"]);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn nft_failed_ip_step_undoes_the_transaction() {
    if skip_unless_root("nft_failed_ip_step_undoes_the_transaction") {
        return;
    }
    let earlier = format!(
        "{FOREIGN_NFT}env -i PATH={} ENABLE_INBOUND_IPV6=true {} >/dev/null\n",
        shell_quote(sane_path()),
        shell_command(cat(&[BIN], &nft(SEED)))
    );
    // Fresh, over an earlier nft config, and over an earlier iptables config (a switch).
    let earlier_iptables = existing_state_setup();
    for setup in ["", earlier.as_str(), earlier_iptables.as_str()] {
        // The kernel refuses our IPv6 route (a conflicting one): the IPv4 steps were made.
        let setup = format!("{setup}{}", conflicting_route("-6"));
        let run = assert_rollback(&setup, Fail::Nothing, V6, NFT_FULL);
        let line = run.one_error();
        assert!(
            line.contains(
                "configuring routes: `ip -6 route add local default dev lo table 133`: over \
                 rtnetlink: the kernel refused it: File exists"
            ) && line.contains("nftables")
                && line.contains("routes;"),
            "the error should name the ip step and say nftables was restored: {line}"
        );
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn nft_refused_transaction_changes_nothing_and_says_so() {
    if skip_unless_root("nft_refused_transaction_changes_nothing_and_says_so") {
        return;
    }
    let earlier = format!(
        "{FOREIGN_NFT}env -i PATH={} {} >/dev/null\n",
        shell_quote(sane_path()),
        shell_command(cat(&[BIN], &nft(SEED)))
    );
    for setup in ["", earlier.as_str()] {
        let ns = Script::new()
            .sh(setup)
            .snap("before")
            .shims(Fail::NftTransaction)
            .run("failing", V6, NFT_FULL)
            .snap("after")
            .exec();
        let ctx = ns.context();
        let run = ns.run_rc("failing", 1);
        assert_same(
            "a refused transaction",
            &ns.state("before"),
            &ns.state("after"),
            &ctx,
        );
        let line = run.one_error();
        assert!(
            line.contains("committing the nftables transaction with nft -f failed at `")
                && line.contains("refused (shim)")
                && line.contains("nothing was changed (checked by re-reading the kernel)"),
            "{line}"
        );
        assert!(
            !run.execs.iter().any(|e| e.starts_with("ip ")),
            "no ip step after a refused transaction\n{}",
            run.describe()
        );
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn nft_missing_or_too_old_is_refused_before_anything_changes() {
    if skip_unless_root("nft_missing_or_too_old_is_refused_before_anything_changes") {
        return;
    }
    let args = shell_command(cat(&[BIN], NFT_FULL));
    // An nft whose binary says 0.9.8, which logs if it is ever run.
    let old = "mkdir -p \"$NS_TMP/old\"\n\
        printf '#!/bin/sh\\necho \"$*\" >> \"$NS_TMP/old/ran\"\\nexit 0\\n' > \"$NS_TMP/old/nft\"\n\
        printf '\\000' >> \"$NS_TMP/old/nft\"; printf '0.9.8' >> \"$NS_TMP/old/nft\"; printf '\\000' >> \"$NS_TMP/old/nft\"\n\
        chmod 755 \"$NS_TMP/old/nft\"";
    let run = |label: &str, path: &str| {
        format!(
            "set +x\n__rc=0\nenv -i PATH={path} ENABLE_INBOUND_IPV6=true NS_TMP=\"$NS_TMP\" {args} \
             >\"$NS_OUT/{label}.out\" 2>\"$NS_OUT/{label}.err\" || __rc=$?\n\
             echo $__rc > \"$NS_OUT/{label}.rc\"\nset -x"
        )
    };
    let ns = Script::new()
        .sh(FOREIGN_NFT)
        .snap("before")
        .sh(&run("missing", "/nonexistent"))
        .snap("after-missing")
        .sh(old)
        .sh(&run(
            "old",
            &format!("\"$NS_TMP/old\":{}", shell_quote(sane_path())),
        ))
        .snap("after-old")
        .sh("[ ! -e \"$NS_TMP/old/ran\" ] || cp \"$NS_TMP/old/ran\" \"$NS_OUT/old-ran\"")
        .exec();
    let ctx = ns.context();
    let missing = ns.run_rc("missing", 1);
    let line = missing.one_error();
    assert!(
        line.contains("needs the nft program")
            && line.contains("install the nftables package")
            && line.contains("nothing was changed"),
        "{line}"
    );
    let old = ns.run_rc("old", 1);
    let line = old.one_error();
    assert!(
        line.contains("nft 0.9.8 is too old") && line.contains("1.0.1"),
        "{line}"
    );
    assert!(
        !ns.out.files.contains_key("old-ran"),
        "the old nft must not run\n{ctx}"
    );
    let before = ns.state("before");
    assert_same("nft missing", &before, &ns.state("after-missing"), &ctx);
    assert_same("nft too old", &before, &ns.state("after-old"), &ctx);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn nft_reconcile_false_refuses_a_conflict_and_changes_nothing() {
    if skip_unless_root("nft_reconcile_false_refuses_a_conflict_and_changes_nothing") {
        return;
    }
    let no = ["--reconcile=false"];
    let ns = Script::new()
        .run("seed", V4, &nft(SEED))
        .snap("before")
        .run("other", V4, &cat(&nft(&seed_with("-b", "8080")), &no))
        .run("same", V4, &cat(&nft(SEED), &no))
        .snap("after")
        .run("iptables", V4, SEED)
        .snap("iptables")
        .run("switch", V4, &cat(&nft(SEED), &no))
        .snap("after-switch")
        .exec();
    let ctx = ns.context();
    ns.run_rc("seed", 0);
    let other = ns.run_rc("other", 4);
    assert!(
        other
            .one_error()
            .contains("table inet istio-proxy-nat differs"),
        "{}",
        other.describe()
    );
    ns.run_rc("same", 0);
    assert_same(
        "--reconcile=false",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
    ns.run_rc("iptables", 0);
    let switch = ns.run_rc("switch", 4);
    assert!(
        switch.one_error().contains("ISTIO_* iptables rules"),
        "{}",
        switch.describe()
    );
    assert_same(
        "--reconcile=false over iptables",
        &ns.state("iptables"),
        &ns.state("after-switch"),
        &ctx,
    );
}

/// `--reconcile=false --force-apply` over the other backend's state is Istio's behaviour:
/// the chosen backend's rules go on top and nothing else is removed, either way round.
#[test]
#[ignore = "needs root and network namespaces"]
fn force_without_reconcile_leaves_the_other_backend_alone() {
    if skip_unless_root("force_without_reconcile_leaves_the_other_backend_alone") {
        return;
    }
    let force = ["--reconcile=false", "--force-apply"];
    let ns = Script::new()
        .run("iptables", V4, SEED)
        .run("nft", V4, &cat(&nft(SEED), &force))
        .snap("both")
        .exec();
    ns.run_rc("iptables", 0);
    ns.run_rc("nft", 0);
    let both = ns.state("both");
    let ctx = ns.context();
    assert!(
        both.get("v4-nft").contains(":ISTIO_OUTPUT"),
        "iptables rules kept\n{ctx}"
    );
    assert!(
        both.get("nft-inet").contains("table inet istio-proxy-nat"),
        "nft tables written\n{ctx}"
    );
}

/// The other way round: an iptables apply with `--reconcile=false` over our nft tables
/// refuses (exit 4) and changes nothing, naming the tables; with the default it removes them.
#[test]
#[ignore = "needs root and network namespaces"]
fn iptables_reconcile_false_over_nft_tables_refuses_and_changes_nothing() {
    if skip_unless_root("iptables_reconcile_false_over_nft_tables_refuses_and_changes_nothing") {
        return;
    }
    let no = ["--reconcile=false"];
    let ns = Script::new()
        .run("nft", V4, &nft(SEED))
        .snap("before")
        .run("refused", V4, &cat(SEED, &no))
        .snap("after")
        .exec();
    let ctx = ns.context();
    ns.run_rc("nft", 0);
    let refused = ns.run_rc("refused", 4);
    assert!(
        refused
            .one_error()
            .contains("nftables table inet istio-proxy-nat"),
        "{}",
        refused.describe()
    );
    assert_same(
        "--reconcile=false over nft tables",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn nft_network_namespace_cni_mode_and_skip_rule_apply() {
    if skip_unless_root("nft_network_namespace_cni_mode_and_skip_rule_apply") {
        return;
    }
    let target = ["--network-namespace", "/run/netns/pod", "--cni-mode"];
    let ns = Script::new()
        .sh("ip netns add pod\nip netns exec pod ip link set lo up")
        .snap("before")
        .run("skip", V4, &cat(&nft(SEED), &["--skip-rule-apply"]))
        .snap("after-skip")
        .run("cni", V4, &cat(&nft(SEED), &target))
        .snap("after-cni")
        .sh("ip netns exec pod nft list ruleset > \"$NS_OUT/pod.nft\"")
        .run(
            "cleanup",
            V4,
            &cat(&nft(SEED), &cat(&target, &["--cleanup-only"])),
        )
        .sh("ip netns exec pod nft list ruleset > \"$NS_OUT/pod-cleaned.nft\"")
        .exec();
    let ctx = ns.context();
    ns.run_rc("skip", 0);
    ns.run_rc("cni", 0);
    ns.run_rc("cleanup", 0);
    let before = ns.state("before");
    assert_same("--skip-rule-apply", &before, &ns.state("after-skip"), &ctx);
    assert_same(
        "the caller's namespace",
        &before,
        &ns.state("after-cni"),
        &ctx,
    );
    assert!(
        ns.file("pod.nft").contains("table inet istio-proxy-nat {"),
        "{ctx}"
    );
    assert_eq!(ns.file("pod-cleaned.nft").trim(), "", "{ctx}");
}

#[test]
#[ignore = "needs root and network namespaces"]
fn ten_simultaneous_nft_runs_of_two_configs_end_in_one_clean_state() {
    if skip_unless_root("ten_simultaneous_nft_runs_of_two_configs_end_in_one_clean_state") {
        return;
    }
    assert_concurrent_runs_converge(V6, &[nft(SEED), NFT_FULL.to_vec()], 2);
}
