//! Cleanup.

use super::*;

/// Foreign state (`setup`), snapshot `before`, apply `apply_args` (snapshot `applied`),
/// cleanup with `cleanup_args` twice (`cleaned`, `cleaned2`); every run must exit 0.
fn apply_then_clean_up_twice(
    setup: &str,
    env: &[(&str, &str)],
    apply_args: &[&str],
    cleanup_args: &[&str],
) -> Ns {
    let ns = Script::new()
        .sh(setup)
        .snap("before")
        .run("apply", env, apply_args)
        .snap("applied")
        .run("cleanup", env, cleanup_args)
        .snap("cleaned")
        .run("cleanup2", env, cleanup_args)
        .snap("cleaned2")
        .exec();
    ns.run_rc("apply", 0);
    ns.run_rc("cleanup", 0);
    ns.run_rc("cleanup2", 0);
    ns
}

/// [`apply_then_clean_up_twice`]: the state after each cleanup equals the one before the
/// apply.
pub(super) fn assert_cleanup_restores(
    setup: &str,
    env: &[(&str, &str)],
    apply_args: &[&str],
    cleanup_args: &[&str],
) -> Ns {
    let ns = apply_then_clean_up_twice(setup, env, apply_args, cleanup_args);
    let ctx = ns.context();
    let applied = ns.state("applied");
    assert!(
        TABLES.iter().any(|p| applied.get(p).contains("ISTIO_"))
            || applied.get("nft-inet").contains("table inet istio-proxy-"),
        "nothing was applied\n{}\n{ctx}",
        applied.describe()
    );
    // Rules of our shape in built-in chains (interface RETURNs, TPROXY marks) stay: nothing
    // proves them ours. Each run names them; everything else is as before the apply.
    let before = ns.state("before").without_empty_tables();
    let cleanup = ns.run_rc("cleanup", 0).logs();
    assert_same(
        "--cleanup-only must return to the state before the apply",
        &before,
        &ns.state("cleaned").without_kept(&cleanup),
        &ctx,
    );
    assert_same(
        "a second --cleanup-only",
        &ns.state("cleaned"),
        &ns.state("cleaned2"),
        &ctx,
    );
    ns
}

#[test]
#[ignore = "needs root and network namespaces"]
fn cleanup_after_seed_restores_foreign_state_exactly() {
    if skip_unless_root("cleanup_after_seed_restores_foreign_state_exactly") {
        return;
    }
    assert_cleanup_restores(
        &foreign_rules("iptables-nft"),
        V4,
        SEED,
        &["--cleanup-only"],
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn cleanup_after_tproxy_ipv6_dns_restores_foreign_state_exactly() {
    if skip_unless_root("cleanup_after_tproxy_ipv6_dns_restores_foreign_state_exactly") {
        return;
    }
    let tmp = common::TempDir::new("istio-iptables-resolv");
    let resolv = tmp.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 10.0.0.53\n").expect("write resolv.conf");
    let resolv = resolv.to_string_lossy().into_owned();
    let args = [
        "-m",
        "TPROXY",
        "-b",
        "*",
        "--redirect-dns",
        "--resolv-conf",
        &resolv,
    ];
    let setup = format!(
        "{}{}",
        foreign_rules("iptables-nft"),
        foreign_rules("ip6tables-nft")
    );
    // Cleanup with the same flags (as Istio's CNI does) ...
    let ns = assert_cleanup_restores(&setup, V6, &args, &cat(&args, &["--cleanup-only"]));
    let applied = ns.state("applied");
    for (part, what) in [
        ("v4-nft", "10.0.0.53"),
        ("v4-nft", "*raw"),
        ("v6-nft", "*mangle"),
        ("rule4", "lookup 133"),
        ("rule6", "lookup 133"),
        ("addr6-lo", "::6/128"),
    ] {
        assert!(
            applied.get(part).contains(what),
            "[{part}] should contain `{what}` after the apply\n{}",
            applied.describe()
        );
    }
    // ... and a bare --cleanup-only.
    assert_cleanup_restores(&setup, V6, &args, &["--cleanup-only"]);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn cleanup_finds_rules_applied_with_forced_legacy() {
    let test = "cleanup_finds_rules_applied_with_forced_legacy";
    if skip_unless_root(test) || skip_unless_installed(test, &["iptables-legacy"]) {
        return;
    }
    let ns = apply_then_clean_up_twice(
        &foreign_rules("iptables-nft"),
        V4,
        &seed_forcing("legacy"),
        &["--cleanup-only"],
    );
    let ctx = ns.context();
    let applied = ns.state("applied");
    assert!(
        applied.get("v4-legacy").contains("-A ISTIO_OUTPUT"),
        "{}",
        applied.describe()
    );
    let cleaned = ns.state("cleaned");
    assert!(
        !cleaned.get("v4-legacy").contains("ISTIO"),
        "cleanup must remove the legacy rules\n{}\n{ctx}",
        cleaned.describe()
    );
    // Legacy tables cannot be unloaded: an empty nat table may stay. Everything else is
    // exactly as before.
    let before = ns.state("before").without_empty_tables();
    let parts = [
        "v4-nft",
        "v6-nft",
        "v4-legacy",
        "v6-legacy",
        "rule4",
        "rule6",
        "route4",
        "route6",
        "addr6-lo",
    ];
    assert_same(
        "cleanup of legacy rules (empty legacy tables aside)",
        &before.only(&parts),
        &cleaned.without_empty_tables().only(&parts),
        &ctx,
    );
    assert_same("a second cleanup", &cleaned, &ns.state("cleaned2"), &ctx);
}
