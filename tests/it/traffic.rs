//! Real traffic through the rules: does what should be captured land on the proxy, and does
//! everything else reach its real destination?
//!
//! Each test builds a [`Topology`] (two network namespaces, `pod` and `peer`, joined by a
//! veth pair), runs the binary in `pod` with `ip netns exec`, opens listeners in the
//! namespaces and connects from threads that entered a namespace with `setns`. Traffic only
//! goes to loopback or to addresses inside the test's own namespaces.
//!
//! **Where did a connection land?** Every TCP listener answers each accepted connection with
//! one line: its label (`pod:15001`, `peer:80`, ...), the accepted socket's local address, the
//! original destination (`SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`, from conntrack) and the
//! client's address. The client reads that line, so each scenario knows exactly which
//! listener took its connection. UDP listeners answer each datagram the same way and record
//! it.
//!
//! **As whom?** iptables' owner match reads the socket's file credentials, fixed when the
//! socket is created. Clients run in their own thread, which calls `setfsgid`/`setfsuid`
//! (per thread on Linux) before creating the socket: uid/gid 0 is "the app", 1337 "the
//! proxy".
//!
//! **Which backend?** Every test runs twice, once per backend, and its name says which:
//! `..._iptables` applies the config with the binary's iptables backend, `..._nft` with
//! `--native-nftables` (Istio's `inet istio-proxy-*` tables). How a config is applied for a
//! backend is decided in one place, [`Topology::apply_ok`] in `tests/it/common/backend.rs`
//! (the binary run for real in the pod, as an init container), which also checks that the
//! capture is in that backend's tables. The scenarios (`tests/it/common/scenarios.rs`) and what
//! they expect are the same for both backends.
//!
//! Each test checks all its scenarios, prints one `PASS`/`FAIL` line per scenario to stderr,
//! and fails with every failed scenario (expected landing place, actual) plus the pod's
//! rules (`iptables-save`, or `nft list ruleset` for nft). Needs root (skips otherwise).
//! Every connect and read is bounded by [`common::TIMEOUT`]. The listeners and clients live
//! in `tests/it/common/sockets.rs` (shared with `tests/it/explain.rs`).

use crate::common;

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use common::{
    APP, Backend, CIDR_SCENARIOS, DNS_SCENARIOS, Dest, INBOUND_PORT_INCLUDE_SCENARIOS, Ident,
    LOCALHOST_V4, LOCALHOST_V6, Lands, Listener, OUTBOUND_PORT_EXCLUDE_SCENARIOS, OUTSIDE_V4,
    PROXY, SEED, SEED_SCENARIOS, Sender, TPROXY_SCENARIOS, Topology, TrafficScenario, UdpListener,
    connect, dns_flags, passthrough, proxy_flags, sa, seed_with, skip_unless_root, udp_exchange,
};

// ---------------------------------------------------------------------------
// Checking scenarios
// ---------------------------------------------------------------------------

/// Where a connection to `dst` must land.
#[derive(Debug, Clone)]
enum Want {
    /// Not captured: accepted by the listener labelled so, at `dst` itself.
    Direct(String),
    /// Captured by REDIRECT: accepted by the listener labelled so, with original dst `dst`.
    Redirected(String),
    /// Captured by TPROXY: accepted by the (transparent) listener labelled so, whose socket's
    /// local address is `dst`.
    Transparent(String),
}

impl Want {
    /// Where a row of the shared table must land, for a connection to `to` on `port`: the
    /// listener labelled `side:port`.
    fn of(s: &TrafficScenario) -> Want {
        match s.lands {
            Lands::Redirect(p) => Want::Redirected(format!("pod:{p}")),
            Lands::Tproxy(p) => Want::Transparent(format!("pod:{p}")),
            Lands::NotCaptured => Want::Direct(format!("{}:{}", s.to.side(), s.port)),
        }
    }
}

impl std::fmt::Display for Want {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Want::Direct(l) => write!(f, "not captured: reaches {l} directly"),
            Want::Redirected(l) => write!(f, "captured: lands on {l} with original dst = dst"),
            Want::Transparent(l) => {
                write!(
                    f,
                    "captured by TPROXY: lands on {l} with local address = dst"
                )
            }
        }
    }
}

/// The scenarios of one test: results are collected, printed, and asserted together (also
/// by `tests/it/image.rs`, with the image's entrypoint applying the rules).
pub(crate) struct Checks {
    test: &'static str,
    log: String,
    failures: Vec<String>,
}

impl Checks {
    pub(crate) fn new(test: &'static str) -> Checks {
        Checks {
            test,
            log: String::new(),
            failures: Vec::new(),
        }
    }

    fn record(&mut self, scenario: &str, problem: Option<String>) {
        let line = match &problem {
            None => format!("PASS {}: {scenario}", self.test),
            Some(p) => format!(
                "FAIL {}: {scenario}\n{}",
                self.test,
                common::indent(p, "       ").trim_end()
            ),
        };
        eprintln!("{line}");
        let verdict = if problem.is_none() { "PASS" } else { "FAIL" };
        let _ = writeln!(self.log, "  {verdict} {scenario}");
        if let Some(p) = problem {
            self.failures.push(format!(
                "{scenario}\n{}",
                common::indent(&p, "    ").trim_end()
            ));
        }
    }

    /// Connects from `ns` as `who` (from `src`, if given) to `dst`; checks against `want`.
    fn tcp(
        &mut self,
        scenario: &str,
        (ns, who, src): (&str, Ident, Option<IpAddr>),
        dst: SocketAddr,
        want: Want,
    ) {
        let from = src.map_or(String::new(), |s| format!(" from {s}"));
        let scenario = format!("{scenario} [{who}{from} -> {dst}; expected {want}]");
        let problem = match connect(ns, who, dst, src) {
            Err(e) => Some(format!("connection failed: {e}")),
            Ok(got) => {
                let ok = match &want {
                    Want::Direct(l) => got.label == *l && got.local == dst,
                    Want::Redirected(l) => got.label == *l && got.orig == Some(dst),
                    Want::Transparent(l) => got.label == *l && got.local == dst,
                };
                (!ok).then(|| format!("actual: landed on {got}"))
            }
        };
        self.record(&scenario, problem);
    }

    /// Sends a UDP datagram from `ns` as `who` to `dst`; it must arrive at `at` (and at no
    /// other of `all`), and the reply must come back carrying `at`'s label.
    fn udp(
        &mut self,
        scenario: &str,
        (ns, who): (&str, Ident),
        dst: SocketAddr,
        (at_label, at): (&str, &UdpListener),
        all: &[(&str, &UdpListener)],
    ) {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let token = format!("probe-{}", N.fetch_add(1, Ordering::SeqCst));
        let scenario = format!("{scenario} [udp {who} -> {dst}; expected at {at_label}]");
        let reply = udp_exchange(ns, who, dst, &token);
        // The listener records the datagram before replying; without a reply, give it a moment.
        if reply.is_err() {
            thread::sleep(Duration::from_millis(50));
        }
        let landed: Vec<&str> = all
            .iter()
            .filter(|(_, l)| l.got(&token).is_some())
            .map(|(label, _)| *label)
            .collect();
        let problem = if at.got(&token).is_none() || landed.len() != 1 {
            Some(format!(
                "actual: datagram arrived at {landed:?}; reply: {reply:?}"
            ))
        } else {
            match &reply {
                Ok(r) if r.starts_with(&format!("{at_label}|")) && r.ends_with(&token) => None,
                other => Some(format!(
                    "datagram arrived at {at_label}, but the reply did not come back \
                     intact: {other:?}"
                )),
            }
        };
        self.record(&scenario, problem);
    }

    /// Connects as each row of `table` says, in `t`, IPv6 with `v6`; checks where it lands.
    pub(crate) fn table(&mut self, t: &Topology, v6: bool, table: &[TrafficScenario]) {
        for s in table {
            let (ns, who, src) = match s.from {
                Sender::Pod(who) => (t.pod.as_str(), who, None),
                Sender::ProxyFromPassthrough => (t.pod.as_str(), PROXY, Some(passthrough(v6))),
                Sender::Peer => (t.peer.as_str(), APP, None),
            };
            self.tcp(
                s.what,
                (ns, who, src),
                sa(s.to.addr(t, v6), s.port),
                Want::of(s),
            );
        }
    }

    pub(crate) fn check(&mut self, scenario: &str, ok: bool, detail: impl FnOnce() -> String) {
        self.record(scenario, (!ok).then(detail));
    }

    /// Panics with every failure, the scenario log and `context` (rules, binary log) if any
    /// scenario failed.
    pub(crate) fn finish(self, context: impl FnOnce() -> String) {
        if !self.failures.is_empty() {
            panic!(
                "{}: {} scenario(s) failed:\n\n{}\n\nall scenarios:\n{}\n{}",
                self.test,
                self.failures.len(),
                self.failures.join("\n\n"),
                self.log,
                context()
            );
        }
    }
}

/// TCP listeners on `any` (the wildcard address of a family), one per `(side, port)`: in the
/// `pod` or `peer` namespace, labelled `side:port`.
pub(crate) fn tcp_listeners(t: &Topology, any: IpAddr, at: &[(&str, u16)]) -> Vec<Listener> {
    at.iter()
        .map(|&(side, port)| {
            let ns = match side {
                "pod" => &t.pod,
                "peer" => &t.peer,
                _ => panic!("a listener is in the pod or the peer, not {side:?}"),
            };
            Listener::tcp(ns, &format!("{side}:{port}"), sa(any, port))
        })
        .collect()
}

/// Context for a failure message: how the config was applied, the binary's log and the pod's
/// rules as `backend` keeps them.
pub(crate) fn context(t: &Topology, backend: Backend, apply_log: &str) -> String {
    format!(
        "--- {backend} backend, {apply_log}\n{}",
        common::indent(&t.describe_for(backend, &t.pod), "  ")
    )
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

common::per_backend! {
    /// The seed command over IPv4.
    seed_command_ipv4_iptables, seed_command_ipv4_nft => |test, b| seed_scenarios(test, b, false);
    /// The seed command over IPv6 (ENABLE_INBOUND_IPV6=true).
    seed_command_ipv6_iptables, seed_command_ipv6_nft => |test, b| seed_scenarios(test, b, true);
    /// `-i CIDR -x CIDR`: only the included range is captured, minus the excluded one.
    outbound_cidr_include_and_exclude_iptables, outbound_cidr_include_and_exclude_nft =>
        outbound_cidr_include_and_exclude;
    /// `-o PORT`: outbound to an excluded port is not captured, other ports are.
    outbound_port_exclude_iptables, outbound_port_exclude_nft => outbound_port_exclude;
    /// `-b PORTS`: only the listed inbound ports are captured.
    inbound_port_include_iptables, inbound_port_include_nft => inbound_port_include;
    /// TPROXY mode, IPv4 and IPv6.
    tproxy_inbound_iptables, tproxy_inbound_nft => tproxy_inbound;
    /// `--redirect-dns`, IPv4 and IPv6, UDP and TCP.
    dns_redirect_iptables, dns_redirect_nft => dns_redirect;
    /// `--run-validation`. The rules come from [`Topology::apply_ok`]; the probe is always
    /// the binary's real run, with nft `--native-nftables --skip-rule-apply --run-validation`
    /// (nothing stands in for the binary probing live rules), so the nft test fails with
    /// exit 2 ("not supported yet") until the real `--native-nftables` apply lands.
    validation_probe_iptables, validation_probe_nft => validation_probe;
}

/// The seed command over IPv4 (or IPv6 with ENABLE_INBOUND_IPV6=true): outbound and inbound
/// capture, the proxy's own traffic, localhost, app-to-self, passthrough, exclusions.
fn seed_scenarios(test: &'static str, backend: Backend, v6: bool) {
    if skip_unless_root(test) {
        return;
    }
    let t = Topology::new(if v6 { "seed6" } else { "seed4" });
    let bin_log = t.apply_ok(backend, &t.pod, v6, SEED);
    let any: IpAddr = if v6 {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let pod_ip = Dest::Pod.addr(&t, v6);
    let outbound = Listener::tcp(&t.pod, "pod:15001", sa(any, 15001));
    let _others = tcp_listeners(
        &t,
        any,
        &[
            ("pod", 15006),
            ("pod", 8080),
            ("pod", 15090),
            ("pod", 15008),
            ("peer", 80),
        ],
    );

    let mut c = Checks::new(test);
    if v6 {
        let lo = t.exec(&t.pod, "ip", &["-6", "addr", "show", "dev", "lo"], &[]);
        let lo = String::from_utf8_lossy(&lo.stdout).into_owned();
        c.check(
            "the binary added ::6/128 to lo",
            lo.contains("::6/128"),
            || format!("`ip -6 addr show dev lo`:\n{lo}"),
        );
    }
    c.table(&t, v6, SEED_SCENARIOS);
    let outbound_seen = outbound.accepted();
    c.check(
        "the outbound listener accepted exactly the two captured connections, both from the pod",
        outbound_seen.len() == 2 && outbound_seen.iter().all(|l| l.peer.ip() == pod_ip),
        || format!("pod:15001 accepted: {outbound_seen:#?}"),
    );
    c.finish(|| context(&t, backend, &bin_log));
}

/// `-i CIDR -x CIDR`: only the included range is captured, minus the excluded one.
fn outbound_cidr_include_and_exclude(test: &'static str, backend: Backend) {
    if skip_unless_root(test) {
        return;
    }
    let t = Topology::new("cidr");
    let dev = common::TOPOLOGY_DEV;
    // A second peer address inside the subnet, and one outside it (routed via the peer).
    let second = t.v4(3);
    let outside = OUTSIDE_V4;
    t.ip(
        &t.peer,
        &["addr", "add", &format!("{second}/24"), "dev", dev],
    )
    .unwrap();
    t.ip(
        &t.peer,
        &["addr", "add", &format!("{outside}/32"), "dev", "lo"],
    )
    .unwrap();
    t.ip(
        &t.pod,
        &[
            "route",
            "add",
            &format!("{outside}/32"),
            "via",
            &t.peer_v4.to_string(),
        ],
    )
    .unwrap();
    let include = t.subnet_v4();
    let exclude = format!("{}/32", t.peer_v4);
    let args = proxy_flags("REDIRECT", &["-i", &include, "-x", &exclude, "-b", "*"]);
    let bin_log = t.apply_ok(backend, &t.pod, false, &args);
    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let _listeners = tcp_listeners(&t, any, &[("pod", 15001), ("pod", 15006), ("peer", 80)]);

    let mut c = Checks::new(test);
    c.table(&t, false, CIDR_SCENARIOS);
    c.finish(|| context(&t, backend, &bin_log));
}

/// One IPv4-only test: applies `args` in a fresh topology `name`, starts the TCP listeners `at`
/// (see [`tcp_listeners`]), then connects as each row of `table` says.
fn port_scenarios(
    test: &'static str,
    backend: Backend,
    name: &str,
    args: &[&str],
    at: &[(&str, u16)],
    table: &[TrafficScenario],
) {
    if skip_unless_root(test) {
        return;
    }
    let t = Topology::new(name);
    let bin_log = t.apply_ok(backend, &t.pod, false, args);
    let _listeners = tcp_listeners(&t, IpAddr::V4(Ipv4Addr::UNSPECIFIED), at);
    let mut c = Checks::new(test);
    c.table(&t, false, table);
    c.finish(|| context(&t, backend, &bin_log));
}

/// `-o PORT`: outbound to an excluded port is not captured, other ports are.
fn outbound_port_exclude(test: &'static str, backend: Backend) {
    port_scenarios(
        test,
        backend,
        "oport",
        &proxy_flags("REDIRECT", &["-i", "*", "-b", "*", "-o", "80"]),
        &[("pod", 15001), ("peer", 80), ("peer", 443)],
        OUTBOUND_PORT_EXCLUDE_SCENARIOS,
    );
}

/// `-b PORTS`: only the listed inbound ports are captured.
fn inbound_port_include(test: &'static str, backend: Backend) {
    port_scenarios(
        test,
        backend,
        "iport",
        &proxy_flags("REDIRECT", &["-i", "*", "-b", "8080"]),
        &[("pod", 15006), ("pod", 8080), ("pod", 9090)],
        INBOUND_PORT_INCLUDE_SCENARIOS,
    );
}

/// TPROXY mode: inbound is delivered, unaltered, to a transparent listener on the inbound
/// port; `ip rule`/`ip route` for the mark are in place; outbound still uses REDIRECT.
fn tproxy_inbound(test: &'static str, backend: Backend) {
    if skip_unless_root(test) {
        return;
    }
    let t = Topology::new("tproxy");
    let args = seed_with("-m", "TPROXY");
    let bin_log = t.apply_ok(backend, &t.pod, true, &args);
    let pod = t.pod.as_str();
    let mut c = Checks::new(test);

    // Default mark 1337 (0x539) and route table 133, for both families.
    let table_rule = "fwmark 0x539 lookup 133";
    for family in ["-4", "-6"] {
        let rules =
            String::from_utf8_lossy(&t.exec(pod, "ip", &[family, "rule"], &[]).stdout).into_owned();
        c.check(
            &format!("`ip {family} rule` has `{table_rule}`"),
            rules.contains(table_rule),
            || format!("`ip {family} rule`:\n{rules}"),
        );
        let routes = String::from_utf8_lossy(
            &t.exec(pod, "ip", &[family, "route", "show", "table", "133"], &[])
                .stdout,
        )
        .into_owned();
        c.check(
            &format!("`ip {family} route show table 133` has `local default dev lo`"),
            routes.contains("local default dev lo"),
            || format!("`ip {family} route show table 133`:\n{routes}"),
        );
    }

    let mut listeners = Vec::new();
    for v6 in [false, true] {
        let any: IpAddr = if v6 {
            Ipv6Addr::UNSPECIFIED.into()
        } else {
            Ipv4Addr::UNSPECIFIED.into()
        };
        listeners.push(Listener::transparent(pod, "pod:15006", sa(any, 15006)));
        listeners.extend(tcp_listeners(
            &t,
            any,
            &[("pod", 15001), ("pod", 8080), ("pod", 15090), ("peer", 80)],
        ));
        c.table(&t, v6, TPROXY_SCENARIOS);
    }
    drop(listeners);
    c.finish(|| context(&t, backend, &bin_log));
}

/// `--redirect-dns` (IPv4 and IPv6): the app's DNS to the resolv.conf servers (UDP and TCP)
/// goes to the agent on 15053; the proxy's own DNS and DNS to other servers is left alone.
fn dns_redirect(test: &'static str, backend: Backend) {
    if skip_unless_root(test) {
        return;
    }
    let t = Topology::new("dns");
    let tmp = common::TempDir::new("istio-iptables-traffic-dns");
    let resolv = tmp.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("nameserver {}\nnameserver {}\n", t.peer_v4, t.peer_v6),
    )
    .unwrap();
    // Another address on the peer, a DNS server that is not in resolv.conf.
    let (other_v4, other_v6) = (t.v4(3), t.v6(3));
    let dev = common::TOPOLOGY_DEV;
    t.ip(
        &t.peer,
        &["addr", "add", &format!("{other_v4}/24"), "dev", dev],
    )
    .unwrap();
    t.ip(
        &t.peer,
        &[
            "addr",
            "add",
            &format!("{other_v6}/64"),
            "dev",
            dev,
            "nodad",
        ],
    )
    .unwrap();
    let resolv_s = resolv.to_string_lossy().into_owned();
    let args = dns_flags(&resolv_s);
    let bin_log = t.apply_ok(backend, &t.pod, true, &args);
    let pod = t.pod.as_str();
    let peer = t.peer.as_str();
    let mut c = Checks::new(test);

    for v6 in [false, true] {
        let (any, localhost): (IpAddr, IpAddr) = if v6 {
            (Ipv6Addr::UNSPECIFIED.into(), LOCALHOST_V6)
        } else {
            (Ipv4Addr::UNSPECIFIED.into(), LOCALHOST_V4)
        };
        let (server, other) = (Dest::Peer.addr(&t, v6), Dest::Second.addr(&t, v6));
        // The agent's DNS proxy listens on localhost as the proxy user (the conntrack-zone
        // rules match its replies by owner).
        let agent_udp = UdpListener::start(pod, "pod:15053", sa(localhost, 15053), PROXY);
        // One UDP server per peer address: a wildcard-bound UDP socket would answer from the
        // primary address, which a client connected to the other one drops.
        let server_udp = UdpListener::start(peer, "peer:53", sa(server, 53), APP);
        let other_udp = UdpListener::start(peer, "peer(other):53", sa(other, 53), APP);
        let _agent_tcp = Listener::tcp(pod, "pod:15053/tcp", sa(localhost, 15053));
        let _server_tcp = Listener::tcp(peer, "peer:53/tcp", sa(any, 53));
        let _outbound = Listener::tcp(pod, "pod:15001", sa(any, 15001));
        let all = [
            ("pod:15053", &agent_udp),
            ("peer:53", &server_udp),
            ("peer(other):53", &other_udp),
        ];

        for row in DNS_SCENARIOS {
            let Sender::Pod(who) = row.from else {
                panic!("DNS is sent from the pod: {row:?}")
            };
            let dst = sa(row.to.addr(&t, v6), row.port);
            if row.udp {
                let at = match (row.lands, row.to) {
                    (Lands::Redirect(_), _) => ("pod:15053", &agent_udp),
                    (Lands::NotCaptured, Dest::Peer) => ("peer:53", &server_udp),
                    _ => ("peer(other):53", &other_udp),
                };
                c.udp(row.what, (pod, who), dst, at, &all);
            } else {
                let want = match row.lands {
                    Lands::Redirect(_) => Want::Redirected("pod:15053/tcp".into()),
                    _ => Want::Direct("peer:53/tcp".into()),
                };
                c.tcp(row.what, (pod, who, None), dst, want);
            }
        }
    }
    c.finish(|| context(&t, backend, &bin_log));
}

/// `--run-validation` with `--skip-rule-apply`: passes (exit 0) where the seed rules are in
/// place, for IPv4 and for IPv4+IPv6; fails with Istio's code 126 where there are none. The
/// probe is always the binary's real run with the backend's flags: with nft,
/// `istio-iptables --native-nftables --skip-rule-apply --run-validation ...`.
fn validation_probe(test: &'static str, backend: Backend) {
    if skip_unless_root(test) {
        return;
    }
    let t = Topology::new("valid");
    let bin_log = t.apply_ok(backend, &t.pod, true, SEED);
    let mut c = Checks::new(test);
    for (ns, ipv6, timeout, want, scenario) in [
        (
            &t.pod,
            false,
            "3s",
            0,
            "with the seed rules, IPv4 validation passes",
        ),
        (
            &t.pod,
            true,
            "3s",
            0,
            "with the seed rules, IPv4+IPv6 validation passes",
        ),
        (
            &t.peer,
            false,
            "1s",
            126,
            "without rules, validation fails with 126",
        ),
    ] {
        let args = backend.argv(&[
            "--skip-rule-apply",
            "--run-validation",
            "--probe-timeout",
            timeout,
            "-p",
            "15001",
            "-z",
            "15006",
            "-u",
            "1337",
        ]);
        let started = std::time::Instant::now();
        let out = t.run_bin(ns, ipv6, &args);
        let run = format!("`istio-iptables {}`", common::shell_command(&args));
        let elapsed = started.elapsed();
        let code = out.status.code();
        c.check(
            &format!("{scenario} ({run}, ENABLE_INBOUND_IPV6={ipv6})"),
            code == Some(want),
            || {
                format!(
                    "expected exit {want}, actual {} after {elapsed:?}\n--- stderr ---\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
            },
        );
    }
    c.finish(|| context(&t, backend, &bin_log));
}
