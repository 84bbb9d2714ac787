//! `doctor` in real namespaces: each finding the issue names (an empty legacy table, both
//! flavours holding rules, a missing capability, the lock held, IPv6 addresses with
//! IPv4-only rules, a PATH without `nft`, a stale config), a namespace where an apply works
//! (exit 0), and that doctor changes nothing: every table, rule, route and address is the
//! same before and after.

use crate::common::{self, BIN, SEED, shell_quote};

/// The namespace's whole netfilter and routing state, as a script writes it to `$1`.
const DUMP: &str = "dump() {\n\
    { for p in iptables-legacy ip6tables-legacy iptables-nft ip6tables-nft; do\n\
        echo \"== $p\"; $p-save | grep -v '^#' | sed 's/\\[[0-9]*:[0-9]*\\]//'; done\n\
      echo '== nft'; nft list ruleset | sed 's/counter packets [0-9]* bytes [0-9]*/counter/'\n\
      echo '== rules'; ip rule; ip -6 rule\n\
      echo '== routes'; ip route show table all; ip -6 route show table all\n\
      echo '== addresses'; ip addr\n\
    } > \"$1\" 2> /dev/null\n\
}\n";

/// The outcome of one doctor run.
struct Doctor {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `setup` in a fresh namespace, then `doctor ARGS` (`prefix`: words before the
/// binary, e.g. `env PATH=...`), and asserts the namespace is the same before and after.
fn doctor(setup: &str, prefix: &str, args: &[&str]) -> Doctor {
    let args: Vec<String> = args.iter().map(shell_quote).collect();
    let script = format!(
        "{DUMP}ip link set lo up\n{setup}\n\
         dump \"$NS_OUT/before\"\n\
         set +e\n\
         {prefix} {BIN} doctor {} > \"$NS_OUT/stdout\" 2> \"$NS_OUT/stderr\"\n\
         echo $? > \"$NS_OUT/code\"\n\
         set -e\n\
         dump \"$NS_OUT/after\"\n",
        args.join(" ")
    );
    let out = common::run_in_fresh_ns_ok(&script).unwrap_or_else(|e| panic!("{e}"));
    let (before, after) = (out.file("before").unwrap(), out.file("after").unwrap());
    assert_eq!(before, after, "doctor changed the namespace");
    Doctor {
        code: out.file("code").unwrap().trim().parse().unwrap(),
        stdout: out.file("stdout").unwrap().to_string(),
        stderr: out.file("stderr").unwrap().to_string(),
    }
}

impl Doctor {
    fn assert(&self, code: i32, texts: &[&str]) {
        assert_eq!(
            self.code, code,
            "exit code\n--- stdout\n{}--- stderr\n{}",
            self.stdout, self.stderr
        );
        for t in texts {
            assert!(
                self.stdout.contains(t),
                "{t:?} missing\n--- stdout\n{}--- stderr\n{}",
                self.stdout,
                self.stderr
            );
        }
    }
}

/// The seed config applied with this binary, as the setup of a namespace.
fn apply(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(shell_quote).collect();
    format!("{BIN} {} > /dev/null 2>&1", args.join(" "))
}

#[test]
#[ignore = "needs root and network namespaces"]
fn fresh_and_applied_namespaces_are_ok() {
    if common::skip_unless_root("doctor::fresh_and_applied_namespaces_are_ok") {
        return;
    }
    let d = doctor("", "", SEED);
    d.assert(
        0,
        &[
            "Backend: iptables",
            "IPv4 iptables-nft: iptables-nft-restore (no legacy rules in this namespace)",
            "IPv4 iptables-nft            empty (the config's rules go here)",
            "IPv4 -m owner",
            "OK: nothing is applied yet; an apply with this config would succeed",
        ],
    );
    let d = doctor(&apply(SEED), "", SEED);
    d.assert(
        0,
        &[
            "IPv4 iptables-nft            matches (the config's rules go here)",
            "1 place(s) hold capture state",
            "OK: capture works as configured",
        ],
    );
    // --probe: the validation probe, per family.
    let d = doctor(&apply(SEED), "", &[SEED, &["--probe"]].concat());
    d.assert(
        0,
        &["Traffic (the --run-validation probe):", "IPv4: captured:"],
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn an_empty_legacy_table_is_named_and_not_counted() {
    if common::skip_unless_root("doctor::an_empty_legacy_table_is_named_and_not_counted") {
        return;
    }
    let d = doctor("iptables-legacy -t nat -L > /dev/null", "", SEED);
    d.assert(
        0,
        &[
            "IPv4: this namespace has legacy tables (nat) that hold no rules",
            "chooses iptables-nft",
            "fix: nothing to do; FORCE_IPTABLES_BINARY=legacy",
            "IPv4 iptables-legacy         empty; tables (ours/rules): nat 0/0",
        ],
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn both_flavours_holding_rules_is_an_error() {
    if common::skip_unless_root("doctor::both_flavours_holding_rules_is_an_error") {
        return;
    }
    // Our rules in both flavours: each apply forced to one, then the legacy copy put back.
    let setup = format!(
        "{}\niptables-legacy-save > \"$NS_TMP/legacy\"\n{}\n\
         iptables-legacy-restore < \"$NS_TMP/legacy\"",
        apply(&[&["--force-iptables-binary=legacy"], SEED].concat()),
        apply(&[&["--force-iptables-binary=nft"], SEED].concat()),
    );
    let d = doctor(&setup, "", SEED);
    d.assert(
        7,
        &[
            "capture state of ours is in 2 places (IPv4 iptables-legacy, IPv4 iptables-nft)",
            // Legacy holds rules, so detection chooses it: the nft copy is the stale one.
            "IPv4 iptables-legacy: iptables-legacy-restore (this namespace's legacy tables hold rules (nat))",
            "fix: re-run to replace the stale copy in IPv4 iptables-nft",
            "PROBLEM:",
        ],
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn a_missing_capability_is_named_with_the_pod_spec_fix() {
    if common::skip_unless_root("doctor::a_missing_capability_is_named_with_the_pod_spec_fix") {
        return;
    }
    let d = doctor("", "setpriv --bounding-set -net_admin", SEED);
    d.assert(
        7,
        &[
            "this process lacks CAP_NET_ADMIN",
            "fix: add to the container's securityContext: capabilities: {add: [NET_ADMIN]}",
            "missing NET_ADMIN",
        ],
    );
    // iptables-nft needs NET_ADMIN alone; legacy iptables NET_RAW too.
    doctor("", "setpriv --bounding-set -net_raw", SEED).assert(0, &[]);
    let d = doctor(
        "",
        "FORCE_IPTABLES_BINARY=legacy setpriv --bounding-set -net_raw",
        SEED,
    );
    d.assert(
        7,
        &[
            "this process lacks CAP_NET_RAW",
            "fix: add to the container's securityContext: capabilities: {add: [NET_RAW]}",
            "missing NET_RAW",
        ],
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn a_held_lock_names_its_holder() {
    if common::skip_unless_root("doctor::a_held_lock_names_its_holder") {
        return;
    }
    let setup = "mkdir -p -m 0700 /run/istio-iptables\n\
                 lock=/run/istio-iptables/netns-$(stat -L -c %i /proc/self/ns/net).lock\n\
                 flock \"$lock\" sleep 30 &\n\
                 holder=$!\n\
                 trap 'kill $holder' EXIT\n\
                 for i in $(seq 100); do grep -q FLOCK /proc/locks && break; sleep 0.05; done";
    let d = doctor(setup, "", SEED);
    d.assert(
        7,
        &[
            "this network namespace's lock (flock on /run/istio-iptables/netns-",
            "is held by pid ",
            "fix: wait for that run to end; if it hangs, end it (pid ",
        ],
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn ipv6_addresses_with_ipv4_only_rules_warn_without_failing() {
    if common::skip_unless_root("doctor::ipv6_addresses_with_ipv4_only_rules_warn_without_failing")
    {
        return;
    }
    let setup = "ip link add v0 type veth peer name v1\n\
                 ip link set v0 up\n\
                 ip addr add 10.9.0.2/24 dev v0\n\
                 ip addr add 2001:db8:9::2/64 dev v0 nodad";
    let d = doctor(setup, "", SEED);
    d.assert(
        0,
        &[
            "WARNING: this network namespace has global IPv6 addresses, but only IPv4 rules",
            "fix: set --dual-stack",
            "addresses: lo 127.0.0.1, v0 10.9.0.2",
            "rules for: IPv4\n",
            "OK: nothing is applied yet",
        ],
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn native_nftables_without_nft_in_path_is_an_error() {
    if common::skip_unless_root("doctor::native_nftables_without_nft_in_path_is_an_error") {
        return;
    }
    // A PATH with everything but nft.
    let setup = "mkdir \"$NS_TMP/bin\"\n\
                 for p in iptables-legacy-save iptables-legacy-restore iptables-nft-save \
                 iptables-nft-restore ip6tables-legacy-save ip6tables-legacy-restore \
                 ip6tables-nft-save ip6tables-nft-restore; do \
                 ln -s \"$(command -v $p)\" \"$NS_TMP/bin/$p\"; done";
    let d = doctor(
        setup,
        "env PATH=\"$NS_TMP/bin\"",
        &[&["--native-nftables"], SEED].concat(),
    );
    d.assert(
        7,
        &[
            "Backend: nftables",
            "nft not found",
            "needs the nft program, which is not in PATH",
            "fix: install nftables (nft 1.0.1 or later)",
        ],
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn a_stale_config_is_named_with_the_re_run_fix() {
    if common::skip_unless_root("doctor::a_stale_config_is_named_with_the_re_run_fix") {
        return;
    }
    // Applied with other excluded ports than doctor is asked about.
    let d = doctor(&apply(&common::seed_with("-d", "15090")), "", SEED);
    d.assert(
        7,
        &[
            "IPv4 iptables-nft            differs (the config's rules go here)",
            "ERROR: IPv4 iptables-nft holds capture state that differs from this config",
            "fix: re-run istio-iptables with this config to replace it",
        ],
    );
    // The same with native nftables: the iptables rules are the other backend's.
    let d = doctor(&apply(SEED), "", &[&["--native-nftables"], SEED].concat());
    d.assert(
        7,
        &[
            "IPv4 iptables-nft            stale",
            "fix: re-run to replace the stale copy in IPv4 iptables-nft",
        ],
    );
}

/// The JSON shape, with what differs from machine to machine (versions, addresses, lock
/// path, how the kernel shows a feature) replaced.
#[test]
#[ignore = "needs root and network namespaces"]
fn json_shape() {
    if common::skip_unless_root("doctor::json_shape") {
        return;
    }
    let d = doctor(&apply(SEED), "", &[SEED, &["--output", "json"]].concat());
    assert_eq!(d.code, 0, "{}{}", d.stdout, d.stderr);
    let mut v: serde_json::Value = serde_json::from_str(&d.stdout).unwrap();
    for p in v["backend"]["programs"].as_array_mut().unwrap() {
        p["version"] = "<version>".into();
    }
    for k in v["kernel"].as_array_mut().unwrap() {
        k["how"] = "<how>".into();
    }
    v["permissions"]["lock"] = "<lock>".into();
    insta::assert_snapshot!("doctor_json", serde_json::to_string_pretty(&v).unwrap());
}
