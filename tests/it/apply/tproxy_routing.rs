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

/// A routing step the kernel refuses (a conflicting IPv6 route in table 133) in a
/// reconfigure that already removed the earlier config's routing (another mark and table)
/// and added the IPv4 route: everything comes back, the earlier routes before the rules that
/// look them up, the rules at their priorities.
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
    let setup = format!(
        "{setup}ip -4 rule add priority 100 fwmark 1500 lookup 140\n{}",
        conflicting_route("-6")
    );
    let run = assert_rollback(&setup, Fail::Nothing, V6, &seed_with("-m", "TPROXY"));
    let line = run.one_error();
    assert!(
        line.starts_with(
            "configuring routes: `ip -6 route add local default dev lo table 133`: over \
             rtnetlink: the kernel refused it: File exists"
        ) && line.contains("(IPv4, IPv6, routes; checked by re-reading the kernel)"),
        "{line}\n{}",
        run.describe()
    );
    // The rollback put the earlier routing back, route first, over netlink.
    let logs = run.logs();
    let back = |what: &str| {
        logs.find(&format!("rolling back\tcommand=ip {what}"))
            .unwrap_or_else(|| panic!("no rollback of {what}\n{}", run.describe()))
    };
    assert!(
        back("-4 route add local default dev lo table 140")
            < back("-4 rule add priority 100 fwmark 1500 lookup 140"),
        "{}",
        run.describe()
    );
    assert!(run.execs_of(|p| p == "ip").is_empty(), "{}", run.describe());
}

/// IPv6 turned off on lo (so `::6` cannot be added) after both families committed and the
/// earlier config's routing was removed: everything is restored, the re-read says so, the
/// message names the `::6` step; no rule is left into an empty table, and once IPv6 is back
/// one run ends in the clean state.
#[test]
#[ignore = "needs root and network namespaces"]
fn ipv6_disabled_on_lo_fails_at_the_address_and_restores_everything() {
    if skip_unless_root("ipv6_disabled_on_lo_fails_at_the_address_and_restores_everything") {
        return;
    }
    let tproxy = seed_with("-m", "TPROXY");
    // (the earlier config, IPv4 only; what the failed run changed, and so restored)
    for (earlier, restored) in [
        // Its IPv4 rules and routing were replaced, the IPv6 rules added.
        (tproxy_1400(), "(IPv4, IPv6, routes;"),
        // The same config with IPv4 only: just the IPv6 rules were added.
        (tproxy.clone(), "(IPv6;"),
        (SEED.to_vec(), "(IPv4, IPv6;"),
    ] {
        let env = V4;
        let ns = Script::new()
            .run("earlier", env, &earlier)
            .sh("sysctl -qw net.ipv6.conf.lo.disable_ipv6=1")
            .snap("before")
            .shims(Fail::Nothing)
            .run("failing", V6, &tproxy)
            .snap("after")
            .sh("sysctl -qw net.ipv6.conf.lo.disable_ipv6=0")
            .run("repair", V6, &tproxy)
            .snap("repaired")
            .exec();
        let ctx = ns.context();
        ns.run_rc("earlier", 0);
        let run = ns.run_rc("failing", 1);
        assert_same(
            "a failed apply must leave everything as it was",
            &ns.state("before"),
            &ns.state("after"),
            &ctx,
        );
        let line = run.one_error();
        assert!(
            line.starts_with(
                "configuring routes: `ip -6 addr add ::6/128 dev lo`: over rtnetlink: the \
                 kernel refused it: Permission denied"
            ) && line.contains(&format!("the previous state was restored {restored}"))
                && !line.contains("ROLLBACK FAILED"),
            "{line}\n{}",
            run.describe()
        );
        assert!(run.execs_of(|p| p == "ip").is_empty(), "{}", run.describe());
        ns.run_rc("repair", 0);
        let mut repaired = ns.state("repaired").without_kept(&ns.run("repair").logs());
        repaired.label = format!("after {earlier:?}, a failed run, then one run");
        assert_same(
            "one run after the failed one ends in the clean state",
            &fresh_state(V6, &tproxy).without_empty_tables(),
            &repaired,
            &ctx,
        );
    }
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

/// Every `lookup N` rule of `state` (N a number, not main/local/default) looks up a table
/// that holds a route: no rule into an empty table.
fn assert_no_rule_into_an_empty_table(state: &State) {
    for (rules, routes) in [("rule4", "route4"), ("rule6", "route6")] {
        for line in state.get(rules).lines() {
            let Some(table) = line.rsplit_once(" lookup ").map(|(_, t)| t.trim()) else {
                continue;
            };
            if table.parse::<u32>().is_err() {
                continue;
            }
            assert!(
                state
                    .get(routes)
                    .lines()
                    .any(|l| l.contains(&format!(" table {table} "))),
                "`{line}` looks up table {table}, which holds no route\n{}",
                state.describe()
            );
        }
    }
}

/// The iptables programs alone, no `ip` and no `nft`.
fn iptables_programs() -> Vec<String> {
    shimmed_programs()
        .into_iter()
        .filter(|p| p.starts_with("iptables") || p.starts_with("ip6tables"))
        .collect()
}

/// TPROXY dual-stack with a PATH of the iptables programs only: the routing and `::6` are
/// made in process (the strace log shows no `ip`), and the kernel ends up holding what a full
/// PATH gives, and what Istio's `ip` commands (the dry-run script, run with sh) give.
#[test]
#[ignore = "needs root and network namespaces"]
fn tproxy_dual_stack_with_only_the_iptables_programs_runs_no_ip() {
    let test = "tproxy_dual_stack_with_only_the_iptables_programs_runs_no_ip";
    if skip_unless_root(test) || skip_unless_installed(test, &["strace"]) {
        return;
    }
    let tproxy = seed_with("-m", "TPROXY");
    let programs = iptables_programs();
    let programs: Vec<&str> = programs.iter().map(String::as_str).collect();
    let detail = |label: &str| {
        format!(
            "{{ ip -d -4 rule; ip -d -6 rule; ip -d -4 route show table 133; \
             ip -d -6 route show table 133; ip -d -6 addr show dev lo; }} > \"$NS_OUT/{label}.detail\""
        )
    };
    let ns = Script::new()
        .only_programs(&programs)
        .run_traced("apply", V6, &tproxy, Some("execve"))
        .snap("applied")
        .sh(&detail("applied"))
        .run("verify", V6, &cat(&["verify"], &tproxy))
        .exec();
    let ctx = ns.context();
    let run = ns.run_rc("apply", 0);
    let mut execs = strace_execs(ns.file("apply.strace"));
    assert!(
        !execs.is_empty() && execs[0].0.ends_with("istio-iptables"),
        "the first execve should be the binary\n{}",
        ns.file("apply.strace")
    );
    execs.remove(0);
    let names: Vec<&str> = execs
        .iter()
        .map(|(p, _)| p.rsplit('/').next().unwrap_or(p))
        .collect();
    assert!(
        !names.is_empty() && names.iter().all(|n| programs.contains(n)),
        "only iptables programs may run: {names:?}\n{}",
        run.describe()
    );
    ns.run_rc("verify", 0);
    let applied = ns.state("applied");
    assert!(
        applied.get("rule4").contains("fwmark 0x539 lookup 133")
            && applied.get("rule6").contains("fwmark 0x539 lookup 133")
            && applied
                .get("route6")
                .contains("local default dev lo table 133")
            && applied.get("addr6-lo").contains("inet6 ::6/128"),
        "{}",
        applied.describe()
    );
    assert_same(
        "only the iptables programs in PATH, against a full PATH",
        &fresh_state(V6, &tproxy),
        &applied,
        &ctx,
    );
    // What `ip` makes of the same steps: Istio's commands, from our dry-run script.
    let mut words = vec![
        format!("PATH={}", sane_path()),
        "ENABLE_INBOUND_IPV6=true".into(),
        BIN.into(),
        "--dry-run".into(),
    ];
    words.extend(tproxy.iter().map(|a| a.to_string()));
    let scripted = Script::new()
        .sh(&format!(
            "env -i {} > \"$NS_TMP/dry.sh\"\nsh -e \"$NS_TMP/dry.sh\" >/dev/null",
            shell_command(&words)
        ))
        .snap("scripted")
        .sh(&detail("scripted"))
        .exec();
    let routing = ["rule4", "rule6", "route4", "route6", "addr6-lo"];
    assert_same(
        "netlink against `ip`",
        &scripted.state("scripted").only(&routing),
        &applied.only(&routing),
        &ctx,
    );
    assert_eq!(
        scripted.file("scripted.detail"),
        ns.file("applied.detail"),
        "`ip -d` shows the same rules, routes and address"
    );
}

/// A `fwmark` rule of our mark (or into our table) into a table with no route, what an older
/// rollback left: verify reports it, the next run removes it; foreign rules stay.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_rule_of_our_mark_into_an_empty_table_is_drift_and_the_next_run_removes_it() {
    let test = "a_rule_of_our_mark_into_an_empty_table_is_drift_and_the_next_run_removes_it";
    if skip_unless_root(test) {
        return;
    }
    let tproxy = seed_with("-m", "TPROXY");
    let verify = |a: &[&'static str]| cat(&["verify"], a);
    // (config, planted, the leftovers verify must name)
    let cases: [(Vec<&str>, &str, Vec<&str>); 2] = [
        (
            SEED.to_vec(),
            "ip -4 rule add fwmark 1337 lookup 133; ip -6 rule add fwmark 1337 lookup 133",
            vec![
                "ip -4 rule add fwmark 1337 lookup 133",
                "ip -6 rule add fwmark 1337 lookup 133",
            ],
        ),
        (
            tproxy.clone(),
            "ip -4 rule add fwmark 1337 lookup 134; ip -4 rule add fwmark 5 lookup 133",
            vec![
                "ip -4 rule add fwmark 1337 lookup 134",
                "ip -4 rule add fwmark 5 lookup 133",
            ],
        ),
    ];
    let foreign = "ip -4 rule add fwmark 9 lookup 300; ip -4 rule add fwmark 1337 lookup main";
    for (config, planted, named) in &cases {
        let ns = Script::new()
            .sh(foreign)
            .run("apply", V6, config)
            .snap("clean")
            .sh(planted)
            .run("verify-drift", V6, &verify(config))
            .run("repair", V6, config)
            .snap("repaired")
            .run("verify-ok", V6, &verify(config))
            .exec();
        let ctx = ns.context();
        ns.run_rc("apply", 0);
        let drift = ns.run_rc("verify-drift", 3);
        for leftover in named {
            assert!(
                drift.stdout.contains(&format!(
                    "routes: not wanted, left by an earlier run `{leftover}`"
                )),
                "verify should report {leftover}\n{}",
                drift.describe()
            );
        }
        assert!(
            !drift.stdout.contains("fwmark 9 lookup 300") && !drift.stdout.contains("lookup 254"),
            "foreign rules are not ours\n{}",
            drift.describe()
        );
        let repair = ns.run_rc("repair", 0);
        assert!(
            repair
                .logs()
                .contains("removing routing left by an earlier TPROXY config")
        );
        ns.run_rc("verify-ok", 0);
        assert_same(
            "the next run removes the planted rules, and only them",
            &ns.state("clean"),
            &ns.state("repaired"),
            &ctx,
        );
    }
}

/// TPROXY -> REDIRECT, and a change of mark and table, leave no rule into an empty table:
/// after the run, and after a run that failed for real past the removal of the earlier
/// routing (the kernel refused a route, or `::6`), and after its repair.
#[test]
#[ignore = "needs root and network namespaces"]
fn mode_and_mark_changes_leave_no_rule_into_an_empty_table() {
    if skip_unless_root("mode_and_mark_changes_leave_no_rule_into_an_empty_table") {
        return;
    }
    let tproxy = seed_with("-m", "TPROXY");
    // (from, its env, to, the fault and its undoing)
    let cases = [
        (
            tproxy.clone(),
            V4,
            SEED.to_vec(),
            "sysctl -qw net.ipv6.conf.lo.disable_ipv6=1".to_string(),
            "sysctl -qw net.ipv6.conf.lo.disable_ipv6=0",
        ),
        (
            tproxy_1400(),
            V6,
            tproxy.clone(),
            conflicting_route("-6"),
            "ip link del d0",
        ),
        (
            tproxy.clone(),
            V6,
            tproxy_1400(),
            conflicting_route_in("-6", 140),
            "ip link del d0",
        ),
    ];
    for (from, from_env, to, fault, undo) in &cases {
        let ns = Script::new()
            .run("from", from_env, from)
            .run("to", V6, to)
            .snap("to")
            .run("back", from_env, from)
            .sh(fault)
            .snap("before")
            .run("failing", V6, to)
            .snap("after")
            .sh(undo)
            .run("repair", V6, to)
            .snap("repaired")
            .exec();
        let ctx = ns.context();
        for label in ["from", "to", "back", "repair"] {
            ns.run_rc(label, 0);
        }
        let failing = ns.run_rc("failing", 1);
        let line = failing.one_error();
        assert!(
            line.starts_with("configuring routes: `ip -6 ")
                && line.contains("the previous state was restored (IPv4, IPv6, routes;"),
            "{line}\n{}",
            failing.describe()
        );
        for label in ["to", "after", "repaired"] {
            assert_no_rule_into_an_empty_table(&ns.state(label));
        }
        assert_same(
            "a failed run leaves everything as it was",
            &ns.state("before"),
            &ns.state("after"),
            &ctx,
        );
        assert_same(
            "the repair ends where the first run did",
            &ns.state("to").without_kept(&ns.run("to").logs()),
            &ns.state("repaired").without_kept(&ns.run("repair").logs()),
            &ctx,
        );
    }
}

/// With only the iptables programs in PATH (no `ip`, no `nft`), a failure at `::6` after
/// both families committed puts everything back, the tables this run created included
/// (dropped over netlink): the message says restored, and the kernel shows it.
#[test]
#[ignore = "needs root and network namespaces"]
fn with_only_the_iptables_programs_a_failed_run_drops_the_tables_it_created() {
    if skip_unless_root("with_only_the_iptables_programs_a_failed_run_drops_the_tables_it_created")
    {
        return;
    }
    let tproxy = seed_with("-m", "TPROXY");
    let programs = iptables_programs();
    let programs: Vec<&str> = programs.iter().map(String::as_str).collect();
    let ns = Script::new()
        .sh("sysctl -qw net.ipv6.conf.lo.disable_ipv6=1")
        .snap("before")
        .only_programs(&programs)
        .run("failing", V6, &tproxy)
        .snap("after")
        .exec();
    let ctx = ns.context();
    let run = ns.run_rc("failing", 1);
    let line = run.one_error();
    assert!(
        line.contains("`ip -6 addr add ::6/128 dev lo`")
            && line.contains("the previous state was restored")
            && !line.contains("ROLLBACK FAILED"),
        "{line}\n{}",
        run.describe()
    );
    assert_same(
        "a failed fresh apply leaves no table behind",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
}
