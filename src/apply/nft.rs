//! Applying with native nftables (`--native-nftables`): one `nft -f -` transaction for all
//! our tables (both families: the tables are `inet`), all or nothing; then the `ip` steps.
//!
//! - **Fresh namespace:** the transaction is Istio's text, and `nft` is the only program
//!   run: netlink says none of our tables exist and no iptables ISTIO_* chain either.
//! - **Re-run:** the live tables are read once (`nft list ruleset inet`) and compared with
//!   what the config wants ([`nftstate`]); equal tables are left alone, and nothing runs when
//!   all are equal. A table that differs or is no longer wanted is deleted and written anew
//!   in the same transaction, so a changed config ends exactly as a fresh apply would (Istio
//!   only flushes, leaving stale chains and tables).
//! - **Switching backends:** ISTIO_* iptables rules (either flavour, either family) are
//!   removed in the same run, after the nft transaction (so capture never lapses).
//! - **Failures:** a failed transaction changes nothing (nft is atomic; re-read to prove
//!   it). When a later step fails (the iptables removal, an `ip` step), everything is put
//!   back: `ip` changes, iptables families, then our nft tables, each re-read to prove it.

use super::{
    ApplyError, Env, IpFailed, Options, Run, Summary, Undo, commit, ip_phase, read_state,
    restore_input,
};
use crate::backend::iptables::build::Plan;
use crate::backend::iptables::plan as reconcile;
use crate::backend::nft::build::{self as nft, FAMILY, Ruleset, Table};
use crate::backend::nft::state::{self as nftstate, Live};
use crate::config::Flavor;
use crate::model::{Family, chain::PREFIX};
use crate::system::backend;
use crate::system::exec::ExecError;

/// The oldest nft the backend supports (older nft parses the whole ruleset for every
/// transaction, other tools' tables included: the limit knftables and kube-proxy set).
pub const MIN_NFT: (u32, u32, u32) = (1, 0, 1);

/// Parses `1.0.6` (or `1.0`).
fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??, it.next().unwrap_or(Some(0))?))
}

/// Checks that `nft` is there and recent enough, before anything is read or changed.
pub fn check_nft(env: &Env<'_>) -> Result<(), ApplyError> {
    if !env.probe.in_path("nft") {
        return Err(ApplyError::NftMissing);
    }
    if let Some(version) = env.probe.nft_version()
        && parse_version(&version).is_some_and(|v| v < MIN_NFT)
    {
        return Err(ApplyError::NftTooOld { version });
    }
    Ok(())
}

/// Whether an `inet` table of this name is one of native nftables capture's.
pub fn is_our_table(name: &str) -> bool {
    Table::from_name(name).is_some()
}

/// Reads our tables. Netlink first: a namespace without any of them needs no process.
pub fn read_live(env: &mut Env<'_>) -> Result<Live, ApplyError> {
    if let Some(names) = env.probe.nft_inet_tables()
        && !names.iter().any(|n| Table::from_name(n).is_some())
    {
        return Ok(Live::default());
    }
    let args = ["list", "ruleset", FAMILY].map(String::from);
    let text = env
        .runner
        .run("nft", &args, None)
        .map_err(|e| ApplyError::NftRead {
            error: e.to_string(),
        })?;
    nftstate::parse_listing(&text, env.resolver).map_err(|e| ApplyError::NftRead {
        error: e.to_string(),
    })
}

/// Tables whose live content differs from `want` (absent on one side included).
fn differing(live: &nftstate::NftState, want: &nftstate::NftState) -> Vec<Table> {
    Table::ALL
        .into_iter()
        .filter(|t| live.tables.get(t) != want.tables.get(t))
        .collect()
}

/// The tables to write anew so that `now` becomes `target`, listed in `order` (nft lists
/// tables in the order they were created, so a fixed table goes to the end): every table
/// from the first of `order` that is not in place (same content, same rank among ours) on,
/// and every table `target` does not have. Empty when `now` is `target` already.
fn to_rewrite(now: &Live, target: &nftstate::NftState, order: &[Table]) -> Vec<Table> {
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

/// One transaction that turns `live` into `ruleset` for `tables`: each one that exists is
/// deleted, then Istio's lines for it are written (in a fresh namespace: exactly Istio's
/// transaction).
fn transaction(ops: &[nft::Op], live: &Live, tables: &[Table], delete: bool) -> String {
    let mut text = String::new();
    if delete {
        for t in tables.iter().filter(|t| live.state.tables.contains_key(t)) {
            text.push_str(&format!("delete table {FAMILY} {t}\n"));
        }
    }
    for op in ops.iter().filter(|op| tables.contains(&op.table())) {
        use std::fmt::Write as _;
        let _ = writeln!(text, "{op}");
    }
    text
}

/// Runs `nft -f -` with `text`.
fn run_nft(text: &str, env: &mut Env<'_>) -> Result<(), ExecError> {
    env.runner
        .run("nft", &["-f", "-"].map(String::from), Some(text))
        .map(|_| ())
}

/// The line of `text` nft's error points at (`/dev/stdin:12:5-9: Error: ...`).
fn rejected_line(text: &str, error: &ExecError) -> Option<String> {
    let stderr = error.stderr()?;
    let at = stderr.find("/dev/stdin:")? + "/dev/stdin:".len();
    let n: usize = stderr[at..].split(':').next()?.parse().ok()?;
    text.lines().nth(n.checked_sub(1)?).map(str::to_string)
}

/// How putting our nft tables back went.
pub enum Restored {
    Unchanged,
    Restored,
}

/// Puts our nft tables back as `before` read them, in one transaction; re-reads to know
/// what changed and again to prove the result.
pub fn restore(before: &Live, env: &mut Env<'_>) -> Result<Restored, String> {
    let reread = |env: &mut Env<'_>| {
        read_live(env).map_err(|e| format!("{e}; the nftables tables may be partly changed"))
    };
    let now = reread(env)?;
    let changed = to_rewrite(&now, &before.state, &before.order);
    if changed.is_empty() {
        return Ok(Restored::Unchanged);
    }
    let mut text = String::new();
    for t in changed.iter().filter(|t| now.state.tables.contains_key(t)) {
        text.push_str(&format!("delete table {FAMILY} {t}\n"));
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
        return Ok(Restored::Restored);
    }
    Err(format!(
        "restoring nftables failed{}: tables still differing from before the run: {}",
        failure.map(|f| format!(" ({f})")).unwrap_or_default(),
        left.iter()
            .map(|t| match after.state.tables.get(t) {
                Some(s) => format!("{t} ({} rules)", s.rule_count()),
                None => format!("{t} (absent)"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// The iptables families that hold ISTIO_* state of this tool (any flavour), with what
/// removing it takes. Netlink rules out iptables-nft state and /proc legacy state without
/// running anything.
fn iptables_state(
    teardown: impl FnOnce() -> Plan,
    env: &mut Env<'_>,
) -> Result<Vec<Run>, ApplyError> {
    let mut runs = Vec::new();
    // Built only when some iptables state may be ours (never in a fresh namespace).
    let mut teardown = Some(teardown);
    let mut plan: Option<Plan> = None;
    for family in [Family::V4, Family::V6] {
        for flavor in [Flavor::Nft, Flavor::Legacy] {
            let maybe = match flavor {
                Flavor::Nft => env.probe.nft_chain_with_prefix(family, PREFIX) != Some(false),
                Flavor::Legacy => !env.probe.legacy_tables(family).is_empty(),
            };
            if !maybe {
                continue;
            }
            let Ok(backend) = backend::detect(family, Some(flavor), env.probe) else {
                tracing::debug!("{family}: no {flavor} iptables to read");
                continue;
            };
            let before = read_state(family, &backend, env.probe, env.runner)?;
            let plan = plan.get_or_insert_with(|| (teardown.take().expect("built once"))());
            let tx = reconcile::cleanup(&before, plan.rules(family), env.resolver);
            if !tx.is_noop() {
                runs.push(Run {
                    backend,
                    before,
                    tx,
                    attempted: false,
                });
            }
        }
    }
    Ok(runs)
}

/// Undoes everything after a failure: `ip` changes, iptables families, our nft tables.
fn undo_everything(
    runs: &[Run],
    ip_done: &[super::IpChange],
    before: &Live,
    opts: &Options,
    env: &mut Env<'_>,
) -> String {
    let mut undo = Undo::default();
    undo.ip(ip_done, env.probe, env.runner);
    undo.families(runs, opts, env.probe, env.runner);
    match restore(before, env) {
        Ok(Restored::Restored) => undo.restored.push("nftables".into()),
        Ok(Restored::Unchanged) => {}
        Err(e) => undo.failures.push(e),
    }
    undo.describe()
}

/// Applies `ruleset` (see the module documentation). `teardown` builds the iptables
/// teardown plan ([`crate::backend::iptables::build::teardown`]: what ISTIO_* iptables state of ours looks
/// like), when there is iptables state to look at.
pub fn apply(
    ruleset: &Ruleset,
    teardown: impl FnOnce() -> Plan,
    opts: &Options,
    env: &mut Env<'_>,
) -> Result<Summary, ApplyError> {
    check_nft(env)?;
    tracing::info!("native nftables enabled, using nft rules for traffic redirection.");
    let live = read_live(env)?;
    let ops = ruleset.transaction();
    let order: Vec<Table> = Table::ALL
        .into_iter()
        .filter(|t| ops.iter().any(|op| op.table() == *t))
        .collect();
    // What the tables must hold, in nft's words: only needed when some of ours exist.
    let want = if live.order.is_empty() {
        nftstate::NftState {
            tables: order.iter().map(|t| (*t, Default::default())).collect(),
        }
    } else {
        nftstate::desired(ruleset, env.resolver)
    };
    let mut changed = to_rewrite(&live, &want, &order);
    let mut runs = iptables_state(teardown, env)?;
    let policy = opts.policy;
    if !policy.reconcile {
        let mut found: Vec<String> = differing(&live.state, &want)
            .iter()
            .filter(|t| live.state.tables.contains_key(t))
            .map(|t| format!("table {FAMILY} {t} differs"))
            .collect();
        found.extend(runs.iter().map(|r| {
            format!(
                "{} ISTIO_* iptables rules ({})",
                r.backend.family,
                r.backend.restore_program()
            )
        }));
        if !found.is_empty() && !policy.force {
            return Err(ApplyError::NftConflict {
                detail: found.join("; "),
            });
        }
        if policy.force {
            // Istio's own behaviour: its transaction on top, nothing else removed.
            runs.clear();
        }
    }
    if policy.force {
        changed = Table::ALL
            .into_iter()
            .filter(|t| want.tables.contains_key(t) || live.state.tables.contains_key(t))
            .collect();
    }

    let mut summary = Summary::default();
    let text = transaction(&ops, &live, &changed, policy.reconcile);
    if text.is_empty() {
        tracing::info!("nftables rules are already in place: nothing to commit");
    } else {
        // Istio logs the transaction once it is programmed (below); the input goes to debug.
        tracing::debug!(
            "Running nft -f - with the following input:\n{}",
            text.trim_end()
        );
        if let Err(error) = run_nft(&text, env) {
            let rejected = rejected_line(&text, &error);
            let rollback = match restore(&live, env) {
                Ok(Restored::Unchanged) => {
                    "nothing was changed (checked by re-reading the kernel)".to_string()
                }
                Ok(Restored::Restored) => {
                    "the previous state was restored (nftables; checked by re-reading the kernel)"
                        .to_string()
                }
                Err(e) => format!("ROLLBACK FAILED ({e}); rerun to repair"),
            };
            return Err(ApplyError::NftCommit {
                rejected,
                error: Box::new(error),
                rollback,
            });
        }
        summary.nft_tables = changed.iter().map(|t| t.name().to_string()).collect();
        tracing::info!("nftables rules programmed:\n{} \n", text.trim_end());
    }

    // The other backend's state, now that nft captures.
    for i in 0..runs.len() {
        runs[i].attempted = true;
        let run = &runs[i];
        let program = run.backend.restore_program();
        tracing::info!(
            %program,
            "removing {} ISTIO_* iptables rules (switching to native nftables):\n{}",
            run.backend.family,
            run.tx.payload.trim_end()
        );
        let (payload, drop) = restore_input(&run.backend, &run.tx);
        if let Err(error) = commit(&run.backend, &payload, &drop, opts, env.runner) {
            let family = run.backend.family;
            let rollback = undo_everything(&runs, &[], &live, opts, env);
            return Err(ApplyError::Switch {
                family,
                program,
                error: Box::new(error),
                rollback,
            });
        }
        summary.committed.push(run.backend.family);
    }

    let had_tproxy = |family: Family| {
        live.state
            .tables
            .get(&Table::Mangle)
            .is_some_and(|t| t.chain(nft::chain::TPROXY).is_some())
            || runs.iter().any(|r| {
                r.backend.family == family
                    && r.before
                        .table(crate::model::Table::Mangle)
                        .is_some_and(|t| {
                            t.user_chains
                                .iter()
                                .any(|c| c == crate::model::chain::TPROXY)
                        })
            })
    };
    if let Err(IpFailed {
        command,
        error,
        done,
    }) = ip_phase(&ruleset.ip, &had_tproxy, opts, env, &mut summary)
    {
        let rollback = undo_everything(&runs, &done, &live, opts, env);
        return Err(ApplyError::Ip {
            command: command.args().join(" "),
            error: Box::new(error),
            rollback,
        });
    }
    Ok(summary)
}

/// Deletes our nft tables, wherever found (cleanup, and an iptables apply over an earlier
/// native nftables one). `Ok(names)`: the tables deleted.
pub fn drop_tables(env: &mut Env<'_>) -> Result<Vec<String>, String> {
    // Without nft and without netlink, nothing can be known or done here.
    if let Some(names) = env.probe.nft_inet_tables()
        && !names.iter().any(|n| Table::from_name(n).is_some())
    {
        return Ok(Vec::new());
    }
    if !env.probe.in_path("nft") {
        return match env.probe.nft_inet_tables() {
            Some(_) => Err(
                "tables of Istio's native nftables capture (inet istio-proxy-*) are present, but \
                 nft is not installed to remove them: install the nftables package"
                    .into(),
            ),
            None => Ok(Vec::new()),
        };
    }
    let live = read_live(env).map_err(|e| e.to_string())?;
    let ours: Vec<Table> = live.state.tables.keys().copied().collect();
    if ours.is_empty() {
        return Ok(Vec::new());
    }
    let text: String = ours
        .iter()
        .map(|t| format!("delete table {FAMILY} {t}\n"))
        .collect();
    tracing::info!("removing the native nftables tables:\n{}", text.trim_end());
    run_nft(&text, env).map_err(|e| format!("deleting the native nftables tables: {e}"))?;
    Ok(ours.iter().map(|t| t.name().to_string()).collect())
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
        use crate::backend::nft::state::{NftState, TableState};
        let table = |rules: usize| TableState {
            chains: vec![nftstate::Chain {
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
