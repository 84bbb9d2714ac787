//! `--exclusion-sets` (native nftables): each list as one rule over an anonymous set.
//!
//! Root-only (ignored by default; `cargo test --test it exclusion_sets:: -- --include-ignored`).
//! That the set form decides every packet as Istio's per-item rules do is proven over random
//! configs and packets by the property test beside the walker (`backend/nft/walk.rs`); here
//! the kernel: real traffic through an applied set config lands where the CIDR scenarios of
//! `tests/it/traffic.rs` say, a re-run commits nothing, `verify` says the state is right, a
//! switch between the two forms is a reconfigure, `doctor` finds nothing, cleanup removes
//! the sets, the dry-run script writes what the real apply writes, and 20,000 excluded CIDRs
//! (and IPv6, TPROXY and owner-group sets) read back equal.
//! Without `--native-nftables` the flag is refused (`tests/it/door.rs` style, no root).

use crate::common;
use crate::traffic::{Checks, context, tcp_listeners};

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use common::{
    BIN, Backend, CIDR_SCENARIOS, OUTSIDE_V4, TempDir, Topology, proxy_flags, skip_unless_root,
};

/// The binary's log and exit code for `args` (with `--native-nftables`) in the pod.
fn run(t: &Topology, args: &[&str]) -> (Option<i32>, String) {
    run_env(t, args, &[])
}

/// [`run`] with env vars.
fn run_env(t: &Topology, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let argv = Backend::Nft.argv(args);
    let out = t.exec(&t.pod, BIN, &argv, env);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// `verify --native-nftables ARGS` in the pod: its exit code and report.
fn verify(t: &Topology, args: &[&str]) -> (Option<i32>, String) {
    let mut argv = vec!["verify"];
    argv.extend_from_slice(args);
    run(t, &argv)
}

/// The pod's nat table, as nft lists it.
fn nat_table(t: &Topology) -> String {
    let out = t.exec(
        &t.pod,
        "nft",
        &["list", "table", "inet", "istio-proxy-nat"],
        &[],
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts a run in `t`'s pod with `args` succeeded and whether it changed anything.
fn assert_run(t: &Topology, args: &[&str], changes: bool) {
    let (code, log) = run(t, args);
    assert_eq!(code, Some(0), "istio-iptables {args:?}:\n{log}");
    assert_eq!(
        !log.contains("already in place"),
        changes,
        "istio-iptables {args:?} should {}change the tables:\n{log}",
        if changes { "" } else { "not " }
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn sets_capture_real_traffic_rerun_verify_and_switch_forms() {
    let test = "sets_capture_real_traffic_rerun_verify_and_switch_forms";
    if skip_unless_root(test) {
        return;
    }
    let t = Topology::new("xsets");
    let dev = common::TOPOLOGY_DEV;
    // As `traffic.rs`'s CIDR test: a second peer address in the subnet, one outside it.
    let second = t.v4(3);
    t.ip(
        &t.peer,
        &["addr", "add", &format!("{second}/24"), "dev", dev],
    )
    .unwrap();
    t.ip(
        &t.peer,
        &["addr", "add", &format!("{OUTSIDE_V4}/32"), "dev", "lo"],
    )
    .unwrap();
    t.ip(
        &t.pod,
        &[
            "route",
            "add",
            &format!("{OUTSIDE_V4}/32"),
            "via",
            &t.peer_v4.to_string(),
        ],
    )
    .unwrap();
    // The scenarios' CIDRs among others that overlap and touch, so that each list is a set
    // (and the kernel lists some elements as ranges).
    let include = format!(
        "10.200.0.0/16,{},10.201.0.0/16,10.200.5.0/24",
        t.subnet_v4()
    );
    let exclude = format!("10.200.1.0/24,{}/32,10.200.2.0/24,10.200.1.7/32", t.peer_v4);
    let base = proxy_flags(
        "REDIRECT",
        &[
            "-i",
            &include,
            "-x",
            &exclude,
            "-b",
            "*",
            "-o",
            "81,82,9000:9010",
        ],
    );
    let mut sets = base.clone();
    sets.push("--exclusion-sets");

    let bin_log = t.apply_ok(Backend::Nft, &t.pod, false, &sets);
    let listed = nat_table(&t);
    assert!(
        listed.contains("tcp dport { 81-82, 9000-9010 }") && listed.contains("10.200.1.0-"),
        "one rule over a set per list:\n{listed}"
    );
    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let listeners = tcp_listeners(&t, any, &[("pod", 15001), ("pod", 15006), ("peer", 80)]);
    let mut c = Checks::new(test);
    c.table(&t, false, CIDR_SCENARIOS);
    c.finish(|| context(&t, Backend::Nft, &bin_log));
    drop(listeners);

    assert_run(&t, &sets, false);
    let (code, report) = verify(&t, &sets);
    assert_eq!(code, Some(0), "verify with sets:\n{report}");
    let (code, report) = verify(&t, &base);
    assert_eq!(code, Some(3), "verify of Istio's form over sets:\n{report}");

    // Istio's form over the sets, and back: each switch rewrites, each re-run does not.
    assert_run(&t, &base, true);
    let listed = nat_table(&t);
    assert!(
        !listed.contains("daddr {") && !listed.contains("dport {"),
        "{listed}"
    );
    assert_run(&t, &base, false);
    assert_eq!(verify(&t, &base).0, Some(0));
    assert_run(&t, &sets, true);
    assert_run(&t, &sets, false);
    let mut doctor = vec!["doctor"];
    doctor.extend_from_slice(&sets);
    let (code, report) = run(&t, &doctor);
    assert_eq!(code, Some(0), "doctor over the sets:\n{report}");

    // Cleanup removes the set form; the dry-run script writes what the real apply does.
    let mut cleanup = sets.clone();
    cleanup.push("--cleanup-only");
    assert_eq!(run(&t, &cleanup).0, Some(0));
    assert!(nat_table(&t).is_empty(), "{}", nat_table(&t));
    let mut dry = vec![BIN, "--dry-run"];
    dry.extend(Backend::Nft.argv(&sets));
    let script = t.exec(&t.pod, BIN, &dry[1..], &[]);
    assert!(script.status.success());
    let applied = t.exec(
        &t.pod,
        "sh",
        &["-c", &String::from_utf8_lossy(&script.stdout)],
        &[],
    );
    assert!(applied.status.success(), "{applied:?}");
    assert!(nat_table(&t).contains("daddr {"), "{}", nat_table(&t));
    assert_run(&t, &sets, false);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn twenty_thousand_excluded_cidrs_read_back_equal() {
    if skip_unless_root("twenty_thousand_excluded_cidrs_read_back_equal") {
        return;
    }
    let t = Topology::new("xsets20k");
    let tmp = TempDir::new("istio-iptables-exclusion-sets");
    // Every other address (no two merge), then 100 adjacent /24s (which the kernel lists as
    // one range).
    let mut list: Vec<String> = (0..20_000u32)
        .map(|i| {
            let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + 2 * i);
            format!("{a}/32")
        })
        .collect();
    list.extend((0..100).map(|i| format!("10.150.{i}.0/24")));
    let path = tmp.path().join("exclude.txt");
    std::fs::write(&path, list.join("\n")).unwrap();
    let x = format!("@{}", path.display());
    let args = proxy_flags(
        "REDIRECT",
        &["-i", "*", "-x", &x, "-b", "*", "--exclusion-sets"],
    );
    assert_run(&t, &args, true);
    let listed = nat_table(&t);
    let set_rules: Vec<&str> = listed.lines().filter(|l| l.contains("daddr {")).collect();
    assert_eq!(
        set_rules.len(),
        1,
        "one rule for the 20,100 CIDRs:\n{listed}"
    );
    // The three prefixes written for the 100 /24s are one interval to the kernel.
    assert!(
        set_rules[0].contains(" 10.150.0.0-10.150.99.255")
            && set_rules[0].contains(" 10.100.156.62,"),
        "{}",
        &set_rules[0][set_rules[0].len().saturating_sub(300)..]
    );
    assert_run(&t, &args, false);
    assert_eq!(verify(&t, &args).0, Some(0));
}

#[test]
#[ignore = "needs root and network namespaces"]
fn ipv6_tproxy_and_owner_group_sets_read_back_equal() {
    if skip_unless_root("ipv6_tproxy_and_owner_group_sets_read_back_equal") {
        return;
    }
    let t = Topology::new("xsets6");
    // Adjacent IPv6 prefixes (listed as one range), ports merged to one range, names and
    // ids of groups.
    let args = proxy_flags(
        "TPROXY",
        &[
            "-i",
            "10.0.0.0/8,fd00::/16,fd01::/16,fd04::/16",
            "-x",
            "fd00:1::/32,fd00:2::/32,fd00:1::5/128,10.1.0.0/16,10.3.0.0/16",
            "-b",
            "80,81,90",
            "-q",
            "7000,7001,7005",
            "--exclusion-sets",
        ],
    );
    for env in [
        [
            ("ENABLE_INBOUND_IPV6", "true"),
            ("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "root,5,7,0"),
        ],
        [
            ("ENABLE_INBOUND_IPV6", "true"),
            ("ISTIO_OUTBOUND_OWNER_GROUPS", "root,5"),
        ],
    ] {
        let (code, log) = run_env(&t, &args, &env);
        assert_eq!(code, Some(0), "{log}");
        let listed = nat_table(&t);
        assert!(
            listed.contains("ip6 daddr { fd00:1::-fd00:2:ffff:ffff:ffff:ffff:ffff:ffff } ")
                && listed.contains("skgid")
                && listed.contains("tcp dport { 7000-7001, 7005 }"),
            "{listed}"
        );
        let (code, log) = run_env(&t, &args, &env);
        assert!(code == Some(0) && log.contains("already in place"), "{log}");
        let mut verify = vec!["verify"];
        verify.extend_from_slice(&args);
        let (code, report) = run_env(&t, &verify, &env);
        assert_eq!(code, Some(0), "{report}");
    }
}

#[test]
fn without_native_nftables_the_flag_is_refused_in_one_line() {
    for (args, env) in [
        (&["--dry-run", "--exclusion-sets"][..], None),
        (&["--dry-run"][..], Some(("EXCLUSION_SETS", "true"))),
    ] {
        let mut cmd = Command::new(BIN);
        cmd.args(args).env_clear();
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}");
        assert!(out.stdout.is_empty());
        let err = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "{err}");
        let name = if env.is_some() {
            "EXCLUSION_SETS"
        } else {
            "--exclusion-sets"
        };
        assert!(
            errors[0].contains(name) && errors[0].contains("needs --native-nftables"),
            "{err}"
        );
    }
    let out = Command::new(BIN)
        .args(["--dry-run", "--native-nftables", "--exclusion-sets=maybe"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// explain's outcome (`verdict`, `port`, `mark`, `zone`, `stopped`) of one packet, or how
/// it failed.
fn explain_outcome(case: &common::Case, extra: &[&str], pkt: &[String]) -> String {
    let mut args = vec!["explain", "--native-nftables"];
    args.extend_from_slice(extra);
    let mut cmd = Command::new(BIN);
    cmd.args(&args)
        .args(&case.args)
        .args(pkt)
        .args(["--output", "json"])
        .current_dir(&case.dir)
        .env_clear()
        .envs(common::case_env(case));
    let out = cmd.output().unwrap();
    if !out.status.success() {
        return format!("exit {:?}", out.status.code());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    ["verdict", "port", "mark", "zone", "stopped"]
        .map(|k| format!("{k}={}", v[k]))
        .join(" ")
}

/// Packets for a case: to an address inside, at the edge of and next to each of its CIDRs
/// and to a few others, at each of its ports and a few others; outbound as the app and as
/// the proxy, inbound.
fn packets(case: &common::Case) -> Vec<Vec<String>> {
    let mut addrs: Vec<IpAddr> = ["10.9.9.9", "127.0.0.1", "fd00::9"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    let mut ports: Vec<u16> = vec![80, 53];
    // The owner groups are env values.
    let mut uids = vec!["0".to_string(), "1337".to_string()];
    for word in case.env.iter().flat_map(|(_, v)| v.split(',')) {
        if word.parse::<u32>().is_ok() {
            uids.push(word.to_string());
        }
    }
    for word in case.args.iter().flat_map(|a| a.split(',')) {
        if let Ok(net) = word.parse::<ipnet::IpNet>() {
            addrs.extend([net.network(), net.broadcast()]);
            if let Some(next) = common_next(net.broadcast()) {
                addrs.push(next);
            }
        }
        for p in word.split(':') {
            if let Ok(p) = p.parse::<u16>()
                && p > 0
            {
                ports.extend([p, p.saturating_add(1)]);
            }
        }
    }
    let mut out = Vec::new();
    for a in &addrs {
        for p in &ports {
            let dst = std::net::SocketAddr::new(*a, *p).to_string();
            for uid in &uids {
                out.push(
                    ["--direction", "outbound", "--dst", &dst, "--uid", uid]
                        .map(String::from)
                        .to_vec(),
                );
            }
            out.push(
                ["--direction", "inbound", "--dst", &dst]
                    .map(String::from)
                    .to_vec(),
            );
        }
    }
    out
}

/// The address after `a`, if any.
fn common_next(a: IpAddr) -> Option<IpAddr> {
    match a {
        IpAddr::V4(v) => u32::from(v).checked_add(1).map(|n| IpAddr::V4(n.into())),
        IpAddr::V6(v) => u128::from(v).checked_add(1).map(|n| IpAddr::V6(n.into())),
    }
}

/// Every conformance case (Istio's args and env): each packet of [`packets`] ends the same
/// way through the set form as through Istio's form, by `explain`'s interpreter.
#[test]
fn every_conformance_case_decides_each_packet_alike_with_sets() {
    let cases = common::all_istio_cases();
    // Four at a time: each packet is two short runs of the binary.
    let results: Vec<(usize, Vec<String>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = cases
            .chunks(cases.len().div_ceil(4))
            .map(|chunk| {
                scope.spawn(move || {
                    let (mut compared, mut failures) = (0, Vec::new());
                    for case in chunk {
                        for pkt in packets(case) {
                            let istio = explain_outcome(case, &[], &pkt);
                            let sets = explain_outcome(case, &["--exclusion-sets"], &pkt);
                            compared += usize::from(istio.starts_with("verdict"));
                            if istio != sets {
                                failures.push(format!(
                                    "{} {pkt:?}: {istio} / with sets {sets}",
                                    case.name
                                ));
                            }
                        }
                    }
                    (compared, failures)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let compared: usize = results.iter().map(|r| r.0).sum();
    let failures: Vec<String> = results.into_iter().flat_map(|r| r.1).collect();
    assert!(compared > 500, "only {compared} packets were explained");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
