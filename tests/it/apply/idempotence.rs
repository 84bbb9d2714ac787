//! Idempotence.

use super::*;

#[test]
#[ignore = "needs root and network namespaces"]
fn seed_command_twice_changes_nothing_the_second_time() {
    if skip_unless_root("seed_command_twice_changes_nothing_the_second_time") {
        return;
    }
    let ns = Script::new()
        .shims(Fail::Nothing)
        .run("first", V4, SEED)
        .snap("first")
        .run("second", V4, SEED)
        .snap("second")
        .exec();
    let ctx = ns.context();
    ns.run_rc("first", 0);
    let second = ns.run_rc("second", 0);
    let first_state = ns.state("first");
    assert!(
        first_state.get("v4-nft").contains("-A ISTIO_OUTPUT"),
        "{}",
        first_state.describe()
    );
    assert_same(
        "second run of the seed command",
        &first_state,
        &ns.state("second"),
        &ctx,
    );
    assert!(
        second.logs().contains("already in place"),
        "the second run should say the rules are already in place\n{}",
        second.describe()
    );
    // The state is read with one iptables-nft-save; nothing else runs.
    let programs = second.execs_of(|_| true);
    assert!(
        programs.len() == 1 && programs[0].starts_with("iptables-nft-save"),
        "the second run must run one save and nothing else, ran {programs:?}\n{}",
        second.describe()
    );
}

/// The seed applied (run `first`), then `setup` (shell), then the seed again (run `second`,
/// with shims failing as `fail` says); the state is snapped as `before` and `after` it.
fn seed_again_after(setup: &str, fail: Fail) -> Ns {
    Script::new()
        .run("first", V4, SEED)
        .sh(setup)
        .snap("before")
        .shims(fail)
        .run("second", V4, SEED)
        .snap("after")
        .exec()
}

/// The iptables rules are in place but removing the tables of an earlier `--native-nftables`
/// run fails: the error says nothing was changed, and that claim rests on real saves (the
/// one read before the run, one to re-read for the rollback).
#[test]
#[ignore = "needs root and network namespaces"]
fn a_failed_switch_from_native_nftables_over_rules_in_place_is_checked_with_real_saves() {
    if skip_unless_root(
        "a_failed_switch_from_native_nftables_over_rules_in_place_is_checked_with_real_saves",
    ) {
        return;
    }
    let ns = seed_again_after("nft add table inet istio-proxy-nat", Fail::NftTransaction);
    let ctx = ns.context();
    ns.run_rc("first", 0);
    let run = ns.run_rc("second", 1);
    assert_same(
        "a failed switch",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
    let line = run.one_error();
    assert!(
        line.contains("removing the native nftables tables")
            && line.contains("nothing was changed (checked by re-reading the kernel)"),
        "{line}"
    );
    let saves = run.execs_of(|p| p == "iptables-nft-save");
    assert_eq!(saves.len(), 2, "{}", run.describe());
}

/// A namespace also holding a foreign rule with a comment: the re-run reads it with one
/// iptables-save, changes nothing, and keeps the foreign rule.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_rerun_over_a_foreign_commented_rule_changes_nothing_and_keeps_it() {
    if skip_unless_root("a_rerun_over_a_foreign_commented_rule_changes_nothing_and_keeps_it") {
        return;
    }
    let ns = seed_again_after(
        "iptables-nft -t filter -A INPUT -m comment --comment keep -j ACCEPT",
        Fail::Nothing,
    );
    let ctx = ns.context();
    ns.run_rc("first", 0);
    let second = ns.run_rc("second", 0);
    assert!(
        ns.state("before").get("v4-nft").contains("--comment keep"),
        "{ctx}"
    );
    assert_same(
        "re-run over a comment",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
    assert!(
        second.logs().contains("already in place"),
        "{}",
        second.describe()
    );
    let programs = second.execs_of(|_| true);
    assert!(
        programs.len() == 1 && programs[0].starts_with("iptables-nft-save"),
        "one save and nothing else, ran {programs:?}\n{}",
        second.describe()
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn tproxy_with_ipv6_twice_has_one_rule_route_and_address() {
    if skip_unless_root("tproxy_with_ipv6_twice_has_one_rule_route_and_address") {
        return;
    }
    let args = &["-m", "TPROXY", "-b", "*"];
    let ns = Script::new()
        .shims(Fail::Nothing)
        .run("first", V6, args)
        .snap("first")
        .run("second", V6, args)
        .snap("second")
        .exec();
    let ctx = ns.context();
    ns.run_rc("first", 0);
    let second = ns.run_rc("second", 0);
    let (a, b) = (ns.state("first"), ns.state("second"));
    assert_same("second TPROXY + IPv6 run", &a, &b, &ctx);
    for (part, what) in [
        ("rule4", "fwmark 0x539 lookup 133"),
        ("rule6", "fwmark 0x539 lookup 133"),
        ("route4", "local default dev lo table 133"),
        ("route6", "local default dev lo table 133"),
        ("addr6-lo", "inet6 ::6/128"),
    ] {
        assert_eq!(
            count_lines(b.get(part), what),
            1,
            "[{part}] should have exactly one `{what}`\n{}",
            b.describe()
        );
    }
    assert!(
        b.get("v4-nft").contains("TPROXY") && b.get("v6-nft").contains("TPROXY"),
        "{}",
        b.describe()
    );
    for family in ["IPv4", "IPv6"] {
        assert!(
            second
                .logs()
                .contains(&format!("{family} rules are already in place")),
            "the second run should say the {family} rules are already in place\n{}",
            second.describe()
        );
    }
    let changes = second.execs_of(|p| p.ends_with("-restore") || p == "nft");
    let ip_changes: Vec<&str> = second
        .execs_of(|p| p == "ip")
        .into_iter()
        .filter(|l| !l.contains(" show"))
        .collect();
    assert!(
        changes.is_empty() && ip_changes.is_empty(),
        "the second run must change nothing, ran {changes:?} {ip_changes:?}\n{}",
        second.describe()
    );
}
