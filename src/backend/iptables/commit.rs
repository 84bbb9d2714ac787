//! The iptables programs at work: reading a family with its save program, committing one
//! iptables-restore --noflush transaction, and putting a family back as it was read, proved
//! by reading it again. iptables-restore commits table by table, so a transaction is not
//! atomic by itself: all or nothing comes from putting every attempted family back.

use std::collections::BTreeSet;

use nix::errno::Errno;

use crate::backend::iptables::detect::{NotInstalled, Program};
use crate::backend::iptables::kernel;
use crate::backend::iptables::plan::{Conflict, Transaction};
use crate::backend::iptables::restore::{self, Header};
use crate::backend::iptables::save::{ParseError, SaveState, TableState, parse_save};
use crate::backend::{Purpose, StepError};
use crate::config::Flavor;
use crate::model::{Family, Table};
use crate::system::Env;
use crate::system::exec::{ExecError, Runner};
use crate::system::host_view::Probe;
use crate::system::nftprobe::{NfFamily, TABLE_F_DORMANT};

/// A failed step of the iptables backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("choosing the {family} backend: {error}")]
    Backend {
        family: Family,
        /// Printed in the message, so not exposed as `source` too.
        error: NotInstalled,
    },
    #[error("reading the current {family} state with {program}: {error}")]
    Read {
        family: Family,
        program: String,
        /// Printed in the message, so not exposed as `source` too.
        error: ExecError,
    },
    #[error("reading the current {family} state with {program}: {error}")]
    Parse {
        family: Family,
        program: String,
        /// Printed in the message, so not exposed as `source` too.
        error: ParseError,
    },
    #[error(
        "{family} ISTIO_* rules are also in {program}, where this config's rules do not go; \
         nothing was changed. Run with --reconcile=true (the default) to remove them, or \
         remove them first with --cleanup-only"
    )]
    Elsewhere { family: Family, program: String },
    #[error(
        "the {family} tables of {program} cannot be read safely ({}): left as they are. \
         Look with `nft list table {} <table>`",
        unreadable.join("; "),
        if *.family == Family::V4 { "ip" } else { "ip6" }
    )]
    Unreadable {
        family: Family,
        program: String,
        unreadable: Vec<String>,
    },
    #[error(
        "the {family} iptables-nft table {table} is dormant (its rules see no packet) and holds \
         no ISTIO chains: it is not ours to wake, and rules written there would capture \
         nothing; nothing was changed. Check whose it is (`nft list table {} {table}`), or \
         use --native-nftables",
        if *.family == Family::V4 { "ip" } else { "ip6" }
    )]
    Dormant { family: Family, table: String },
    #[error("{family}: {error}")]
    Conflict {
        family: Family,
        /// Printed in the message, so not exposed as `source` too.
        error: Conflict,
    },
    #[error(
        "committing {family} rules with {program} (iptables {version}) failed{}: {}",
        rejected.as_ref().map(|l| format!(" at `{l}`")).unwrap_or_default(),
        (.error)
    )]
    Commit {
        family: Family,
        program: String,
        version: String,
        rejected: Option<String>,
        /// Not `source`: the message already includes it, once. Boxed: the error is large
        /// and only ever built once, on the way out.
        error: Box<Failure>,
    },
    #[error(
        "removing the {family} ISTIO_* iptables rules with {program} (switching to native \
         nftables) failed: {}",
        (.error)
    )]
    Switch {
        family: Family,
        program: String,
        /// Not `source`: the message already includes it, once.
        error: Box<Failure>,
    },
    #[error(
        "removing the stale {family} ISTIO_* rules with {program} (this config's rules are \
         not there) failed: {}",
        (.error)
    )]
    Stale {
        family: Family,
        program: String,
        /// Not `source`: the message already includes it, once.
        error: Box<Failure>,
    },
    #[error("cleaning up {family} with {program}: {error}")]
    Cleanup {
        family: Family,
        program: String,
        /// Not `source`: the message already includes it, once.
        error: Box<Failure>,
    },
}

/// Why a commit step failed: a program, or a change made over netlink.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{}", explain_exec(.0))]
    Program(ExecError),
    #[error("{step} over netlink: {}", .errno.desc())]
    Netlink { step: String, errno: Errno },
}

impl Failure {
    fn stderr(&self) -> Option<&str> {
        match self {
            Failure::Program(e) => e.stderr(),
            Failure::Netlink { .. } => None,
        }
    }
}

impl StepError for Error {
    fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. } | Error::Elsewhere { .. })
    }
}

/// The exec error, with the xtables lock named plainly.
pub(super) fn explain_exec(e: &ExecError) -> String {
    match e.stderr() {
        // iptables-legacy's "Fatal: can't open lock file /run/xtables.lock: Read-only file
        // system" (a pod with readOnlyRootFilesystem).
        Some(s) if s.contains("can't open lock file") => {
            format!(
                "{}: the legacy iptables programs need a writable /run for the xtables lock \
                 (in a pod: readOnlyRootFilesystem: false, or an emptyDir volume mounted at /run)",
                s.trim().replace('\n', " ")
            )
        }
        Some(s) if s.contains("holding the xtables lock") => {
            format!(
                "xtables lock held by another process and not released in time ({})",
                s.trim().replace('\n', " ")
            )
        }
        _ => e.to_string(),
    }
}

/// From iptables-restore's stderr (`... line 7 failed`), the 1-based payload line it rejected.
/// Understands `line 7 failed` (legacy) and `Error occurred at line: 7` (nft).
fn failed_restore_line(stderr: &str) -> Option<usize> {
    stderr.match_indices("line").find_map(|(i, _)| {
        let rest = stderr[i + 4..].trim_start_matches([':', ' ']);
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    })
}

/// Reads one family with `program`'s save (nothing to run where the flavour has no tables).
/// With iptables-nft, the save is held against nf_tables' structure read over netlink
/// ([`kernel::check`]), both read within one generation of the ruleset: a change by another
/// process in between (the namespace lock keeps only our runs out) reads again, up to three
/// times, and after that the disagreement stands as found.
pub(super) fn read_state(
    program: &Program,
    probe: &dyn Probe,
    runner: &mut dyn Runner,
) -> Result<SaveState, Error> {
    let family = program.family;
    let nothing = || {
        tracing::debug!(
            "{family}: no {} tables in this namespace",
            program.save_program()
        );
    };
    match program.flavor {
        None => save(program, runner),
        Some(Flavor::Legacy) => {
            if probe.legacy_tables(family).is_empty() {
                nothing();
                return Ok(SaveState::default());
            }
            save(program, runner)
        }
        Some(Flavor::Nft) => {
            if probe.nft_tables(family) == Some(0) {
                // A namespace whose backend has no tables at all has nothing to save.
                nothing();
                return Ok(SaveState {
                    kernel_tables: Some(Vec::new()),
                    ..SaveState::default()
                });
            }
            for attempt in 1.. {
                let generation = probe.nft_generation();
                let Some(kernel) = probe.nft_structure(NfFamily::of(family)) else {
                    // No netlink: the save alone, and no table provably absent.
                    return save(program, runner);
                };
                let mut st = save(program, runner)?;
                // Without a generation to compare, the first read stands.
                let settled = generation.is_none() || probe.nft_generation() == generation;
                if settled || attempt == 3 {
                    kernel::check(&mut st, &kernel);
                    return Ok(st);
                }
                tracing::debug!("{family}: the ruleset changed while it was read: reading again");
            }
            unreachable!("the loop returns by its third attempt")
        }
    }
}

/// `program`'s save, parsed.
fn save(program: &Program, runner: &mut dyn Runner) -> Result<SaveState, Error> {
    let family = program.family;
    let save = program.save_program();
    let text = runner.run(&save, &[], None).map_err(|error| Error::Read {
        family,
        program: save.clone(),
        error,
    })?;
    parse_save(text).map_err(|error| Error::Parse {
        family,
        program: save,
        error,
    })
}

fn restore_args(program: &Program, noflush: bool, lock_wait_secs: u32) -> Vec<String> {
    let mut a = Vec::new();
    if noflush {
        a.push("--noflush".to_string());
    }
    if program.uses_lock() {
        a.push(format!("--wait={lock_wait_secs}"));
    }
    a
}

fn version_of(program: &Program, before: &SaveState, probe: &dyn Probe) -> String {
    before
        .version
        .clone()
        .or_else(|| probe.version(&program.restore_program()))
        .unwrap_or_else(|| "version unknown".into())
}

/// Drops nft tables whole, over netlink (nft keeps an empty table around where legacy would
/// have none to drop).
fn drop_nft_tables(program: &Program, tables: &[Table], env: &mut Env<'_>) -> Result<(), Failure> {
    if program.flavor != Some(Flavor::Nft) {
        return Ok(());
    }
    let family = NfFamily::of(program.family);
    for t in tables {
        env.nf
            .delete_table(family, t.name())
            .map_err(|errno| Failure::Netlink {
                step: format!("deleting table {} {t}", family.name()),
                errno,
            })?;
    }
    Ok(())
}

/// Sets or clears the dormant flag of nft tables, over netlink.
fn set_dormant(
    program: &Program,
    tables: &[String],
    dormant: bool,
    env: &mut Env<'_>,
) -> Result<(), Failure> {
    let family = NfFamily::of(program.family);
    let flags = if dormant { TABLE_F_DORMANT } else { 0 };
    for t in tables {
        env.nf
            .set_table_flags(family, t, flags)
            .map_err(|errno| Failure::Netlink {
                step: format!(
                    "{} table {} {t}",
                    if dormant {
                        "making dormant"
                    } else {
                        "waking the dormant"
                    },
                    family.name()
                ),
                errno,
            })?;
    }
    Ok(())
}

/// What to feed iptables-restore and which tables to drop afterwards. With nft a table the
/// transaction empties is not emptied by iptables-restore and then dropped: its section is
/// left out and the table dropped whole after the restore. A run killed in between then
/// leaves our old rules, which the next run recognises and removes, never an empty table it
/// could not tell from another tool's.
fn restore_input(program: &Program, tx: &Transaction) -> (String, Vec<Table>) {
    if program.flavor != Some(Flavor::Nft) || tx.emptied.is_empty() {
        return (tx.payload.clone(), tx.emptied.clone());
    }
    let mut payload = String::new();
    let mut skipping = false;
    for line in tx.payload.lines() {
        if let Some(name) = line.strip_prefix('*') {
            skipping = tx.emptied.iter().any(|t| t.name() == name.trim());
        }
        if !skipping {
            payload.push_str(line);
            payload.push('\n');
        }
        if line == "COMMIT" {
            skipping = false;
        }
    }
    (payload, tx.emptied.clone())
}

/// One place in flight: a family in one flavour, as read before the run.
#[derive(Debug)]
pub struct Place {
    pub program: Program,
    pub before: SaveState,
    /// Where the config's rules go (else a place only our stale state may be in: the other
    /// flavour, or a family the config does not use).
    pub target: bool,
}

/// Commits `tx` at `place` for `purpose`: iptables-restore --noflush, then the nft tables
/// it empties are dropped.
pub(super) fn commit(
    place: &Place,
    tx: &Transaction,
    purpose: Purpose,
    lock_wait_secs: u32,
    env: &mut Env<'_>,
) -> Result<(), Error> {
    let family = place.program.family;
    let program = place.program.restore_program();
    let (payload, drop) = restore_input(&place.program, tx);
    match purpose {
        Purpose::Apply => tracing::info!(
            "Running iptables restore with: {program} --noflush and the following input:\n{}",
            payload.trim_end()
        ),
        Purpose::Switch => tracing::info!(
            %program,
            "removing {family} ISTIO_* iptables rules (switching to native nftables):\n{}",
            tx.payload.trim_end()
        ),
        Purpose::Stale => tracing::info!(
            %program,
            "removing stale {family} ISTIO_* rules (this config's rules are not there):\n{}",
            tx.payload.trim_end()
        ),
        Purpose::Cleanup => tracing::info!(
            %program,
            "removing {family} ISTIO_* rules:\n{}",
            tx.payload.trim_end()
        ),
    }
    // A dormant table holding our chains is woken first: the rules committed into it are to
    // see packets.
    if !tx.wake.is_empty() {
        tracing::info!(tables = %tx.wake.join(","), "waking the dormant {family} iptables-nft tables holding ISTIO chains");
    }
    let mut result = set_dormant(&place.program, &tx.wake, false, env);
    if result.is_ok() && !payload.is_empty() {
        result = env
            .runner
            .run(
                &program,
                &restore_args(&place.program, true, lock_wait_secs),
                Some(&payload),
            )
            .map(|_| ())
            .map_err(Failure::Program);
    }
    let result = result.and_then(|()| drop_nft_tables(&place.program, &drop, env));
    result.map_err(|error| {
        let error = Box::new(error);
        match purpose {
            Purpose::Apply => Error::Commit {
                family,
                rejected: error
                    .stderr()
                    .and_then(failed_restore_line)
                    .and_then(|n| payload.lines().nth(n.saturating_sub(1)))
                    .map(str::to_string),
                version: version_of(&place.program, &place.before, env.probe),
                program,
                error,
            },
            Purpose::Switch => Error::Switch {
                family,
                program,
                error,
            },
            Purpose::Stale => Error::Stale {
                family,
                program,
                error,
            },
            Purpose::Cleanup => Error::Cleanup {
                family,
                program,
                error,
            },
        }
    })
}

/// Whether a table reads the same now as before (legacy tables cannot be unloaded, so an
/// empty legacy table counts as absent).
fn same_table(program: &Program, before: Option<&TableState>, now: Option<&TableState>) -> bool {
    let legacy = program.flavor != Some(Flavor::Nft);
    match (before, now) {
        (Some(b), Some(n)) => b == n,
        (None, None) => true,
        (None, Some(t)) | (Some(t), None) => legacy && t.is_empty(),
    }
}

/// Tables of `now` that differ from `before`, in their rules or their dormant flag.
fn changed_tables(program: &Program, before: &SaveState, now: &SaveState) -> Vec<String> {
    let names: BTreeSet<&String> = before.tables.keys().chain(now.tables.keys()).collect();
    names
        .into_iter()
        .filter(|t| {
            !same_table(program, before.tables.get(*t), now.tables.get(*t))
                || before.dormant.contains(t) != now.dormant.contains(t)
        })
        .cloned()
        .collect()
}

/// Putting one family back did not take.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error("{error}; the {family} tables may be partly changed")]
    Reread {
        family: Family,
        /// Printed in the message, so not exposed as `source` too.
        error: Box<Error>,
    },
    #[error(
        "the {family} tables cannot be read safely after the failure ({}): what the run \
         changed there is unknown",
        unreadable.join("; ")
    )]
    Unreadable {
        family: Family,
        unreadable: Vec<String>,
    },
    #[error(
        "restoring {family} failed{}: {family} tables still differing from before the run: {}",
        failure.as_ref().map(|f| format!(" ({f})")).unwrap_or_default(),
        left.join(", ")
    )]
    StillDiffering {
        family: Family,
        /// Why the restore itself failed, when it did.
        failure: Option<String>,
        /// Each table still differing, with what it holds.
        left: Vec<String>,
    },
}

/// How putting one family back went: `Ok(true)` put back and proved, `Ok(false)` nothing
/// had changed; `Err`, what is left.
///
/// Puts one family back exactly as it was read before the run, whatever happened to it
/// (iptables-restore commits table by table: a failed transaction may have committed its
/// first tables). Re-reads the kernel first, to know what changed, and after, to prove it.
pub(super) fn roll_back(
    place: &Place,
    lock_wait_secs: u32,
    env: &mut Env<'_>,
) -> Result<bool, RollbackError> {
    let (program, before) = (&place.program, &place.before);
    let family = program.family;
    let reread = |env: &mut Env<'_>| {
        let now =
            read_state(program, env.probe, env.runner).map_err(|e| RollbackError::Reread {
                family,
                error: Box::new(e),
            })?;
        if now.unreadable.is_empty() || now.unreadable == before.unreadable {
            Ok(now)
        } else {
            Err(RollbackError::Unreadable {
                family,
                unreadable: now.unreadable.iter().map(ToString::to_string).collect(),
            })
        }
    };
    let now = reread(env)?;
    let changed = changed_tables(program, before, &now);
    if changed.is_empty() {
        return Ok(false);
    }
    let mut text = String::new();
    let mut absent = Vec::new();
    let mut failure = None;
    for t in &changed {
        match before.section(t) {
            Some(section) => text.push_str(section),
            None if program.flavor == Some(Flavor::Nft) => {
                // Created by this run only if the kernel's own list showed it absent.
                let proved_absent = before
                    .kernel_tables
                    .as_ref()
                    .is_some_and(|names| !names.contains(t));
                match Table::from_name(t) {
                    Some(table) if proved_absent => absent.push(table),
                    _ => {
                        failure.get_or_insert(format!(
                            "table {t} is not proved absent before the run: left as it is"
                        ));
                    }
                }
            }
            None => restore::section(&mut text, t, Header::Save, |_| {}),
        }
    }
    tracing::info!(tables = %changed.join(","), "restoring the {family} tables read before the run");
    if !text.is_empty() {
        // Without --noflush each listed table is replaced whole by its previous content.
        if let Err(e) = env.runner.run(
            &program.restore_program(),
            &restore_args(program, false, lock_wait_secs),
            Some(&text),
        ) {
            failure.get_or_insert(explain_exec(&e));
        }
    }
    if let Err(e) = drop_nft_tables(program, &absent, env) {
        failure.get_or_insert(e.to_string());
    }
    // A table the run woke is made dormant again.
    let woken: Vec<String> = changed
        .iter()
        .filter(|t| before.dormant.contains(t) && !absent.iter().any(|a| a.name() == t.as_str()))
        .cloned()
        .collect();
    if let Err(e) = set_dormant(program, &woken, true, env) {
        failure.get_or_insert(e.to_string());
    }
    let after = reread(env)?;
    let left = changed_tables(program, before, &after);
    if left.is_empty() {
        return Ok(true);
    }
    Err(RollbackError::StillDiffering {
        family,
        failure,
        left: left
            .iter()
            .map(|t| format!("{t} ({})", describe_table(after.tables.get(t))))
            .collect(),
    })
}

/// A short description of a table's content, for "what is left" messages.
fn describe_table(t: Option<&TableState>) -> String {
    match t {
        None => "absent".into(),
        Some(t) => {
            let ours: Vec<&str> = t
                .user_chains
                .iter()
                .filter(|c| c.starts_with(crate::model::chain::PREFIX))
                .map(String::as_str)
                .collect();
            format!(
                "{} rules, ISTIO chains: {}",
                t.rules.len(),
                if ours.is_empty() {
                    "none".to_string()
                } else {
                    ours.join(" ")
                }
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_line_is_found() {
        assert_eq!(
            failed_restore_line("iptables-restore: line 7 failed\n"),
            Some(7)
        );
        assert_eq!(
            failed_restore_line("iptables-restore v1.8.9 (nf_tables): line 12: RULE_APPEND failed"),
            Some(12)
        );
        assert_eq!(
            failed_restore_line("iptables-restore: Error occurred at line: 21\nTry it"),
            Some(21)
        );
        assert_eq!(
            failed_restore_line("Another app is currently holding the xtables lock"),
            None
        );
    }
}
