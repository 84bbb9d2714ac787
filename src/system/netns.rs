//! Entering a network namespace (`--network-namespace`) and scoping the xtables lock to the
//! pod (`--cni-mode`). Only this process changes namespace; the caller's stays as it was.

use std::ffi::OsString;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

/// The namespace could not be entered.
#[derive(Debug, thiserror::Error)]
#[error("entering network namespace {}: {error}", path.display())]
pub struct NetnsError {
    pub path: PathBuf,
    /// Printed in the message, so not exposed as `source` too.
    pub error: std::io::Error,
}

/// Moves this (still single-threaded) process into the network namespace at `path`, e.g.
/// `/var/run/netns/pod` or `/proc/PID/ns/net`. Must run before any thread or child starts.
pub fn enter(path: &Path) -> Result<(), NetnsError> {
    let err = |error| NetnsError {
        path: path.to_path_buf(),
        error,
    };
    // Non-blocking: a FIFO given by mistake must not hang the open.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(err)?;
    setns(file, CloneFlags::CLONE_NEWNET).map_err(|e| {
        err(match e {
            // setns(2) says EINVAL when the file is not a namespace of the asked type.
            nix::errno::Errno::EINVAL => std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the path is not a network namespace (expected e.g. /var/run/netns/NAME or \
                 /proc/PID/ns/net)",
            ),
            // setns(2) takes CAP_SYS_ADMIN; "Operation not permitted" alone does not say so.
            nix::errno::Errno::EPERM => std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "Operation not permitted: entering a network namespace needs CAP_SYS_ADMIN \
                 (add SYS_ADMIN to securityContext.capabilities.add, as Istio's CNI plugin has it)",
            ),
            e => std::io::Error::from(e),
        })
    })
}

/// In CNI mode we run in the node's filesystem, where /run/xtables.lock is shared by every
/// pod; Istio scopes the lock to the pod. Returns `XTABLES_LOCKFILE` and the pod's lock file,
/// for the environment of the programs we run ([`SystemRunner::with_env`]); our own
/// environment is left as it is.
///
/// [`SystemRunner::with_env`]: crate::system::exec::SystemRunner::with_env
pub fn pod_xtables_lock(ns: Option<&Path>) -> (OsString, OsString) {
    let tag: String = ns
        .map(|p| {
            p.to_string_lossy()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect()
        })
        .unwrap_or_else(|| std::process::id().to_string());
    let lock = std::env::temp_dir().join(format!("istio-iptables-{tag}.xtables.lock"));
    tracing::debug!(lock = %lock.display(), "CNI mode: xtables lock scoped to the pod");
    ("XTABLES_LOCKFILE".into(), lock.into())
}
