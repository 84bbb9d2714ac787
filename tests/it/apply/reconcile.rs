//! `--reconcile=false` and `--force-apply`.

use super::*;

#[test]
#[ignore = "needs root and network namespaces"]
fn reconcile_false_refuses_a_conflict_and_changes_nothing() {
    if skip_unless_root("reconcile_false_refuses_a_conflict_and_changes_nothing") {
        return;
    }
    let other = cat(&seed_with("-b", "8080"), &["--reconcile=false"]);
    let same = cat(SEED, &["--reconcile=false"]);
    let ns = Script::new()
        .run("apply", V4, SEED)
        .shims(Fail::Nothing)
        .snap("before")
        .run("conflict", V4, &other)
        .snap("after-conflict")
        .run("same", V4, &same)
        .snap("after-same")
        .exec();
    let ctx = ns.context();
    ns.run_rc("apply", 0);
    let conflict = ns.run_rc("conflict", 4);
    let line = conflict.one_error();
    assert!(
        line.contains("--reconcile") && line.contains("nat"),
        "the error should mention reconcile and the table: {line}"
    );
    assert_eq!(conflict.error_lines().len(), 1, "{}", conflict.describe());
    let writes = conflict.execs_of(|p| p.ends_with("-restore") || p == "nft" || p == "ip");
    assert!(
        writes.is_empty(),
        "a refused conflict must run no restore: {writes:?}"
    );
    let before = ns.state("before");
    assert_same(
        "--reconcile=false on a conflict",
        &before,
        &ns.state("after-conflict"),
        &ctx,
    );
    let same = ns.run_rc("same", 0);
    assert!(
        same.execs_of(|p| p.ends_with("-restore")).is_empty(),
        "{}",
        same.describe()
    );
    assert_same(
        "--reconcile=false with the same config",
        &before,
        &ns.state("after-same"),
        &ctx,
    );
}

/// `--force-apply --reconcile=false` over different ISTIO_* state: like Istio, our payload is
/// restored on top, which iptables rejects (`-N` of an existing chain): exit 1, the error
/// names the phase and says nothing was changed, and nothing was changed.
#[test]
#[ignore = "needs root and network namespaces"]
fn force_apply_without_reconcile_on_a_conflict_fails_cleanly() {
    if skip_unless_root("force_apply_without_reconcile_on_a_conflict_fails_cleanly") {
        return;
    }
    let args = cat(
        &seed_with("-b", "8080"),
        &["--reconcile=false", "--force-apply"],
    );
    let ns = Script::new()
        .run("apply", V4, SEED)
        .snap("before")
        .run("force", V4, &args)
        .snap("after")
        .exec();
    let ctx = ns.context();
    ns.run_rc("apply", 0);
    let force = ns.run_rc("force", 1);
    let line = force.one_error();
    assert!(
        line.contains("committing IPv4 rules")
            && line.contains("iptables-nft-restore")
            && line.contains("Chain already exists")
            && line.contains("nothing was changed"),
        "{}",
        force.describe()
    );
    assert!(
        force.logs().contains("--force-apply"),
        "the warning about adding on top should be logged\n{}",
        force.describe()
    );
    assert_same(
        "--force-apply --reconcile=false on a conflict",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
}
