//! Post-apply validation (`--run-validation`): proves that outbound traffic of the proxy's
//! identity is really redirected, by sending a probe through the rules just applied.
//!
//! # The probe
//!
//! For each address family this module
//!
//! 1. listens on the loopback address (`127.0.0.1`, `[::1]`) at the proxy's outbound port
//!    (`-p`, 15001) and inbound port (`-z`, 15006) — the ports a `REDIRECT` sends captured
//!    connections to (a locally generated connection is redirected to the loopback address);
//! 2. repeatedly connects, from a socket bound to `127.0.0.1:0` (`[::1]:0`), to
//!    `127.0.0.6:PROBE_PORT` (`[::6]:PROBE_PORT`);
//! 3. succeeds when one of its listeners accepts a connection whose original destination
//!    (`SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`, read from conntrack) has the probe port.
//!    Connections with another original port are ignored: they may be stray traffic.
//!
//! **Why `127.0.0.6`.** It is on `lo` but is not `127.0.0.1`, which is exactly what Istio's
//! "proxy talks to itself through a service VIP" rule matches:
//! `-o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT`.
//! Connections *to* `127.0.0.1` are exempted by the rules, and connections *from* `127.0.0.6`
//! (the proxy's inbound passthrough source) are returned early, so the client binds its source
//! to `127.0.0.1` explicitly. Nothing listens on `127.0.0.6:PROBE_PORT`: without capture the
//! connection is refused, with capture it lands on the inbound listener.
//!
//! **Why the filesystem uid.** Istio runs the probe in a container as the proxy user (1337),
//! so the owner match applies to it. We usually run as root, and root's traffic is *not*
//! captured (`-m owner ! --uid-owner 1337 -j RETURN`). The iptables owner match reads the
//! socket file's credentials (`f_cred->fsuid` / `fsgid`), which are taken when the socket is
//! created. So the client runs in a dedicated thread that calls `setfsgid`/`setfsuid` (per
//! thread on Linux, unlike `setuid`) *before* creating its sockets; the rest of the process
//! keeps its identity, and the thread restores its ids before it exits.
//!
//! **Where things are.** This module decides what to probe, for how long and what counts as
//! captured. The sockets and ids themselves — the non-blocking listener that reads the
//! original destination, the connect from a bound source with a timeout, running under other
//! filesystem ids — are [`crate::system::probe`]'s.
//!
//! # Time and threads
//!
//! The whole validation is bounded by [`Settings::timeout`]: one deadline shared by every
//! family. When IPv6 is validated too, both families run concurrently (IPv6 in its own thread)
//! against that deadline, and both must pass. Listeners are non-blocking and polled, the
//! client's connect has a short timeout (`SO_SNDTIMEO`) and its pause between attempts is cut
//! short when the listener side finishes; all threads are scoped and joined, so [`run`]
//! returns promptly at the deadline (or as soon as the probe arrives) and leaks nothing.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use crate::config::{Config, HostFacts, Owner};
use crate::model::Family;
use crate::model::OwnerResolver;
use crate::system::probe::{self, Accepted};

/// Destination of the IPv4 probe (never `127.0.0.1`, which the capture rules exempt).
pub const PROBE_ADDR_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// Destination of the IPv6 probe, `::6`.
pub const PROBE_ADDR_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// Time between the starts of two probe attempts.
const ATTEMPT_INTERVAL: Duration = Duration::from_millis(150);
/// Upper bound of one connect (loopback connects take microseconds; this only matters when
/// a rule drops the SYN).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(100);
/// Pause between two polls of the non-blocking listeners.
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// What to validate, and as whom. Mirrors Istio's flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Outbound port of the proxy (`-p`, default 15001).
    pub proxy_port: u16,
    /// Inbound capture port of the proxy (`-z`, default 15006).
    pub inbound_port: u16,
    /// Port the probe connects to on `127.0.0.6` / `::6` (`--iptables-probe-port`, 15002).
    pub probe_port: u16,
    /// Bound of the whole validation, all families included (`--probe-timeout`, 5s).
    pub timeout: Duration,
    /// Validate IPv6 as well as IPv4 (both must pass).
    pub ipv6: bool,
    /// Filesystem uid the probe client's sockets are created with (the proxy uid, 1337 in
    /// Istio); `None` keeps the current one.
    pub uid: Option<u32>,
    /// Filesystem gid the probe client's sockets are created with; `None` keeps the current
    /// one.
    pub gid: Option<u32>,
}

impl Default for Settings {
    /// Istio's defaults: ports 15001/15006, probe port 15002, 5s, IPv4 only, current identity.
    fn default() -> Self {
        Settings {
            proxy_port: 15001,
            inbound_port: 15006,
            probe_port: 15002,
            timeout: Duration::from_secs(5),
            ipv6: false,
            uid: None,
            gid: None,
        }
    }
}

impl Settings {
    /// The validation settings of `cfg` on a host with `facts`; the probe runs as the first
    /// proxy uid and gid, names looked up with `resolver`.
    pub fn from_config(cfg: &Config, facts: &HostFacts, resolver: &dyn OwnerResolver) -> Settings {
        Settings {
            proxy_port: cfg.proxy_port.get(),
            inbound_port: cfg.inbound_capture_port.get(),
            probe_port: cfg.probe_port.get(),
            timeout: cfg.probe_timeout,
            ipv6: facts.ipv6,
            uid: first_id(&facts.proxy_uids, |n| resolver.uid(n)),
            gid: first_id(&facts.proxy_gids, |n| resolver.gid(n)),
        }
    }
}

/// The first owner as a number (the probe runs with that identity).
fn first_id(owners: &[Owner], resolve: impl Fn(&str) -> Option<u32>) -> Option<u32> {
    match owners.first()? {
        Owner::Id(n) => Some(*n),
        Owner::Name(n) => resolve(n),
    }
}

/// The address the probe connects to in `family`.
fn probe_addr(family: Family) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(PROBE_ADDR_V4),
        Family::V6 => IpAddr::V6(PROBE_ADDR_V6),
    }
}

/// The filesystem identity the probe client actually ran with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeIdentity {
    /// Filesystem uid in effect when the client created its sockets.
    pub fsuid: u32,
    /// Filesystem gid in effect when the client created its sockets.
    pub fsgid: u32,
    /// The uid that was asked for, if any.
    pub requested_uid: Option<u32>,
    /// The gid that was asked for, if any.
    pub requested_gid: Option<u32>,
}

impl ProbeIdentity {
    /// Whether the requested ids could not be assumed.
    pub fn mismatch(&self) -> bool {
        self.requested_uid.is_some_and(|u| u != self.fsuid)
            || self.requested_gid.is_some_and(|g| g != self.fsgid)
    }
}

impl fmt::Display for ProbeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid {}, gid {}", self.fsuid, self.fsgid)?;
        if self.mismatch() {
            f.write_str(" instead of the requested")?;
            if let Some(u) = self.requested_uid {
                write!(f, " uid {u}")?;
            }
            if let Some(g) = self.requested_gid {
                write!(f, " gid {g}")?;
            }
        }
        Ok(())
    }
}

/// Why validation failed.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    /// The probe never reached a listener through the capture rules before the deadline.
    #[error(
        "{family}: no connection to {target} was redirected to {} within {timeout:?} ({})",
        describe_listeners(*.inbound_port, *.outbound_port),
        describe_attempts(.identity, *.attempts, *.connected, .last_error)
    )]
    Timeout {
        /// The family that failed.
        family: Family,
        /// Where the probe connected to (`127.0.0.6:PROBE_PORT`).
        target: SocketAddr,
        /// The inbound port, when a listener could be opened on it.
        inbound_port: Option<u16>,
        /// The outbound port, when a listener could be opened on it.
        outbound_port: Option<u16>,
        /// The validation timeout.
        timeout: Duration,
        /// The identity the probe ran with (`None` if the client never started).
        identity: Option<ProbeIdentity>,
        /// Connection attempts made.
        attempts: u32,
        /// Attempts whose connect succeeded (but did not arrive at our listeners).
        connected: u32,
        /// The last connect error, e.g. "Connection refused (os error 111)".
        last_error: Option<String>,
    },
    /// Neither the outbound nor the inbound port could be listened on.
    #[error("{family}: could not open any validation listener: {}", describe_listen_errors(*.family, .ports, .errors))]
    NoListener {
        /// The family that failed.
        family: Family,
        /// The ports tried, in order.
        ports: Vec<u16>,
        /// The error for each port of `ports`.
        errors: Vec<io::Error>,
    },
    /// Some other system call failed (e.g. a thread could not be started).
    #[error("{family}: {op}")]
    Io {
        /// The family being validated.
        family: Family,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl ValidationError {
    /// Whether the probe simply did not get through in time (the rules do not capture), as
    /// opposed to validation being unable to run.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ValidationError::Timeout { .. })
    }

    /// The family the error is about.
    pub fn family(&self) -> Family {
        match self {
            ValidationError::Timeout { family, .. }
            | ValidationError::NoListener { family, .. }
            | ValidationError::Io { family, .. } => *family,
        }
    }
}

fn describe_listeners(inbound: Option<u16>, outbound: Option<u16>) -> String {
    match (inbound, outbound) {
        (Some(i), Some(o)) if i == o => format!("the inbound/outbound ({i}) listener"),
        (Some(i), Some(o)) => format!("the inbound ({i}) or outbound ({o}) listener"),
        (Some(i), None) => format!("the inbound ({i}) listener (the outbound port was in use)"),
        (None, Some(o)) => format!("the outbound ({o}) listener (the inbound port was in use)"),
        (None, None) => "any listener".to_string(),
    }
}

fn describe_attempts(
    identity: &Option<ProbeIdentity>,
    attempts: u32,
    connected: u32,
    last_error: &Option<String>,
) -> String {
    let mut s = match identity {
        Some(id) => format!("from {id}; "),
        None => String::new(),
    };
    s.push_str(&format!(
        "{attempts} attempt{}",
        if attempts == 1 { "" } else { "s" }
    ));
    if connected > 0 {
        s.push_str(&format!(", {connected} connected elsewhere"));
    }
    if let Some(e) = last_error {
        s.push_str(&format!(", last error: {e}"));
    }
    s
}

fn describe_listen_errors(family: Family, ports: &[u16], errors: &[io::Error]) -> String {
    ports
        .iter()
        .zip(errors)
        .map(|(p, e)| format!("{}: {e}", SocketAddr::new(family.loopback(), *p)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Validates that the capture rules redirect the probe, for IPv4 and (if
/// [`Settings::ipv6`]) IPv6, within [`Settings::timeout`].
///
/// Returns `Ok(())` when every family passed. When both fail, the IPv4 error is returned and
/// the IPv6 one is logged.
pub fn run(s: &Settings) -> Result<(), ValidationError> {
    let start = Instant::now();
    let deadline = start
        .checked_add(s.timeout)
        .or_else(|| start.checked_add(Duration::from_secs(u32::MAX.into())))
        .unwrap_or(start);
    tracing::debug!(
        proxy_port = s.proxy_port,
        inbound_port = s.inbound_port,
        probe_port = s.probe_port,
        timeout = %format!("{:?}", s.timeout),
        ipv6 = s.ipv6,
        uid = %s.uid.map_or_else(|| "none".to_string(), |u| u.to_string()),
        gid = %s.gid.map_or_else(|| "none".to_string(), |g| g.to_string()),
        "validating traffic capture"
    );
    let mut results = run_each_from(s, start, deadline).into_iter();
    let v4 = results.next().map_or(Ok(()), |(_, r)| r.map(|_| ()));
    let v6 = results.next().map_or(Ok(()), |(_, r)| r.map(|_| ()));
    match (v4, v6) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Err(e),
        (Err(e4), Err(e6)) => {
            tracing::error!("{e6}");
            Err(e4)
        }
    }
}

/// The probe of every family [`run`] validates, each family's outcome on its own (doctor
/// reports them apart): where the probe landed, or why it did not.
pub fn run_each(s: &Settings) -> Vec<(Family, Result<String, ValidationError>)> {
    let start = Instant::now();
    let deadline = start
        .checked_add(s.timeout)
        .or_else(|| start.checked_add(Duration::from_secs(u32::MAX.into())))
        .unwrap_or(start);
    run_each_from(s, start, deadline)
}

fn run_each_from(
    s: &Settings,
    start: Instant,
    deadline: Instant,
) -> Vec<(Family, Result<String, ValidationError>)> {
    if !s.ipv6 {
        return vec![(Family::V4, validate_family(Family::V4, s, start, deadline))];
    }
    thread::scope(|scope| {
        let v6 = thread::Builder::new()
            .name("validate-ipv6".into())
            .spawn_scoped(scope, || validate_family(Family::V6, s, start, deadline));
        let v4 = validate_family(Family::V4, s, start, deadline);
        let v6 = match v6 {
            Ok(handle) => handle.join().unwrap_or_else(|_| {
                Err(ValidationError::Io {
                    family: Family::V6,
                    op: "the validation thread panicked",
                    source: io::Error::other("panic"),
                })
            }),
            Err(source) => Err(ValidationError::Io {
                family: Family::V6,
                op: "starting the validation thread",
                source,
            }),
        };
        vec![(Family::V4, v4), (Family::V6, v6)]
    })
}

/// A listener and the role(s) of its port.
struct Listener {
    port: u16,
    role: &'static str,
    socket: probe::Listener,
}

/// What the client thread did, handed back when it is joined.
#[derive(Default)]
struct ClientReport {
    identity: Option<ProbeIdentity>,
    attempts: u32,
    connected: u32,
    last_error: Option<String>,
}

fn validate_family(
    family: Family,
    s: &Settings,
    start: Instant,
    deadline: Instant,
) -> Result<String, ValidationError> {
    let listeners = open_listeners(family, s)?;
    let inbound_port = listeners
        .iter()
        .any(|l| l.port == s.inbound_port)
        .then_some(s.inbound_port);
    let outbound_port = listeners
        .iter()
        .any(|l| l.port == s.proxy_port)
        .then_some(s.proxy_port);
    let target = SocketAddr::new(probe_addr(family), s.probe_port);
    let (stop_tx, stop_rx) = mpsc::channel::<()>();

    let (found, report) = thread::scope(|scope| {
        let client = thread::Builder::new()
            .name(format!("probe-{family}"))
            .spawn_scoped(scope, move || {
                client_loop(family, target, s.uid, s.gid, deadline, stop_rx)
            })
            .map_err(|source| ValidationError::Io {
                family,
                op: "starting the probe client thread",
                source,
            })?;
        let found = accept_loop(family, &listeners, s.probe_port, deadline);
        drop(stop_tx); // wakes the client up from its pause: it stops
        let report = client.join().unwrap_or_default();
        Ok::<_, ValidationError>((found, report))
    })?;

    match found {
        Some((listener, original, peer)) => {
            let landed = format!(
                "a connection to {original} from {peer} was redirected to the {} listener ({}) \
                 after {:?}",
                listener.role,
                listener.port,
                start.elapsed()
            );
            tracing::info!("{family}: traffic capture validated: {landed}");
            Ok(landed)
        }
        None => Err(ValidationError::Timeout {
            family,
            target,
            inbound_port,
            outbound_port,
            timeout: s.timeout,
            identity: report.identity,
            attempts: report.attempts,
            connected: report.connected,
            last_error: report.last_error,
        }),
    }
}

/// Listens on the outbound and inbound ports (once if they are the same). A port in use is
/// logged and skipped; no listener at all is an error.
fn open_listeners(family: Family, s: &Settings) -> Result<Vec<Listener>, ValidationError> {
    let mut wanted: Vec<(u16, &'static str)> = vec![(s.proxy_port, "outbound")];
    if s.inbound_port == s.proxy_port {
        wanted[0].1 = "inbound/outbound";
    } else {
        wanted.push((s.inbound_port, "inbound"));
    }
    let mut listeners = Vec::new();
    let mut ports = Vec::new();
    let mut errors = Vec::new();
    for (port, role) in wanted {
        let addr = SocketAddr::new(family.loopback(), port);
        match probe::Listener::bind(addr) {
            Ok(socket) => {
                tracing::debug!("{family}: listening on {addr} ({role})");
                listeners.push(Listener { port, role, socket });
            }
            Err(e) => {
                tracing::warn!("{family}: cannot listen on {addr} ({role}): {e}; continuing");
                ports.push(port);
                errors.push(e);
            }
        }
    }
    if listeners.is_empty() {
        return Err(ValidationError::NoListener {
            family,
            ports,
            errors,
        });
    }
    Ok(listeners)
}

/// Polls the listeners until one accepts a connection originally addressed to the probe
/// port, or the deadline passes.
fn accept_loop(
    family: Family,
    listeners: &[Listener],
    probe_port: u16,
    deadline: Instant,
) -> Option<(&Listener, SocketAddr, SocketAddr)> {
    loop {
        for l in listeners {
            loop {
                match l.socket.accept() {
                    Ok(Some(Accepted { peer, original_dst })) => match original_dst {
                        Ok(orig) if orig.port() == probe_port => return Some((l, orig, peer)),
                        Ok(orig) => tracing::debug!(
                            "{family}: ignoring a connection from {peer} on port {} \
                             (original destination {orig})",
                            l.port
                        ),
                        Err(e) => tracing::debug!(
                            "{family}: ignoring a connection from {peer} on port {} \
                             (no original destination: {e})",
                            l.port
                        ),
                    },
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!("{family}: accept on port {}: {e}", l.port);
                        break;
                    }
                }
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        thread::sleep(ACCEPT_POLL.min(deadline - now));
    }
}

/// The probe client; runs in its own thread because it changes the thread's filesystem ids
/// (gid first, restored before the thread ends). Attempts a connection every
/// [`ATTEMPT_INTERVAL`] until the deadline or until `stop`'s sender is dropped.
fn client_loop(
    family: Family,
    target: SocketAddr,
    uid: Option<u32>,
    gid: Option<u32>,
    deadline: Instant,
    stop: mpsc::Receiver<()>,
) -> ClientReport {
    probe::with_fs_ids(uid, gid, |ids| {
        let identity = ProbeIdentity {
            fsuid: ids.uid,
            fsgid: ids.gid,
            requested_uid: uid,
            requested_gid: gid,
        };
        if identity.mismatch() {
            tracing::warn!(
                "the validation probe runs as {identity} (setfsuid/setfsgid need CAP_SETUID and \
                 CAP_SETGID); the capture rules may not apply to it"
            );
        }
        probe_attempts(family, target, identity, deadline, &stop)
    })
}

/// The client's attempts, made with `identity` (the thread's filesystem ids).
fn probe_attempts(
    family: Family,
    target: SocketAddr,
    identity: ProbeIdentity,
    deadline: Instant,
    stop: &mpsc::Receiver<()>,
) -> ClientReport {
    let mut report = ClientReport {
        identity: Some(identity),
        ..ClientReport::default()
    };
    let source = SocketAddr::new(family.loopback(), 0);
    // The last connected stream stays open until the next attempt, so that its conntrack
    // entry is certainly alive when the listener asks for the original destination.
    let mut held: Option<TcpStream> = None;
    loop {
        let begun = Instant::now();
        if begun >= deadline {
            break;
        }
        let connect_timeout = CONNECT_TIMEOUT.min(deadline - begun);
        if connect_timeout < Duration::from_millis(1) {
            break; // SO_SNDTIMEO of zero would mean "no timeout"
        }
        report.attempts += 1;
        match probe::connect_from(source, target, connect_timeout) {
            Ok(stream) => {
                tracing::debug!(
                    "{family}: probe attempt {} ({identity}): connected to {target}",
                    report.attempts
                );
                report.connected += 1;
                held = Some(stream);
            }
            Err(e) => {
                tracing::debug!(
                    "{family}: probe attempt {} ({identity}): {target}: {e}",
                    report.attempts
                );
                report.last_error = Some(e.to_string());
            }
        }
        let now = Instant::now();
        let next = begun + ATTEMPT_INTERVAL;
        let pause = next.min(deadline).saturating_duration_since(now);
        match stop.recv_timeout(pause) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    drop(held);
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;
    use std::process::{Command, Stdio};

    /// A port that was free a moment ago on the loopback address of `family`.
    fn free_port(family: Family) -> u16 {
        TcpListener::bind(SocketAddr::new(family.loopback(), 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind an ephemeral port")
    }

    fn settings_with_free_ports(timeout: Duration) -> Settings {
        Settings {
            proxy_port: free_port(Family::V4),
            inbound_port: free_port(Family::V4),
            probe_port: free_port(Family::V4),
            timeout,
            ..Settings::default()
        }
    }

    fn ipv6_loopback_available() -> bool {
        TcpListener::bind("[::1]:0").is_ok()
    }

    #[test]
    fn defaults_are_istios() {
        let s = Settings::default();
        assert_eq!(
            (s.proxy_port, s.inbound_port, s.probe_port),
            (15001, 15006, 15002)
        );
        assert_eq!(s.timeout, Duration::from_secs(5));
        assert!(!s.ipv6);
        assert_eq!((s.uid, s.gid), (None, None));
    }

    #[test]
    fn timeout_message_names_family_target_listeners_and_identity() {
        let e = ValidationError::Timeout {
            family: Family::V4,
            target: "127.0.0.6:15002".parse().expect("addr"),
            inbound_port: Some(15006),
            outbound_port: Some(15001),
            timeout: Duration::from_secs(5),
            identity: Some(ProbeIdentity {
                fsuid: 1337,
                fsgid: 1337,
                requested_uid: Some(1337),
                requested_gid: Some(1337),
            }),
            attempts: 33,
            connected: 0,
            last_error: Some("Connection refused (os error 111)".into()),
        };
        assert!(e.is_timeout());
        assert_eq!(e.family(), Family::V4);
        assert_eq!(
            e.to_string(),
            "IPv4: no connection to 127.0.0.6:15002 was redirected to the inbound (15006) or \
             outbound (15001) listener within 5s (from uid 1337, gid 1337; 33 attempts, last \
             error: Connection refused (os error 111))"
        );
    }

    #[test]
    fn identity_mismatch_is_reported() {
        let id = ProbeIdentity {
            fsuid: 1000,
            fsgid: 1000,
            requested_uid: Some(1337),
            requested_gid: None,
        };
        assert!(id.mismatch());
        assert_eq!(
            id.to_string(),
            "uid 1000, gid 1000 instead of the requested uid 1337"
        );
    }

    #[test]
    fn times_out_promptly_when_nothing_is_captured() {
        let s = settings_with_free_ports(Duration::from_millis(300));
        let t = Instant::now();
        let err = run(&s).expect_err("nothing captures 127.0.0.6 here");
        let took = t.elapsed();
        assert!(err.is_timeout(), "{err}");
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_millis(800), "returned late: {took:?}");
        let msg = err.to_string();
        assert!(msg.starts_with("IPv4: "), "{msg}");
        assert!(
            msg.contains(&format!("127.0.0.6:{}", s.probe_port)),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("inbound ({})", s.inbound_port)),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("outbound ({})", s.proxy_port)),
            "{msg}"
        );
        assert!(msg.contains("within 300ms"), "{msg}");
        match err {
            ValidationError::Timeout {
                attempts,
                identity,
                last_error,
                ..
            } => {
                assert!(attempts >= 2, "{attempts}");
                assert!(identity.is_some_and(|i| !i.mismatch()));
                assert!(last_error.is_some());
            }
            e => panic!("unexpected {e:?}"),
        }
    }

    #[test]
    fn zero_timeout_is_an_immediate_timeout() {
        let s = settings_with_free_ports(Duration::ZERO);
        let t = Instant::now();
        let err = run(&s).expect_err("no time at all");
        assert!(err.is_timeout(), "{err}");
        assert!(t.elapsed() < Duration::from_millis(200));
    }

    #[test]
    fn no_listener_when_both_ports_are_taken() {
        let a = TcpListener::bind("127.0.0.1:0").expect("bind");
        let b = TcpListener::bind("127.0.0.1:0").expect("bind");
        let pa = a.local_addr().expect("addr").port();
        let pb = b.local_addr().expect("addr").port();
        let s = Settings {
            proxy_port: pa,
            inbound_port: pb,
            probe_port: free_port(Family::V4),
            timeout: Duration::from_secs(5),
            ..Settings::default()
        };
        let t = Instant::now();
        let err = run(&s).expect_err("both ports taken");
        assert!(t.elapsed() < Duration::from_millis(500), "not a timeout");
        assert!(!err.is_timeout());
        match &err {
            ValidationError::NoListener {
                family,
                ports,
                errors,
            } => {
                assert_eq!(*family, Family::V4);
                assert_eq!(ports, &vec![pa, pb]);
                assert_eq!(errors.len(), 2);
                assert!(errors.iter().all(|e| e.kind() == io::ErrorKind::AddrInUse));
            }
            e => panic!("unexpected {e:?}"),
        }
        let msg = err.to_string();
        assert!(msg.starts_with("IPv4: could not open any validation listener"));
        assert!(msg.contains(&format!("127.0.0.1:{pa}")), "{msg}");
        assert!(msg.contains(&format!("127.0.0.1:{pb}")), "{msg}");
    }

    #[test]
    fn one_port_taken_keeps_the_other_listener() {
        let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut s = settings_with_free_ports(Duration::from_millis(200));
        s.proxy_port = taken.local_addr().expect("addr").port();
        let err = run(&s).expect_err("nothing captures");
        match &err {
            ValidationError::Timeout {
                inbound_port,
                outbound_port,
                ..
            } => {
                assert_eq!(*inbound_port, Some(s.inbound_port));
                assert_eq!(*outbound_port, None);
            }
            e => panic!("unexpected {e:?}"),
        }
        assert!(err.to_string().contains("the outbound port was in use"));
    }

    #[test]
    fn ipv6_is_validated_too_and_fails_independently() {
        if !ipv6_loopback_available() {
            eprintln!("SKIPPED ipv6_is_validated_too_and_fails_independently: no [::1]");
            return;
        }
        // The IPv6 ports are taken, the IPv4 ones are free: IPv4 times out, IPv6 has no
        // listener; the IPv4 error wins, and both ran within the one timeout.
        let a = TcpListener::bind("[::1]:0").expect("bind");
        let b = TcpListener::bind("[::1]:0").expect("bind");
        let s = Settings {
            proxy_port: a.local_addr().expect("addr").port(),
            inbound_port: b.local_addr().expect("addr").port(),
            probe_port: free_port(Family::V4),
            timeout: Duration::from_millis(300),
            ipv6: true,
            ..Settings::default()
        };
        // The same port numbers might be taken on 127.0.0.1 by chance; then IPv4 fails with
        // NoListener too, which is still an IPv4 error.
        let t = Instant::now();
        let err = run(&s).expect_err("fails");
        assert!(t.elapsed() < Duration::from_millis(800));
        assert_eq!(err.family(), Family::V4, "{err}");
    }

    // ---- root tests: private network namespaces --------------------------------------

    const RULES: &str = "* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
COMMIT
";

    fn rules_v6() -> String {
        RULES
            .replace("127.0.0.6/32", "::6/128")
            .replace("127.0.0.1/32", "::1/128")
    }

    fn is_root(test: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            true
        } else {
            eprintln!("SKIPPED {test}: needs root");
            false
        }
    }

    fn cmd(program: &str, args: &[&str], stdin: Option<&str>) {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        let mut pipe = child.stdin.take().expect("stdin");
        if let Some(text) = stdin {
            pipe.write_all(text.as_bytes()).expect("write stdin");
        }
        drop(pipe);
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs `f` in a thread moved into a new network namespace with `lo` up; the test
    /// process itself stays where it is.
    fn in_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                        .expect("unshare(CLONE_NEWNET)");
                    cmd("ip", &["link", "set", "lo", "up"], None);
                    f()
                })
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    fn proxy(timeout: Duration, ipv6: bool) -> Settings {
        Settings {
            timeout,
            ipv6,
            uid: Some(1337),
            gid: Some(1337),
            ..Settings::default()
        }
    }

    #[test]
    fn root_ipv4_captured_is_ok() {
        if !is_root("root_ipv4_captured_is_ok") {
            return;
        }
        in_netns(|| {
            cmd("iptables-restore", &["--noflush"], Some(RULES));
            let before = probe::current_fs_ids();
            let t = Instant::now();
            let r = run(&proxy(Duration::from_secs(5), false));
            assert!(r.is_ok(), "{}", r.expect_err("err"));
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
            // The caller's identity is untouched.
            assert_eq!(probe::current_fs_ids(), before);
        });
    }

    #[test]
    fn root_ipv4_without_rules_times_out() {
        if !is_root("root_ipv4_without_rules_times_out") {
            return;
        }
        in_netns(|| {
            let t = Instant::now();
            let err = run(&proxy(Duration::from_millis(500), false)).expect_err("no rules");
            assert!(err.is_timeout(), "{err}");
            assert!(t.elapsed() < Duration::from_millis(1000));
            let msg = err.to_string();
            assert!(
                msg.starts_with(
                    "IPv4: no connection to 127.0.0.6:15002 was redirected to the inbound \
                     (15006) or outbound (15001) listener within 500ms (from uid 1337, gid 1337;"
                ),
                "{msg}"
            );
            assert!(msg.contains("Connection refused"), "{msg}");
        });
    }

    #[test]
    fn root_ipv4_probe_as_root_is_not_captured() {
        if !is_root("root_ipv4_probe_as_root_is_not_captured") {
            return;
        }
        // The rules only capture the proxy's identity: probing as root proves nothing.
        in_netns(|| {
            cmd("iptables-restore", &["--noflush"], Some(RULES));
            let s = Settings {
                uid: None,
                gid: None,
                ..proxy(Duration::from_millis(400), false)
            };
            let err = run(&s).expect_err("root is exempt");
            assert!(err.is_timeout(), "{err}");
            assert!(err.to_string().contains("from uid 0, gid 0"), "{err}");
        });
    }

    #[test]
    fn root_ipv4_and_ipv6_captured_is_ok() {
        if !is_root("root_ipv4_and_ipv6_captured_is_ok") {
            return;
        }
        in_netns(|| {
            cmd("ip", &["-6", "addr", "add", "::6/128", "dev", "lo"], None);
            cmd("iptables-restore", &["--noflush"], Some(RULES));
            cmd("ip6tables-restore", &["--noflush"], Some(&rules_v6()));
            let t = Instant::now();
            let r = run(&proxy(Duration::from_secs(5), true));
            assert!(r.is_ok(), "{}", r.expect_err("err"));
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        });
    }

    #[test]
    fn root_ipv6_without_rules_fails_even_if_ipv4_passes() {
        if !is_root("root_ipv6_without_rules_fails_even_if_ipv4_passes") {
            return;
        }
        in_netns(|| {
            cmd("ip", &["-6", "addr", "add", "::6/128", "dev", "lo"], None);
            cmd("iptables-restore", &["--noflush"], Some(RULES));
            let t = Instant::now();
            let err = run(&proxy(Duration::from_millis(500), true)).expect_err("no v6 rules");
            assert!(t.elapsed() < Duration::from_millis(1000));
            assert!(err.is_timeout(), "{err}");
            assert_eq!(err.family(), Family::V6);
            assert!(
                err.to_string()
                    .starts_with("IPv6: no connection to [::6]:15002 was redirected"),
                "{err}"
            );
        });
    }
}
