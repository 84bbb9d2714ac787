//! All or nothing across tables: iptables-restore commits table by table.

use super::rollback::existing_state_setup;
use super::*;

/// A TPROXY + DNS config (mangle, nat and raw in both families), with its resolv.conf.
pub(super) struct TproxyDns {
    _tmp: common::TempDir,
    pub(super) resolv: String,
}

impl TproxyDns {
    pub(super) fn new() -> TproxyDns {
        let tmp = common::TempDir::new("istio-iptables-resolv");
        let resolv = tmp.path().join("resolv.conf");
        std::fs::write(&resolv, "nameserver 10.0.0.53\nnameserver fd00::53\n")
            .expect("write resolv.conf");
        let resolv = resolv.to_string_lossy().into_owned();
        TproxyDns { _tmp: tmp, resolv }
    }

    pub(super) fn args(&self) -> Vec<&str> {
        vec![
            "-m",
            "TPROXY",
            "-b",
            "*",
            "-c",
            "eth9",
            "--redirect-dns",
            "--resolv-conf",
            &self.resolv,
        ]
    }
}

/// After `setup`, `args` with the `n`th table of one family refused: exit 1, everything as
/// before, and the message says what failed and what was restored.
fn assert_table_fault(setup: &str, ipv6: bool, n: usize, args: &[&str]) {
    let ns = Script::new()
        .sh(setup)
        .snap("before")
        .shims(Fail::NthTable { ipv6, n })
        .run("failing", V6, args)
        .snap("after")
        .exec();
    let ctx = ns.context();
    let run = ns.run_rc("failing", 1);
    let what = format!(
        "table {n} of {} refused (setup: {})",
        if ipv6 { "IPv6" } else { "IPv4" },
        if setup.is_empty() {
            "fresh"
        } else {
            "existing"
        }
    );
    assert_same(
        &format!("{what}: the namespace must be exactly as before"),
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
    let line = run.one_error();
    let family = if ipv6 { "IPv6" } else { "IPv4" };
    assert!(
        line.contains(&format!("committing {family} rules"))
            && line.contains(&format!("table {n} refused")),
        "{what}: the error should name the family and the refusal: {line}"
    );
    // Only a refused first IPv4 table leaves nothing to restore.
    let expected = if !ipv6 && n == 1 {
        "nothing was changed (checked by re-reading the kernel)"
    } else {
        "the previous state was restored ("
    };
    assert!(
        line.contains(expected) && !line.contains("ROLLBACK FAILED"),
        "{what}: the error should say `{expected}`: {line}\n{}",
        run.describe()
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn a_refused_table_in_a_fresh_namespace_leaves_nothing_behind() {
    if skip_unless_root("a_refused_table_in_a_fresh_namespace_leaves_nothing_behind") {
        return;
    }
    let cfg = TproxyDns::new();
    for ipv6 in [false, true] {
        for n in 1..=3 {
            assert_table_fault("", ipv6, n, &cfg.args());
        }
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn a_refused_table_over_an_existing_config_restores_it() {
    if skip_unless_root("a_refused_table_over_an_existing_config_restores_it") {
        return;
    }
    let cfg = TproxyDns::new();
    let setup = existing_state_setup();
    for ipv6 in [false, true] {
        for n in 1..=3 {
            assert_table_fault(&setup, ipv6, n, &cfg.args());
        }
    }
}

/// A real refusal, no shim: over an existing config, `--reconcile=false --force-apply` feeds
/// Istio's plain payload, whose mangle table (`--drop-invalid`: ISTIO_DROP) commits and whose
/// nat table the kernel refuses (`-N ISTIO_INBOUND`: the chain exists). Mangle must not
/// stay behind.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_real_refusal_of_a_later_table_rolls_back_the_earlier_ones() {
    if skip_unless_root("a_real_refusal_of_a_later_table_rolls_back_the_earlier_ones") {
        return;
    }
    let args = cat(
        SEED,
        &["--drop-invalid", "--reconcile=false", "--force-apply"],
    );
    let ns = Script::new()
        .sh(&existing_state_setup())
        .snap("before")
        .run("failing", V6, &args)
        .snap("after")
        .exec();
    let ctx = ns.context();
    let run = ns.run_rc("failing", 1);
    assert_same(
        "a refused nat table must not leave mangle's ISTIO_DROP behind",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
    let line = run.one_error();
    assert!(
        line.contains("committing IPv4 rules")
            && line.contains("-N ISTIO_INBOUND")
            && line.contains("the previous state was restored (IPv4"),
        "{line}"
    );
}
