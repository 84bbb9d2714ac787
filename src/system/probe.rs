//! Sockets and filesystem ids for a traffic probe: a non-blocking listener that tells where a
//! redirected connection was originally addressed (`SO_ORIGINAL_DST` /
//! `IP6T_SO_ORIGINAL_DST`, from conntrack), one connect from a bound source with a timeout,
//! and this thread's filesystem uid/gid (`setfsuid`/`setfsgid`), which the iptables owner
//! match reads from a socket. Plumbing only: what to probe, for how long and what an answer
//! means is decided by `commands::validate`.

use std::io;
use std::net::{
    Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};
use nix::unistd::{Gid, Uid};

/// A non-blocking TCP listener whose connections come with their original destination.
#[derive(Debug)]
pub struct Listener {
    socket: TcpListener,
    ipv6: bool,
}

/// A connection taken from a [`Listener`]; it is closed once its original destination is
/// read.
#[derive(Debug)]
pub struct Accepted {
    /// The connecting side.
    pub peer: SocketAddr,
    /// Where the connection was addressed before a `REDIRECT` (or DNAT) rewrote it; an error
    /// when conntrack knows of no such rewrite (`ENOENT`).
    pub original_dst: io::Result<SocketAddr>,
}

impl Listener {
    /// Listens on `addr`, without blocking in [`Listener::accept`].
    pub fn bind(addr: SocketAddr) -> io::Result<Listener> {
        let socket = TcpListener::bind(addr)?;
        socket.set_nonblocking(true)?;
        Ok(Listener {
            socket,
            ipv6: addr.is_ipv6(),
        })
    }

    /// The address listened on (with the port chosen, if `bind` was given port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The next pending connection, or `None` when none is waiting (an interrupted accept is
    /// retried).
    pub fn accept(&self) -> io::Result<Option<Accepted>> {
        loop {
            match self.socket.accept() {
                Ok((stream, peer)) => {
                    return Ok(Some(Accepted {
                        peer,
                        original_dst: original_dst(&stream, self.ipv6),
                    }));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The destination a redirected connection was originally addressed to, from conntrack.
fn original_dst(stream: &TcpStream, ipv6: bool) -> io::Result<SocketAddr> {
    if ipv6 {
        let sa = socket::getsockopt(stream, sockopt::Ip6tOriginalDst)?;
        Ok(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(sa.sin6_addr.s6_addr),
            u16::from_be(sa.sin6_port),
            sa.sin6_flowinfo,
            sa.sin6_scope_id,
        )))
    } else {
        let sa = socket::getsockopt(stream, sockopt::OriginalDst)?;
        Ok(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
            u16::from_be(sa.sin_port),
        )))
    }
}

/// Connects once to `target` from a TCP socket bound to `source` (port 0: any free port),
/// giving up after `timeout` (at least 1µs: a zero `SO_SNDTIMEO` would mean no timeout). The
/// socket is created with the calling thread's filesystem ids. A connect that times out is an
/// [`io::ErrorKind::TimedOut`] error, "connect timed out after {timeout:?}".
pub fn connect_from(
    source: SocketAddr,
    target: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let domain = if source.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd: OwnedFd = socket::socket(
        domain,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Tcp,
    )?;
    let micros = i64::try_from(timeout.as_micros())
        .unwrap_or(i64::MAX)
        .max(1);
    // On Linux a blocking connect gives up after SO_SNDTIMEO (EINPROGRESS), see socket(7).
    socket::setsockopt(&fd, sockopt::SendTimeout, &TimeVal::microseconds(micros))?;
    bind_to(&fd, source)?;
    match target {
        SocketAddr::V4(a) => socket::connect(fd.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => socket::connect(fd.as_raw_fd(), &SockaddrIn6::from(a)),
    }
    .map_err(|e| match e {
        nix::errno::Errno::EINPROGRESS | nix::errno::Errno::EAGAIN => io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect timed out after {timeout:?}"),
        ),
        e => io::Error::from(e),
    })?;
    Ok(TcpStream::from(fd))
}

fn bind_to(fd: &OwnedFd, addr: SocketAddr) -> io::Result<()> {
    match addr {
        SocketAddr::V4(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn::from(a))?,
        SocketAddr::V6(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(a))?,
    }
    Ok(())
}

/// A thread's filesystem ids: what file access checks, and the credentials a new socket
/// takes, use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsIds {
    /// The filesystem uid.
    pub uid: u32,
    /// The filesystem gid.
    pub gid: u32,
}

/// An id that is never valid: `setfsuid`/`setfsgid` with it change nothing and return the
/// current value.
const INVALID_ID: u32 = u32::MAX;

/// This thread's filesystem ids.
pub fn current_fs_ids() -> FsIds {
    FsIds {
        uid: nix::unistd::setfsuid(Uid::from_raw(INVALID_ID)).as_raw(),
        gid: nix::unistd::setfsgid(Gid::from_raw(INVALID_ID)).as_raw(),
    }
}

/// Runs `f` with this thread's filesystem gid and uid set to `gid` and `uid` (`None` keeps
/// the current one), then restores the previous ids, also when `f` panics. `f` is given the
/// ids actually in effect: without `CAP_SETUID`/`CAP_SETGID` the kernel keeps the old ones
/// and says nothing. On Linux these ids are per thread (unlike `setuid`): the rest of the
/// process keeps its identity.
pub fn with_fs_ids<T>(uid: Option<u32>, gid: Option<u32>, f: impl FnOnce(FsIds) -> T) -> T {
    /// Puts the saved ids back when dropped: uid first, regaining the capabilities needed
    /// to change the gid back.
    struct Restore(FsIds);
    impl Drop for Restore {
        fn drop(&mut self) {
            nix::unistd::setfsuid(Uid::from_raw(self.0.uid));
            nix::unistd::setfsgid(Gid::from_raw(self.0.gid));
        }
    }

    let _restore = Restore(current_fs_ids());
    // The gid first: changing the fsuid away from 0 drops the filesystem capabilities.
    if let Some(g) = gid {
        nix::unistd::setfsgid(Gid::from_raw(g));
    }
    if let Some(u) = uid {
        nix::unistd::setfsuid(Uid::from_raw(u));
    }
    f(current_fs_ids())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    const LOOPBACK: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));

    #[test]
    fn accept_without_a_connection_is_none() {
        let l = Listener::bind(LOOPBACK).expect("bind");
        assert!(l.accept().expect("accept").is_none());
    }

    #[test]
    fn a_port_in_use_is_addr_in_use() {
        let l = Listener::bind(LOOPBACK).expect("bind");
        let e = Listener::bind(l.local_addr().expect("addr")).expect_err("port taken");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn a_direct_connection_has_no_original_destination() {
        let l = Listener::bind(LOOPBACK).expect("bind");
        let to = l.local_addr().expect("addr");
        let stream = connect_from(LOOPBACK, to, Duration::from_secs(1)).expect("connect");
        let accepted = (0..200)
            .find_map(|_| {
                let a = l.accept().expect("accept");
                if a.is_none() {
                    thread::sleep(Duration::from_millis(5));
                }
                a
            })
            .expect("the connection arrives");
        assert_eq!(accepted.peer, stream.local_addr().expect("addr"));
        // Not redirected: conntrack has no rewrite (or is not loaded at all).
        assert!(accepted.original_dst.is_err(), "{accepted:?}");
    }

    #[test]
    fn connect_to_a_closed_port_is_refused() {
        let port = Listener::bind(LOOPBACK)
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let e = connect_from(LOOPBACK, port, Duration::from_secs(1)).expect_err("nothing there");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[test]
    fn fs_ids_are_restored_after_the_closure() {
        let before = current_fs_ids();
        let inside = with_fs_ids(None, None, |ids| ids);
        assert_eq!(inside, before);
        let root = nix::unistd::geteuid().is_root();
        let inside = with_fs_ids(Some(1337), Some(1338), |ids| {
            assert_eq!(ids, current_fs_ids());
            ids
        });
        if root {
            assert_eq!(
                inside,
                FsIds {
                    uid: 1337,
                    gid: 1338
                }
            );
        }
        assert_eq!(current_fs_ids(), before);
    }

    #[test]
    fn fs_ids_are_restored_after_a_panic() {
        let before = current_fs_ids();
        let r = std::panic::catch_unwind(|| with_fs_ids(Some(1337), Some(1337), |_| panic!()));
        assert!(r.is_err());
        assert_eq!(current_fs_ids(), before);
    }
}
