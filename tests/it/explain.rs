//! `explain` and `verify` against the kernel: what `explain` says about a packet must be where
//! the packet really lands, and `verify` must see every drift of the live rules.
//!
//! Three groups of tests, all on a [`Topology`] (two network namespaces, `pod` and `peer`,
//! joined by a veth pair named `eth0` on both sides), all root-only (they skip visibly
//! otherwise):
//!
//! 1. **Traffic scenarios** (`traffic_*`): every scenario of `tests/it/traffic.rs`, from the
//!    table both read (`tests/it/common/scenarios.rs`: seed command over IPv4 and IPv6, CIDR
//!    include/exclude, `-o` port exclude, `-b` include, TPROXY, DNS over UDP and TCP). Each connection is made for real, and `istio-iptables explain` with
//!    the same config flags is asked twice, from the config and `--from-kernel` (inside the
//!    pod namespace); both verdicts must equal where the connection landed, and the one from
//!    the config must equal what `tests/it/traffic.rs` expects (so a test cannot pass because
//!    nothing was captured at all). Each has a twin `…_nft` that applies and explains with
//!    `--native-nftables` (the nft walk, from the config and from `nft list ruleset inet`).
//!    `explain_passthrough_address_as_destination` (ignored: a known disagreement) does the
//!    same for connections to the passthrough addresses 127.0.0.6 and `::6`.
//! 2. **Differential** (`differential_explain_vs_kernel`): 300 generated packets (seeded
//!    splitmix64; the seed is printed, `EXPLAIN_DIFF_SEED` replays another) over five configs
//!    (REDIRECT and TPROXY, includes/excludes, IPv4 and IPv6, DNS), each sent for real and
//!    explained in-process from the config (through the library, with the same argv the
//!    binary would get); every fifth one is also explained by the binary `--from-kernel`.
//!    `differential_explain_vs_kernel_nft` does the same with `--native-nftables`.
//! 3. **verify** (`verify_*`): exit 0 right after an apply; exit 3 after deleting, adding or
//!    reordering one rule, or deleting a jump from a built-in chain, in either family, with a
//!    diff that names family, table, chain and rule; foreign rules in built-in chains are no
//!    drift; a missing TPROXY `ip rule`/route is drift.
//!
//! **Where did a packet land?** TCP listeners (from `tests/it/common/mod.rs`) answer with their
//! label (`pod:15001`, `peer:80`), the accepted socket's local address and `SO_ORIGINAL_DST`.
//! The verdicts map to landings as follows:
//!
//! | explain | TCP | UDP |
//! |---|---|---|
//! | `redirect` P | listener `pod:P`, original destination = dst | only `pod:P/udp` got it |
//! | `tproxy` P | listener `pod:P` (transparent), local address = dst | - |
//! | `not-captured` | the listener at dst itself (pod or peer), local address = dst | only the socket bound to dst got it |
//! | `drop` | the connection failed | - |
//!
//! Every connect is bounded by [`common::TIMEOUT`]; the differential test also fails when it
//! runs longer than [`DIFF_BUDGET`] (which would mean hangs).

use crate::common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use istio_iptables::backend::iptables::Iptables;
use istio_iptables::backend::iptables::build as rules;
use istio_iptables::backend::iptables::walk::ruleset_from_rules;
use istio_iptables::backend::nft::Nftables;
use istio_iptables::cli::{Args, Command as Subcommand};
use istio_iptables::commands::explain::{self, ExplainRequest};
use istio_iptables::config::{BackendChoice, Config, HostFacts};
use istio_iptables::model::{Family, Table};
use istio_iptables::system::Env;
use istio_iptables::system::exec::SystemRunner;
use istio_iptables::system::host::RealHost;
use istio_iptables::system::host_view::SystemProbe;

use common::{
    APP, BIN, Backend, CIDR_SCENARIOS, DEFAULT_TIMEOUT, DNS_SCENARIOS, Dest,
    INBOUND_PORT_INCLUDE_SCENARIOS, Ident, LOCALHOST_V4, LOCALHOST_V6, Landing, Lands, Listener,
    OTHER_APP, OUTBOUND_PORT_EXCLUDE_SCENARIOS, OUTSIDE_V4, OUTSIDE_V6, PASSTHROUGH_V4, PROXY,
    PROXY_GROUP, SEED, SEED_SCENARIOS, Sender, TOPOLOGY_DEV, TPROXY_SCENARIOS, TempDir, Topology,
    TrafficScenario, UdpListener, connect, dns_flags, passthrough, proxy_flags, run_with_timeout,
    sa, sane_path, seed_with, shell_command, skip_unless_root, udp_exchange,
};

/// Real destination ports: every one has a listener in both namespaces, both families.
const PORTS: &[u16] = &[53, 80, 443, 3306, 8080, 9090, 15008, 15020, 15090];

// ---------------------------------------------------------------------------
// explain's JSON
// ---------------------------------------------------------------------------

/// The part of explain's answer we compare: `verdict` and `port`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Verdict {
    word: String,
    port: Option<u16>,
}

impl Verdict {
    /// `"redirect 15001"`, `"tproxy 15006"`, `"not-captured"`.
    fn of(s: &str) -> Verdict {
        let mut it = s.split_whitespace();
        let word = it.next().unwrap_or_default().to_string();
        let port = it.next().map(|p| p.parse().expect("a port"));
        Verdict { word, port }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "{} {p}", self.word),
            None => f.write_str(&self.word),
        }
    }
}

/// The raw value of the first `"key":` in `json` (a string without its quotes, or the text
/// up to the next `,`/`}`). `verdict` and `port` come before the walk, so the first match is
/// the top-level one (and quotes inside the walk's strings are escaped anyway).
fn json_value<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":");
    let rest = json[json.find(&pat)? + pat.len()..].trim_start();
    match rest.strip_prefix('"') {
        Some(s) => s.find('"').map(|end| &s[..end]),
        None => {
            let end = rest.find([',', '}']).unwrap_or(rest.len());
            Some(rest[..end].trim())
        }
    }
}

fn parse_verdict(json: &str) -> Result<Verdict, String> {
    let bad = |why: &str| format!("{why} in explain's JSON: {json:?}");
    if !json.trim_start().starts_with('{') {
        return Err(bad("not an object"));
    }
    let word = json_value(json, "verdict").ok_or_else(|| bad("no \"verdict\""))?;
    let port = match json_value(json, "port") {
        None => return Err(bad("no \"port\"")),
        Some("null") => None,
        Some(p) => Some(p.parse().map_err(|_| bad("bad \"port\""))?),
    };
    Ok(Verdict {
        word: word.to_string(),
        port,
    })
}

// ---------------------------------------------------------------------------
// Probes: one connection (or datagram)
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

/// One connection: inbound (from the peer to the pod) or outbound (from the pod, as `who`).
#[derive(Debug, Clone)]
struct Probe {
    inbound: bool,
    who: Ident,
    /// Source address to bind (inbound: a peer address; outbound: the passthrough source).
    src: Option<IpAddr>,
    dst: SocketAddr,
    proto: Proto,
}

impl Probe {
    fn outbound(who: Ident, dst: SocketAddr) -> Probe {
        Probe {
            inbound: false,
            who,
            src: None,
            dst,
            proto: Proto::Tcp,
        }
    }

    fn inbound(src: IpAddr, dst: SocketAddr) -> Probe {
        Probe {
            inbound: true,
            who: APP,
            src: Some(src),
            dst,
            proto: Proto::Tcp,
        }
    }

    fn from(mut self, src: IpAddr) -> Probe {
        self.src = Some(src);
        self
    }

    fn udp(mut self) -> Probe {
        self.proto = Proto::Udp;
        self
    }
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        if self.inbound {
            write!(f, "inbound {proto} ")?;
        } else {
            write!(
                f,
                "outbound {proto} uid {} gid {} ",
                self.who.uid, self.who.gid
            )?;
        }
        if let Some(s) = self.src {
            write!(f, "{s} ")?;
        }
        write!(f, "-> {}", self.dst)
    }
}

/// Where a probe really went.
#[derive(Debug)]
enum Landed {
    Tcp(Result<Landing, String>),
    /// Labels and bound addresses of the UDP sockets the datagram reached, and the reply.
    Udp {
        at: Vec<(String, SocketAddr)>,
        reply: Result<String, String>,
    },
}

impl std::fmt::Display for Landed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Landed::Tcp(Ok(l)) => write!(f, "landed on {l}"),
            Landed::Tcp(Err(e)) => write!(f, "connection failed: {e}"),
            Landed::Udp { at, reply } => {
                let at: Vec<String> = at.iter().map(|(l, a)| format!("{l} ({a})")).collect();
                write!(f, "datagram arrived at {at:?}; reply {reply:?}")
            }
        }
    }
}

/// `pod:8080` / `pod:15053/udp` → (`pod`, 8080).
fn split_label(label: &str) -> (&str, u16) {
    let label = label.strip_suffix("/udp").unwrap_or(label);
    let (ns, port) = label.rsplit_once(':').expect("listener labels are NS:PORT");
    (ns, port.parse().expect("listener labels end in a port"))
}

// ---------------------------------------------------------------------------
// A lab: a topology, a config applied in the pod, listeners everywhere
// ---------------------------------------------------------------------------

/// A [`Topology`] with extra peer addresses (`.3` of each subnet on the veth, an address
/// outside both subnets on the peer's `lo`, routed from the pod), a resolv.conf naming the
/// peer's primary addresses, a config applied in the pod and listeners on every port a probe
/// can reach.
struct Lab {
    // Listeners first: they stop before the namespaces go.
    tcp: Vec<Listener>,
    udp: Vec<(String, SocketAddr, UdpListener)>,
    t: Topology,
    _tmp: TempDir,
    /// The resolv.conf for `--redirect-dns`.
    resolv: String,
    /// The config flags (the same for apply and explain).
    args: Vec<String>,
    ipv6: bool,
    bin_log: String,
    /// The backend of the apply and of every explain (iptables unless a test says).
    backend: Backend,
}

impl Lab {
    /// A lab whose rules are applied and explained with `backend`.
    fn with_backend(name: &str, backend: Backend) -> Lab {
        Lab {
            backend,
            ..Lab::new(name)
        }
    }

    fn new(name: &str) -> Lab {
        let t = Topology::new(name);
        let dev = TOPOLOGY_DEV;
        let (second4, second6) = (t.v4(3), t.v6(3));
        for args in [
            vec!["addr", "add", &format!("{second4}/24"), "dev", dev],
            vec!["addr", "add", &format!("{second6}/64"), "dev", dev, "nodad"],
            vec!["addr", "add", &format!("{OUTSIDE_V4}/32"), "dev", "lo"],
            vec!["addr", "add", &format!("{OUTSIDE_V6}/128"), "dev", "lo"],
        ] {
            t.ip(&t.peer, &args).unwrap();
        }
        let (peer4, peer6) = (t.peer_v4.to_string(), t.peer_v6.to_string());
        t.ip(
            &t.pod,
            &["route", "add", &format!("{OUTSIDE_V4}/32"), "via", &peer4],
        )
        .unwrap();
        t.ip(
            &t.pod,
            &[
                "-6",
                "route",
                "add",
                &format!("{OUTSIDE_V6}/128"),
                "via",
                &peer6,
            ],
        )
        .unwrap();
        // Static IPv6 neighbours across the veth. Right after the link comes up, the
        // link-local addresses are still tentative (DAD), and neighbour discovery for a
        // packet from or to the peer's address on `lo` (routed via the peer) stalls for a
        // second or two: long enough to time out a connect.
        let mac = |ns: &str| -> String {
            let out = t.ip(ns, &["-br", "link", "show", "dev", dev]).unwrap();
            out.split_whitespace()
                .nth(2)
                .unwrap_or_else(|| panic!("no MAC address in `ip -br link`: {out:?}"))
                .to_string()
        };
        let (pod_mac, peer_mac) = (mac(&t.pod), mac(&t.peer));
        for (ns, addr, lladdr) in [
            (&t.pod, IpAddr::from(t.peer_v6), &peer_mac),
            (&t.pod, IpAddr::from(second6), &peer_mac),
            (&t.peer, IpAddr::from(t.pod_v6), &pod_mac),
        ] {
            let addr = addr.to_string();
            t.ip(
                ns,
                &[
                    "neigh",
                    "replace",
                    &addr,
                    "lladdr",
                    lladdr,
                    "dev",
                    dev,
                    "nud",
                    "permanent",
                ],
            )
            .unwrap();
        }
        let tmp = TempDir::new("istio-iptables-explain");
        let resolv = tmp.path().join("resolv.conf");
        std::fs::write(&resolv, format!("nameserver {peer4}\nnameserver {peer6}\n")).unwrap();
        Lab {
            tcp: Vec::new(),
            udp: Vec::new(),
            t,
            _tmp: tmp,
            resolv: resolv.to_string_lossy().into_owned(),
            args: Vec::new(),
            ipv6: false,
            bin_log: String::new(),
            backend: Backend::Iptables,
        }
    }

    fn pod(&self, v6: bool) -> IpAddr {
        Dest::Pod.addr(&self.t, v6)
    }

    fn peer(&self, v6: bool) -> IpAddr {
        Dest::Peer.addr(&self.t, v6)
    }

    /// The peer's second address in the subnet.
    fn second(&self, v6: bool) -> IpAddr {
        Dest::Second.addr(&self.t, v6)
    }

    fn outside(&self, v6: bool) -> IpAddr {
        Dest::Outside.addr(&self.t, v6)
    }

    fn localhost(v6: bool) -> IpAddr {
        if v6 { LOCALHOST_V6 } else { LOCALHOST_V4 }
    }

    fn subnet(&self, v6: bool) -> String {
        if v6 {
            format!("{}/64", self.t.v6(0))
        } else {
            self.t.subnet_v4()
        }
    }

    fn peer_addrs(&self, v6: bool) -> [IpAddr; 3] {
        [self.peer(v6), self.second(v6), self.outside(v6)]
    }

    /// Applies `args` in the pod (`ENABLE_INBOUND_IPV6=<ipv6>`) with the lab's backend;
    /// panics if that fails.
    fn apply(&mut self, args: Vec<String>, ipv6: bool) {
        let words: Vec<&str> = args.iter().map(String::as_str).collect();
        self.bin_log = match self.backend {
            Backend::Iptables => self.t.run_bin_ok(&self.t.pod, ipv6, &words),
            Backend::Nft => self.t.apply_ok(Backend::Nft, &self.t.pod, ipv6, &words),
        };
        self.args = args;
        self.ipv6 = ipv6;
    }

    /// Starts the listeners: in both namespaces and families, TCP on every port of [`PORTS`];
    /// in the pod also 15001, 15006 (`IP_TRANSPARENT` with `tproxy`) and 15053 on localhost.
    /// With `udp`: port 53 on every peer address and on the pod's localhost, and the DNS
    /// agent on localhost:15053 (as the proxy user, whose replies the DNS rules recognise).
    fn listen(&mut self, tproxy: bool, udp: bool) {
        let (pod, peer) = (self.t.pod.clone(), self.t.peer.clone());
        for any in [
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        ] {
            for &port in PORTS {
                self.tcp
                    .push(Listener::tcp(&pod, &format!("pod:{port}"), sa(any, port)));
                self.tcp
                    .push(Listener::tcp(&peer, &format!("peer:{port}"), sa(any, port)));
            }
            self.tcp
                .push(Listener::tcp(&pod, "pod:15001", sa(any, 15001)));
            self.tcp.push(if tproxy {
                Listener::transparent(&pod, "pod:15006", sa(any, 15006))
            } else {
                Listener::tcp(&pod, "pod:15006", sa(any, 15006))
            });
        }
        for v6 in [false, true] {
            let lo = Lab::localhost(v6);
            self.tcp
                .push(Listener::tcp(&pod, "pod:15053", sa(lo, 15053)));
            if !udp {
                continue;
            }
            // One socket per address: a wildcard UDP socket would answer from the primary
            // address, which a client connected to another one drops.
            for a in self.peer_addrs(v6) {
                let at = sa(a, 53);
                self.udp.push((
                    "peer:53/udp".into(),
                    at,
                    UdpListener::start(&peer, "peer:53/udp", at, APP),
                ));
            }
            for (label, port, owner) in [("pod:53/udp", 53, APP), ("pod:15053/udp", 15053, PROXY)] {
                let at = sa(lo, port);
                self.udp
                    .push((label.into(), at, UdpListener::start(&pod, label, at, owner)));
            }
        }
    }

    /// explain's arguments for `p` (without the program name): `explain`, the config flags,
    /// the packet, `extra`.
    fn explain_argv(&self, p: &Probe, extra: &[&str]) -> Vec<String> {
        let mut v = vec!["explain".to_string()];
        v.extend(self.backend.flags().iter().map(|f| f.to_string()));
        v.extend(self.args.iter().cloned());
        let dir = if p.inbound { "inbound" } else { "outbound" };
        v.extend(["--direction".into(), dir.into(), "--dst".into()]);
        v.push(p.dst.to_string());
        if let Some(s) = p.src {
            v.extend(["--src".into(), s.to_string()]);
        }
        if !p.inbound {
            v.extend(["--uid".into(), p.who.uid.to_string()]);
            v.extend(["--gid".into(), p.who.gid.to_string()]);
        }
        // The pod's own address: explain routes traffic to it over lo, as the kernel does.
        v.extend(["--pod-ip".into(), self.pod(p.dst.is_ipv6()).to_string()]);
        if p.proto == Proto::Udp {
            v.extend(["--proto".into(), "udp".into()]);
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    /// Runs the binary: `explain ... --from-kernel` inside the pod namespace, or explain from
    /// the config outside any test namespace. stdout, or an error with the command and stderr.
    fn explain_bin(&self, argv: &[String], from_kernel: bool) -> Result<String, String> {
        let mut argv = argv.to_vec();
        let out: Output = if from_kernel {
            argv.push("--from-kernel".into());
            let words: Vec<&str> = argv.iter().map(String::as_str).collect();
            self.t.run_bin(&self.t.pod, self.ipv6, &words)
        } else {
            let mut cmd = Command::new(BIN);
            cmd.args(&argv)
                .env_clear()
                .env("PATH", sane_path())
                .env("ENABLE_INBOUND_IPV6", self.ipv6.to_string());
            run_with_timeout(&mut cmd, DEFAULT_TIMEOUT)?
        };
        let where_ = if from_kernel {
            format!("ip netns exec {} ", self.t.pod)
        } else {
            String::new()
        };
        if !out.status.success() {
            return Err(format!(
                "`{where_}istio-iptables {}` (ENABLE_INBOUND_IPV6={}) failed with {}: {}",
                shell_command(&argv),
                self.ipv6,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// explain from the config, in-process (the library, with the argv the binary would get
    /// and `ENABLE_INBOUND_IPV6` as the only env-only knob). clap reads the env var of a flag
    /// from this process's environment, while the binary runs with a cleared one: if any such
    /// variable is set here, this falls back to the binary.
    fn explain_lib(&self, argv: &[String]) -> Result<String, String> {
        if let Some(var) = flag_env_in_use() {
            static NOTED: std::sync::Once = std::sync::Once::new();
            NOTED.call_once(|| {
                eprintln!(
                    "note: {var} is set in the test's environment; explaining from the config \
                     with the binary (cleared environment) instead of in-process"
                )
            });
            return self.explain_bin(argv, false);
        }
        let mut full = vec!["istio-iptables".to_string()];
        full.extend(argv.iter().cloned());
        let args = Args::parse_from(full).map_err(|e| e.to_string())?;
        let ipv6 = self.ipv6.to_string();
        let env = |k: &str| (k == "ENABLE_INBOUND_IPV6").then(|| ipv6.clone());
        let cfg = Config::build(&args, &env).map_err(|e| e.to_string())?;
        let facts = HostFacts::detect(&cfg, &RealHost).map_err(|e| e.to_string())?;
        let Some(Subcommand::Explain(a)) = &args.command else {
            return Err("not an explain command line".into());
        };
        let req = ExplainRequest::from(a);
        let mut runner = SystemRunner::default();
        let mut env = Env {
            runner: &mut runner,
            probe: &SystemProbe,
            nf: &mut istio_iptables::system::nftprobe::NfNetlink,
            rtnl: &mut istio_iptables::system::rtnl_change::Kernel,
            resolver: &RealHost,
        };
        // As main builds them: the other backend's iptables detects its flavour.
        let iptables = Iptables {
            flavor: match cfg.backend {
                BackendChoice::Iptables { flavor } => flavor,
                BackendChoice::Nftables { .. } => None,
            },
            lock_wait_secs: cfg.lock_wait_secs,
        };
        match cfg.backend {
            BackendChoice::Iptables { .. } => {
                explain::explain(&iptables, &Nftables, &req, &cfg, &facts, &mut env)
            }
            BackendChoice::Nftables { .. } => {
                explain::explain(&Nftables, &iptables, &req, &cfg, &facts, &mut env)
            }
        }
        .map(|e| e.output)
        .map_err(|e| e.to_string())
    }

    /// Sends `p` for real.
    fn send(&self, p: &Probe) -> Landed {
        let ns = if p.inbound { &self.t.peer } else { &self.t.pod };
        match p.proto {
            Proto::Tcp => Landed::Tcp(connect(ns, p.who, p.dst, p.src)),
            Proto::Udp => {
                static N: AtomicUsize = AtomicUsize::new(0);
                let token = format!("explain-probe-{}", N.fetch_add(1, Ordering::SeqCst));
                let reply = udp_exchange(ns, p.who, p.dst, &token);
                if reply.is_err() {
                    // Listeners record before replying; without a reply, give them a moment.
                    std::thread::sleep(Duration::from_millis(50));
                }
                let at = self
                    .udp
                    .iter()
                    .filter(|(_, _, l)| l.got(&token).is_some())
                    .map(|(label, addr, _)| (label.clone(), *addr))
                    .collect();
                Landed::Udp { at, reply }
            }
        }
    }

    /// Whether `landed` is where verdict `v` says `p` goes; `Err` says why not.
    fn judge(&self, p: &Probe, v: &Verdict, landed: &Landed) -> Result<(), String> {
        let dst = p.dst;
        let v6 = dst.is_ipv6();
        // The pod's addresses: its IP, loopback, and the passthrough address `::6` the
        // binary adds to `lo` (127.0.0.6 is loopback anyway).
        let dst_ns = if p.inbound
            || dst.ip().is_loopback()
            || dst.ip() == self.pod(v6)
            || dst.ip() == passthrough(v6)
        {
            "pod"
        } else {
            "peer"
        };
        let ok = match landed {
            Landed::Tcp(Err(_)) => v.word == "drop",
            Landed::Tcp(Ok(l)) => {
                let (ns, port) = split_label(&l.label);
                match (v.word.as_str(), v.port) {
                    ("redirect", Some(to)) => ns == "pod" && port == to && l.orig == Some(dst),
                    ("tproxy", Some(to)) => ns == "pod" && port == to && l.local == dst,
                    ("not-captured", _) => ns == dst_ns && port == dst.port() && l.local == dst,
                    _ => false,
                }
            }
            Landed::Udp { at, .. } => match (v.word.as_str(), v.port, at.as_slice()) {
                ("redirect", Some(to), [(label, _)]) => split_label(label) == ("pod", to),
                ("not-captured", _, [(_, addr)]) => *addr == dst,
                ("drop", _, []) => true,
                _ => false,
            },
        };
        if ok {
            Ok(())
        } else {
            Err(format!("explain says {v}, but {landed}"))
        }
    }

    /// explain's text output (from the config and from the kernel) for a failure message.
    fn walks(&self, p: &Probe) -> String {
        let argv = self.explain_argv(p, &["--output", "text"]);
        let mut s = String::new();
        for (from_kernel, what) in [(false, "from the config"), (true, "--from-kernel")] {
            let text = self
                .explain_bin(&argv, from_kernel)
                .unwrap_or_else(|e| format!("error: {e}"));
            let _ = writeln!(s, "explain {what}:\n{}", common::indent(&text, "  "));
        }
        s
    }

    /// The applied command, the binary's log and the pod's rules.
    fn context(&self) -> String {
        format!(
            "--- config (ENABLE_INBOUND_IPV6={}) ---\nistio-iptables {}\n--- binary log ---\n{}\n{}",
            self.ipv6,
            shell_command(&self.args),
            self.bin_log,
            common::indent(&self.t.describe_for(self.backend, &self.t.pod), "  ")
        )
    }
}

/// The first env var backing a flag (`ENVOY_PORT`, `REDIRECT_DNS`, ...) that is set in this
/// process's environment.
fn flag_env_in_use() -> Option<String> {
    use clap::CommandFactory;
    istio_iptables::cli::Root::command()
        .get_arguments()
        .filter_map(|a| a.get_env())
        .find(|e| std::env::var_os(e).is_some())
        .map(|e| e.to_string_lossy().into_owned())
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------

/// Collects PASS/FAIL lines (printed as they come) and fails with all failures at the end.
struct Report {
    test: String,
    failures: Vec<String>,
    passed: usize,
}

impl Report {
    fn new(test: &str) -> Report {
        Report {
            test: test.to_string(),
            failures: Vec::new(),
            passed: 0,
        }
    }

    fn record(&mut self, what: &str, problems: Vec<String>) {
        if problems.is_empty() {
            eprintln!("PASS {}: {what}", self.test);
            self.passed += 1;
        } else {
            let detail = common::indent(&problems.join("\n"), "    ");
            eprintln!("FAIL {}: {what}\n{}", self.test, detail.trim_end());
            self.failures.push(format!("{what}\n{}", detail.trim_end()));
        }
    }

    fn finish(self, context: impl FnOnce() -> String) {
        if !self.failures.is_empty() {
            panic!(
                "{}: {} of {} check(s) failed:\n\n{}\n\n{}",
                self.test,
                self.failures.len(),
                self.failures.len() + self.passed,
                self.failures.join("\n\n"),
                context()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 1. The scenarios of tests/it/traffic.rs
// ---------------------------------------------------------------------------

/// A scenario of `tests/it/traffic.rs`: a probe and the verdict that test expects.
struct Scenario {
    what: String,
    probe: Probe,
    want: Verdict,
}

fn scenario(what: &str, probe: Probe, want: &str) -> Scenario {
    Scenario {
        what: what.to_string(),
        probe,
        want: Verdict::of(want),
    }
}

/// Sends every scenario for real and asks the binary (from the config, and `--from-kernel`
/// in the pod) where it goes; both must match the landing, and the config's answer must be
/// what `tests/it/traffic.rs` expects.
fn run_scenarios(test: &str, lab: &Lab, scenarios: &[Scenario]) {
    let mut r = Report::new(test);
    for s in scenarios {
        let p = &s.probe;
        let landed = lab.send(p);
        let argv = lab.explain_argv(p, &["--output", "json"]);
        let mut problems = Vec::new();
        for (from_kernel, what) in [(false, "from the config"), (true, "from the kernel")] {
            match lab
                .explain_bin(&argv, from_kernel)
                .and_then(|j| parse_verdict(&j))
            {
                Err(e) => problems.push(format!("explain {what}: {e}")),
                Ok(v) => {
                    if let Err(e) = lab.judge(p, &v, &landed) {
                        problems.push(format!("explain {what}: {e}"));
                    }
                    if !from_kernel && v != s.want {
                        problems.push(format!(
                            "explain {what} says {v}; tests/it/traffic.rs expects {}",
                            s.want
                        ));
                    }
                }
            }
        }
        if !problems.is_empty() {
            problems.push(lab.walks(p));
        }
        r.record(&format!("{} [{p}; {}]", s.what, s.want), problems);
    }
    r.finish(|| lab.context());
}

/// The rows of a table shared with `tests/it/traffic.rs` as probes (IPv6 with `v6`), each with
/// the verdict where that test expects the connection to land.
fn from_table(lab: &Lab, v6: bool, table: &[TrafficScenario]) -> Vec<Scenario> {
    table
        .iter()
        .map(|s| {
            let dst = sa(s.to.addr(&lab.t, v6), s.port);
            let mut probe = match s.from {
                Sender::Pod(who) => Probe::outbound(who, dst),
                Sender::ProxyFromPassthrough => Probe::outbound(PROXY, dst).from(passthrough(v6)),
                Sender::Peer => Probe::inbound(lab.peer(v6), dst),
            };
            if s.udp {
                probe = probe.udp();
            }
            let want = match s.lands {
                Lands::Redirect(p) => format!("redirect {p}"),
                Lands::Tproxy(p) => format!("tproxy {p}"),
                Lands::NotCaptured => "not-captured".to_string(),
            };
            scenario(s.what, probe, &want)
        })
        .collect()
}

fn traffic_seed(test: &str, backend: Backend, v6: bool) {
    if skip_unless_root(test) {
        return;
    }
    let mut lab = Lab::with_backend(if v6 { "xseed6" } else { "xseed4" }, backend);
    lab.apply(strings(SEED), v6);
    lab.listen(false, false);
    run_scenarios(test, &lab, &from_table(&lab, v6, SEED_SCENARIOS));
}

fn traffic_cidrs(test: &str, backend: Backend) {
    if skip_unless_root(test) {
        return;
    }
    let mut lab = Lab::with_backend("xcidr", backend);
    let (include, exclude) = (lab.subnet(false), format!("{}/32", lab.t.peer_v4));
    lab.apply(
        strings(&proxy_flags(
            "REDIRECT",
            &["-i", &include, "-x", &exclude, "-b", "*"],
        )),
        false,
    );
    lab.listen(false, false);
    run_scenarios(test, &lab, &from_table(&lab, false, CIDR_SCENARIOS));
}

/// One IPv4-only test: applies `args` in a fresh lab `name`, then sends each row of `table`
/// (as `port_scenarios` in tests/it/traffic.rs).
fn port_scenarios(
    test: &str,
    backend: Backend,
    name: &str,
    args: &[&str],
    table: &[TrafficScenario],
) {
    if skip_unless_root(test) {
        return;
    }
    let mut lab = Lab::with_backend(name, backend);
    lab.apply(strings(args), false);
    lab.listen(false, false);
    run_scenarios(test, &lab, &from_table(&lab, false, table));
}

fn outbound_port_exclude(test: &str, backend: Backend) {
    port_scenarios(
        test,
        backend,
        "xoport",
        &proxy_flags("REDIRECT", &["-i", "*", "-b", "*", "-o", "80"]),
        OUTBOUND_PORT_EXCLUDE_SCENARIOS,
    );
}

fn inbound_port_include(test: &str, backend: Backend) {
    port_scenarios(
        test,
        backend,
        "xiport",
        &proxy_flags("REDIRECT", &["-i", "*", "-b", "8080"]),
        INBOUND_PORT_INCLUDE_SCENARIOS,
    );
}

fn traffic_tproxy(test: &str, backend: Backend) {
    if skip_unless_root(test) {
        return;
    }
    let mut lab = Lab::with_backend("xtproxy", backend);
    lab.apply(strings(&seed_with("-m", "TPROXY")), true);
    lab.listen(true, false);
    let mut s = Vec::new();
    for v6 in [false, true] {
        s.extend(from_table(&lab, v6, TPROXY_SCENARIOS));
    }
    run_scenarios(test, &lab, &s);
}

fn traffic_dns(test: &str, backend: Backend) {
    if skip_unless_root(test) {
        return;
    }
    let mut lab = Lab::with_backend("xdns", backend);
    let resolv = lab.resolv.clone();
    lab.apply(strings(&dns_flags(&resolv)), true);
    lab.listen(false, true);
    let mut s = Vec::new();
    for v6 in [false, true] {
        s.extend(from_table(&lab, v6, DNS_SCENARIOS));
    }
    run_scenarios(test, &lab, &s);
}

// Each scenario test once per backend: with `--native-nftables` (the `_nft` tests) the config is
// applied for real, explained from the config and `--from-kernel` (nft's listing), each against
// where the connection really lands.
common::per_backend! {
    traffic_seed_ipv4, traffic_seed_ipv4_nft => |test, b| traffic_seed(test, b, false);
    traffic_seed_ipv6, traffic_seed_ipv6_nft => |test, b| traffic_seed(test, b, true);
    traffic_outbound_cidr_include_and_exclude, traffic_outbound_cidr_include_and_exclude_nft =>
        traffic_cidrs;
    traffic_outbound_port_exclude, traffic_outbound_port_exclude_nft => outbound_port_exclude;
    traffic_inbound_port_include, traffic_inbound_port_include_nft => inbound_port_include;
    traffic_tproxy_inbound, traffic_tproxy_inbound_nft => traffic_tproxy;
    traffic_dns_redirect, traffic_dns_redirect_nft => traffic_dns;
}

/// Connections to the pod's passthrough addresses, which the binary puts on `lo` (`::6/128`
/// when IPv6 is on; 127.0.0.6 is in 127/8). The kernel routes them over `lo`, with source
/// `::6` for `::6` (the same address is preferred), so `-A ISTIO_OUTPUT -o lo -s ::6/128 -j
/// RETURN` leaves them alone; `explain` must route `::6` over lo from `::6` too.
#[test]
#[ignore = "needs root and network namespaces"]
fn explain_passthrough_address_as_destination() {
    let test = "explain_passthrough_address_as_destination";
    if skip_unless_root(test) {
        return;
    }
    let mut lab = Lab::new("xpass");
    lab.apply(strings(SEED), true);
    lab.listen(false, false);
    let mut s = Vec::new();
    for v6 in [false, true] {
        let pass = passthrough(v6);
        s.extend([
            scenario(
                "app to the passthrough address is not captured",
                Probe::outbound(APP, sa(pass, 8080)),
                "not-captured",
            ),
            // From 127.0.0.1 (the source of the 127/8 route) for IPv4, so the proxy's
            // connection goes to the inbound side as for any local address; from ::6 itself
            // for IPv6, so the passthrough rule returns it.
            scenario(
                "proxy to the passthrough address",
                Probe::outbound(PROXY, sa(pass, 8080)),
                if v6 { "not-captured" } else { "redirect 15006" },
            ),
            scenario(
                "a member of the proxy's group to the passthrough address is not captured",
                Probe::outbound(PROXY_GROUP, sa(pass, 8080)),
                "not-captured",
            ),
        ]);
    }
    run_scenarios(test, &lab, &s);
}

// ---------------------------------------------------------------------------
// 2. Differential: generated packets, explain vs the kernel
// ---------------------------------------------------------------------------

/// The seed used unless `EXPLAIN_DIFF_SEED` (decimal or 0x-hex) says otherwise.
const DIFF_SEED: u64 = 0x1571_0e7a_b1e5_0001;
/// Packets per config.
const DIFF_PACKETS: usize = 60;
/// Every n-th packet is also explained by the binary `--from-kernel`.
const DIFF_KERNEL_EVERY: usize = 5;
/// The whole differential test must finish within this (more means something hangs).
const DIFF_BUDGET: Duration = Duration::from_secs(60);

/// splitmix64: tiny, deterministic, good enough to pick from small sets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())]
    }
}

fn diff_seed() -> u64 {
    match std::env::var("EXPLAIN_DIFF_SEED") {
        Ok(s) if !s.trim().is_empty() => {
            let s = s.trim();
            match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            }
            .unwrap_or_else(|e| panic!("EXPLAIN_DIFF_SEED={s:?}: {e}"))
        }
        _ => DIFF_SEED,
    }
}

/// One config of the differential test.
struct DiffConfig {
    name: &'static str,
    tproxy: bool,
    /// ENABLE_INBOUND_IPV6.
    ipv6: bool,
    /// Families packets are generated for (false = IPv4).
    families: &'static [bool],
    /// Also UDP to port 53 (a `--redirect-dns` config).
    dns: bool,
    /// The config flags, given the lab (for its subnets, addresses and resolv.conf).
    args: fn(&Lab) -> Vec<String>,
}

fn diff_configs() -> Vec<DiffConfig> {
    vec![
        DiffConfig {
            name: "redirect-v4-cidrs-ports",
            tproxy: false,
            ipv6: false,
            families: &[false],
            dns: false,
            args: |l| {
                let (inc, exc) = (l.subnet(false), format!("{}/32", l.peer(false)));
                strings(&proxy_flags(
                    "REDIRECT",
                    &[
                        "-i",
                        &inc,
                        "-x",
                        &exc,
                        "-b",
                        "*",
                        "-d",
                        "15090,15020",
                        "-o",
                        "3306",
                        "-q",
                        "9090",
                    ],
                ))
            },
        },
        DiffConfig {
            name: "redirect-v6-cidrs-inbound-list",
            tproxy: false,
            ipv6: true,
            families: &[true],
            dns: false,
            args: |l| {
                let (inc, exc) = (l.subnet(true), format!("{}/128", l.peer(true)));
                strings(&proxy_flags(
                    "REDIRECT",
                    &["-i", &inc, "-x", &exc, "-b", "80,443,8080", "-o", "3306"],
                ))
            },
        },
        DiffConfig {
            name: "tproxy-dual-exclude",
            tproxy: true,
            ipv6: true,
            families: &[false, true],
            dns: false,
            args: |l| {
                let exc = format!("{}/32,{}/128", l.second(false), l.second(true));
                strings(&proxy_flags(
                    "TPROXY",
                    &["-i", "*", "-x", &exc, "-b", "*", "-d", "15090,15020"],
                ))
            },
        },
        DiffConfig {
            name: "tproxy-dns-includes",
            tproxy: true,
            ipv6: true,
            families: &[false, true],
            dns: true,
            args: |l| {
                let inc = format!("{},{}", l.subnet(false), l.subnet(true));
                strings(&proxy_flags(
                    "TPROXY",
                    &[
                        "-i",
                        &inc,
                        "-b",
                        "53,8080,9090",
                        "--redirect-dns",
                        "--resolv-conf",
                        &l.resolv,
                    ],
                ))
            },
        },
        DiffConfig {
            name: "redirect-dns-capture-all",
            tproxy: false,
            ipv6: true,
            families: &[false, true],
            dns: true,
            args: |l| {
                strings(&proxy_flags(
                    "REDIRECT",
                    &[
                        "-i",
                        "*",
                        "-b",
                        "*",
                        "-d",
                        "15090",
                        "-o",
                        "443",
                        "--redirect-dns",
                        "--capture-all-dns",
                        "--resolv-conf",
                        &l.resolv,
                    ],
                ))
            },
        },
    ]
}

/// A random packet for `c`: a quarter UDP to port 53 in DNS configs; otherwise TCP to a port
/// of [`PORTS`]: 30% inbound from a peer address, 10% the proxy's passthrough to the pod's
/// own address, 60% outbound to a peer address (in/out of the CIDRs), localhost or the pod's
/// own address, as the app (uid 0), the proxy (1337), a member of the proxy's group or
/// another user.
fn generate(rng: &mut Rng, lab: &Lab, c: &DiffConfig) -> Probe {
    let v6 = rng.pick(c.families);
    let pod = lab.pod(v6);
    let peers = lab.peer_addrs(v6);
    let whos = [APP, APP, PROXY, PROXY, PROXY_GROUP, OTHER_APP];
    if c.dns && rng.below(4) == 0 {
        let dst = rng.pick(&[peers[0], peers[1], peers[2], Lab::localhost(v6)]);
        return Probe::outbound(rng.pick(&whos), sa(dst, 53)).udp();
    }
    let port = rng.pick(PORTS);
    match rng.below(10) {
        0..=2 => Probe::inbound(rng.pick(&peers), sa(pod, port)),
        3 => Probe::outbound(PROXY, sa(pod, port)).from(passthrough(v6)),
        _ => {
            // Loopback: 127.0.0.1 or another 127/8 address (127.0.0.6) for IPv4, ::1 for
            // IPv6 (`::6` is left to `explain_passthrough_address_as_destination`).
            let lo = if !v6 && rng.below(2) == 0 {
                PASSTHROUGH_V4
            } else {
                Lab::localhost(v6)
            };
            let dst = rng.pick(&[peers[0], peers[1], peers[2], lo, pod]);
            Probe::outbound(rng.pick(&whos), sa(dst, port))
        }
    }
}

common::per_backend! {
    /// For each config: apply it in a fresh lab, then for each generated packet compare explain
    /// (in-process from the config; every fifth also the binary `--from-kernel`) with where the
    /// packet really landed (`_nft`: with `--native-nftables`, applied for real).
    differential_explain_vs_kernel, differential_explain_vs_kernel_nft => differential;
}

fn differential(test: &str, backend: Backend) {
    if skip_unless_root(test) {
        return;
    }
    let seed = diff_seed();
    eprintln!("{test}: seed {seed:#x} (set EXPLAIN_DIFF_SEED to replay another)");
    let started = Instant::now();
    let mut r = Report::new(test);
    let mut contexts = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let (mut sent, mut kernel_checked) = (0, 0);
    'configs: for (ci, c) in diff_configs().iter().enumerate() {
        let mut lab = Lab::with_backend(&format!("xdiff{ci}"), backend);
        let args = (c.args)(&lab);
        lab.apply(args, c.ipv6);
        lab.listen(c.tproxy, c.dns);
        let mut rng = Rng(seed ^ (ci as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
        let failed_before = r.failures.len();
        for i in 0..DIFF_PACKETS {
            if started.elapsed() > DIFF_BUDGET {
                r.record(
                    &format!("time budget of {DIFF_BUDGET:?}"),
                    vec![format!(
                        "exceeded after {sent} packets (config {}, packet #{i}): \
                         something hangs",
                        c.name
                    )],
                );
                break 'configs;
            }
            let p = generate(&mut rng, &lab, c);
            let argv = lab.explain_argv(&p, &["--output", "json"]);
            let from_config = lab.explain_lib(&argv).and_then(|j| parse_verdict(&j));
            let from_kernel = (i % DIFF_KERNEL_EVERY == 0).then(|| {
                kernel_checked += 1;
                lab.explain_bin(&argv, true).and_then(|j| parse_verdict(&j))
            });
            let landed = lab.send(&p);
            sent += 1;
            let mut problems = Vec::new();
            for (what, v) in [
                ("from the config", Some(&from_config)),
                ("from the kernel", from_kernel.as_ref()),
            ] {
                match v {
                    None => {}
                    Some(Err(e)) => problems.push(format!("explain {what}: {e}")),
                    Some(Ok(v)) => {
                        if let Err(e) = lab.judge(&p, v, &landed) {
                            problems.push(format!("explain {what}: {e}"));
                        }
                    }
                }
            }
            if let Ok(v) = &from_config {
                *seen.entry(v.to_string()).or_default() += 1;
            }
            if !problems.is_empty() {
                problems.push(format!(
                    "replay: EXPLAIN_DIFF_SEED={seed:#x}; istio-iptables {}",
                    shell_command(&argv)
                ));
                problems.push(lab.walks(&p));
            }
            r.record(
                &format!("seed {seed:#x} config {} packet #{i}: {p}", c.name),
                problems,
            );
        }
        if r.failures.len() > failed_before {
            contexts.push(format!("=== config {} ===\n{}", c.name, lab.context()));
        }
    }
    eprintln!(
        "{test}: seed {seed:#x}: {sent} packets ({kernel_checked} also --from-kernel) in {:?}; \
         verdicts from the config: {seen:?}",
        started.elapsed()
    );
    // Not vacuous: every kind of landing occurred.
    for want in [
        "redirect 15001",
        "redirect 15006",
        "redirect 15053",
        "tproxy 15006",
        "not-captured",
    ] {
        r.record(
            &format!("seed {seed:#x}: some packet got `{want}`"),
            if seen.contains_key(want) {
                vec![]
            } else {
                vec![format!("verdicts seen: {seen:?}")]
            },
        );
    }
    r.finish(|| format!("seed {seed:#x}\n{}", contexts.join("\n")));
}

// ---------------------------------------------------------------------------
// 3. verify
// ---------------------------------------------------------------------------

/// A pod namespace with a config applied (both families, ENABLE_INBOUND_IPV6=true), for
/// `verify`. Mutations use the iptables of the backend the apply chose.
struct Drift {
    t: Topology,
    args: Vec<String>,
    bin_log: String,
}

fn fam_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

impl Drift {
    /// Applies `args` and checks that `verify` says OK (exit 0) right away.
    fn new(name: &str, args: &[&str]) -> Drift {
        let t = Topology::new(name);
        let bin_log = t.run_bin_ok(&t.pod, true, args);
        let d = Drift {
            t,
            args: strings(args),
            bin_log,
        };
        let (code, out) = d.verify(false);
        assert!(
            code == Some(0) && out.starts_with("OK"),
            "verify right after an apply: exit {code:?}, expected 0\n{out}\n{}",
            d.context()
        );
        d
    }

    /// The iptables program of the backend the apply used for `family` (from its log:
    /// `IPv4 backend backend=iptables-nft-restore ...`).
    fn program(&self, family: Family) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let marker = format!("{} backend", fam_name(family));
        self.bin_log
            .lines()
            .filter(|l| l.contains(&marker))
            .flat_map(|l| l.split_whitespace())
            .find_map(|w| w.strip_prefix("backend="))
            .and_then(|p| p.strip_suffix("-restore"))
            .map(str::to_string)
            .unwrap_or_else(|| base.to_string())
    }

    /// Runs `program args` in the pod; panics unless it succeeds. Returns stdout.
    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.t.exec(&self.t.pod, program, args, &[]);
        assert!(
            out.status.success(),
            "`{program} {}` in the pod failed: {}",
            shell_command(args),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn iptables(&self, family: Family, args: &[&str]) -> String {
        self.run(&self.program(family), args)
    }

    /// `ip netns exec POD istio-iptables verify <config> [--output json]`: exit code, stdout
    /// and stderr together.
    fn verify(&self, json: bool) -> (Option<i32>, String) {
        let mut args: Vec<&str> = vec!["verify"];
        args.extend(self.args.iter().map(String::as_str));
        if json {
            args.extend(["--output", "json"]);
        }
        let out = self.t.run_bin(&self.t.pod, true, &args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    }

    /// Rule `n` (1-based) of `table`/`chain` as the config has it (what verify prints as
    /// missing), from the library.
    fn config_rule(&self, family: Family, table: &str, chain: &str, n: usize) -> String {
        let mut full = vec!["istio-iptables".to_string()];
        full.extend(self.args.iter().cloned());
        let args = Args::parse_from(full).expect("valid flags");
        let env = |k: &str| (k == "ENABLE_INBOUND_IPV6").then(|| "true".to_string());
        let cfg = Config::build(&args, &env).expect("valid config");
        let facts = HostFacts::detect(&cfg, &RealHost).expect("host facts");
        let plan = rules::build(&cfg, &facts);
        let rs = ruleset_from_rules(plan.rules(family));
        rs[&Table::from_name(table).expect("a table name")][chain][n - 1]
            .0
            .clone()
    }

    fn context(&self) -> String {
        format!(
            "--- binary log ---\n{}\n{}",
            self.bin_log,
            common::indent(&self.t.describe(&self.t.pod), "  ")
        )
    }
}

/// What `verify` must answer: its exit code, strings its output must contain, and strings it
/// must not (the other family, other kinds of difference).
struct Expect {
    json: bool,
    code: i32,
    has: Vec<String>,
    lacks: Vec<String>,
}

impl Expect {
    fn exit(code: i32) -> Expect {
        Expect {
            json: false,
            code,
            has: Vec::new(),
            lacks: Vec::new(),
        }
    }

    /// Exit 0 and the text that says so.
    fn matches() -> Expect {
        Expect::exit(0).has(&["OK: the live rules match the config"])
    }

    /// Exit 3 with a diff of `family`'s `nat/chain` (`IPv4 iptables-nft nat/CHAIN:`), and
    /// nothing of the other family.
    fn drift(family: Family, chain: &str) -> Expect {
        let program = match family {
            Family::V4 => "iptables-nft",
            Family::V6 => "ip6tables-nft",
        };
        let header = format!("{} {program} nat/{chain}:", fam_name(family));
        Expect::exit(3)
            .has(&["DRIFT", &header])
            .lacks(&[other_family(family)])
    }

    fn json(mut self) -> Expect {
        self.json = true;
        self
    }

    fn has(mut self, s: &[&str]) -> Expect {
        self.has.extend(s.iter().map(|n| n.to_string()));
        self
    }

    fn lacks(mut self, s: &[&str]) -> Expect {
        self.lacks.extend(s.iter().map(|n| n.to_string()));
        self
    }
}

/// Runs `verify` in `d`'s pod and records whether it answered as `e` says.
fn expect_verify(r: &mut Report, what: &str, d: &Drift, e: Expect) {
    let (code, out) = d.verify(e.json);
    let mut problems = Vec::new();
    if code != Some(e.code) {
        problems.push(format!("exit {code:?}, expected {}", e.code));
    }
    for n in &e.has {
        if !out.contains(n.as_str()) {
            problems.push(format!("the output does not contain {n:?}"));
        }
    }
    for n in &e.lacks {
        if out.contains(n.as_str()) {
            problems.push(format!("the output contains {n:?}"));
        }
    }
    if !problems.is_empty() {
        problems.push(format!("--- verify output ---\n{out}"));
        problems.push(d.context());
    }
    r.record(what, problems);
}

/// The other family's diff header prefix (`IPv6 ` for IPv4), which must not appear.
fn other_family(f: Family) -> &'static str {
    match f {
        Family::V4 => "IPv6 ",
        Family::V6 => "IPv4 ",
    }
}

/// For each family: applies [`SEED`] in a fresh pod (`{tag}ipv4`, `{tag}ipv6`; see
/// [`Drift::new`]) and hands it to `check`; fails with every failed check.
fn verify_each_family(test: &str, tag: &str, mut check: impl FnMut(&mut Report, Family, &Drift)) {
    if skip_unless_root(test) {
        return;
    }
    let mut r = Report::new(test);
    for family in [Family::V4, Family::V6] {
        let d = Drift::new(&format!("{tag}{}", fam_name(family).to_lowercase()), SEED);
        check(&mut r, family, &d);
    }
    r.finish(String::new);
}

#[test]
#[ignore = "needs root and network namespaces"]
fn verify_matches_right_after_apply() {
    let test = "verify_matches_right_after_apply";
    if skip_unless_root(test) {
        return;
    }
    let mut r = Report::new(test);
    for (name, args) in [
        ("seed", SEED.to_vec()),
        ("tproxy", seed_with("-m", "TPROXY")),
    ] {
        let d = Drift::new(&format!("v0{name}"), &args);
        expect_verify(
            &mut r,
            &format!("{name}: verify exits 0"),
            &d,
            Expect::matches(),
        );
        expect_verify(
            &mut r,
            &format!("{name}: verify --output json says match"),
            &d,
            Expect::exit(0)
                .json()
                .has(&["{\"match\":true,\"differences\":[],\"routes_missing\":[]}"]),
        );
    }
    r.finish(String::new);
}

#[test]
fn verify_deleted_rule_is_drift() {
    verify_each_family("verify_deleted_rule_is_drift", "vdel", |r, family, d| {
        let f = fam_name(family);
        let gone = d.config_rule(family, "nat", "ISTIO_OUTPUT", 2);
        d.iptables(family, &["-t", "nat", "-D", "ISTIO_OUTPUT", "2"]);
        let missing = format!("missing:  {gone}");
        expect_verify(
            r,
            &format!("{f}: `-t nat -D ISTIO_OUTPUT 2` is drift naming `{gone}`"),
            d,
            Expect::drift(family, "ISTIO_OUTPUT")
                .has(&[&missing])
                .lacks(&["extra:", "out of order"]),
        );
        let json_family = f.to_lowercase();
        let backend = match family {
            Family::V4 => "iptables-nft",
            Family::V6 => "ip6tables-nft",
        };
        let json_diff = format!(
            "{{\"family\":\"{json_family}\",\"backend\":\"{backend}\",\"table\":\"nat\",\
             \"chain\":\"ISTIO_OUTPUT\",\"missing\":[\"{gone}\"],\"extra\":[],\"out_of_order\":false}}"
        );
        expect_verify(
            r,
            &format!("{f}: the same with --output json"),
            d,
            Expect::exit(3).json().has(&[
                "{\"match\":false,",
                &json_diff,
                "\"routes_missing\":[]}",
            ]),
        );
    });
}

#[test]
fn verify_added_rule_is_drift() {
    verify_each_family("verify_added_rule_is_drift", "vadd", |r, family, d| {
        let f = fam_name(family);
        d.iptables(
            family,
            &[
                "-t",
                "nat",
                "-A",
                "ISTIO_OUTPUT",
                "-p",
                "tcp",
                "--dport",
                "1234",
                "-j",
                "RETURN",
            ],
        );
        expect_verify(
            r,
            &format!("{f}: an added ISTIO_OUTPUT rule is drift"),
            d,
            Expect::drift(family, "ISTIO_OUTPUT")
                .has(&["extra:    -A ISTIO_OUTPUT -p tcp", "--dport 1234 -j RETURN"])
                .lacks(&["missing:", "out of order"]),
        );
    });
}

#[test]
fn verify_reordered_rule_is_drift() {
    verify_each_family("verify_reordered_rule_is_drift", "vord", |r, family, d| {
        let f = fam_name(family);
        // Rule 2 moves behind rule 3.
        let listing = d.iptables(family, &["-t", "nat", "-S", "ISTIO_OUTPUT"]);
        let rules: Vec<&str> = listing
            .lines()
            .filter(|l| l.starts_with("-A ISTIO_OUTPUT "))
            .collect();
        let second: Vec<&str> = rules[1]
            .strip_prefix("-A ISTIO_OUTPUT ")
            .unwrap()
            .split_whitespace()
            .collect();
        d.iptables(family, &["-t", "nat", "-D", "ISTIO_OUTPUT", "2"]);
        let mut insert = vec!["-t", "nat", "-I", "ISTIO_OUTPUT", "3"];
        insert.extend(second);
        d.iptables(family, &insert);
        expect_verify(
            r,
            &format!("{f}: ISTIO_OUTPUT rule 2 moved behind rule 3 is drift"),
            d,
            Expect::drift(family, "ISTIO_OUTPUT")
                .has(&["out of order"])
                .lacks(&["missing:", "extra:"]),
        );
    });
}

#[test]
fn verify_deleted_jump_is_drift() {
    verify_each_family("verify_deleted_jump_is_drift", "vjmp", |r, family, d| {
        let f = fam_name(family);
        d.iptables(family, &["-t", "nat", "-D", "OUTPUT", "-j", "ISTIO_OUTPUT"]);
        expect_verify(
            r,
            &format!("{f}: the deleted jump OUTPUT -> ISTIO_OUTPUT is drift"),
            d,
            Expect::drift(family, "OUTPUT")
                .has(&["missing:  -A OUTPUT -j ISTIO_OUTPUT"])
                .lacks(&["ISTIO_OUTPUT:", "extra:"]),
        );
    });
}

#[test]
fn verify_foreign_rules_in_builtin_chains_are_not_drift() {
    let test = "verify_foreign_rules_in_builtin_chains_are_not_drift";
    verify_each_family(test, "vfor", |r, family, d| {
        let f = fam_name(family);
        let rule = ["-p", "tcp", "--dport", "9999", "-j", "RETURN"];
        for (table, how, chain) in [("nat", "-A", "OUTPUT"), ("filter", "-A", "INPUT")] {
            let mut args = vec!["-t", table, how, chain];
            args.extend(rule);
            d.iptables(family, &args);
            expect_verify(
                r,
                &format!("{f}: a foreign rule (`-t {table} {how} {chain}`) is not drift"),
                d,
                Expect::matches(),
            );
        }
        // Before our jump it is still not drift, but it takes inbound TCP to port 9999
        // before the capture: a finding, exit 5.
        let mut args = vec!["-t", "nat", "-I", "PREROUTING"];
        args.extend(rule);
        d.iptables(family, &args);
        expect_verify(
            r,
            &format!("{f}: a foreign RETURN before our PREROUTING jump is a finding"),
            d,
            Expect::exit(5)
                .has(&[
                    "SHADOWED",
                    " nat PREROUTING:\n  rule:   -A PREROUTING -p tcp -m tcp --dport 9999 -j RETURN\n",
                    "for packets matching `--dport 9999`, TCP leaves PREROUTING before the jump \
                     to ISTIO_INBOUND",
                ])
                .lacks(&["DRIFT"]),
        );
    });
}

#[test]
#[ignore = "needs root and network namespaces"]
fn verify_missing_tproxy_routes_are_drift() {
    let test = "verify_missing_tproxy_routes_are_drift";
    if skip_unless_root(test) {
        return;
    }
    let mut r = Report::new(test);
    for (tag, del, add) in [
        (
            "r4",
            &["-4", "rule", "del", "fwmark", "1337", "lookup", "133"][..],
            "ip -4 rule add fwmark 1337 lookup 133",
        ),
        (
            "r6",
            &["-6", "rule", "del", "fwmark", "1337", "lookup", "133"][..],
            "ip -6 rule add fwmark 1337 lookup 133",
        ),
        (
            "rt4",
            &[
                "-4", "route", "del", "local", "default", "dev", "lo", "table", "133",
            ][..],
            "ip -4 route add local default dev lo table 133",
        ),
    ] {
        let d = Drift::new(&format!("vrt{tag}"), &seed_with("-m", "TPROXY"));
        d.run("ip", del);
        let missing = format!("routes: missing `{add}`");
        expect_verify(
            &mut r,
            &format!("`ip {}` is drift", del.join(" ")),
            &d,
            Expect::exit(3)
                .has(&["DRIFT", &missing])
                .lacks(&["IPv4 ", "IPv6 "]),
        );
        let routes = format!("\"routes_missing\":[\"{add}\"]");
        expect_verify(
            &mut r,
            &format!("`ip {}`: the same with --output json", del.join(" ")),
            &d,
            Expect::exit(3)
                .json()
                .has(&["{\"match\":false,\"differences\":[],", &routes]),
        );
    }
    r.finish(String::new);
}
