//! Shared helpers for the integration tests.
//!
//! The one copy of them, in the one test crate (`tests/it/main.rs`): each test module uses
//! them as `crate::common`.
//!
//! What is here, one file per concern:
//! - `process.rs`: privilege checks ([`is_root`], [`can_unshare`], [`skip_unless_root`]),
//!   [`TempDir`], [`run_with_timeout`], [`sane_path`];
//! - `namespaces.rs`: running a shell script as root inside a fresh network + mount
//!   namespace ([`run_in_fresh_ns`], [`run_in_fresh_ns_ok`], [`NsOutput`]), and the
//!   two-namespace topology real traffic crosses;
//! - `backend.rs`: which backend programs the capture ([`Backend`]: iptables or native
//!   nftables), applying a config in a namespace with it ([`Topology::apply_ok`]) and its
//!   rules for failure reports ([`Topology::describe_for`]);
//! - `shell.rs`: shell snippets ([`with_test_groups_prelude`], [`groups_prelude`],
//!   [`shell_quote`], [`shell_command`]);
//! - `cases.rs`: test-case data ([`Case`], [`read_case`], [`read_cases`],
//!   [`istio_cases_dir`], [`parse_args_file`], [`parse_env_file`]), running the binary
//!   ([`BIN`]) for a case ([`case_command`], [`case_shell_command`], [`case_env`]) and
//!   output handling ([`normalize_save`], [`normalize_restore_payload`],
//!   [`extract_heredoc_blocks`], [`line_diff`], [`compare_lines`], [`indent`]);
//! - `sockets.rs`: listeners that say where a connection landed, clients, identities;
//! - `scenarios.rs`: the traffic scenarios `tests/it/traffic.rs` and `tests/it/explain.rs` share
//!   ([`TrafficScenario`]: who sends, where to, where it must land);
//! - here: Istio's seed command line and variants ([`SEED`], [`seed_with`], [`proxy_flags`]).
mod backend;
mod cases;
mod namespaces;
mod process;
mod scenarios;
mod shell;
mod sockets;

pub use backend::*;
pub use cases::*;
pub use namespaces::*;
pub use process::*;
pub use scenarios::*;
pub use shell::*;
pub use sockets::*;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Path of the binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_istio-iptables");

/// Standard directories that must be on PATH for iptables/ip/unshare.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long one namespace script or one binary invocation may run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Istio's seed command:
/// `-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15020`.
pub const SEED: &[&str] = &[
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15020",
];

/// The proxy's ports and uid as in [`SEED`] (`-p 15001 -z 15006 -u 1337`), `-m mode`, then
/// `rest`.
pub fn proxy_flags<'a>(mode: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["-p", "15001", "-z", "15006", "-u", "1337", "-m", mode];
    v.extend_from_slice(rest);
    v
}

/// REDIRECT capture of everything, with DNS redirected for the servers of the resolv.conf at
/// `resolv`: the config of the DNS scenarios.
pub fn dns_flags(resolv: &str) -> Vec<&str> {
    proxy_flags(
        "REDIRECT",
        &[
            "-i",
            "*",
            "-b",
            "*",
            "--redirect-dns",
            "--resolv-conf",
            resolv,
        ],
    )
}

/// [`SEED`] with the value of `flag` replaced by `value` (`seed_with("-m", "TPROXY")`).
pub fn seed_with<'a>(flag: &str, value: &'a str) -> Vec<&'a str> {
    let mut v = SEED.to_vec();
    let i = v
        .iter()
        .position(|a| *a == flag)
        .unwrap_or_else(|| panic!("no {flag} in the seed command"))
        + 1;
    v[i] = value;
    v
}
