//! TPROXY routing: exact values, no leftovers.

use super::changed_config::assert_transition;
use super::cleanup::assert_cleanup_restores;
use super::rollback::assert_rollback;
use super::table_rollback::TproxyDns;
use super::*;

/// TPROXY with mark 1400 (0x578) and route table 140.
fn tproxy_1400() -> Vec<&'static str> {
    cat(&seed_with("-m", "TPROXY"), &["-t", "1400", "-r", "140"])
}

#[test]
#[ignore = "needs root and network namespaces"]
fn dangerous_tproxy_values_are_refused_before_anything_runs() {
    if skip_unless_root("dangerous_tproxy_values_are_refused_before_anything_runs") {
        return;
    }
    /// (label, extra env, args, the flag or env var the error must name)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<&'a str>, &'a str);
    let cases: [Case; 5] = [
        (
            "t0",
            vec![],
            cat(&seed_with("-m", "TPROXY"), &["-t", "0"]),
            "--istio-inbound-tproxy-mark",
        ),
        (
            "r254",
            vec![],
            cat(&seed_with("-m", "TPROXY"), &["-r", "254"]),
            "--istio-inbound-tproxy-route-table",
        ),
        (
            "r255",
            vec![],
            cat(&seed_with("-m", "TPROXY"), &["-r", "255"]),
            "--istio-inbound-tproxy-route-table",
        ),
        (
            "env-mark",
            vec![("ISTIO_INBOUND_TPROXY_MARK", "0")],
            seed_with("-m", "TPROXY"),
            "ISTIO_INBOUND_TPROXY_MARK",
        ),
        (
            "env-table",
            vec![("ISTIO_INBOUND_TPROXY_ROUTE_TABLE", "253")],
            seed_with("-m", "TPROXY"),
            "ISTIO_INBOUND_TPROXY_ROUTE_TABLE",
        ),
    ];
    let mut script = Script::new().snap("before").shims(Fail::Nothing);
    for (label, env, args, _) in &cases {
        let mut env = env.clone();
        env.push(("ENABLE_INBOUND_IPV6", "true"));
        script = script.run(label, &env, args);
    }
    let ns = script.snap("after").exec();
    let ctx = ns.context();
    for (label, env, _, flag) in &cases {
        let run = ns.run_rc(label, 2);
        let lines = run.error_lines();
        let value = env
            .first()
            .map(|(_, v)| *v)
            .unwrap_or_else(|| label.trim_start_matches(['t', 'r']));
        assert!(
            lines.len() == 1
                && lines[0].contains(flag)
                && lines[0].contains(&format!("\"{value}\"")),
            "one line naming {flag} and {value:?}\n{}",
            run.describe()
        );
        assert!(run.execs.is_empty(), "nothing may run\n{}", run.describe());
    }
    assert_same(
        "refused values change nothing",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn tproxy_with_another_mark_and_table_then_redirect_leaves_no_routing() {
    if skip_unless_root("tproxy_with_another_mark_and_table_then_redirect_leaves_no_routing") {
        return;
    }
    assert_transition(V6, &tproxy_1400(), SEED, PARTS);
    assert_transition(V6, &tproxy_1400(), &seed_with("-m", "TPROXY"), PARTS);
    assert_transition(V6, &seed_with("-m", "TPROXY"), &tproxy_1400(), PARTS);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn cleanup_removes_tproxy_routing_of_any_mark_and_table() {
    if skip_unless_root("cleanup_removes_tproxy_routing_of_any_mark_and_table") {
        return;
    }
    let ns = assert_cleanup_restores(
        &foreign_rules("iptables-nft"),
        V6,
        &tproxy_1400(),
        &["--cleanup-only"],
    );
    let applied = ns.state("applied");
    assert!(
        applied.get("rule4").contains("fwmark 0x578 lookup 140")
            && applied
                .get("route6")
                .contains("local default dev lo table 140"),
        "{}",
        applied.describe()
    );
}

/// Leftover routing (another mark and table, and a duplicate of ours) is drift for verify,
/// and one apply removes it.
#[test]
#[ignore = "needs root and network namespaces"]
fn leftover_tproxy_routing_is_drift_and_the_next_apply_removes_it() {
    if skip_unless_root("leftover_tproxy_routing_is_drift_and_the_next_apply_removes_it") {
        return;
    }
    let tproxy = seed_with("-m", "TPROXY");
    let verify = |a: &[&'static str]| cat(&["verify"], a);
    let ns = Script::new()
        .run("apply", V6, &tproxy)
        .sh("ip -4 rule add fwmark 1400 lookup 140; ip -4 route add local default dev lo table 140")
        .sh("ip -6 rule add fwmark 1337 lookup 133")
        .run("verify-drift", V6, &verify(&tproxy))
        .run("repair", V6, &tproxy)
        .snap("repaired")
        .run("verify-ok", V6, &verify(&tproxy))
        .exec();
    let ctx = ns.context();
    ns.run_rc("apply", 0);
    let drift = ns.run_rc("verify-drift", 3);
    for leftover in [
        "routes: not wanted, left by an earlier run `ip -4 rule add fwmark 1400 lookup 140`",
        "routes: not wanted, left by an earlier run `ip -4 route add local default dev lo table 140`",
        "routes: not wanted, left by an earlier run `ip -6 rule add fwmark 1337 lookup 133`",
    ] {
        assert!(
            drift.stdout.contains(leftover),
            "verify should report {leftover}\n{}",
            drift.describe()
        );
    }
    ns.run_rc("repair", 0);
    ns.run_rc("verify-ok", 0);
    let fresh = fresh_state(V6, &tproxy);
    assert_same(
        "one apply removes leftover routing",
        &fresh,
        &ns.state("repaired"),
        &ctx,
    );
}

/// Deterministic pseudo-random delays (seeded from the clock, printed on failure).
fn kill_delays(n: usize, max_us: u64) -> (u64, Vec<u64>) {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    let mut x = seed;
    let mut v: Vec<u64> = (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Spread over the whole run, plus jitter.
            (max_us * i as u64 / n as u64) + x % (max_us / n as u64 + 1)
        })
        .collect();
    v.sort();
    (seed, v)
}

/// SIGKILL at random moments of a TPROXY reconfigure (iptables commit, rollback, `ip`
/// steps); one more run of the target config always ends in its clean state.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_run_killed_at_any_moment_is_repaired_by_the_next() {
    if skip_unless_root("a_run_killed_at_any_moment_is_repaired_by_the_next") {
        return;
    }
    let from = tproxy_1400();
    let targets: [(&str, Vec<&str>); 2] = [
        ("redirect", SEED.to_vec()),
        ("tproxy", seed_with("-m", "TPROXY")),
    ];
    for (name, to) in &targets {
        let (seed, delays) = kill_delays(12, 120_000);
        let mut script = Script::new();
        for (i, us) in delays.iter().enumerate() {
            let mut words: Vec<String> = vec![
                format!("PATH={}", sane_path()),
                "ENABLE_INBOUND_IPV6=true".into(),
                BIN.into(),
            ];
            words.extend(to.iter().map(|a| a.to_string()));
            script = script
                .run(&format!("setup{i}"), V6, &from)
                .sh(&format!(
                    "set +x\nenv -i {} >/dev/null 2>&1 &\n__k=$!\nsleep {}.{:06}\nkill -9 $__k 2>/dev/null || true\nwait $__k || true\nset -x",
                    shell_command(&words),
                    us / 1_000_000,
                    us % 1_000_000
                ))
                .run(&format!("repair{i}"), V6, to)
                .snap(&format!("k{i}"));
        }
        let ns = script.exec();
        let ctx = ns.context();
        let fresh = fresh_state(V6, to);
        for (i, us) in delays.iter().enumerate() {
            ns.run_rc(&format!("setup{i}"), 0);
            let repair = ns.run_rc(&format!("repair{i}"), 0).logs();
            // The earlier config's rules of our shape stay (nothing proves them ours), named.
            let mut got = ns.state(&format!("k{i}")).without_kept(&repair);
            got.label = format!("killed after {us} us (seed {seed}), then one run of {name}");
            assert_same(
                "a run after a SIGKILL must end in the clean state",
                &fresh.without_empty_tables(),
                &got,
                &ctx,
            );
        }
    }
}

/// A failing `ip rule add` in a reconfigure that already removed the earlier config's
/// routing (another mark and table): everything comes back, routing included.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_failed_ip_step_in_a_tproxy_reconfigure_restores_the_earlier_routing() {
    if skip_unless_root("a_failed_ip_step_in_a_tproxy_reconfigure_restores_the_earlier_routing") {
        return;
    }
    let setup = format!(
        "{}env -i PATH={} ENABLE_INBOUND_IPV6=true {} 2>/dev/null\n",
        foreign_rules("iptables-nft"),
        shell_quote(sane_path()),
        shell_command(cat(&[BIN], &tproxy_1400()))
    );
    // A second rule into table 140 at an explicit priority: put back exactly there.
    let setup = format!("{setup}ip -4 rule add priority 100 fwmark 1500 lookup 140\n");
    let run = assert_rollback(
        &setup,
        Fail::IpRuleAddOf("fwmark 1337"),
        V6,
        &seed_with("-m", "TPROXY"),
    );
    let line = run.one_error();
    assert!(
        line.contains("configuring routes")
            && line.contains("rule add fwmark 1337 lookup 133")
            && line.contains("IPv4, IPv6, routes"),
        "{line}"
    );
    // When putting the earlier rules back fails too, the message says exactly that.
    let ns = Script::new()
        .sh(&setup)
        .shims(Fail::IpRuleAdd)
        .run("failing", V6, &seed_with("-m", "TPROXY"))
        .exec();
    let run = ns.run_rc("failing", 1);
    let line = run.one_error();
    assert!(
        line.contains("ROLLBACK FAILED")
            && line.contains("undoing the change to `ip -4 rule add fwmark 1400 lookup 140`")
            && line.contains("restored and checked by re-reading the kernel: IPv4, IPv6")
            && !line.contains("the previous state was restored"),
        "{line}"
    );
}

/// The same faults with the legacy backend, whose tables cannot be unloaded: a table the
/// failed run created stays, empty; everything else is exactly as before.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_refused_table_with_legacy_leaves_nothing_but_empty_tables() {
    let test = "a_refused_table_with_legacy_leaves_nothing_but_empty_tables";
    if skip_unless_root(test) || skip_unless_installed(test, &["iptables-legacy"]) {
        return;
    }
    let cfg = TproxyDns::new();
    let args = cat(&cfg.args(), &["--force-iptables-binary", "legacy"]);
    let earlier = cat(&[BIN], &seed_forcing("legacy"));
    let existing = format!(
        "{}env -i PATH={} ENABLE_INBOUND_IPV6=false {} 2>/dev/null\n",
        foreign_rules("iptables-legacy"),
        shell_quote(sane_path()),
        shell_command(&earlier)
    );
    let parts = [
        "v4-nft",
        "v6-nft",
        "v4-legacy",
        "rule4",
        "rule6",
        "route4",
        "route6",
        "addr6-lo",
    ];
    for setup in ["", existing.as_str()] {
        for n in 1..=3 {
            let ns = Script::new()
                .sh(setup)
                .snap("before")
                .shims(Fail::NthTable { ipv6: false, n })
                .run("failing", V4, &args)
                .snap("after")
                .exec();
            let ctx = ns.context();
            let run = ns.run_rc("failing", 1);
            assert_same(
                &format!("legacy, table {n} refused"),
                &ns.state("before").without_empty_tables().only(&parts),
                &ns.state("after").without_empty_tables().only(&parts),
                &ctx,
            );
            let line = run.one_error();
            assert!(
                (line.contains("the previous state was restored (IPv4;")
                    || (n == 1 && line.contains("nothing was changed")))
                    && !line.contains("ROLLBACK FAILED"),
                "{line}"
            );
        }
    }
}
