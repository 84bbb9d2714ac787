//! `explain --from-kernel` against whatever the kernel holds, each verdict checked against a
//! real connection made right after it (so explain agrees with what the kernel does).
//!
//! Root-only (`cargo test --test it explain_live:: -- --include-ignored`). Each test builds a
//! [`Topology`] (pod and peer namespaces joined by `eth0`), starts TCP listeners (in the pod
//! 8080, the proxy's 15001 and 15006, and 15002 for a second capture; on the peer 80), sets
//! up the rules, then for each packet runs the binary's `explain ... --from-kernel` inside
//! the pod and connects for real as the same uid and gid ([`connect`]: the socket's fsuid
//! and fsgid, what the owner matches see):
//!
//! 1. **Whatever is installed** (`*_whatever_the_flags`, `*_two_places_*`, `*_order_*`): the
//!    capture in native nftables explained with iptables flags and the other way round; the
//!    same rules in iptables-nft and iptables-legacy (and native nftables), a warning naming
//!    the places; two places that disagree at equal priority, verdict unknown (exit 6),
//!    the connection landing where the place set up last sends it.
//! 2. **Nothing installed** (`*_no_capture_rules_*`): "no capture rules installed", JSON
//!    verdict `no-capture-rules`, also with only a foreign rule there.
//! 3. **The pod's own address** (`*_own_address_*`): without `--pod-ip`, both backends and
//!    families: the app's connection to it is not captured, the proxy's goes to 15006; and
//!    `-m addrtype --dst-type LOCAL` evaluated from the namespace's routes.
//! 4. **A rule it cannot evaluate** (`*_cannot_evaluate_*`): kube-proxy's `-m statistic`:
//!    verdict unknown (exit 6), the walk so far and the rule, in text and JSON.

use crate::common;

use std::net::{IpAddr, SocketAddr};

use common::{
    APP, Backend, Ident, Listener, PROXY, SEED, Topology, connect, sa, shell_command,
    skip_unless_root,
};

/// A pod with listeners, and the rules a test puts there.
struct Pod {
    // Listeners first: they stop before the namespaces go.
    _listeners: Vec<Listener>,
    t: Topology,
    ipv6: bool,
}

/// What explain said of one packet.
#[derive(Debug)]
struct Said {
    code: Option<i32>,
    text: String,
    json: serde_json::Value,
}

impl Said {
    /// `redirect 15001`, `not-captured`, `unknown`, ...
    fn verdict(&self) -> String {
        let word = self.json["verdict"].as_str().unwrap_or("?").to_string();
        match self.json["port"].as_u64() {
            Some(p) => format!("{word} {p}"),
            None => word,
        }
    }

    fn warnings(&self) -> Vec<String> {
        self.json["warnings"]
            .as_array()
            .map(|w| {
                w.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Pod {
    fn new(name: &str, ipv6: bool) -> Pod {
        let t = Topology::new(name);
        let mut listeners = Vec::new();
        for any in [
            IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
            IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
        ] {
            for port in [8080, 15001, 15002, 15006] {
                listeners.push(Listener::tcp(&t.pod, &format!("pod:{port}"), sa(any, port)));
            }
            listeners.push(Listener::tcp(&t.peer, "peer:80", sa(any, 80)));
        }
        Pod {
            _listeners: listeners,
            t,
            ipv6,
        }
    }

    fn own(&self, v6: bool) -> IpAddr {
        if v6 {
            self.t.pod_v6.into()
        } else {
            self.t.pod_v4.into()
        }
    }

    fn peer(&self, v6: bool) -> IpAddr {
        if v6 {
            self.t.peer_v6.into()
        } else {
            self.t.peer_v4.into()
        }
    }

    /// Applies SEED with `backend` for real.
    fn apply(&self, backend: Backend) {
        self.t.apply_ok(backend, &self.t.pod, self.ipv6, SEED);
    }

    /// Runs `script` with `sh` in the pod; panics unless it succeeds.
    fn sh(&self, script: &str) {
        let out = self.t.exec(&self.t.pod, "sh", &["-ec", script], &[]);
        assert!(
            out.status.success(),
            "`{script}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `explain FLAGS SEED --direction outbound --dst DST --uid U --gid G --from-kernel`, as
    /// text and as JSON, inside the pod.
    fn explain(&self, flags: &[&str], who: Ident, dst: SocketAddr) -> Said {
        let (dst, uid, gid) = (dst.to_string(), who.uid.to_string(), who.gid.to_string());
        let mut argv = vec!["explain"];
        argv.extend_from_slice(flags);
        argv.extend_from_slice(SEED);
        argv.extend([
            "--direction",
            "outbound",
            "--dst",
            &dst,
            "--uid",
            &uid,
            "--gid",
            &gid,
            "--from-kernel",
        ]);
        let run = |extra: &[&str]| {
            let mut a = argv.clone();
            a.extend_from_slice(extra);
            self.t.run_bin(&self.t.pod, self.ipv6, &a)
        };
        let text = run(&[]);
        let json = run(&["--output", "json"]);
        assert_eq!(text.status.code(), json.status.code());
        let stdout = String::from_utf8_lossy(&json.stdout).into_owned();
        Said {
            code: text.status.code(),
            text: String::from_utf8_lossy(&text.stdout).into_owned(),
            json: serde_json::from_str(&stdout).unwrap_or_else(|e| {
                panic!(
                    "explain's JSON ({e}): {stdout:?}; stderr: {}",
                    String::from_utf8_lossy(&json.stderr)
                )
            }),
        }
    }

    /// Where a real connection from the pod as `who` to `dst` lands: the listener's label.
    fn land(&self, who: Ident, dst: SocketAddr) -> String {
        match connect(&self.t.pod, who, dst, None) {
            Ok(l) => l.label,
            Err(e) => format!("failed: {e}"),
        }
    }

    /// Explains `who` → `dst` and connects for real: the verdict must be `want` and the
    /// connection must land where it says. Returns what explain said.
    fn check(&self, flags: &[&str], who: Ident, dst: SocketAddr, want: &str) -> Said {
        let said = self.explain(flags, who, dst);
        let landed = self.land(who, dst);
        let at_dst = if dst.ip() == self.own(dst.is_ipv6()) {
            format!("pod:{}", dst.port())
        } else {
            format!("peer:{}", dst.port())
        };
        let expected_landing = match said.verdict().split_once(' ') {
            Some(("redirect", port)) => format!("pod:{port}"),
            _ => at_dst,
        };
        let context = || {
            format!(
                "explain {flags:?} {who} -> {dst}:\n{}\n--- rules ---\n{}",
                said.text,
                self.t.describe_for(Backend::Iptables, &self.t.pod)
                    + &self.t.describe_for(Backend::Nft, &self.t.pod)
            )
        };
        assert_eq!(said.verdict(), want, "{}", context());
        assert_eq!(
            landed,
            expected_landing,
            "explain says {want}, but the connection landed elsewhere\n{}",
            context()
        );
        assert_eq!(said.code, Some(0), "{}", context());
        eprintln!("PASS {flags:?} {who} -> {dst}: {want}, landed at {landed}");
        said
    }
}

/// `--native-nftables` state explained with iptables flags, and iptables state with
/// `--native-nftables`: explain walks what is there and names it.
#[test]
#[ignore = "needs root and network namespaces"]
fn from_kernel_walks_the_capture_whatever_the_flags() {
    if skip_unless_root("from_kernel_walks_the_capture_whatever_the_flags") {
        return;
    }
    for (applied, flags, place) in [
        (
            Backend::Nft,
            &[][..],
            "live rules: native nftables (inet istio-proxy-*)",
        ),
        (
            Backend::Iptables,
            &["--native-nftables"][..],
            "live rules: iptables-nft, IPv4",
        ),
    ] {
        let pod = Pod::new("lflags", false);
        pod.apply(applied);
        let peer = sa(pod.peer(false), 80);
        let said = pod.check(flags, APP, peer, "redirect 15001");
        assert!(
            said.text.lines().next().unwrap().ends_with(place),
            "{}",
            said.text
        );
        assert!(said.warnings().is_empty(), "{}", said.text);
        pod.check(flags, PROXY, peer, "not-captured");
        pod.check(flags, APP, sa(pod.own(false), 8080), "not-captured");
        pod.check(flags, PROXY, sa(pod.own(false), 8080), "redirect 15006");
    }
}

/// The same capture in iptables-nft and iptables-legacy, then in native nftables too: all
/// run, a warning names them, and every order gives the verdict the traffic shows.
#[test]
#[ignore = "needs root and network namespaces"]
fn from_kernel_warns_when_two_places_hold_capture_rules() {
    if skip_unless_root("from_kernel_warns_when_two_places_hold_capture_rules") {
        return;
    }
    let pod = Pod::new("ltwo", false);
    pod.apply(Backend::Iptables);
    pod.sh("iptables-nft-save | iptables-legacy-restore");
    let (peer, own) = (sa(pod.peer(false), 80), sa(pod.own(false), 8080));
    for (who, dst, want) in [
        (APP, peer, "redirect 15001"),
        (PROXY, peer, "not-captured"),
        (APP, own, "not-captured"),
        (PROXY, own, "redirect 15006"),
    ] {
        let said = pod.check(&[], who, dst, want);
        let w = said.warnings();
        assert!(
            w.len() == 1
                && w[0].starts_with(
                    "capture rules are in more than one place: iptables-legacy, IPv4 and iptables-nft, IPv4."
                )
                && w[0].contains("every order gives this verdict"),
            "{}",
            said.text
        );
        assert!(
            said.text
                .contains("  warning: capture rules are in more than one place")
        );
        assert!(
            said.text
                .contains("; live rules: iptables-legacy, IPv4 + iptables-nft, IPv4\n"),
            "{}",
            said.text
        );
    }
    // Native nftables too, as its dry-run script writes it (nothing removed).
    let dry = shell_command(Backend::Nft.argv(&[&["--dry-run"][..], SEED].concat()));
    pod.sh(&format!("{} {dry} 2>/dev/null | sh", common::BIN));
    for (who, dst, want) in [
        (APP, peer, "redirect 15001"),
        (PROXY, own, "redirect 15006"),
    ] {
        let said = pod.check(&[], who, dst, want);
        assert!(
            said.warnings()[0].starts_with(
                "capture rules are in more than one place: iptables-legacy, IPv4, \
                 iptables-nft, IPv4 and native nftables (inet istio-proxy-*)."
            ),
            "{}",
            said.text
        );
    }
}

/// iptables-nft redirects to 15001, iptables-legacy (set up later) to 15002: both nat at
/// -100, so the order the kernel runs them in decides, and that cannot be read. explain
/// says unknown (exit 6) and names both outcomes; the kernel runs the one set up last first.
#[test]
#[ignore = "needs root and network namespaces"]
fn from_kernel_when_the_order_of_equal_priorities_decides_it_is_unknown() {
    if skip_unless_root("from_kernel_when_the_order_of_equal_priorities_decides_it_is_unknown") {
        return;
    }
    let pod = Pod::new("lorder", false);
    pod.apply(Backend::Iptables);
    pod.sh(
        "iptables-nft-save | sed 's/--to-ports 15001/--to-ports 15002/' | iptables-legacy-restore",
    );
    let peer = sa(pod.peer(false), 80);
    let said = pod.explain(&[], APP, peer);
    assert_eq!(said.code, Some(6), "{}", said.text);
    assert_eq!(said.verdict(), "unknown", "{}", said.text);
    let why = said.json["stopped"]["reason"].as_str().unwrap_or_default();
    assert!(
        why.contains("iptables-legacy, IPv4, then iptables-nft, IPv4 gives redirect to 15002")
            && why
                .contains("iptables-nft, IPv4, then iptables-legacy, IPv4 gives redirect to 15001"),
        "{}",
        said.text
    );
    assert!(
        said.text.contains("verdict: unknown: at equal priority"),
        "{}",
        said.text
    );
    let landed = pod.land(APP, peer);
    assert_eq!(
        landed, "pod:15002",
        "the legacy nat table, registered last, runs first"
    );
    // The proxy's own traffic is left alone by both: no order changes that.
    pod.check(&[], PROXY, peer, "not-captured");
}

/// No capture rules anywhere: "no capture rules installed", not "not captured"; the same
/// with only a foreign rule installed.
#[test]
#[ignore = "needs root and network namespaces"]
fn from_kernel_with_no_capture_rules_says_so() {
    if skip_unless_root("from_kernel_with_no_capture_rules_says_so") {
        return;
    }
    let pod = Pod::new("lnone", false);
    let peer = sa(pod.peer(false), 80);
    for native in [false, true] {
        let flags: &[&str] = if native { &["--native-nftables"] } else { &[] };
        let said = pod.check(flags, APP, peer, "no-capture-rules");
        assert!(
            said.text.contains("; live rules: none installed\n")
                && said.text.contains("verdict: no capture rules installed"),
            "{}",
            said.text
        );
    }
    pod.sh("iptables -t nat -N DOCKER && iptables -t nat -A OUTPUT -m addrtype --dst-type LOCAL -j DOCKER");
    let said = pod.check(&[], APP, peer, "no-capture-rules");
    assert!(
        said.text.contains("; live rules: iptables-nft, IPv4\n"),
        "{}",
        said.text
    );
    pod.check(&[], APP, sa(pod.own(false), 8080), "no-capture-rules");
}

/// Traffic to the pod's own address leaves by lo, from that address, without `--pod-ip`:
/// the app's connection is not captured, the proxy's goes to the inbound side; both backends,
/// both families.
#[test]
#[ignore = "needs root and network namespaces"]
fn from_kernel_the_own_address_is_local() {
    if skip_unless_root("from_kernel_the_own_address_is_local") {
        return;
    }
    for backend in [Backend::Iptables, Backend::Nft] {
        let pod = Pod::new("lown", true);
        pod.apply(backend);
        for v6 in [false, true] {
            let own = sa(pod.own(v6), 8080);
            let said = pod.check(backend.flags(), APP, own, "not-captured");
            let head = said.text.lines().next().unwrap_or_default().to_string();
            assert!(
                head.contains(&format!("{own}, uid 0, gid 0, out lo;")),
                "{}",
                said.text
            );
            assert!(
                head.contains(&format!("tcp {} -> ", sa(pod.own(v6), 40000))),
                "{head}"
            );
            pod.check(backend.flags(), PROXY, own, "redirect 15006");
            pod.check(backend.flags(), APP, sa(pod.peer(v6), 80), "redirect 15001");
        }
    }
}

/// `-m addrtype --dst-type LOCAL` is evaluated from the namespace's routes: Docker's jump to
/// an empty chain changes nothing; a RETURN for local destinations leaves the proxy's
/// connection to its own address alone, and the connection agrees.
#[test]
#[ignore = "needs root and network namespaces"]
fn from_kernel_the_own_address_and_addrtype_local() {
    if skip_unless_root("from_kernel_the_own_address_and_addrtype_local") {
        return;
    }
    let pod = Pod::new("laddr", true);
    pod.apply(Backend::Iptables);
    for ipt in ["iptables", "ip6tables"] {
        pod.sh(&format!(
            "{ipt} -t nat -N DOCKER && {ipt} -t nat -I OUTPUT -m addrtype --dst-type LOCAL -j DOCKER"
        ));
    }
    for v6 in [false, true] {
        let own = sa(pod.own(v6), 8080);
        let said = pod.check(&[], PROXY, own, "redirect 15006");
        assert!(
            said.text
                .contains("MATCH nat/OUTPUT #1: -A OUTPUT -m addrtype --dst-type LOCAL -j DOCKER"),
            "{}",
            said.text
        );
        pod.check(&[], APP, own, "not-captured");
        let said = pod.check(&[], APP, sa(pod.peer(v6), 80), "redirect 15001");
        assert!(
            said.text
                .contains("-     nat/OUTPUT #1: -A OUTPUT -m addrtype --dst-type LOCAL -j DOCKER"),
            "{}",
            said.text
        );
    }
    for ipt in ["iptables", "ip6tables"] {
        pod.sh(&format!(
            "{ipt} -t nat -I OUTPUT -m addrtype --dst-type LOCAL -j RETURN"
        ));
    }
    for v6 in [false, true] {
        pod.check(&[], PROXY, sa(pod.own(v6), 8080), "not-captured");
        pod.check(&[], APP, sa(pod.peer(v6), 80), "redirect 15001");
    }
}

/// kube-proxy's `-m statistic --mode random` cannot be evaluated: verdict unknown, exit 6,
/// the walk up to it and the rule, in text and JSON; a packet the rule is not about gets its
/// verdict.
#[test]
#[ignore = "needs root and network namespaces"]
fn from_kernel_a_rule_it_cannot_evaluate_is_unknown() {
    if skip_unless_root("from_kernel_a_rule_it_cannot_evaluate_is_unknown") {
        return;
    }
    let pod = Pod::new("lstat", false);
    pod.apply(Backend::Iptables);
    let peer = sa(pod.peer(false), 80);
    pod.sh(&format!(
        "iptables -t nat -N KUBE-SVC-X && \
         iptables -t nat -A KUBE-SVC-X -m comment --comment svc -m statistic --mode random --probability 0.5 -j RETURN && \
         iptables -t nat -I OUTPUT -d {}/32 -p tcp -j KUBE-SVC-X",
        peer.ip()
    ));
    let said = pod.explain(&[], APP, peer);
    assert_eq!(said.code, Some(6), "{}", said.text);
    assert_eq!(said.verdict(), "unknown");
    assert!(
        said.text.contains(&format!(
            "  MATCH nat/OUTPUT #1: -A OUTPUT -d {}/32 -p tcp -j KUBE-SVC-X\n  STOP  nat/KUBE-SVC-X #1: -A KUBE-SVC-X",
            peer.ip()
        )),
        "{}",
        said.text
    );
    assert!(
        said.text.contains(
            "verdict: unknown: the walk stops at nat/KUBE-SVC-X rule 1, which it cannot evaluate: unknown match \"statistic\""
        ),
        "{}",
        said.text
    );
    let stopped = &said.json["stopped"];
    assert_eq!(stopped["chain"], "KUBE-SVC-X", "{}", said.json);
    assert_eq!(stopped["rule"], 1);
    assert!(
        stopped["text"]
            .as_str()
            .unwrap_or_default()
            .contains("statistic")
    );
    assert_eq!(said.json["walk"].as_array().map(Vec::len), Some(1));
    // Whether the random rule matches or not, the packet goes on to ISTIO_OUTPUT: captured
    // (which explain cannot know without evaluating the rule).
    let landed = pod.land(APP, peer);
    assert!(landed == "pod:15001", "{landed}");
    // A packet the rule is not about passes it by.
    pod.check(&[], APP, sa(pod.own(false), 8080), "not-captured");
}
