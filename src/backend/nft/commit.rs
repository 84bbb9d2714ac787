//! `nft` at work: reading our tables, one `nft -f -` transaction (atomic: it happens whole or
//! not at all), and putting our tables back as they were read, proved by reading them again.

use std::fmt::Write as _;

use crate::backend::StepError;
use crate::backend::nft::build::{FAMILY, Op, Table};
use crate::backend::nft::state::{self as nftstate, Live, NftState};
use crate::system::Env;
use crate::system::exec::ExecError;

/// The oldest nft the backend supports (older nft parses the whole ruleset for every
/// transaction, other tools' tables included: the limit knftables and kube-proxy set).
pub const MIN_NFT: (u32, u32, u32) = (1, 0, 1);

/// A failed step of the native nftables backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the native nftables backend (--native-nftables) needs the nft program, which is not \
         in PATH: install the nftables package (apt-get install nftables, apk add nftables, \
         dnf install nftables); nothing was changed"
    )]
    Missing,
    #[error(
        "nft {version} is too old: the native nftables backend needs nft 1.0.1 or later \
         (older nft parses every table of the namespace on each change); nothing was changed"
    )]
    TooOld { version: String },
    #[error("reading the current nftables state with `nft list ruleset inet`: {reason}")]
    Read { reason: ReadError },
    #[error(
        "tables of Istio's native nftables capture (inet istio-proxy-*) are present, but nft \
         is not installed to remove them: install the nftables package"
    )]
    NotInstalledToRemove,
    #[error(
        "the namespace already holds different capture rules ({detail}); nothing was changed. \
         Run with --reconcile=true (the default) to replace them, or remove them first with \
         --cleanup-only"
    )]
    Conflict { detail: String },
    #[error(
        "committing the nftables transaction with nft -f failed{}: {}",
        rejected.as_ref().map(|l| format!(" at `{l}`")).unwrap_or_default(),
        .error
    )]
    Commit {
        rejected: Option<String>,
        /// Not `source`: the message already includes it, once.
        error: Box<ExecError>,
    },
    #[error(
        "removing the native nftables tables (switching to iptables) failed: deleting the native nftables tables: {error}"
    )]
    Switch {
        /// Not `source`: the message already includes it, once.
        error: Box<ExecError>,
    },
    #[error("deleting the native nftables tables: {error}")]
    Cleanup {
        /// Not `source`: the message already includes it, once.
        error: Box<ExecError>,
    },
}

/// Why our tables could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Run(ExecError),
    #[error(transparent)]
    Parse(nftstate::ParseError),
}

impl StepError for Error {
    fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }
}

/// Parses `1.0.6` (or `1.0`).
fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??, it.next().unwrap_or(Some(0))?))
}

/// Checks that `nft` is there and recent enough, before anything is read or changed.
pub(super) fn check_nft(env: &Env<'_>) -> Result<(), Error> {
    if !env.probe.in_path("nft") {
        return Err(Error::Missing);
    }
    if let Some(version) = env.probe.version("nft")
        && parse_version(&version).is_some_and(|v| v < MIN_NFT)
    {
        return Err(Error::TooOld { version });
    }
    Ok(())
}

/// Whether netlink shows none of our tables (`false` also when it cannot tell).
pub(super) fn none_of_ours(env: &Env<'_>) -> bool {
    none_in(env.probe.nft_inet_tables().as_deref())
}

/// Whether the `inet` table names netlink showed hold none of ours (`false` when it could
/// not tell: `None`).
pub(super) fn none_in(names: Option<&[String]>) -> bool {
    names.is_some_and(|names| !names.iter().any(|n| Table::from_name(n).is_some()))
}

/// Reads our tables. Netlink first: a namespace without any of them needs no process.
pub(super) fn read_live(env: &mut Env<'_>) -> Result<Live, Error> {
    if none_of_ours(env) {
        return Ok(Live::default());
    }
    list(env)
}

/// Our tables as `nft list ruleset inet` shows them.
pub(super) fn list(env: &mut Env<'_>) -> Result<Live, Error> {
    let args = ["list", "ruleset", FAMILY].map(String::from);
    let text = env
        .runner
        .run("nft", &args, None)
        .map_err(|e| Error::Read {
            reason: ReadError::Run(e),
        })?;
    nftstate::parse_listing(&text, env.resolver).map_err(|e| Error::Read {
        reason: ReadError::Parse(e),
    })
}

/// Tables whose live content differs from `want` (absent on one side included).
pub(super) fn differing(live: &NftState, want: &NftState) -> Vec<Table> {
    Table::ALL
        .into_iter()
        .filter(|t| live.tables.get(t) != want.tables.get(t))
        .collect()
}

/// The tables to write anew so that `now` becomes `target`, listed in `order` (nft lists
/// tables in the order they were created, so a fixed table goes to the end): every table
/// from the first of `order` that is not in place (same content, same rank among ours) on,
/// and every table `target` does not have. Empty when `now` is `target` already.
pub(super) fn to_rewrite(now: &Live, target: &NftState, order: &[Table]) -> Vec<Table> {
    let kept = order
        .iter()
        .zip(&now.order)
        .take_while(|(t, n)| t == n && now.state.tables.get(t) == target.tables.get(t))
        .count();
    Table::ALL
        .into_iter()
        .filter(|t| {
            order[kept..].contains(t)
                || (now.state.tables.contains_key(t) && !target.tables.contains_key(t))
        })
        .collect()
}

/// One transaction that turns `live` into `ops` for `tables`: each one that exists is
/// deleted, then Istio's lines for it are written (in a fresh namespace: exactly Istio's
/// transaction).
pub(super) fn transaction(ops: &[Op], live: &Live, tables: &[Table], delete: bool) -> String {
    let mut text = String::new();
    if delete {
        for t in tables.iter().filter(|t| live.state.tables.contains_key(t)) {
            let _ = writeln!(text, "delete table {FAMILY} {t}");
        }
    }
    for op in ops.iter().filter(|op| tables.contains(&op.table())) {
        let _ = writeln!(text, "{op}");
    }
    text
}

/// Runs `nft -f -` with `text`.
pub(super) fn run_nft(text: &str, env: &mut Env<'_>) -> Result<(), ExecError> {
    env.runner
        .run("nft", &["-f", "-"].map(String::from), Some(text))
        .map(|_| ())
}

/// The line of `text` nft's error points at (`/dev/stdin:12:5-9: Error: ...`).
pub(super) fn rejected_line(text: &str, error: &ExecError) -> Option<String> {
    let stderr = error.stderr()?;
    let at = stderr.find("/dev/stdin:")? + "/dev/stdin:".len();
    let n: usize = stderr[at..].split(':').next()?.parse().ok()?;
    text.lines().nth(n.checked_sub(1)?).map(str::to_string)
}

/// Putting our tables back did not take.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error("{error}; the nftables tables may be partly changed")]
    Reread {
        /// Printed in the message, so not exposed as `source` too.
        error: Box<Error>,
    },
    #[error(
        "restoring nftables failed{}: tables still differing from before the run: {}",
        failure.as_ref().map(|f| format!(" ({f})")).unwrap_or_default(),
        left.join(", ")
    )]
    StillDiffering {
        /// The transaction's error, when it failed.
        failure: Option<ExecError>,
        /// Each table still differing, with its rule count.
        left: Vec<String>,
    },
}

/// Puts our nft tables back as `before` read them, in one transaction; re-reads to know
/// what changed and again to prove the result. `Ok(true)`: put back; `Ok(false)`: nothing
/// had changed; `Err`: what is left.
pub(super) fn restore(before: &Live, env: &mut Env<'_>) -> Result<bool, RollbackError> {
    let reread = |env: &mut Env<'_>| {
        read_live(env).map_err(|e| RollbackError::Reread { error: Box::new(e) })
    };
    let now = reread(env)?;
    let changed = to_rewrite(&now, &before.state, &before.order);
    if changed.is_empty() {
        return Ok(false);
    }
    let mut text = String::new();
    for t in changed.iter().filter(|t| now.state.tables.contains_key(t)) {
        let _ = writeln!(text, "delete table {FAMILY} {t}");
    }
    for t in before.order.iter().filter(|t| changed.contains(t)) {
        text.push_str(&before.text[t]);
    }
    tracing::info!(
        tables = %changed.iter().map(|t| t.name()).collect::<Vec<_>>().join(","),
        "restoring the nftables tables read before the run"
    );
    let failure = run_nft(&text, env).err();
    let after = reread(env)?;
    let left = to_rewrite(&after, &before.state, &before.order);
    if left.is_empty() {
        return Ok(true);
    }
    Err(RollbackError::StillDiffering {
        failure,
        left: left
            .iter()
            .map(|t| match after.state.tables.get(t) {
                Some(s) => format!("{t} ({} rules)", s.rule_count()),
                None => format!("{t} (absent)"),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare() {
        assert!(parse_version("1.0.0").unwrap() < MIN_NFT);
        assert!(parse_version("0.9.8").unwrap() < MIN_NFT);
        assert!(parse_version("1.0.1").unwrap() >= MIN_NFT);
        assert!(parse_version("1.1").unwrap() >= MIN_NFT);
        assert_eq!(parse_version("x"), None);
    }

    #[test]
    fn tables_are_rewritten_from_the_first_one_out_of_place() {
        use crate::backend::nft::state::{Chain, TableState};
        let table = |rules: usize| TableState {
            chains: vec![Chain {
                name: "output".into(),
                hook: None,
                rules: vec!["counter".into(); rules],
            }],
            other: vec![],
        };
        let want = NftState {
            tables: [(Table::Nat, table(1)), (Table::Mangle, table(1))].into(),
        };
        let order = [Table::Nat, Table::Mangle];
        let live = |tables: Vec<(Table, usize)>| Live {
            order: tables.iter().map(|(t, _)| *t).collect(),
            state: NftState {
                tables: tables.iter().map(|(t, n)| (*t, table(*n))).collect(),
            },
            text: Default::default(),
        };
        assert!(
            to_rewrite(
                &live(vec![(Table::Nat, 1), (Table::Mangle, 1)]),
                &want,
                &order
            )
            .is_empty()
        );
        // Out of order: both, so that nat is listed first again.
        assert_eq!(
            to_rewrite(
                &live(vec![(Table::Mangle, 1), (Table::Nat, 1)]),
                &want,
                &order
            ),
            [Table::Nat, Table::Mangle]
        );
        // The second differs: only it; a table no longer wanted goes too.
        assert_eq!(
            to_rewrite(
                &live(vec![(Table::Nat, 1), (Table::Mangle, 2), (Table::Raw, 1)]),
                &want,
                &order
            ),
            [Table::Mangle, Table::Raw]
        );
        assert_eq!(to_rewrite(&live(vec![]), &want, &order), order);
    }

    #[test]
    fn the_rejected_line_is_found_in_nft_error() {
        let e = ExecError::Failed {
            command: "nft -f -".into(),
            status: std::os::unix::process::ExitStatusExt::from_raw(256),
            stderr: "/dev/stdin:2:50-52: Error: Group does not exist\nadd rule x\n   ^^^\n".into(),
        };
        assert_eq!(rejected_line("a\nb\nc\n", &e).as_deref(), Some("b"));
    }
}
