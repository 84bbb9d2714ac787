//! The xtables lock (legacy).

use super::*;

/// Shell lines holding /run/xtables.lock (private: /run is a tmpfs here) for `secs` in the
/// background, returning once it is held; `$__holder` is the holder's pid.
fn hold_lock(secs: u32) -> String {
    format!(
        "( exec 9>/run/xtables.lock; flock -x 9; exec sleep {secs} ) &\n__holder=$!\n\
         __i=0; while flock -n /run/xtables.lock true; do __i=$((__i+1)); [ $__i -lt 500 ]; sleep 0.01; done\n"
    )
}

/// Runs the seed command (legacy) with `extra` args while /run/xtables.lock is held for `hold`
/// seconds; snapshots before and after.
fn apply_under_held_lock(hold: u32, wait_env: Option<&str>, extra: &[&str]) -> Ns {
    let mut env = vec![("ENABLE_INBOUND_IPV6", "false")];
    if let Some(w) = wait_env {
        env.push(("IPTABLES_LOCK_WAIT_SECONDS", w));
    }
    Script::new()
        .snap("before")
        .sh(&hold_lock(hold))
        .run("apply", &env, &cat(&seed_forcing("legacy"), extra))
        .sh("kill $__holder 2>/dev/null || true; wait $__holder || true")
        .snap("after")
        .exec()
}

fn assert_applied_to_legacy(ns: &Ns) {
    let st = ns.state("after");
    assert!(
        st.get("v4-legacy").contains("-A ISTIO_OUTPUT"),
        "{}\n{}",
        st.describe(),
        ns.context()
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn legacy_waits_for_the_xtables_lock() {
    let test = "legacy_waits_for_the_xtables_lock";
    if skip_unless_root(test) || skip_unless_installed(test, &["iptables-legacy", "flock"]) {
        return;
    }
    let ns = apply_under_held_lock(3, None, &[]);
    let run = ns.run_rc("apply", 0);
    assert!(
        run.ms >= 2500,
        "the binary should have waited for the lock (held ~3 s), took {} ms\n{}",
        run.ms,
        run.describe()
    );
    assert_applied_to_legacy(&ns);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn legacy_gives_up_on_a_held_xtables_lock() {
    let test = "legacy_gives_up_on_a_held_xtables_lock";
    if skip_unless_root(test) || skip_unless_installed(test, &["iptables-legacy", "flock"]) {
        return;
    }
    let ns = apply_under_held_lock(4, Some("1"), &[]);
    let ctx = ns.context();
    let run = ns.run_rc("apply", 1);
    let line = run.one_error();
    assert!(
        line.contains("xtables lock held") && !line.contains("kernel support"),
        "the error should blame the lock, not the kernel: {line}"
    );
    assert!(
        run.ms < 3500,
        "the wait should be bounded by IPTABLES_LOCK_WAIT_SECONDS=1, took {} ms",
        run.ms
    );
    assert_same(
        "nothing may change when the lock is not obtained",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
}

/// `--cni-mode`: the lock is scoped to the pod (Istio's CNI runs in the node's filesystem,
/// where /run/xtables.lock is shared by every pod), so a held node-wide lock does not block.
#[test]
#[ignore = "needs root and network namespaces"]
fn cni_mode_does_not_wait_for_the_node_wide_lock() {
    let test = "cni_mode_does_not_wait_for_the_node_wide_lock";
    if skip_unless_root(test) || skip_unless_installed(test, &["iptables-legacy", "flock"]) {
        return;
    }
    let ns = apply_under_held_lock(4, Some("1"), &["--cni-mode"]);
    let run = ns.run_rc("apply", 0);
    assert!(
        run.ms < 2500,
        "with --cni-mode the node-wide lock must not be waited for, took {} ms\n{}",
        run.ms,
        run.describe()
    );
    assert_applied_to_legacy(&ns);
}
