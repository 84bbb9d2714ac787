//! Changed config.

use super::*;

/// Applies `from` then `to` in one namespace; the `parts` of the state must equal a fresh
/// apply of `to` but for the rules of our shape `to`'s run says it kept (an interface
/// RETURN, a TPROXY mark rule: nothing proves them ours), and applying `to` once more must
/// commit nothing. Returns the fresh state and the state after `to`, kept rules left out.
pub(super) fn assert_transition(
    env: &[(&str, &str)],
    from: &[&str],
    to: &[&str],
    parts: &[&str],
) -> (State, State) {
    let ns = Script::new()
        .run("from", env, from)
        .snap("from")
        .run("to", env, to)
        .snap("to")
        .run("again", env, to)
        .snap("again")
        .exec();
    let ctx = ns.context();
    ns.run_rc("from", 0);
    let run = ns.run_rc("to", 0);
    let again = ns.run_rc("again", 0);
    let fresh = fresh_state(env, to);
    let mut got = ns.state("to");
    got.label = format!("{} then {}", shell_command(from), shell_command(to));
    assert_same(
        "applying the new config again",
        &got,
        &ns.state("again"),
        &ctx,
    );
    let got = got.without_kept(&run.logs());
    assert_same(
        "a changed config must converge to a fresh apply",
        &fresh.without_empty_tables().only(parts),
        &got.only(parts),
        &ctx,
    );
    assert!(
        again.logs().contains("already in place"),
        "{}",
        again.describe()
    );
    (fresh, got)
}

#[test]
#[ignore = "needs root and network namespaces"]
fn all_inbound_ports_then_one_port_equals_fresh_apply() {
    if skip_unless_root("all_inbound_ports_then_one_port_equals_fresh_apply") {
        return;
    }
    assert_transition(V4, SEED, &seed_with("-b", "8080"), PARTS);
    assert_transition(V4, &seed_with("-b", "8080"), SEED, PARTS);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn tproxy_then_redirect_equals_fresh_redirect() {
    if skip_unless_root("tproxy_then_redirect_equals_fresh_redirect") {
        return;
    }
    let (_, got) = assert_transition(V4, &["-m", "TPROXY", "-b", "8080"], &["-b", "8080"], TABLES);
    assert!(
        !got.get("v4-nft").contains("*mangle"),
        "mangle must hold nothing but the TPROXY mark rules it keeps\n{}",
        got.describe()
    );
    // And with IPv6: both families converge.
    assert_transition(V6, &["-m", "TPROXY", "-b", "8080"], &["-b", "8080"], TABLES);
}

/// Switching TPROXY off removes the TPROXY policy routing (`ip rule fwmark 0x539 lookup 133`
/// and `local default dev lo table 133`) too, so the state is that of a fresh REDIRECT apply
/// (Istio itself leaves them behind).
#[test]
#[ignore = "needs root and network namespaces"]
fn tproxy_then_redirect_removes_tproxy_routing() {
    if skip_unless_root("tproxy_then_redirect_removes_tproxy_routing") {
        return;
    }
    assert_transition(V4, &["-m", "TPROXY", "-b", "8080"], &["-b", "8080"], PARTS);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn exclude_and_virtual_interfaces_added_then_removed_equal_fresh_apply() {
    if skip_unless_root("exclude_and_virtual_interfaces_added_then_removed_equal_fresh_apply") {
        return;
    }
    let plain = SEED.to_vec();
    let ifaces = cat(SEED, &["-c", "eth9,eth10", "-k", "veth1"]);
    assert_transition(V4, &plain, &ifaces, PARTS);
    assert_transition(V4, &ifaces, &plain, PARTS);
    let tproxy = ["-m", "TPROXY", "-b", "*"];
    let tproxy_ifaces = cat(&tproxy, &["-c", "eth9", "-k", "veth1"]);
    assert_transition(V6, &tproxy_ifaces, &tproxy, PARTS);
    assert_transition(V6, &tproxy, &tproxy_ifaces, PARTS);
}
