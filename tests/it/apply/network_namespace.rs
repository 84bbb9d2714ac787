//! `--network-namespace`.

use super::*;

/// Without ENABLE_INBOUND_IPV6, IPv6 is detected from the addresses of the namespace the rules
/// go into, not from the caller's: an IPv6-only pod gets ip6tables rules even when the caller
/// has no IPv6 address.
#[test]
#[ignore = "needs root and network namespaces"]
fn network_namespace_ipv6_is_detected_inside() {
    if skip_unless_root("network_namespace_ipv6_is_detected_inside") {
        return;
    }
    let no_override: &[(&str, &str)] = &[];
    let ns = Script::new()
        .sh("ip netns add inner")
        .sh("ip link add v0 type veth peer name v1")
        .sh("ip link set v1 netns inner")
        .sh("ip link set v0 up")
        .sh("ip netns exec inner ip link set lo up")
        .sh("ip netns exec inner ip link set v1 up")
        .sh("ip netns exec inner ip -6 addr add fd00:77::1/64 dev v1 nodad")
        .run(
            "apply",
            no_override,
            &cat(SEED, &["--network-namespace", "/run/netns/inner"]),
        )
        .sh("ip netns exec inner ip6tables-nft-save > \"$NS_OUT/inner.v6\"")
        .sh("ip6tables-nft-save > \"$NS_OUT/outer.v6\"")
        .exec();
    ns.run_rc("apply", 0);
    let inner = ns.out.file("inner.v6").unwrap_or_default().to_string();
    let outer = ns.out.file("outer.v6").unwrap_or_default().to_string();
    assert!(
        inner.contains("-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN"),
        "the IPv6-only inner namespace should get IPv6 rules:\n{inner}\n{}",
        ns.context()
    );
    assert!(
        !outer.contains("ISTIO"),
        "the caller's namespace must stay untouched:\n{outer}"
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn network_namespace_applies_inside_and_leaves_the_caller_alone() {
    if skip_unless_root("network_namespace_applies_inside_and_leaves_the_caller_alone") {
        return;
    }
    let have_legacy = real_program("iptables-legacy").is_some();
    // The outer namespace (the test's) has foreign nft rules and, if possible, legacy tables:
    // detection must look at the inner namespace, which has none.
    let mut outer_setup = foreign_rules("iptables-nft");
    if have_legacy {
        outer_setup.push_str("iptables-legacy -t filter -A INPUT -j ACCEPT\n");
    }
    let inner_snap = r#"isnap() {
    ip netns exec inner iptables-nft-save > "$NS_OUT/$1.v4-nft"
    ip netns exec inner ip6tables-nft-save > "$NS_OUT/$1.v6-nft"
    ip netns exec inner cat /proc/net/ip_tables_names > "$NS_OUT/$1.legacy-names4" 2>/dev/null || : > "$NS_OUT/$1.legacy-names4"
    ip netns exec inner ip -4 rule > "$NS_OUT/$1.rule4"
    ip netns exec inner ip -6 rule > "$NS_OUT/$1.rule6"
    ip netns exec inner ip -6 addr show dev lo > "$NS_OUT/$1.addr6-lo"
    ip netns exec inner nft list ruleset inet > "$NS_OUT/$1.nft-inet"
}"#;
    let tproxy = ["-m", "TPROXY", "-b", "*"];
    let ns_arg = ["--network-namespace", "/run/netns/inner"];
    let ns = Script::new()
        .sh(&outer_setup)
        .sh(inner_snap)
        .sh("ip netns add inner")
        .sh("ip netns exec inner ip link set lo up")
        .snap("outer-before")
        .run("seed", V4, &cat(SEED, &ns_arg))
        .snap("outer-after-seed")
        .sh("isnap inner-seed")
        .run("tproxy", V6, &cat(&tproxy, &ns_arg))
        .snap("outer-after-tproxy")
        .sh("isnap inner-tproxy")
        .run(
            "cleanup",
            V6,
            &cat(&tproxy, &cat(&ns_arg, &["--cleanup-only"])),
        )
        .snap("outer-after-cleanup")
        .sh("isnap inner-cleaned")
        .exec();
    let ctx = ns.context();
    let seed = ns.run_rc("seed", 0);
    ns.run_rc("tproxy", 0);
    ns.run_rc("cleanup", 0);
    assert!(
        seed.logs().contains("iptables-nft-restore")
            && seed.logs().contains("no legacy rules in this namespace"),
        "detection must look at the target namespace, which has no legacy tables\n{}",
        seed.describe()
    );
    let outer = ns.state("outer-before");
    for after in [
        "outer-after-seed",
        "outer-after-tproxy",
        "outer-after-cleanup",
    ] {
        assert_same(
            "the caller's namespace must not change",
            &outer,
            &ns.state(after),
            &ctx,
        );
    }
    let fresh = fresh_state(V4, SEED);
    let inner = ns.file("inner-seed.v4-nft");
    if let Some(d) = compare_lines(
        "fresh apply",
        &normalize_save(fresh.get("v4-nft"))
            .lines()
            .collect::<Vec<_>>(),
        "inner namespace",
        &normalize_save(inner).lines().collect::<Vec<_>>(),
    ) {
        panic!("the inner namespace should hold the seed rules\n{d}\n{ctx}");
    }
    for (file, what) in [
        ("inner-tproxy.v4-nft", "TPROXY"),
        ("inner-tproxy.v6-nft", "TPROXY"),
        ("inner-tproxy.rule4", "lookup 133"),
        ("inner-tproxy.rule6", "lookup 133"),
        ("inner-tproxy.addr6-lo", "::6/128"),
    ] {
        assert!(
            ns.file(file).contains(what),
            "{file} should contain `{what}`:\n{}\n{ctx}",
            ns.file(file)
        );
    }
    assert_eq!(
        normalize_save(ns.file("inner-cleaned.legacy-names4")),
        "",
        "cleanup inside the namespace leaves no legacy table\n{ctx}"
    );
    for file in ["inner-cleaned.v4-nft", "inner-cleaned.v6-nft"] {
        // Nothing of ours but TPROXY's mark rules, which nothing proves ours (kept, named).
        let left = normalize_save(ns.file(file));
        assert!(
            !left.contains("ISTIO_")
                && left
                    .lines()
                    .filter(|l| l.starts_with("-A"))
                    .all(|l| l.contains("mark")),
            "{file}: cleanup inside the namespace leaves only the kept mark rules\n{left}\n{ctx}"
        );
    }
    for (file, what) in [
        ("inner-cleaned.rule4", "lookup 133"),
        ("inner-cleaned.rule6", "lookup 133"),
        ("inner-cleaned.addr6-lo", "::6/128"),
    ] {
        assert!(
            !ns.file(file).contains(what),
            "{file} should not contain `{what}`:\n{}",
            ns.file(file)
        );
    }
}
