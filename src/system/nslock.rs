//! One run at a time per network namespace. Applying is read → reconcile → commit → roll back →
//! `ip` steps; two runs interleaving in one namespace would reconcile from stale reads, restore
//! stale snapshots over each other's commits and race on `ip` (seen as "Chain already
//! exists", "Index of deletion too big", rules missing after every run exited 0).
//!
//! The lock is `flock` on a file of the namespace's own, in a directory only root can write:
//! `/run/istio-iptables/netns-<inode>.lock`, the inode being that of the network namespace
//! (`/proc/thread-self/ns/net`, so after `--network-namespace` was entered, whatever path
//! named it, and pod by pod in CNI mode):
//! - the directory is made mode 0700 by root and used only while owned by root and writable
//!   by no one else: a process that could not change the rules cannot take the lock or hold
//!   it against us (any local user could bind the abstract socket name that was the lock
//!   before, and stop every run);
//! - the kernel releases the lock when the holder's descriptor is closed, i.e. when it
//!   exits, SIGKILL included; nothing is left to clean up but an empty file. The descriptor
//!   is close-on-exec: the programs a run starts never hold the lock (one that hung would
//!   otherwise hold it forever after the run that started it died). A run kills the program
//!   it waits on at its deadline or on SIGTERM/SIGINT (`system::exec`) before it goes on;
//!   only a run killed with SIGKILL can leave one running, and iptables-restore and nft
//!   commit in one transaction, which the next run reads whole, before or after;
//! - taking and releasing it cost microseconds. (An nf_tables table owned by a netlink
//!   socket would be keyed to the namespace itself, but closing that socket after a commit
//!   waits for the kernel's deferred clean-up: about 10 ms on every run.)
//!
//! A waiter tries again every 10 ms up to its wait; `/proc/*/fd` tells which processes have
//! the file open: the messages name them (pid, command, uid).
//!
//! Where the directory cannot be used (a read-only `/run`, not root), the lock is the
//! abstract unix socket `@istio-iptables.netns.lock` (said at debug level): keyed to the
//! namespace and released the same way, but any process can bind it. A waiter that gives up
//! asks the holder who it is (SO_PEERCRED); one without CAP_NET_ADMIN cannot be a run, and
//! the error says it is squatting the name.

use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, connect, getsockopt, listen,
    socket, sockopt::PeerCredentials,
};

use crate::system::host;

/// The directory of the lock files (root's, mode 0700).
pub const DIR: &str = "/run/istio-iptables";

/// The abstract socket name of the fallback (shown with a leading `@`, as `ss -x` does).
pub const NAME: &str = "istio-iptables.netns.lock";

/// How often a waiter tries again.
const POLL: Duration = Duration::from_millis(10);

/// At most this many holders are named.
const NAMED: usize = 4;

/// What the lock is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The file under [`DIR`] (only root can take it).
    File,
    /// The abstract unix socket [`NAME`] (anyone can bind it): where [`DIR`] cannot be used.
    Socket,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::File => write!(f, "flock on {}", file_path().display()),
            Kind::Socket => write!(f, "abstract socket @{NAME}"),
        }
    }
}

/// Held until dropped (or the process exits); never by the programs it starts.
pub struct NsLock {
    _file: Option<std::fs::File>,
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
    /// The processes that have it open, by pid (a run; the programs it starts never do).
    Processes(Vec<Process>),
    /// The holder could not be asked (a process this PID namespace does not show).
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
             namespace's lock name ({kind}, the lock where {DIR} cannot be used): it is \
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

/// The file of this namespace under [`DIR`]: `netns-<inode>.lock`.
fn file_path() -> PathBuf {
    use std::os::unix::fs::MetadataExt as _;
    // thread-self: the namespace this thread entered with --network-namespace.
    let ino = std::fs::metadata("/proc/thread-self/ns/net").map_or(0, |m| m.ino());
    Path::new(DIR).join(format!("netns-{ino}.lock"))
}

/// The directory, made if missing; `Err` unless it is root's and no one else may write it.
fn lock_dir() -> Result<(), Errno> {
    use std::os::unix::fs::DirBuilderExt as _;
    match std::fs::DirBuilder::new().mode(0o700).create(DIR) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_errno(&e)),
    }
    let m = std::fs::symlink_metadata(DIR).map_err(|e| io_errno(&e))?;
    if !only_root_writes(&m) {
        return Err(Errno::EPERM);
    }
    Ok(())
}

/// Whether [`DIR`] as `m` shows it may hold the lock: a directory of root's that only root
/// may write (anyone else could replace the file).
fn only_root_writes(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    m.is_dir() && m.uid() == 0 && m.mode() & 0o022 == 0
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(Errno::EIO as i32))
}

/// The file, flocked once taken.
struct FileLock {
    path: PathBuf,
    held: Option<std::fs::File>,
}

impl Lock for FileLock {
    fn kind(&self) -> Kind {
        Kind::File
    }

    fn try_take(&mut self) -> Result<bool, Errno> {
        use std::os::unix::fs::OpenOptionsExt as _;
        // Close-on-exec (std's default): the programs we run never hold the lock.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&self.path)
            .map_err(|e| io_errno(&e))?;
        // flock(2): released when this descriptor closes.
        match file.try_lock() {
            Ok(()) => {
                self.held = Some(file);
                Ok(true)
            }
            Err(std::fs::TryLockError::WouldBlock) => Ok(false),
            Err(std::fs::TryLockError::Error(e)) => Err(io_errno(&e)),
        }
    }

    fn holder(&mut self) -> Holder {
        let ps = processes_with(&self.path.to_string_lossy());
        if ps.is_empty() {
            Holder::Unknown
        } else {
            Holder::Processes(ps)
        }
    }

    fn into_lock(self, waited: Duration) -> NsLock {
        NsLock {
            _file: self.held,
            _socket: None,
            kind: Kind::File,
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
        // Close-on-exec: the programs we run never hold the lock.
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
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
            _file: None,
            _socket: self.fd,
            kind: Kind::Socket,
            waited,
        }
    }
}

/// Takes the lock of the current network namespace, waiting up to `wait`: the file under
/// [`DIR`], or the abstract socket where that cannot be used.
pub fn acquire(wait: Duration) -> Result<NsLock, LockError> {
    let start = Instant::now();
    let mut file = FileLock {
        path: file_path(),
        held: None,
    };
    match lock_dir().and_then(|()| file.try_take()) {
        Ok(taken) => return wait_for(file, taken, start, wait),
        Err(e) => tracing::debug!(
            "{DIR} cannot hold this network namespace's lock ({e}): using the abstract socket \
             @{NAME}, which any process can bind"
        ),
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

/// Whether a `flock` on the file at `path` is held now, and by which processes (empty: by
/// one this PID namespace does not show); `None` when it is free or there is no such file.
/// Read from `/proc/locks`: taking the lock, even for a moment, could make another program
/// that does not wait for it fail.
pub fn flock_holders(path: &Path) -> Option<Vec<Process>> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    let dev = meta.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let file = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let pids = holders_in_proc_locks(&locks, &file);
    if pids.is_empty() {
        return None;
    }
    // The pid that took it may be gone (`flock -x 9` in a shell: the shell keeps the lock).
    let live: Vec<i32> = pids
        .into_iter()
        .flatten()
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    if live.is_empty() {
        return Some(processes_with(&path.to_string_lossy()));
    }
    Some(live.into_iter().map(|pid| process(pid, None)).collect())
}

/// The lock as an apply in this namespace would find it, read without taking it (doctor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// What an apply would lock.
    pub kind: Kind,
    /// Why [`DIR`] cannot be used (the lock is then the socket).
    pub no_dir: Option<String>,
    /// Who holds it now (`None`: no one).
    pub holder: Option<Holder>,
}

/// Reads the lock without taking it: whether [`DIR`] can be used (made by root where it is
/// missing and `/run` is writable), and who holds the file (`/proc/locks`) or the socket
/// (`/proc/net/unix`, then the holder asked as a waiter asks).
pub fn view() -> View {
    match dir_unusable() {
        None => View {
            kind: Kind::File,
            no_dir: None,
            holder: file_holder(&file_path()),
        },
        Some(why) => {
            let bound = std::fs::read_to_string("/proc/thread-self/net/unix")
                .is_ok_and(|t| t.lines().any(|l| l.ends_with(&format!(" @{NAME}"))));
            View {
                kind: Kind::Socket,
                no_dir: Some(why),
                holder: bound.then(|| SocketLock { fd: None }.holder()),
            }
        }
    }
}

/// Why [`lock_dir`] would fail (`None`: it would succeed), checked without making the
/// directory.
fn dir_unusable() -> Option<String> {
    let writable = |path: &str| nix::unistd::access(path, nix::unistd::AccessFlags::W_OK);
    match std::fs::symlink_metadata(DIR) {
        Ok(m) if !only_root_writes(&m) => Some(format!(
            "{DIR} is not a directory of root's that only root may write"
        )),
        Ok(_) => writable(DIR)
            .err()
            .map(|e| format!("{DIR} is not writable: {}", e.desc())),
        Err(_) if !nix::unistd::geteuid().is_root() => {
            Some(format!("{DIR} is missing, and only root may make it"))
        }
        Err(_) => writable("/run")
            .err()
            .map(|e| format!("{DIR} is missing and /run is not writable: {}", e.desc())),
    }
}

/// One entry per holder of a FLOCK on the file `id` (`MAJ:MIN:INODE`) in a /proc/locks
/// text, with its pid where the line shows one (a holder in another PID namespace shows
/// none); waiters do not hold it. A line reads `1: FLOCK  ADVISORY  WRITE 4242 00:1a:5678 0
/// EOF`; a waiter's has `->` after `1:`.
fn holders_in_proc_locks(locks: &str, id: &str) -> Vec<Option<i32>> {
    locks
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| w.get(1) == Some(&"FLOCK") && w.get(5) == Some(&id))
        .map(|w| {
            w.get(4)
                .and_then(|p| p.parse().ok())
                .filter(|&p: &i32| p > 0)
        })
        .collect()
}

/// The processes holding a flock on `path` (`None`: none, or no file).
fn file_holder(path: &Path) -> Option<Holder> {
    flock_holders(path).map(Holder::Processes)
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

    /// One of these tests at a time: each starts processes while it holds a lock, and one
    /// that fails is easier to read alone.
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
    fn proc_locks_names_the_flock_holders() {
        let locks = "1: FLOCK  ADVISORY  WRITE 4242 00:1a:99 0 EOF\n\
                     1: -> FLOCK  ADVISORY  WRITE 4343 00:1a:99 0 EOF\n\
                     2: POSIX  ADVISORY  WRITE 4444 00:1a:99 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 4545 00:1a:98 0 EOF\n";
        assert_eq!(holders_in_proc_locks(locks, "00:1a:99"), [Some(4242)]);
    }

    /// `view` sees the lock a run holds, and who holds it, without taking it.
    #[test]
    fn view_names_the_holder_without_taking_the_lock() {
        let r = in_private_ns(|| {
            let free = view();
            let held = acquire(Duration::ZERO).expect("free lock");
            let seen = view();
            drop(held);
            (free, seen)
        });
        let Some((free, seen)) = r else {
            eprintln!("SKIPPED nslock::view_names_the_holder_without_taking_the_lock: needs root");
            return;
        };
        assert_eq!(free.holder, None, "{free:?}");
        assert_eq!(seen.kind, Kind::File);
        match seen.holder {
            Some(Holder::Processes(ps)) => {
                assert_eq!(ps[0].pid, std::process::id() as i32, "{ps:?}")
            }
            other => panic!("{other:?}"),
        }
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
        assert_eq!(kind, Kind::File, "root can use {DIR}");
        assert!(msg.contains("gave up waiting"), "{msg}");
        assert!(msg.contains(&format!("flock on {DIR}/netns-")), "{msg}");
        assert!(
            msg.contains(&format!("by pid {} (", std::process::id())),
            "{msg}"
        );
        assert!(third_ok, "dropping the lock must release it");
    }

    /// The lock file is in a root-only directory; a program started while the lock is held
    /// (the file's or the fallback socket) does not inherit it: once the run lets go, the
    /// lock is free though the program still runs.
    #[test]
    fn the_lock_is_in_a_root_only_directory_and_never_inherited() {
        let r = in_private_ns(|| {
            let mut results = Vec::new();
            // A wait, not none: another test's program forked but not yet exec'd holds a
            // copy of every descriptor for a moment; the child here holds on for 5 s.
            for take in [
                || acquire(Duration::from_secs(2)),
                || acquire_socket(Instant::now(), Duration::from_secs(2)),
            ] {
                let lock = take().expect("free lock");
                let kind = lock.kind;
                let mut child = std::process::Command::new("sleep")
                    .arg("5")
                    .spawn()
                    .expect("sleep");
                drop(lock);
                let again = take().map(|l| l.kind).map_err(|e| e.to_string());
                let _ = child.kill();
                let _ = child.wait();
                results.push((kind, again));
            }
            results
        });
        let Some(results) = r else {
            eprintln!("SKIPPED nslock::the_lock_is_in_a_root_only_directory_and_never_inherited");
            return;
        };
        use std::os::unix::fs::MetadataExt as _;
        let dir = std::fs::metadata(DIR).expect("the lock directory");
        assert_eq!((dir.uid(), dir.mode() & 0o777), (0, 0o700));
        assert_eq!(
            results,
            [
                (Kind::File, Ok(Kind::File)),
                (Kind::Socket, Ok(Kind::Socket))
            ],
            "a child started while the lock was held must not hold it"
        );
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
            timeout_message(1, Kind::Socket, &two),
            "this network namespace's lock (abstract socket @istio-iptables.netns.lock) has been \
             held by pid 10 (istio-iptables, uid 0) and pid 12 (sleep, uid 0) for more than 1 s: \
             gave up waiting, nothing was changed (IPTABLES_LOCK_WAIT_SECONDS sets the wait)"
        );
        let squatter = Holder::Processes(vec![Process {
            uid: Some(65534),
            ..p(7, "python3", false)
        }]);
        assert!(squatter.squats(Kind::Socket));
        assert!(!squatter.squats(Kind::File));
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
