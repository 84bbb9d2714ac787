//! One run at a time per network namespace. Applying is read → reconcile → commit → roll back →
//! `ip` steps; two runs interleaving in one namespace would reconcile from stale reads, restore
//! stale snapshots over each other's commits and race on `ip` (seen as "Chain already
//! exists", "Index of deletion too big", rules missing after every run exited 0).
//!
//! The lock is an nf_tables table, `table inet istio-iptables-lock`, created empty with the
//! flag `owner` (`NFT_TABLE_F_OWNER`, Linux 5.12) in a transaction of its own that fails when
//! the table exists:
//! - tables belong to the network namespace, so the lock is keyed to the namespace itself
//!   (after `--network-namespace` was entered, whatever path named it, and pod by pod in CNI
//!   mode), and needs no file on any filesystem;
//! - creating a table needs CAP_NET_ADMIN in the namespace: a process that could not change
//!   the rules cannot take the lock or hold it against us either (any local user could bind
//!   the abstract socket name that was the lock before, and stop every run);
//! - the table belongs to the netlink socket that created it: no other socket may change or
//!   delete it, `nft flush ruleset` passes it by, and the kernel deletes it when that socket
//!   is closed, i.e. when the holder exits, SIGKILL included — once the programs it started,
//!   which inherit the socket (not close-on-exec, on purpose), have exited too (an orphaned
//!   iptables-restore finishing its commit after its parent was killed must not race the
//!   next run);
//! - it has no chain, so no packet ever sees it, and it is in the `inet` family, which
//!   iptables-nft-save does not show; the nf_tables reads of [`nftprobe`] leave it out.
//!
//! A waiter tries again every 10 ms up to its wait. The table's owner is a netlink port,
//! which `/proc/net/netlink` maps to a socket inode and `/proc/*/fd` to the processes that
//! have it open: the messages name them (pid, command, uid).
//!
//! Where nf_tables cannot be used (no nf_tables or no `inet` family in the kernel, a kernel
//! before 5.12, netlink refused), the lock is the abstract unix socket
//! `@istio-iptables.netns.lock` (said at debug level): keyed and released the same way, but
//! any process can bind it. A waiter that gives up asks the holder who it is (SO_PEERCRED);
//! one without CAP_NET_ADMIN cannot be a run, and the error says it is squatting the name.

use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockProtocol, SockType, UnixAddr, bind, connect, getsockopt,
    listen, socket, sockopt::PeerCredentials,
};

use crate::system::host;
use crate::system::netlink::Socket;
use crate::system::nftprobe::{self, NfFamily};

/// The lock's nf_tables table (family `inet`).
pub const TABLE: &str = nftprobe::LOCK_TABLE;

/// The abstract socket name of the fallback (shown with a leading `@`, as `ss -x` does).
pub const NAME: &str = "istio-iptables.netns.lock";

/// How often a waiter tries again.
const POLL: Duration = Duration::from_millis(10);

/// `NETLINK_NETFILTER`, the protocol column of `/proc/net/netlink`.
const NETLINK_NETFILTER: u32 = 12;

/// At most this many holders are named.
const NAMED: usize = 4;

/// What the lock is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The nf_tables table [`TABLE`] (only CAP_NET_ADMIN can take it).
    Table,
    /// The abstract unix socket [`NAME`] (anyone can bind it): where nf_tables cannot be used.
    Socket,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Table => write!(f, "nf_tables table inet {TABLE}"),
            Kind::Socket => write!(f, "abstract socket @{NAME}"),
        }
    }
}

/// Held until dropped (or the process and the programs it started exit).
pub struct NsLock {
    _table: Option<Socket>,
    _socket: Option<OwnedFd>,
    /// What the lock is.
    pub kind: Kind,
    /// How long taking it took.
    pub waited: Duration,
}

impl fmt::Debug for NsLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NsLock")
            .field("kind", &self.kind)
            .field("waited", &self.waited)
            .finish()
    }
}

/// A process that holds the lock (has its socket open).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: i32,
    /// Its `/proc/PID/comm` (or the first word of its command line).
    pub command: Option<String>,
    /// Its effective uid.
    pub uid: Option<u32>,
    /// Whether it has CAP_NET_ADMIN in effect.
    pub net_admin: Option<bool>,
}

impl fmt::Display for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let command = self.command.as_deref().unwrap_or("?");
        match self.uid {
            Some(uid) => write!(f, "pid {} ({command}, uid {uid})", self.pid),
            None => write!(f, "pid {} ({command})", self.pid),
        }
    }
}

/// Who holds the lock, as far as this process can see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// The processes that have its socket open, by pid (a run, then the programs it started).
    Processes(Vec<Process>),
    /// The table's owner, a netlink port no process visible here has open (one in another
    /// PID namespace).
    Port(u32),
    /// The table exists without an owner: made by hand (e.g. `nft add table`), it stays
    /// until it is deleted.
    NoOwner,
    /// The holder could not be asked.
    Unknown,
}

impl Holder {
    /// An abstract socket held only by processes without CAP_NET_ADMIN: no run of ours (a
    /// run checks it has CAP_NET_ADMIN before it takes the lock).
    fn squats(&self, kind: Kind) -> bool {
        match self {
            Holder::Processes(ps) => {
                kind == Kind::Socket
                    && !ps.is_empty()
                    && ps.iter().all(|p| p.net_admin == Some(false))
            }
            _ => false,
        }
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Processes(ps) => {
                for (i, p) in ps.iter().take(NAMED).enumerate() {
                    if i > 0 {
                        f.write_str(" and ")?;
                    }
                    write!(f, "{p}")?;
                }
                if ps.len() > NAMED {
                    write!(f, " and {} more processes", ps.len() - NAMED)?;
                }
                Ok(())
            }
            Holder::Port(port) => write!(
                f,
                "netlink port {port} (of a process this PID namespace does not show)"
            ),
            Holder::NoOwner => write!(
                f,
                "no process: the table was made without the owner flag (by hand, e.g. `nft \
                 add table`) and stays until `nft delete table inet {TABLE}`"
            ),
            Holder::Unknown => f.write_str("a process that could not be asked"),
        }
    }
}

/// The lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{}", timeout_message(*secs, *kind, holder))]
    Timeout {
        secs: u64,
        kind: Kind,
        /// Who held it when the wait ended.
        holder: Holder,
    },
    #[error("taking this network namespace's lock ({kind}): {errno}")]
    System { kind: Kind, errno: Errno },
}

/// Who holds the lock, for a message: "this network namespace's lock (KIND) {is held,
/// has been held} by HOLDER" (`held` is the verb), or that a process squats its name.
fn held_by(kind: Kind, holder: &Holder, held: &str) -> String {
    if holder.squats(kind) {
        format!(
            "an unprivileged process without CAP_NET_ADMIN, {holder}, {held} this network \
             namespace's lock name ({kind}, the lock where nf_tables cannot be used): it is \
             squatting the name, it is no istio-iptables run"
        )
    } else {
        let verb = if held == "holds" {
            "is held"
        } else {
            "has been held"
        };
        format!("this network namespace's lock ({kind}) {verb} by {holder}")
    }
}

fn timeout_message(secs: u64, kind: Kind, holder: &Holder) -> String {
    format!(
        "{} for more than {secs} s: gave up waiting, nothing was changed \
         (IPTABLES_LOCK_WAIT_SECONDS sets the wait)",
        held_by(kind, holder, "has held")
    )
}

/// One way of locking.
trait Lock {
    fn kind(&self) -> Kind;
    /// Tries once: whether the lock is now ours.
    fn try_take(&mut self) -> Result<bool, Errno>;
    /// Who holds it.
    fn holder(&mut self) -> Holder;
    /// The taken lock.
    fn into_lock(self, waited: Duration) -> NsLock;
}

/// The nf_tables table, on a netlink socket that owns it once taken.
struct TableLock {
    sock: Socket,
}

impl Lock for TableLock {
    fn kind(&self) -> Kind {
        Kind::Table
    }

    fn try_take(&mut self) -> Result<bool, Errno> {
        let mut refused = Errno::EPERM;
        // A table released between the failed create and the read is taken the next time.
        for _ in 0..3 {
            match nftprobe::create_owned_table(&mut self.sock, NfFamily::Inet, TABLE) {
                Ok(()) => return Ok(true),
                // EEXIST: it exists; EPERM: another socket owns it, or this process may not
                // create tables. The read tells (it needs CAP_NET_ADMIN too).
                Err(e @ (Errno::EEXIST | Errno::EPERM)) => {
                    if nftprobe::find_table(&mut self.sock, NfFamily::Inet, TABLE)?.is_some() {
                        return Ok(false);
                    }
                    refused = e;
                }
                Err(e) => return Err(e),
            }
        }
        // Refused, though the table is not there and tables can be read (a security module?).
        Err(refused)
    }

    fn holder(&mut self) -> Holder {
        match nftprobe::find_table(&mut self.sock, NfFamily::Inet, TABLE) {
            Ok(Some(t)) => match t.owner {
                Some(port) => netlink_holder(port),
                None => Holder::NoOwner,
            },
            _ => Holder::Unknown,
        }
    }

    fn into_lock(self, waited: Duration) -> NsLock {
        NsLock {
            _table: Some(self.sock),
            _socket: None,
            kind: Kind::Table,
            waited,
        }
    }
}

/// The abstract socket, bound and listening once taken.
struct SocketLock {
    fd: Option<OwnedFd>,
}

fn addr() -> UnixAddr {
    UnixAddr::new_abstract(NAME.as_bytes()).expect("short abstract name")
}

impl Lock for SocketLock {
    fn kind(&self) -> Kind {
        Kind::Socket
    }

    fn try_take(&mut self) -> Result<bool, Errno> {
        // Not close-on-exec, on purpose: the programs we run inherit the socket, so the lock
        // is held until the last of them exits.
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )?;
        match bind(fd.as_raw_fd(), &addr()) {
            Ok(()) => {
                // Listening lets a waiter ask who holds it.
                listen(&fd, Backlog::new(16).unwrap_or(Backlog::MAXCONN))?;
                self.fd = Some(fd);
                Ok(true)
            }
            Err(Errno::EADDRINUSE) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn holder(&mut self) -> Holder {
        // Non-blocking: a holder whose backlog is full (it never accepts) must not hang us.
        let peer = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .ok()
        .filter(|fd| connect(fd.as_raw_fd(), &addr()).is_ok())
        .and_then(|fd| getsockopt(&fd, PeerCredentials).ok());
        match peer {
            Some(c) => Holder::Processes(vec![process(c.pid(), Some(c.uid()))]),
            None => Holder::Unknown,
        }
    }

    fn into_lock(self, waited: Duration) -> NsLock {
        NsLock {
            _table: None,
            _socket: self.fd,
            kind: Kind::Socket,
            waited,
        }
    }
}

/// Takes the lock of the current network namespace, waiting up to `wait`: the nf_tables
/// table, or the abstract socket where nf_tables cannot be used.
pub fn acquire(wait: Duration) -> Result<NsLock, LockError> {
    let start = Instant::now();
    let unusable = |e: Errno| {
        tracing::debug!(
            "nf_tables cannot hold this network namespace's lock ({e}): using the abstract \
             socket @{NAME}, which any process can bind"
        );
    };
    match Socket::open_inheritable(SockProtocol::NetlinkNetFilter) {
        Ok(sock) => {
            let mut table = TableLock { sock };
            match table.try_take() {
                Ok(taken) => return wait_for(table, taken, start, wait),
                Err(e) => unusable(e),
            }
        }
        Err(e) => unusable(e),
    }
    acquire_socket(start, wait)
}

/// The fallback: the abstract socket.
fn acquire_socket(start: Instant, wait: Duration) -> Result<NsLock, LockError> {
    let mut lock = SocketLock { fd: None };
    let taken = lock.try_take().map_err(|errno| LockError::System {
        kind: Kind::Socket,
        errno,
    })?;
    wait_for(lock, taken, start, wait)
}

/// Tries `lock` again until it is taken or `wait` (from `start`) is over.
fn wait_for(
    mut lock: impl Lock,
    mut taken: bool,
    start: Instant,
    wait: Duration,
) -> Result<NsLock, LockError> {
    let kind = lock.kind();
    let mut first_holder: Option<Holder> = None;
    while !taken {
        if start.elapsed() >= wait {
            return Err(LockError::Timeout {
                secs: wait.as_secs(),
                kind,
                holder: lock.holder(),
            });
        }
        if first_holder.is_none() {
            let holder = lock.holder();
            tracing::info!(
                "{}: waiting up to {} s",
                held_by(kind, &holder, "holds"),
                wait.as_secs()
            );
            first_holder = Some(holder);
        }
        std::thread::sleep(POLL);
        taken = lock
            .try_take()
            .map_err(|errno| LockError::System { kind, errno })?;
    }
    let waited = start.elapsed();
    match first_holder {
        Some(holder) => tracing::info!(
            waited_ms = waited.as_millis() as u64,
            "got this network namespace's lock ({kind}), held before by {holder}"
        ),
        None => tracing::debug!("took this network namespace's lock ({kind})"),
    }
    Ok(lock.into_lock(waited))
}

/// The processes that have netlink port `port` (of nf_tables) open.
fn netlink_holder(port: u32) -> Holder {
    // thread-self: the namespace this thread entered with --network-namespace.
    let inode = std::fs::read_to_string("/proc/thread-self/net/netlink")
        .ok()
        .and_then(|t| netfilter_socket_inode(&t, port));
    let Some(inode) = inode else {
        return Holder::Port(port);
    };
    let ps = processes_with(&format!("socket:[{inode}]"));
    if ps.is_empty() {
        Holder::Port(port)
    } else {
        Holder::Processes(ps)
    }
}

/// The inode of nf_tables' netlink socket bound to `port`, from `/proc/net/netlink`
/// (`sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode`).
fn netfilter_socket_inode(proc_net_netlink: &str, port: u32) -> Option<u64> {
    proc_net_netlink.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let ours = f.get(1)?.parse::<u32>().ok()? == NETLINK_NETFILTER
            && f.get(2)?.parse::<u32>().ok()? == port;
        if ours { f.get(9)?.parse().ok() } else { None }
    })
}

/// The processes one of whose descriptors links to `target` (e.g. `socket:[123]`), by pid.
fn processes_with(target: &str) -> Vec<Process> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target))
            })
        })
        .collect();
    pids.sort_unstable();
    pids.into_iter().map(|pid| process(pid, None)).collect()
}

/// What `/proc` says of `pid`; `uid` when known already.
fn process(pid: i32, uid: Option<u32>) -> Process {
    let command = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim_end().to_string())
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let first = cmdline.split(|b| *b == 0).next()?;
            Some(String::from_utf8_lossy(first).into_owned()).filter(|c| !c.is_empty())
        });
    let uid = uid.or_else(|| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        // Uid: real, effective, saved, filesystem.
        let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    });
    Process {
        pid,
        command,
        uid,
        net_admin: host::net_admin_in_effect(pid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of these tests at a time: a lock socket is inherited by every process started
    /// while it is open (on purpose), so a squatter spawned by one test would hold another
    /// test's lock.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Runs `f` in a private network namespace (in a thread, so the test process keeps its
    /// own); `None` without the privilege to make one.
    fn in_private_ns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            Some(f())
        })
        .join()
        .unwrap()
    }

    #[test]
    fn one_holder_per_namespace_and_a_bounded_wait() {
        let r = in_private_ns(|| {
            let first = acquire(Duration::ZERO).expect("free lock");
            let second = acquire(Duration::from_millis(50)).unwrap_err();
            let kind = first.kind;
            drop(first);
            let third = acquire(Duration::from_secs(2)).map(|_| ());
            (kind, second.to_string(), third.is_ok())
        });
        let Some((kind, msg, third_ok)) = r else {
            eprintln!("SKIPPED nslock::one_holder_per_namespace_and_a_bounded_wait: needs root");
            return;
        };
        assert_eq!(
            kind,
            Kind::Table,
            "this kernel has nf_tables and owned tables"
        );
        assert!(msg.contains("gave up waiting"), "{msg}");
        assert!(msg.contains(&format!("inet {TABLE}")), "{msg}");
        assert!(
            msg.contains(&format!("by pid {} (", std::process::id())),
            "{msg}"
        );
        assert!(third_ok, "dropping the lock must release it");
    }

    /// The table is there while held (owned by our socket) and gone when dropped; the
    /// nf_tables reads do not list it.
    #[test]
    fn the_table_is_owned_while_held_and_no_read_lists_it() {
        let r = in_private_ns(|| {
            let lock = acquire(Duration::ZERO).expect("free lock");
            let mut sock = Socket::open_inheritable(SockProtocol::NetlinkNetFilter).unwrap();
            let held = nftprobe::find_table(&mut sock, NfFamily::Inet, TABLE);
            let listed = nftprobe::tables(NfFamily::Inet);
            let read = nftprobe::read(NfFamily::Inet);
            drop(lock);
            // A process another test started meanwhile may have inherited the socket: the
            // table goes once it has exited too.
            let mut after = nftprobe::find_table(&mut sock, NfFamily::Inet, TABLE);
            for _ in 0..300 {
                if matches!(after, Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
                after = nftprobe::find_table(&mut sock, NfFamily::Inet, TABLE);
            }
            (held, listed, read, after)
        });
        let Some((held, listed, read, after)) = r else {
            eprintln!("SKIPPED nslock::the_table_is_owned_while_held_and_no_read_lists_it");
            return;
        };
        let held = held.expect("read").expect("the table while held");
        assert_eq!(
            held.flags & nftprobe::TABLE_F_OWNER,
            nftprobe::TABLE_F_OWNER
        );
        assert!(held.owner.is_some(), "{held:?}");
        assert_eq!(listed, Some(nftprobe::NfTables::default()));
        assert_eq!(read, Some(nftprobe::NfTables::default()));
        assert_eq!(after, Ok(None), "dropping the lock deletes the table");
    }

    /// The fallback's abstract socket, bound by a process without CAP_NET_ADMIN: the error
    /// says it squats the name (and names it); held by ourselves it blames no squatter.
    #[test]
    fn the_fallback_names_an_unprivileged_squatter() {
        let ok = std::process::Command::new("setpriv")
            .args([
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                "true",
            ])
            .status()
            .is_ok_and(|s| s.success());
        if !ok || !std::path::Path::new("/usr/bin/perl").exists() {
            eprintln!(
                "SKIPPED nslock::the_fallback_names_an_unprivileged_squatter: needs root, setpriv and perl"
            );
            return;
        }
        let r = in_private_ns(|| {
            let ours = acquire_socket(Instant::now(), Duration::ZERO).expect("free name");
            let ours_msg = acquire_socket(Instant::now(), Duration::ZERO)
                .unwrap_err()
                .to_string();
            drop(ours);
            // The child starts in this thread's namespace.
            let mut squatter = std::process::Command::new("setpriv")
                .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
                .args(["/usr/bin/perl", "-MSocket", "-e"])
                .arg(format!(
                    "socket(S, AF_UNIX, SOCK_STREAM, 0) or die; \
                     bind(S, pack_sockaddr_un(\"\\0{NAME}\")) or die; listen(S, 5); sleep 30"
                ))
                .spawn()
                .expect("setpriv");
            let mut msg = String::new();
            for _ in 0..500 {
                match acquire_socket(Instant::now(), Duration::ZERO) {
                    Ok(l) => drop(l),
                    Err(e) => {
                        msg = e.to_string();
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let pid = squatter.id();
            let _ = squatter.kill();
            let _ = squatter.wait();
            (ours_msg, msg, pid)
        });
        let Some((ours_msg, msg, pid)) = r else {
            eprintln!("SKIPPED nslock::the_fallback_names_an_unprivileged_squatter: needs root");
            return;
        };
        assert!(
            ours_msg.contains(&format!("@{NAME}")) && !ours_msg.contains("squatting"),
            "{ours_msg}"
        );
        assert!(
            ours_msg.contains(&format!("by pid {} (", std::process::id())),
            "{ours_msg}"
        );
        assert!(
            msg.contains("an unprivileged process without CAP_NET_ADMIN")
                && msg.contains(&format!("pid {pid} (perl, uid 65534)"))
                && msg.contains("squatting")
                && msg.contains("gave up waiting"),
            "{msg}"
        );
    }

    #[test]
    fn the_socket_of_a_netlink_port() {
        let text = "sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode\n\
                    0000000000000000 0   77         00000000 0        0        0     2        0        10\n\
                    0000000000000000 12  77         00000000 0        0        0     2        0        4242\n\
                    0000000000000000 12  4294967295 00000000 0        0        0     2        0        11\n";
        assert_eq!(netfilter_socket_inode(text, 77), Some(4242));
        assert_eq!(netfilter_socket_inode(text, u32::MAX), Some(11));
        assert_eq!(netfilter_socket_inode(text, 78), None);
    }

    #[test]
    fn holders_are_named_with_command_and_uid() {
        let p = |pid, command: &str, net_admin| Process {
            pid,
            command: Some(command.into()),
            uid: Some(0),
            net_admin: Some(net_admin),
        };
        let two = Holder::Processes(vec![p(10, "istio-iptables", true), p(12, "sleep", true)]);
        assert_eq!(
            two.to_string(),
            "pid 10 (istio-iptables, uid 0) and pid 12 (sleep, uid 0)"
        );
        assert_eq!(
            timeout_message(1, Kind::Table, &two),
            "this network namespace's lock (nf_tables table inet istio-iptables-lock) has been \
             held by pid 10 (istio-iptables, uid 0) and pid 12 (sleep, uid 0) for more than 1 s: \
             gave up waiting, nothing was changed (IPTABLES_LOCK_WAIT_SECONDS sets the wait)"
        );
        let squatter = Holder::Processes(vec![Process {
            uid: Some(65534),
            ..p(7, "python3", false)
        }]);
        assert!(squatter.squats(Kind::Socket));
        assert!(!squatter.squats(Kind::Table));
        assert!(!two.squats(Kind::Socket));
        let m = timeout_message(30, Kind::Socket, &squatter);
        assert!(
            m.starts_with(
                "an unprivileged process without CAP_NET_ADMIN, pid 7 (python3, uid 65534), \
                 has held this network namespace's lock name (abstract socket \
                 @istio-iptables.netns.lock"
            ) && m.contains("squatting"),
            "{m}"
        );
        let many = Holder::Processes((1..=6).map(|i| p(i, "x", true)).collect());
        assert!(
            many.to_string().ends_with(" and 2 more processes"),
            "{many}"
        );
    }
}
