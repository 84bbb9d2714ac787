//! One run at a time per network namespace. Applying is read → reconcile → commit → roll back →
//! `ip` steps; two runs interleaving in one namespace would reconcile from stale reads, restore
//! stale snapshots over each other's commits and race on `ip` (seen as "Chain already
//! exists", "Index of deletion too big", rules missing after every run exited 0).
//!
//! The lock is an abstract unix socket bound in the target namespace: abstract socket names
//! belong to the network namespace, so the lock is keyed to the namespace itself (after
//! `--network-namespace` was entered, whatever path named it, and pod by pod in CNI mode),
//! needs no file on any filesystem, and is released by the kernel when the holder exits,
//! SIGKILL included — once the programs it started, which inherit the socket, have exited
//! too (an orphaned iptables-restore finishing its commit after its parent was killed must
//! not race the next run). A waiter that gives up asks the holder's pid (SO_PEERCRED).

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, connect, getsockopt, listen,
    socket, sockopt::PeerCredentials,
};

/// The abstract socket name (shown with a leading `@`, as `ss -x` does).
pub const NAME: &str = "istio-iptables.netns.lock";

/// Held until dropped (or the process exits).
#[derive(Debug)]
pub struct NsLock {
    _socket: OwnedFd,
    /// How long taking it took.
    pub waited: Duration,
}

/// The lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another istio-iptables run{} in this network namespace held its lock \
         (abstract socket @{NAME}) for more than {secs} s: gave up waiting, nothing was \
         changed (IPTABLES_LOCK_WAIT_SECONDS sets the wait)",
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Timeout {
        secs: u64,
        /// The holder's pid, when it could be asked.
        holder: Option<i32>,
    },
    #[error("taking this network namespace's lock (abstract socket @{NAME}): {0}")]
    Socket(Errno),
}

fn addr() -> UnixAddr {
    UnixAddr::new_abstract(NAME.as_bytes()).expect("short abstract name")
}

fn try_bind() -> Result<Option<OwnedFd>, Errno> {
    // Not close-on-exec, on purpose: the programs we run inherit the socket, so the lock is
    // held until the last of them exits. A run killed while its iptables-restore is still
    // committing keeps the namespace locked until that commit is over.
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )?;
    match bind(fd.as_raw_fd(), &addr()) {
        Ok(()) => {
            // Listening lets a waiter that gives up ask who holds it.
            listen(&fd, Backlog::new(16).unwrap_or(Backlog::MAXCONN))?;
            Ok(Some(fd))
        }
        Err(Errno::EADDRINUSE) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The pid of the current holder, when it can be asked.
fn holder() -> Option<i32> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .ok()?;
    connect(fd.as_raw_fd(), &addr()).ok()?;
    getsockopt(&fd, PeerCredentials).ok().map(|c| c.pid())
}

/// Takes the lock of the current network namespace, waiting up to `wait`.
pub fn acquire(wait: Duration) -> Result<NsLock, LockError> {
    let start = Instant::now();
    let mut said = false;
    loop {
        if let Some(fd) = try_bind().map_err(LockError::Socket)? {
            let waited = start.elapsed();
            if said {
                tracing::info!(
                    waited_ms = waited.as_millis() as u64,
                    "got this network namespace's lock"
                );
            }
            return Ok(NsLock {
                _socket: fd,
                waited,
            });
        }
        if start.elapsed() >= wait {
            return Err(LockError::Timeout {
                secs: wait.as_secs(),
                holder: holder(),
            });
        }
        if !said {
            tracing::info!(
                "another istio-iptables run is working in this network namespace: waiting up to {} s",
                wait.as_secs()
            );
            said = true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_per_namespace_and_a_bounded_wait() {
        // A private network namespace (in a thread, so the test process keeps its own).
        let r = std::thread::spawn(|| {
            if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                return None;
            }
            let first = acquire(Duration::ZERO).expect("free lock");
            let second = acquire(Duration::from_millis(50)).unwrap_err();
            drop(first);
            let third = acquire(Duration::from_secs(2)).map(|_| ());
            Some((second.to_string(), third.is_ok()))
        })
        .join()
        .unwrap();
        let Some((msg, third_ok)) = r else {
            eprintln!("SKIPPED nslock::one_holder_per_namespace_and_a_bounded_wait: needs root");
            return;
        };
        assert!(msg.contains("gave up waiting"), "{msg}");
        assert!(
            msg.contains(&format!("(pid {})", std::process::id())),
            "{msg}"
        );
        assert!(third_ok, "dropping the lock must release it");
    }
}
