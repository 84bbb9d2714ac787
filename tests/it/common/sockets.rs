//! Sockets for real traffic: listeners that say where a connection landed, clients,
//! identities to send as; TCP and UDP.

use super::*;

// ---------------------------------------------------------------------------
// Real traffic: listeners that say where a connection landed, and clients
// (shared by tests/it/traffic.rs and tests/it/explain.rs)
// ---------------------------------------------------------------------------
//
// **Where did a connection land?** Every TCP [`Listener`] answers each accepted connection
// with one line: its label (`pod:15001`, `peer:80`, ...), the accepted socket's local
// address, the original destination (`SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`, from
// conntrack) and the client's address ([`Landing`]). [`connect`] reads that line. A
// [`UdpListener`] records each datagram and answers it ([`udp_exchange`]).
//
// **As whom?** iptables' owner match reads the socket's file credentials, fixed when the
// socket is created. Clients run in their own thread, which calls `setfsgid`/`setfsuid`
// (per thread on Linux) before creating the socket ([`Ident::assume`]).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};

use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6,
    sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};
use nix::unistd::{Gid, Uid};

/// Bound of one connect, one read, one UDP round trip.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// How often idle listeners check whether they should stop.
pub const POLL: Duration = Duration::from_millis(5);

/// The proxy's uid and gid (`-u 1337`).
pub const PROXY: Ident = Ident {
    uid: 1337,
    gid: 1337,
};
/// An application running as root.
pub const APP: Ident = Ident { uid: 0, gid: 0 };

pub const LOCALHOST_V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
pub const LOCALHOST_V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
/// Source address of the proxy's inbound passthrough (`127.0.0.6`, `::6`).
pub const PASSTHROUGH_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6));
pub const PASSTHROUGH_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6));

// ---------------------------------------------------------------------------
// Identities
// ---------------------------------------------------------------------------

/// Filesystem uid/gid a client's socket is created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ident {
    pub uid: u32,
    pub gid: u32,
}

impl Ident {
    /// Sets the calling thread's filesystem ids (gid first: leaving fsuid 0 drops the
    /// capability to change the gid). Only call in a thread that ends afterwards.
    pub fn assume(self) -> Result<(), String> {
        nix::unistd::setfsgid(Gid::from_raw(self.gid));
        nix::unistd::setfsuid(Uid::from_raw(self.uid));
        // setfsuid/setfsgid return the previous value; an invalid id changes nothing and
        // reports the current one.
        let fsuid = nix::unistd::setfsuid(Uid::from_raw(u32::MAX)).as_raw();
        let fsgid = nix::unistd::setfsgid(Gid::from_raw(u32::MAX)).as_raw();
        if (fsuid, fsgid) != (self.uid, self.gid) {
            return Err(format!(
                "could not switch to fsuid/fsgid {}/{} (still {fsuid}/{fsgid})",
                self.uid, self.gid
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for Ident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "uid {} gid {}", self.uid, self.gid)
    }
}

// ---------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------

pub fn domain_of(addr: &SocketAddr) -> AddressFamily {
    match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    }
}

pub fn bind_fd(fd: &OwnedFd, addr: SocketAddr) -> nix::Result<()> {
    match addr {
        SocketAddr::V4(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(a)),
    }
}

/// A socket of `ty` for `addr`'s family, `SO_REUSEADDR`, IPv6-only for IPv6 (so IPv4 and
/// IPv6 listeners never share a port), optionally `IP_TRANSPARENT`, bound to `addr`.
pub fn bound_socket(ty: SockType, addr: SocketAddr, transparent: bool) -> nix::Result<OwnedFd> {
    let proto = match ty {
        SockType::Datagram => SockProtocol::Udp,
        _ => SockProtocol::Tcp,
    };
    let fd = socket::socket(domain_of(&addr), ty, SockFlag::SOCK_CLOEXEC, proto)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    if transparent {
        // SOL_IP/IP_TRANSPARENT also applies to IPv6 sockets on Linux.
        socket::setsockopt(&fd, sockopt::IpTransparent, &true)?;
    }
    bind_fd(&fd, addr)?;
    Ok(fd)
}

/// The destination a connection was originally addressed to, from conntrack.
pub fn original_dst(stream: &TcpStream, local: &SocketAddr) -> Option<SocketAddr> {
    if local.is_ipv4() {
        let sa = socket::getsockopt(stream, sockopt::OriginalDst).ok()?;
        Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr))),
            u16::from_be(sa.sin_port),
        ))
    } else {
        let sa = socket::getsockopt(stream, sockopt::Ip6tOriginalDst).ok()?;
        Some(SocketAddr::new(
            IpAddr::V6(Ipv6Addr::from(sa.sin6_addr.s6_addr)),
            u16::from_be(sa.sin6_port),
        ))
    }
}

// ---------------------------------------------------------------------------
// TCP listeners and clients
// ---------------------------------------------------------------------------

/// What a listener saw of one connection (also what it tells the client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Landing {
    /// The listener's label, e.g. `pod:15001`.
    pub label: String,
    /// Local address of the accepted socket.
    pub local: SocketAddr,
    /// `SO_ORIGINAL_DST`; `None` if conntrack had no answer.
    pub orig: Option<SocketAddr>,
    /// The client's address as the listener saw it.
    pub peer: SocketAddr,
}

impl Landing {
    pub fn to_line(&self) -> String {
        let orig = self.orig.map_or("none".to_string(), |o| o.to_string());
        format!("{}|{}|{}|{}\n", self.label, self.local, orig, self.peer)
    }

    pub fn parse(line: &str) -> Result<Landing, String> {
        let f: Vec<&str> = line.trim_end().split('|').collect();
        let bad = || format!("malformed listener reply {line:?}");
        if f.len() != 4 {
            return Err(bad());
        }
        Ok(Landing {
            label: f[0].to_string(),
            local: f[1].parse().map_err(|_| bad())?,
            orig: if f[2] == "none" {
                None
            } else {
                Some(f[2].parse().map_err(|_| bad())?)
            },
            peer: f[3].parse().map_err(|_| bad())?,
        })
    }
}

impl std::fmt::Display for Landing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let orig = self.orig.map_or("none".to_string(), |o| o.to_string());
        write!(
            f,
            "{} (local {}, original dst {orig}, from {})",
            self.label, self.local, self.peer
        )
    }
}

/// A TCP listener in a namespace, run by a thread until dropped. Every accepted connection
/// gets its [`Landing`] line and is closed.
pub struct Listener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    accepted: Arc<Mutex<Vec<Landing>>>,
}

impl Listener {
    /// Listens on `addr` in namespace `ns`; returns once the socket listens. Panics if it
    /// cannot (with the reason).
    pub fn tcp(ns: &str, label: &str, addr: SocketAddr) -> Listener {
        Listener::start(ns, label, addr, false)
    }

    /// Like [`Listener::tcp`], with `IP_TRANSPARENT` (a TPROXY target).
    pub fn transparent(ns: &str, label: &str, addr: SocketAddr) -> Listener {
        Listener::start(ns, label, addr, true)
    }

    pub fn start(ns: &str, label: &str, addr: SocketAddr, transparent: bool) -> Listener {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (ns_s, label_s) = (ns.to_string(), label.to_string());
        let (stop_t, accepted_t) = (stop.clone(), accepted.clone());
        let thread = thread::spawn(move || {
            let listener = match (|| -> Result<TcpListener, String> {
                enter_netns(&ns_s)?;
                let fd = bound_socket(SockType::Stream, addr, transparent)
                    .map_err(|e| format!("bind {addr}: {e}"))?;
                socket::listen(&fd, Backlog::new(64).expect("valid backlog"))
                    .map_err(|e| format!("listen {addr}: {e}"))?;
                let l = TcpListener::from(fd);
                l.set_nonblocking(true).map_err(|e| e.to_string())?;
                Ok(l)
            })() {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while !stop_t.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_write_timeout(Some(TIMEOUT));
                        let local = stream.local_addr().unwrap_or(addr);
                        let landing = Landing {
                            label: label_s.clone(),
                            orig: original_dst(&stream, &local),
                            local,
                            peer,
                        };
                        let line = landing.to_line();
                        // Record before replying: the client may check the record after the reply.
                        accepted_t
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(landing);
                        let _ = (&stream).write_all(line.as_bytes());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => thread::sleep(POLL),
                    Err(_) => thread::sleep(POLL),
                }
            }
        });
        match ready_rx.recv_timeout(TIMEOUT * 5) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                panic!("listener {label} in {ns}: {e}");
            }
            Err(e) => panic!("listener {label} in {ns} did not start: {e}"),
        }
        Listener {
            stop,
            thread: Some(thread),
            accepted,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> Vec<Landing> {
        self.accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects to `dst` from namespace `ns` with a socket created as `who`, optionally bound to
/// source address `src` first, and returns the landing line of the listener that accepted
/// the connection. Errors: refused, timed out (after [`TIMEOUT`]), no reply.
pub fn connect(
    ns: &str,
    who: Ident,
    dst: SocketAddr,
    src: Option<IpAddr>,
) -> Result<Landing, String> {
    run_in_netns(ns, || -> Result<Landing, String> {
        who.assume()?;
        let fd = socket::socket(
            domain_of(&dst),
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::Tcp,
        )
        .map_err(|e| format!("socket: {e}"))?;
        // A blocking connect gives up after SO_SNDTIMEO (EINPROGRESS), see socket(7).
        socket::setsockopt(
            &fd,
            sockopt::SendTimeout,
            &TimeVal::milliseconds(TIMEOUT.as_millis() as i64),
        )
        .map_err(|e| format!("SO_SNDTIMEO: {e}"))?;
        if let Some(src) = src {
            bind_fd(&fd, SocketAddr::new(src, 0)).map_err(|e| format!("bind {src}: {e}"))?;
        }
        match dst {
            SocketAddr::V4(a) => socket::connect(fd.as_raw_fd(), &SockaddrIn::from(a)),
            SocketAddr::V6(a) => socket::connect(fd.as_raw_fd(), &SockaddrIn6::from(a)),
        }
        .map_err(|e| match e {
            nix::errno::Errno::EINPROGRESS | nix::errno::Errno::EAGAIN => {
                format!("connect timed out after {TIMEOUT:?}")
            }
            e => format!("connect: {e}"),
        })?;
        let stream = TcpStream::from(fd);
        stream
            .set_read_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .map_err(|e| format!("connected, but reading the listener's reply: {e}"))?;
        if line.is_empty() {
            return Err("connected, but the connection was closed without a reply \
                 (accepted by something other than a test listener?)"
                .to_string());
        }
        Landing::parse(&line)
    })?
}

// ---------------------------------------------------------------------------
// UDP
// ---------------------------------------------------------------------------

/// A UDP socket in a namespace, run by a thread until dropped. Every datagram is recorded
/// as `(payload, from)` and answered with `label|local|payload`.
pub struct UdpListener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    received: Arc<Mutex<Vec<(String, SocketAddr)>>>,
}

impl UdpListener {
    /// Binds `addr` in `ns` with a socket created as `owner` (the DNS proxy runs as the
    /// proxy user, which the conntrack-zone rules match on). Panics if it cannot.
    pub fn start(ns: &str, label: &str, addr: SocketAddr, owner: Ident) -> UdpListener {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (ns_s, label_s) = (ns.to_string(), label.to_string());
        let (stop_t, received_t) = (stop.clone(), received.clone());
        let thread = thread::spawn(move || {
            let sock = match (|| -> Result<UdpSocket, String> {
                enter_netns(&ns_s)?;
                owner.assume()?;
                let fd = bound_socket(SockType::Datagram, addr, false)
                    .map_err(|e| format!("bind udp {addr}: {e}"))?;
                let s = UdpSocket::from(fd);
                s.set_read_timeout(Some(POLL * 4))
                    .map_err(|e| e.to_string())?;
                Ok(s)
            })() {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut buf = [0u8; 512];
            while !stop_t.load(Ordering::SeqCst) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let payload = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let reply = format!("{label_s}|{addr}|{payload}");
                    // Record before replying: the client checks the record after the reply.
                    received_t
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((payload, from));
                    let _ = sock.send_to(reply.as_bytes(), from);
                }
            }
        });
        match ready_rx.recv_timeout(TIMEOUT * 5) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                panic!("udp listener {label} in {ns}: {e}");
            }
            Err(e) => panic!("udp listener {label} in {ns} did not start: {e}"),
        }
        UdpListener {
            stop,
            thread: Some(thread),
            received,
        }
    }

    /// The sender of the datagram carrying `payload`, if it arrived here.
    pub fn got(&self, payload: &str) -> Option<SocketAddr> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(p, _)| p == payload)
            .map(|(_, from)| *from)
    }
}

impl Drop for UdpListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `payload` over UDP from `ns` as `who` to `dst` (connected socket) and returns the
/// reply's text, or an error (e.g. no reply within [`TIMEOUT`]).
pub fn udp_exchange(
    ns: &str,
    who: Ident,
    dst: SocketAddr,
    payload: &str,
) -> Result<String, String> {
    run_in_netns(ns, || -> Result<String, String> {
        who.assume()?;
        let any: SocketAddr = if dst.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let s = UdpSocket::bind(any).map_err(|e| format!("bind: {e}"))?;
        s.connect(dst).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        s.send(payload.as_bytes())
            .map_err(|e| format!("send: {e}"))?;
        let mut buf = [0u8; 512];
        let n = s
            .recv(&mut buf)
            .map_err(|e| format!("no reply from {dst}: {e}"))?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })?
}

pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}
