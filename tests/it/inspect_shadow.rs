//! `verify` on a real kernel when foreign state takes the packet before our rules: our rules
//! stay exactly as the config wants (a re-run says "already in place"), yet traffic is not
//! captured; verify names the foreign rule and exits 5 (`Exit::Shadowed`).
//!
//! Each test builds a [`Topology`], applies a config in its pod with the binary, adds one
//! piece of foreign state with the real tools (`iptables`, `nft`, `ip rule`) and runs
//! `verify` in the pod. The nat RETURN and raw notrack tests also connect for real: from the
//! pod's app to a listener in the peer namespace, with a listener on the proxy's port 15001
//! in the pod, to show where the connection lands before and after.

use crate::common;

use std::net::SocketAddr;
use std::process::Output;

use common::{APP, Backend, Landing, Listener, SEED, Topology, connect, sa, seed_with};

/// The exit code of `verify` when foreign rules take packets before ours.
const SHADOWED: i32 = 5;

/// A pod with `args` applied by `backend`.
struct Pod {
    t: Topology,
    backend: Backend,
    args: Vec<String>,
    ipv6: bool,
}

impl Pod {
    fn new(name: &str, backend: Backend, args: &[&str], ipv6: bool) -> Pod {
        let t = Topology::new(name);
        t.apply_ok(backend, &t.pod, ipv6, args);
        Pod {
            t,
            backend,
            args: args.iter().map(|a| a.to_string()).collect(),
            ipv6,
        }
    }

    /// `sh -c line` in the pod; panics with its output unless it succeeds.
    fn sh(&self, line: &str) {
        let out = self.t.exec(&self.t.pod, "sh", &["-c", line], &[]);
        assert!(
            out.status.success(),
            "`{line}` in the pod failed: {}",
            describe(&out)
        );
    }

    /// `verify` with the pod's config (and `extra`): exit code and stdout.
    fn verify(&self, extra: &[&str]) -> (Option<i32>, String) {
        let mut words: Vec<&str> = vec!["verify"];
        words.extend(self.backend.flags());
        words.extend(self.args.iter().map(String::as_str));
        words.extend_from_slice(extra);
        let out = self.t.run_bin(&self.t.pod, self.ipv6, &words);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// Asserts that verify matches (exit 0) before the foreign state is added.
    fn verify_ok(&self) {
        let (code, text) = self.verify(&[]);
        assert_eq!(
            (code, text.as_str()),
            (Some(0), "OK: the live rules match the config\n"),
            "{}",
            self.t.describe_for(self.backend, &self.t.pod)
        );
    }

    /// Asserts that verify exits 5 and that its text report holds every one of `wanted`
    /// (the place, the rule); returns the report.
    fn verify_shadowed(&self, wanted: &[&str]) -> String {
        let (code, text) = self.verify(&[]);
        let rules = self.t.describe_for(self.backend, &self.t.pod);
        assert_eq!(code, Some(SHADOWED), "{text}\n{rules}");
        assert!(
            text.starts_with(
                "SHADOWED: our rules match the config, but foreign rules take packets before them\n"
            ),
            "{text}"
        );
        for w in wanted {
            assert!(
                text.contains(w),
                "verify should name `{w}`:\n{text}\n{rules}"
            );
        }
        let (code, json) = self.verify(&["--output", "json"]);
        assert_eq!(code, Some(SHADOWED), "{json}");
        assert!(
            json.starts_with("{\"match\":true,") && json.contains(",\"findings\":[{\"place\":"),
            "{json}"
        );
        text
    }

    /// Connects from the pod's app to `dst`; where it landed.
    fn connect(&self, dst: SocketAddr) -> Landing {
        connect(&self.t.pod, APP, dst, None).unwrap_or_else(|e| {
            panic!(
                "connecting to {dst}: {e}\n{}",
                self.t.describe_for(self.backend, &self.t.pod)
            )
        })
    }
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The listeners of an outbound connection from the pod to the peer's port 80: the proxy's
/// outbound port in the pod, the destination in the peer.
fn outbound_listeners(t: &Topology) -> (Listener, Listener, SocketAddr) {
    let proxy = Listener::tcp(
        &t.pod,
        "pod:15001",
        sa(std::net::Ipv4Addr::UNSPECIFIED, 15001),
    );
    let dst = sa(t.peer_v4, 80);
    let peer = Listener::tcp(&t.peer, "peer:80", dst);
    (proxy, peer, dst)
}

#[test]
#[ignore = "needs root and network namespaces"]
fn inspect_shadow_a_foreign_return_before_our_output_jump() {
    if common::skip_unless_root("inspect_shadow_a_foreign_return_before_our_output_jump") {
        return;
    }
    let pod = Pod::new("shret", Backend::Iptables, SEED, false);
    let (_proxy, _peer, dst) = outbound_listeners(&pod.t);
    let captured = pod.connect(dst);
    assert_eq!(captured.label, "pod:15001", "captured before: {captured}");
    assert_eq!(captured.orig, Some(dst), "{captured}");
    pod.verify_ok();

    pod.sh("iptables -t nat -I OUTPUT 1 -p tcp -j RETURN");
    // Not captured any more: the connection reaches the peer itself.
    let direct = pod.connect(dst);
    assert_eq!(direct.label, "peer:80", "not captured after: {direct}");
    // A re-run sees its rules in place and changes nothing...
    let out = pod.t.run_bin(&pod.t.pod, false, SEED);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        describe(&out).contains("rules are already in place"),
        "{}",
        describe(&out)
    );
    // ... and verify names the rule.
    pod.verify_shadowed(&[
        " nat OUTPUT:\n  rule:   -A OUTPUT -p tcp -j RETURN\n",
        "effect: TCP leaves OUTPUT before the jump to ISTIO_OUTPUT: outbound TCP is not captured",
    ]);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn inspect_shadow_a_raw_notrack_skips_nat() {
    if common::skip_unless_root("inspect_shadow_a_raw_notrack_skips_nat") {
        return;
    }
    let pod = Pod::new("shraw", Backend::Iptables, SEED, false);
    let (proxy, _peer, dst) = outbound_listeners(&pod.t);
    pod.verify_ok();
    pod.sh("iptables -t raw -A OUTPUT -p tcp -j CT --notrack");
    // Untracked, the SYN skips nat and goes to the peer itself; the peer's reply, tracked
    // on the way in, meets nat PREROUTING as a new connection, so the exchange need not even
    // complete. Either way the proxy never sees it.
    match connect(&pod.t.pod, APP, dst, None) {
        Ok(l) => assert_ne!(l.label, "pod:15001", "untracked, yet captured: {l}"),
        Err(e) => eprintln!("the untracked connection did not complete: {e}"),
    }
    assert_eq!(
        proxy.accepted(),
        [],
        "the proxy took an untracked connection"
    );
    pod.verify_shadowed(&[
        " raw OUTPUT:\n  rule:   -A OUTPUT -p tcp -j CT --notrack\n",
        "untracked packets skip nat: outbound TCP is not captured",
    ]);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn inspect_shadow_a_mangle_accept_before_the_tproxy_jump() {
    if common::skip_unless_root("inspect_shadow_a_mangle_accept_before_the_tproxy_jump") {
        return;
    }
    let pod = Pod::new(
        "shmangle",
        Backend::Iptables,
        &seed_with("-m", "TPROXY"),
        false,
    );
    pod.verify_ok();
    pod.sh("iptables -t mangle -I PREROUTING 1 -p tcp -j ACCEPT");
    pod.verify_shadowed(&[
        " mangle PREROUTING:\n  rule:   -A PREROUTING -p tcp -j ACCEPT\n",
        "TCP is accepted in PREROUTING before the jump to ISTIO_INBOUND: inbound TCP is not captured",
    ]);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn inspect_shadow_an_ip_rule_before_ours_in_both_families() {
    if common::skip_unless_root("inspect_shadow_an_ip_rule_before_ours_in_both_families") {
        return;
    }
    let pod = Pod::new(
        "shrule",
        Backend::Iptables,
        &seed_with("-m", "TPROXY"),
        true,
    );
    pod.verify_ok();
    for family in ["-4", "-6"] {
        pod.sh(&format!(
            "ip {family} rule add fwmark 1337 lookup main pref 100"
        ));
    }
    pod.verify_shadowed(&[
        "ip -4 rule:\n  rule:   100: from all fwmark 0x539 lookup main\n",
        "ip -6 rule:\n  rule:   100: from all fwmark 0x539 lookup main\n",
        "packets marked 1337 are routed by table main, before our `fwmark 1337 lookup 133`",
    ]);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn inspect_shadow_a_foreign_nft_table_that_redirects_first() {
    if common::skip_unless_root("inspect_shadow_a_foreign_nft_table_that_redirects_first") {
        return;
    }
    for backend in [Backend::Iptables, Backend::Nft] {
        let pod = Pod::new("shnft", backend, SEED, false);
        // An earlier accept ends only its own base chain: nothing to report.
        pod.sh("nft add table ip foo");
        pod.sh("nft add chain ip foo early '{ type filter hook output priority -300 ; }'");
        pod.sh("nft add rule ip foo early meta l4proto tcp accept");
        pod.verify_ok();
        // An earlier nat chain that redirects decides the connection's NAT.
        pod.sh("nft add chain ip foo out '{ type nat hook output priority -150 ; }'");
        pod.sh("nft add rule ip foo out tcp dport 80 redirect to :9999");
        let ours = match backend {
            Backend::Iptables => "nat OUTPUT, priority -100)",
            Backend::Nft => "(inet istio-proxy-nat output, priority -100)",
        };
        pod.verify_shadowed(&[
            "nft table ip foo chain out:\n  rule:   tcp dport 80 redirect to :9999\n",
            "for packets matching `tcp dport 80`, TCP is NATed by its `redirect` in this chain \
             (type nat hook output priority -150), before ours",
            ours,
        ]);
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn inspect_shadow_an_nft_rule_in_iptables_nft_table() {
    if common::skip_unless_root("inspect_shadow_an_nft_rule_in_iptables_nft_table") {
        return;
    }
    let pod = Pod::new("shnftipt", Backend::Iptables, SEED, false);
    // iptables-nft-save translates it: `-A OUTPUT -p tcp -j RETURN`.
    pod.sh("nft insert rule ip nat OUTPUT meta l4proto tcp return");
    pod.verify_shadowed(&[" nat OUTPUT:\n  rule:   -A OUTPUT -p tcp -j RETURN\n"]);
    // One it cannot translate makes the whole table "incompatible": iptables-nft-save prints
    // nothing of it, so our nat rules read as missing (drift, which wins), and the rule is
    // judged from `nft list table ip nat`.
    pod.sh("nft insert rule ip nat OUTPUT meta l4proto tcp ct state new log prefix '\"x\"' return");
    let (code, text) = pod.verify(&[]);
    assert_eq!(code, Some(3), "{text}");
    for w in [
        "Foreign rules that take packets before ours:\n",
        " nat:\n  rule:   # Table `nat' is incompatible, use 'nft' tool.\n",
        "rule:   meta l4proto tcp ct state new log prefix \"x\" return\n",
        "for packets matching `ct state new`, TCP leaves the chain before the jump to ISTIO_OUTPUT",
    ] {
        assert!(text.contains(w), "verify should say `{w}`:\n{text}");
    }
}
