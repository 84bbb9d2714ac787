//! All or nothing.

use super::*;

/// Runs `args` with failing shims (after `setup`), expecting exit 1 and no change at all.
pub(super) fn assert_rollback(setup: &str, fail: Fail, env: &[(&str, &str)], args: &[&str]) -> Run {
    let ns = Script::new()
        .sh(setup)
        .snap("before")
        .shims(fail)
        .run("failing", env, args)
        .snap("after")
        .exec();
    let ctx = ns.context();
    let run = ns.run_rc("failing", 1);
    assert_same(
        "a failed apply must leave everything as it was",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
    let line = run.one_error();
    assert!(
        line.contains("the previous state was restored"),
        "the error should say the previous state was restored: {line}\n{}",
        run.describe()
    );
    run
}

/// A namespace with foreign rules in both families and an earlier Istio config (IPv6 on).
pub(super) fn existing_state_setup() -> String {
    let earlier = cat(&[BIN], &seed_with("-b", "8080"));
    // The ::6 address is `tentative` for a moment (DAD): wait, so that snapshots compare.
    format!(
        "{}{}env -i PATH={} ENABLE_INBOUND_IPV6=true {} 2>/dev/null\n\
         __i=0; while ip -6 addr show dev lo | grep -q tentative; do \
         __i=$((__i+1)); [ $__i -lt 500 ]; sleep 0.01; done\n",
        foreign_rules("iptables-nft"),
        foreign_rules("ip6tables-nft"),
        shell_quote(sane_path()),
        shell_command(&earlier)
    )
}

fn assert_ip6tables_failure_message(run: &Run) {
    let line = run.one_error();
    assert!(
        line.contains("committing IPv6 rules")
            && line.contains("ip6tables-nft-restore")
            && line.contains("line 3 failed")
            && line.contains("(IPv4; checked by re-reading the kernel)"),
        "the error should name the phase, the program, its message and what was restored: \
         {line}"
    );
    assert!(
        line.contains(" at `"),
        "the error should quote the rejected payload line (line 3): {line}"
    );
    let v6_restores = run.execs_of(|p| p.starts_with("ip6tables") && p.ends_with("restore"));
    assert_eq!(v6_restores.len(), 1, "{}", run.describe());
}

#[test]
#[ignore = "needs root and network namespaces"]
fn failed_ip6tables_restore_rolls_back_ipv4_in_a_fresh_namespace() {
    if skip_unless_root("failed_ip6tables_restore_rolls_back_ipv4_in_a_fresh_namespace") {
        return;
    }
    let run = assert_rollback("", Fail::Ip6tablesRestoreNoflush, V6, SEED);
    assert_ip6tables_failure_message(&run);
    let run = assert_rollback(
        "",
        Fail::Ip6tablesRestoreNoflush,
        V6,
        &["-m", "TPROXY", "-b", "*"],
    );
    assert_ip6tables_failure_message(&run);
    assert!(
        run.execs_of(|p| p == "ip")
            .iter()
            .all(|l| !l.contains(" add ")),
        "no ip change may happen after a failed commit\n{}",
        run.describe()
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn failed_ip6tables_restore_restores_existing_content() {
    if skip_unless_root("failed_ip6tables_restore_restores_existing_content") {
        return;
    }
    let run = assert_rollback(
        &existing_state_setup(),
        Fail::Ip6tablesRestoreNoflush,
        V6,
        &["-m", "TPROXY", "-b", "*", "-c", "eth9"],
    );
    assert_ip6tables_failure_message(&run);
}

/// A routing step the kernel refuses for real (a conflicting route in table 133) after both
/// families committed: the tables, the routing and `::6` come back, and the message names the
/// step and the kernel's answer.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_refused_route_rolls_back_tables_routes_and_address() {
    if skip_unless_root("a_refused_route_rolls_back_tables_routes_and_address") {
        return;
    }
    for (setup, added_v6) in [
        (conflicting_route("-4"), true),
        (
            format!("{}{}", existing_state_setup(), conflicting_route("-4")),
            false,
        ),
    ] {
        let run = assert_rollback(&setup, Fail::Nothing, V6, &["-m", "TPROXY", "-b", "*"]);
        let line = run.one_error();
        // `::6` was added first (and so taken back) only where it was not there yet.
        let restored = if added_v6 {
            "(IPv4, IPv6, routes; checked by re-reading the kernel)"
        } else {
            "(IPv4, IPv6; checked by re-reading the kernel)"
        };
        assert!(
            line.starts_with(
                "configuring routes: `ip -4 route add local default dev lo table 133`: over \
                 rtnetlink: the kernel refused it: File exists (os error 17); the previous state \
                 was restored"
            ) && line.contains(restored),
            "the error should name the step, the kernel's answer and what was restored: \
             {line}\n{}",
            run.describe()
        );
        assert!(run.execs_of(|p| p == "ip").is_empty(), "{}", run.describe());
    }
}
