//! Only our own state is touched.

use super::table_rollback::TproxyDns;
use super::*;

/// A foreign rule of the shape of our exclude-interface rules, alone, survives a first apply
/// and an identical second run commits nothing and deletes nothing.
#[test]
#[ignore = "needs root and network namespaces"]
fn an_identical_rerun_keeps_a_foreign_rule_of_our_shape() {
    if skip_unless_root("an_identical_rerun_keeps_a_foreign_rule_of_our_shape") {
        return;
    }
    let tproxy = seed_with("-m", "TPROXY");
    for foreign in [
        "iptables-nft -t nat -A PREROUTING -i eth9 -j RETURN",
        "iptables-nft -t nat -A OUTPUT -o eth9 -j RETURN",
        "iptables-nft -t mangle -A PREROUTING -i eth9 -j RETURN",
    ] {
        for args in [SEED, &tproxy] {
            let ns = Script::new()
                .sh(foreign)
                .shims(Fail::Nothing)
                .run("first", V4, args)
                .snap("first")
                .run("second", V4, args)
                .snap("second")
                .exec();
            let ctx = ns.context();
            ns.run_rc("first", 0);
            let second = ns.run_rc("second", 0);
            let first = ns.state("first");
            let rule = foreign.split_once(" -A ").unwrap().1;
            assert!(
                first.get("v4-nft").contains(&format!("-A {rule}")),
                "the first run must keep the foreign `{rule}`\n{}\n{ctx}",
                first.describe()
            );
            assert_same(
                "an identical second run must change nothing",
                &first,
                &ns.state("second"),
                &ctx,
            );
            let changes = second.execs_of(|p| p.ends_with("-restore") || p == "nft");
            assert!(
                changes.is_empty(),
                "the second run must commit nothing, ran {changes:?}\n{}",
                second.describe()
            );
        }
    }
}

/// kube-proxy's and Docker's chains and jumps, in nat, filter, mangle and raw.
fn kube_and_docker_rules(tool: &str) -> String {
    [
        "-t nat -N KUBE-SERVICES",
        "-t nat -N DOCKER",
        "-t nat -A PREROUTING -m comment --comment kubernetes-service-portals -j KUBE-SERVICES",
        "-t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
        "-t nat -A OUTPUT -m comment --comment kubernetes-service-portals -j KUBE-SERVICES",
        "-t nat -A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER",
        "-t nat -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE",
        "-t nat -A DOCKER -i docker0 -j RETURN",
        "-t nat -A KUBE-SERVICES -d 10.96.0.1/32 -p tcp --dport 443 -j RETURN",
        "-t filter -N DOCKER-USER",
        "-t filter -A FORWARD -j DOCKER-USER",
        "-t mangle -N KUBE-KUBELET-CANARY",
        "-t mangle -A PREROUTING -j KUBE-KUBELET-CANARY",
        "-t mangle -A OUTPUT -p udp --dport 4789 -j RETURN",
        "-t raw -A PREROUTING -p udp --dport 4789 -j NOTRACK",
        "-t raw -A OUTPUT -p udp --sport 4789 -j NOTRACK",
    ]
    .iter()
    .map(|r| {
        let r = if tool.starts_with("ip6") {
            r.replace("172.17.0.0/16", "fd17::/64")
                .replace("127.0.0.0/8", "::1/128")
                .replace("10.96.0.1/32", "fd96::1/128")
        } else {
            r.to_string()
        };
        format!("{tool} {r}\n")
    })
    .collect()
}

/// The `-A`/`:` lines of `before` appear in `after`, each once, in the same order.
fn assert_foreign_in_place(what: &str, before: &str, after: &str) {
    let foreign: Vec<&str> = before
        .lines()
        .filter(|l| l.starts_with("-A ") || (l.starts_with(':') && l.ends_with(" -")))
        .collect();
    let kept: Vec<&str> = after.lines().filter(|l| foreign.contains(l)).collect();
    if let Some(d) = compare_lines("foreign rules before", &foreign, what, &kept) {
        panic!("{what}: other tools' chains and rules must stay, in order\n{d}\n{after}");
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn other_tools_chains_stay_in_place_through_apply_reconfigure_and_cleanup() {
    if skip_unless_root("other_tools_chains_stay_in_place_through_apply_reconfigure_and_cleanup") {
        return;
    }
    let cfg = TproxyDns::new();
    let tproxy_dns = cfg.args();
    let redirect_dns = cat(SEED, &["--redirect-dns", "--resolv-conf", &cfg.resolv]);
    let steps: [(&str, Vec<&str>); 5] = [
        ("redirect-dns", redirect_dns.clone()),
        ("tproxy-dns", tproxy_dns.clone()),
        ("redirect", SEED.to_vec()),
        ("tproxy", seed_with("-m", "TPROXY")),
        ("cleanup", vec!["--cleanup-only"]),
    ];
    let mut script = Script::new()
        .sh(&kube_and_docker_rules("iptables-nft"))
        .sh(&kube_and_docker_rules("ip6tables-nft"))
        .snap("before");
    for (label, args) in &steps {
        script = script.run(label, V6, args).snap(label);
    }
    let ns = script.exec();
    let ctx = ns.context();
    let before = ns.state("before");
    for (label, _) in &steps {
        ns.run_rc(label, 0);
        let st = ns.state(label);
        for part in ["v4-nft", "v6-nft"] {
            assert_foreign_in_place(
                &format!("[{part}] after `{label}`\n{ctx}"),
                before.get(part),
                st.get(part),
            );
        }
    }
    // But for our rules of the shape anyone may write (kept, and named by the run).
    let cleanup = ns.run_rc("cleanup", 0).logs();
    assert_same(
        "cleanup must return to exactly the other tools' state",
        &before.without_empty_tables(),
        &ns.state("cleanup").without_kept(&cleanup),
        &ctx,
    );
}
