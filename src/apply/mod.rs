//! Applying a plan for real: detect the backend, read the current state, commit one
//! iptables-restore --noflush transaction per family that leaves exactly the desired state,
//! then the `ip` plumbing. iptables-restore commits table by table, so a transaction is not
//! atomic by itself; all or nothing comes from the rollback: when any step fails, `ip`
//! changes are undone and every family whose commit was attempted is put back table by table
//! to what was read, then read again to prove it before the error says so.

pub mod nft;

use std::collections::BTreeSet;

use crate::backend::iptables::build::Plan;
use crate::backend::iptables::plan::{self as reconcile, Conflict, Policy, Transaction};
use crate::backend::iptables::restore::{self, Header};
use crate::backend::iptables::save::{ParseError, SaveState, TableState, parse_save};
use crate::config::{Config, Flavor};
use crate::model::OwnerResolver;
use crate::model::{Family, Table};
use crate::routes as ip;
use crate::routes::IpCommand;
use crate::system::backend::{self, Backend, NotInstalled, Probe};
use crate::system::exec::{ExecError, Runner, failed_restore_line};

/// How to apply.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// `--force-iptables-binary`.
    pub flavor: Option<Flavor>,
    /// `--reconcile` / `--force-apply`.
    pub policy: Policy,
    /// Seconds to wait for the xtables lock (legacy backend).
    pub lock_wait_secs: u32,
    /// TPROXY mark and routing table of this config, to remove a TPROXY setup left by an
    /// earlier config that used them.
    pub tproxy_mark: u32,
    pub tproxy_route_table: u32,
}

impl Options {
    /// The apply settings of `cfg`.
    pub fn from_config(cfg: &Config) -> Options {
        Options {
            flavor: cfg.flavor,
            policy: Policy {
                reconcile: cfg.reconcile,
                force: cfg.force_apply,
            },
            lock_wait_secs: cfg.lock_wait_secs,
            tproxy_mark: cfg.tproxy_mark,
            tproxy_route_table: cfg.tproxy_route_table,
        }
    }
}

/// An `ip` change made by this run, for rollback.
#[derive(Debug, Clone)]
enum IpChange {
    Added(IpCommand),
    /// With the rule's priority, when known, to put it back where it was.
    Removed(IpCommand, Option<u32>),
}

/// What the process needs from the outside world.
pub struct Env<'a> {
    pub runner: &'a mut dyn Runner,
    pub probe: &'a dyn Probe,
    pub resolver: &'a dyn OwnerResolver,
}

/// What was done.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Families whose tables changed.
    pub committed: Vec<Family>,
    /// `ip` commands run.
    pub ip_changed: Vec<String>,
    /// Native nftables tables written (or, by cleanup, deleted).
    pub nft_tables: Vec<String>,
}

/// A failed apply. Every variant says the phase; commit failures say whether the earlier
/// steps were put back.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
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
    #[error("{family}: {error}")]
    Conflict {
        family: Family,
        /// Printed in the message, so not exposed as `source` too.
        error: Conflict,
    },
    #[error(
        "committing {family} rules with {program} (iptables {version}) failed{}: {}; {rollback}",
        rejected.as_ref().map(|l| format!(" at `{l}`")).unwrap_or_default(),
        explain_exec(.error)
    )]
    Commit {
        family: Family,
        program: String,
        version: String,
        rejected: Option<String>,
        /// Not `source`: the message already includes it, once. Boxed: the error is large
        /// and only ever built once, on the way out.
        error: Box<ExecError>,
        rollback: String,
    },
    #[error("configuring routes: `ip {command}`: {error}; {rollback}")]
    Ip {
        command: String,
        error: Box<ExecError>,
        rollback: String,
    },
    #[error(
        "the native nftables backend (--native-nftables) needs the nft program, which is not \
         in PATH: install the nftables package (apt-get install nftables, apk add nftables, \
         dnf install nftables); nothing was changed"
    )]
    NftMissing,
    #[error(
        "nft {version} is too old: the native nftables backend needs nft 1.0.1 or later \
         (older nft parses every table of the namespace on each change); nothing was changed"
    )]
    NftTooOld { version: String },
    #[error("reading the current nftables state with `nft list ruleset inet`: {error}")]
    NftRead { error: String },
    #[error(
        "the namespace already holds different capture rules ({detail}); nothing was changed. \
         Run with --reconcile=true (the default) to replace them, or remove them first with \
         --cleanup-only"
    )]
    NftConflict { detail: String },
    #[error(
        "committing the nftables transaction with nft -f failed{}: {}; {rollback}",
        rejected.as_ref().map(|l| format!(" at `{l}`")).unwrap_or_default(),
        .error
    )]
    NftCommit {
        rejected: Option<String>,
        /// Not `source`: the message already includes it, once.
        error: Box<ExecError>,
        rollback: String,
    },
    #[error(
        "removing the {family} ISTIO_* iptables rules with {program} (switching to native \
         nftables) failed: {}; {rollback}",
        explain_exec(.error)
    )]
    Switch {
        family: Family,
        program: String,
        /// Not `source`: the message already includes it, once.
        error: Box<ExecError>,
        rollback: String,
    },
    #[error(
        "removing the native nftables tables (switching to iptables) failed: {error}; {rollback}"
    )]
    SwitchNft { error: String, rollback: String },
}

impl ApplyError {
    /// --reconcile=false met different state (exit code 4).
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            ApplyError::Conflict { .. } | ApplyError::NftConflict { .. }
        )
    }
}

/// One failure of a cleanup, which goes on past it (see [`cleanup`]).
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// The state of one family could not be read (ip6tables may be unusable where IPv6 is
    /// off).
    #[error(transparent)]
    Read(ApplyError),
    #[error("cleaning up {family} with {program}: {}", explain_exec(.error))]
    Commit {
        family: Family,
        program: String,
        /// Not `source`: the message already includes it, once.
        error: ExecError,
    },
    #[error("removing `{command}`: {error}")]
    Ip {
        command: IpCommand,
        /// Not `source`: the message already includes it, once.
        error: ExecError,
    },
    #[error("{error}")]
    Nft { error: String },
}

/// The exec error, with the xtables lock named plainly.
fn explain_exec(e: &ExecError) -> String {
    match e.stderr() {
        Some(s) if s.contains("holding the xtables lock") => {
            format!(
                "xtables lock held by another process and not released in time ({})",
                s.trim().replace('\n', " ")
            )
        }
        _ => e.to_string(),
    }
}

/// One family in flight.
struct Run {
    backend: Backend,
    before: SaveState,
    tx: Transaction,
    /// A commit was attempted: the family may have changed, even if the commit failed.
    attempted: bool,
}

fn read_state(
    family: Family,
    backend: &Backend,
    probe: &dyn Probe,
    runner: &mut dyn Runner,
) -> Result<SaveState, ApplyError> {
    // A namespace whose backend has no tables at all has nothing to save: skip the process.
    let empty = match backend.flavor {
        Some(Flavor::Nft) => probe.nft_tables(family) == Some(0),
        Some(Flavor::Legacy) => probe.legacy_tables(family).is_empty(),
        None => false,
    };
    if empty {
        tracing::debug!(
            "{family}: no {} tables in this namespace",
            backend.save_program()
        );
        return Ok(SaveState::default());
    }
    let program = backend.save_program();
    let text = runner
        .run(&program, &[], None)
        .map_err(|error| ApplyError::Read {
            family,
            program: program.clone(),
            error,
        })?;
    parse_save(&text).map_err(|error| ApplyError::Parse {
        family,
        program,
        error,
    })
}

fn restore_args(backend: &Backend, noflush: bool, opts: &Options) -> Vec<String> {
    let mut a = Vec::new();
    if noflush {
        a.push("--noflush".to_string());
    }
    if backend.uses_lock() {
        a.push(format!("--wait={}", opts.lock_wait_secs));
    }
    a
}

fn version_of(backend: &Backend, before: &SaveState) -> String {
    before
        .version
        .clone()
        .or_else(|| backend::binary_version(&backend.restore_program()))
        .unwrap_or_else(|| "version unknown".into())
}

/// Drops nft tables (nft keeps an empty table around where legacy would have none to drop).
fn drop_nft_tables(
    backend: &Backend,
    tables: &[Table],
    runner: &mut dyn Runner,
) -> Result<(), ExecError> {
    if tables.is_empty() || backend.flavor != Some(Flavor::Nft) {
        return Ok(());
    }
    if backend::which("nft").is_none() {
        tracing::warn!(
            "nft is not installed: leaving the empty tables {} in place",
            tables
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(());
    }
    let script: String = tables
        .iter()
        .map(|t| format!("delete table {} {}\n", backend.nft_family(), t))
        .collect();
    runner
        .run("nft", &["-f".to_string(), "-".to_string()], Some(&script))
        .map(|_| ())
}

/// What to feed iptables-restore and which tables to drop afterwards. With nft (and `nft`
/// installed) a table the transaction empties is not emptied by iptables-restore and then
/// dropped: its section is left out and the table dropped whole after the restore. A run
/// killed in between then leaves our old rules, which the next run recognises and removes,
/// never an empty table it could not tell from another tool's.
fn restore_input(backend: &Backend, tx: &Transaction) -> (String, Vec<Table>) {
    let drop = backend.flavor == Some(Flavor::Nft) && backend::which("nft").is_some();
    if !drop || tx.emptied.is_empty() {
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

/// Runs iptables-restore --noflush with `payload` (when there is any), then drops `drop`.
fn commit(
    backend: &Backend,
    payload: &str,
    drop: &[Table],
    opts: &Options,
    runner: &mut dyn Runner,
) -> Result<(), ExecError> {
    if !payload.is_empty() {
        runner.run(
            &backend.restore_program(),
            &restore_args(backend, true, opts),
            Some(payload),
        )?;
    }
    drop_nft_tables(backend, drop, runner)
}

/// Whether a table reads the same now as before (legacy tables cannot be unloaded, so an
/// empty legacy table counts as absent).
fn same_table(backend: &Backend, before: Option<&TableState>, now: Option<&TableState>) -> bool {
    let legacy = backend.flavor != Some(Flavor::Nft);
    match (before, now) {
        (Some(b), Some(n)) => b == n,
        (None, None) => true,
        (None, Some(t)) | (Some(t), None) => legacy && t.is_empty(),
    }
}

/// Tables of `now` that differ from `before`.
fn changed_tables(backend: &Backend, before: &SaveState, now: &SaveState) -> Vec<String> {
    let names: BTreeSet<&String> = before.tables.keys().chain(now.tables.keys()).collect();
    names
        .into_iter()
        .filter(|t| !same_table(backend, before.tables.get(*t), now.tables.get(*t)))
        .cloned()
        .collect()
}

/// How putting one family back went.
enum Restored {
    /// The kernel already held exactly the state read before the run.
    Unchanged,
    /// Tables were put back, and re-reading them proves it.
    Restored,
}

/// Puts one family back exactly as it was read before the run, whatever happened to it
/// (iptables-restore commits table by table: a failed transaction may have committed its
/// first tables). Re-reads the kernel first, to know what changed, and after, to prove it;
/// the error says what is left.
fn roll_back(
    backend: &Backend,
    before: &SaveState,
    opts: &Options,
    probe: &dyn Probe,
    runner: &mut dyn Runner,
) -> Result<Restored, String> {
    let family = backend.family;
    let reread = |runner: &mut dyn Runner| {
        read_state(family, backend, probe, runner)
            .map_err(|e| format!("{e}; the {family} tables may be partly changed"))
    };
    let now = reread(runner)?;
    let changed = changed_tables(backend, before, &now);
    if changed.is_empty() {
        return Ok(Restored::Unchanged);
    }
    let mut text = String::new();
    let mut absent = Vec::new();
    for t in &changed {
        match before.sections.get(t) {
            Some(section) => text.push_str(section),
            None if backend.flavor == Some(Flavor::Nft) => {
                absent.extend(Table::ALL.into_iter().filter(|x| x.name() == t.as_str()))
            }
            None => restore::section(&mut text, t, Header::Save, |_| {}),
        }
    }
    tracing::info!(tables = %changed.join(","), "restoring the {family} tables read before the run");
    let mut failure = None;
    if !text.is_empty() {
        // Without --noflush each listed table is replaced whole by its previous content.
        if let Err(e) = runner.run(
            &backend.restore_program(),
            &restore_args(backend, false, opts),
            Some(&text),
        ) {
            failure = Some(explain_exec(&e));
        }
    }
    if let Err(e) = drop_nft_tables(backend, &absent, runner) {
        failure.get_or_insert(e.to_string());
    }
    let after = reread(runner)?;
    let left = changed_tables(backend, before, &after);
    if left.is_empty() {
        return Ok(Restored::Restored);
    }
    Err(format!(
        "restoring {family} failed{}: {family} tables still differing from before the run: {}",
        failure.map(|f| format!(" ({f})")).unwrap_or_default(),
        left.iter()
            .map(|t| format!("{t} ({})", describe_table(after.tables.get(t))))
            .collect::<Vec<_>>()
            .join(", ")
    ))
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

/// What a rollback did, for the error message: what it proved restored, what it could not.
#[derive(Debug, Default)]
struct Undo {
    failures: Vec<String>,
    /// What was put back and proved so ("IPv4", "nftables", ...).
    restored: Vec<String>,
    /// `ip` changes were undone (and checked).
    routes: bool,
}

impl Undo {
    /// Undoes `ip` changes, newest first, checking each by asking the kernel again.
    fn ip(&mut self, ip_done: &[IpChange], probe: &dyn Probe, runner: &mut dyn Runner) {
        for change in ip_done.iter().rev() {
            let (cmd, args, present) = match change {
                IpChange::Added(c) => (c, ip::undo_args(c), false),
                IpChange::Removed(c, priority) => (c, ip::change_args(c, true, *priority), true),
            };
            if let Err(e) = runner.run("ip", &args, None) {
                self.failures
                    .push(format!("undoing the change to `{cmd}`: {e}"));
                continue;
            }
            match ip::present(cmd, probe, runner) {
                Ok(p) if p == present => {}
                Ok(_) => self.failures.push(format!(
                    "undoing the change to `{cmd}` did not take: it is still {}",
                    if present { "missing" } else { "present" }
                )),
                Err(e) => self
                    .failures
                    .push(format!("checking `{cmd}` after undoing it: {e}")),
            }
        }
        self.routes |= !ip_done.is_empty();
    }

    /// Puts every iptables family whose commit was attempted back as it was read.
    fn families(
        &mut self,
        runs: &[Run],
        opts: &Options,
        probe: &dyn Probe,
        runner: &mut dyn Runner,
    ) {
        for run in runs.iter().filter(|r| r.attempted) {
            match roll_back(&run.backend, &run.before, opts, probe, runner) {
                Ok(Restored::Restored) => self.restored.push(run.backend.family.to_string()),
                Ok(Restored::Unchanged) => {}
                Err(e) => self.failures.push(e),
            }
        }
    }

    /// The outcome, for the error message; it claims only what re-reading proved.
    fn describe(self) -> String {
        if !self.failures.is_empty() {
            let fine = if self.restored.is_empty() {
                String::new()
            } else {
                format!(
                    "; restored and checked by re-reading the kernel: {}",
                    self.restored.join(", ")
                )
            };
            format!(
                "ROLLBACK FAILED ({}){fine}; rerun to repair",
                self.failures.join("; ")
            )
        } else if self.restored.is_empty() && !self.routes {
            "nothing was changed (checked by re-reading the kernel)".to_string()
        } else {
            let mut what = self.restored;
            if self.routes {
                what.push("routes".into());
            }
            format!(
                "the previous state was restored ({}; checked by re-reading the kernel)",
                what.join(", ")
            )
        }
    }
}

/// Undoes `ip` changes (newest first), then puts every family back as it was read; checks
/// both by re-reading the kernel and describes the outcome for the error message.
fn undo_all(
    runs: &[Run],
    ip_done: &[IpChange],
    opts: &Options,
    probe: &dyn Probe,
    runner: &mut dyn Runner,
) -> String {
    let mut undo = Undo::default();
    undo.ip(ip_done, probe, runner);
    undo.families(runs, opts, probe, runner);
    undo.describe()
}

/// Applies `plan`, reconciling whatever the namespace already holds.
pub fn apply(plan: &Plan, opts: &Options, env: &mut Env<'_>) -> Result<Summary, ApplyError> {
    let mut runs: Vec<Run> = Vec::new();
    for family in plan.families() {
        let backend = backend::detect(family, opts.flavor, env.probe)
            .map_err(|error| ApplyError::Backend { family, error })?;
        let before = read_state(family, &backend, env.probe, env.runner)?;
        // The version is logged when the save printed it (free); read from the binary's file
        // (228 KB for xtables-nft-multi) only for a failed commit's message.
        match &before.version {
            Some(version) => {
                tracing::info!(backend = %backend.restore_program(), %version, reason = %backend.reason, "{family} backend");
            }
            None => {
                tracing::info!(backend = %backend.restore_program(), reason = %backend.reason, "{family} backend");
            }
        }
        let tx = reconcile::reconcile(&before, plan.rules(family), env.resolver, opts.policy)
            .map_err(|error| ApplyError::Conflict { family, error })?;
        runs.push(Run {
            backend,
            before,
            tx,
            attempted: false,
        });
    }

    let mut summary = Summary::default();
    for i in 0..runs.len() {
        let run = &runs[i];
        let family = run.backend.family;
        if run.tx.is_noop() {
            tracing::info!("{family} rules are already in place: nothing to commit");
            continue;
        }
        let program = run.backend.restore_program();
        runs[i].attempted = true;
        let run = &runs[i];
        let (payload, drop) = restore_input(&run.backend, &run.tx);
        tracing::info!(
            "Running iptables restore with: {program} --noflush and the following input:\n{}",
            payload.trim_end()
        );
        let result = commit(&run.backend, &payload, &drop, opts, env.runner);
        if let Err(error) = result {
            let rejected = error
                .stderr()
                .and_then(failed_restore_line)
                .and_then(|n| payload.lines().nth(n.saturating_sub(1)))
                .map(str::to_string);
            let version = version_of(&run.backend, &run.before);
            let rollback = undo_all(&runs, &[], opts, env.probe, env.runner);
            return Err(ApplyError::Commit {
                family,
                program,
                version,
                rejected,
                error: Box::new(error),
                rollback,
            });
        }
        summary.committed.push(family);
    }

    let had_tproxy = |family: Family| {
        runs.iter().any(|r| {
            r.backend.family == family
                && r.before.table(Table::Mangle).is_some_and(|t| {
                    t.user_chains
                        .iter()
                        .any(|c| c == crate::model::chain::TPROXY)
                })
        })
    };
    let ip_done = match ip_phase(&plan.ip, &had_tproxy, opts, env, &mut summary) {
        Ok(done) => done,
        Err(failed) => {
            let rollback = undo_all(&runs, &failed.done, opts, env.probe, env.runner);
            return Err(ApplyError::Ip {
                command: failed.command.args().join(" "),
                error: Box::new(failed.error),
                rollback,
            });
        }
    };
    // Switching from native nftables: its tables go last, in one transaction (which either
    // happens or not), so that a failure before leaves the pod captured as it was.
    match nft::drop_tables(env) {
        Ok(dropped) => summary.nft_tables = dropped,
        Err(error) => {
            for r in &mut runs {
                r.attempted = true;
            }
            let rollback = undo_all(&runs, &ip_done, opts, env.probe, env.runner);
            return Err(ApplyError::SwitchNft { error, rollback });
        }
    }
    Ok(summary)
}

/// An `ip` step that failed, with the changes made before it (to undo).
struct IpFailed {
    command: IpCommand,
    error: ExecError,
    done: Vec<IpChange>,
}

/// The `ip` plumbing: removes TPROXY routing an earlier run added that `wanted` no longer
/// has, then adds what is missing of `wanted`. `had_tproxy(family)`: whether the state read
/// before the run shows a TPROXY config (used only when netlink cannot tell).
fn ip_phase(
    wanted: &[IpCommand],
    had_tproxy: &dyn Fn(Family) -> bool,
    opts: &Options,
    env: &mut Env<'_>,
    summary: &mut Summary,
) -> Result<Vec<IpChange>, IpFailed> {
    // TPROXY routing an earlier run added (whatever mark and table it used, found over
    // netlink: a `fwmark` rule whose table holds our `local default dev lo` route) that this
    // config no longer wants is removed. In process, so a REDIRECT apply runs no `ip` at all.
    let mut stale: Vec<(IpCommand, Option<u32>)> = Vec::new();
    let routing = env.probe.routing_both();
    for (family, routing) in [Family::V4, Family::V6].into_iter().zip(routing) {
        match routing {
            Some(routing) => stale.extend(ip::leftovers_at(family, &routing, wanted)),
            None => {
                // Netlink unavailable: the configured mark and table, when the state read
                // before shows an earlier TPROXY config.
                if !had_tproxy(family) {
                    continue;
                }
                for cmd in [
                    IpCommand::RuleAdd {
                        family,
                        mark: opts.tproxy_mark,
                        table: opts.tproxy_route_table,
                    },
                    IpCommand::RouteAddLocal {
                        family,
                        table: opts.tproxy_route_table,
                    },
                ] {
                    if !wanted.contains(&cmd) {
                        stale.push((cmd, None));
                    }
                }
            }
        }
    }
    // The route before the rule that looks it up: a run killed in between leaves a route
    // nothing uses (and the next run finds it), never a rule into an empty table.
    let mut wanted_ip: Vec<&IpCommand> = wanted.iter().collect();
    wanted_ip.sort_by_key(|c| match c {
        IpCommand::AddInboundV6Address => 0,
        IpCommand::RouteAddLocal { .. } => 1,
        IpCommand::RuleAdd { .. } => 2,
    });

    let mut ip_done: Vec<IpChange> = Vec::new();
    // Leftovers go first: the kernel numbers a new rule below the lowest one there, so
    // adding ours first would give it another priority than a fresh apply does.
    let steps = stale
        .iter()
        .map(|(c, priority)| (c, false, *priority))
        .chain(wanted_ip.into_iter().map(|c| (c, true, None)));
    for (cmd, wanted, priority) in steps {
        let step = ip::present(cmd, env.probe, env.runner).and_then(|present| {
            if present == wanted {
                tracing::debug!(command = %cmd, wanted, "already as wanted");
                Ok(None)
            } else if wanted {
                tracing::info!(command = %cmd, "configuring");
                env.runner.run("ip", &cmd.args(), None).map(|_| Some(IpChange::Added(cmd.clone())))
            } else {
                let undo = ip::change_args(cmd, false, priority);
                tracing::info!(command = %format!("ip {}", undo.join(" ")), "removing routing left by an earlier TPROXY config");
                env.runner.run("ip", &undo, None).map(|_| Some(IpChange::Removed(cmd.clone(), priority)))
            }
        });
        match step {
            Ok(Some(change)) => {
                summary.ip_changed.push(cmd.to_string());
                ip_done.push(change);
            }
            Ok(None) => {}
            Err(error) => {
                return Err(IpFailed {
                    command: cmd.clone(),
                    error,
                    done: ip_done,
                });
            }
        }
    }
    Ok(ip_done)
}

/// Removes every ISTIO_* chain and jump (and our other built-in chain rules), in every table,
/// both families, on every backend that holds them; then the `ip` plumbing in `plan.ip`
/// (`plan` is [`rules::teardown`](crate::backend::iptables::build::teardown)'s).
/// Keeps going after a failure and reports all of them.
pub fn cleanup(
    plan: &Plan,
    opts: &Options,
    env: &mut Env<'_>,
) -> Result<Summary, Vec<CleanupError>> {
    let mut summary = Summary::default();
    let mut errors = Vec::new();
    for family in [Family::V4, Family::V6] {
        let mut backends: Vec<Backend> = Vec::new();
        match backend::detect(family, opts.flavor, env.probe) {
            Ok(b) => backends.push(b),
            Err(e) => {
                tracing::debug!("{family}: {e}");
            }
        }
        if opts.flavor.is_none() {
            for f in [Flavor::Legacy, Flavor::Nft] {
                if backends.iter().any(|b| b.flavor == Some(f)) {
                    continue;
                }
                let holds_state = f == Flavor::Nft || !env.probe.legacy_tables(family).is_empty();
                if let Ok(b) = backend::detect(family, Some(f), env.probe)
                    && holds_state
                {
                    backends.push(b);
                }
            }
        }
        let ours = plan.rules(family);
        for b in backends {
            let before = match read_state(family, &b, env.probe, env.runner) {
                Ok(s) => s,
                Err(e) => {
                    // ip6tables may be unusable where IPv6 is off; say so but go on.
                    errors.push(CleanupError::Read(e));
                    continue;
                }
            };
            let tx = reconcile::cleanup(&before, ours, env.resolver);
            if tx.is_noop() {
                continue;
            }
            let program = b.restore_program();
            tracing::info!(%program, "removing {family} ISTIO_* rules:\n{}", tx.payload.trim_end());
            let (payload, drop) = restore_input(&b, &tx);
            let r = commit(&b, &payload, &drop, opts, env.runner);
            match r {
                Ok(()) => summary.committed.push(family),
                Err(error) => errors.push(CleanupError::Commit {
                    family,
                    program,
                    error,
                }),
            }
        }
    }
    // Istio's native nftables capture keeps its rules in tables of its own.
    match nft::drop_tables(env) {
        Ok(dropped) => summary.nft_tables = dropped,
        Err(e) => errors.push(CleanupError::Nft { error: e }),
    }
    // The configured routing and address, then whatever TPROXY routing earlier runs added
    // with other marks and tables (found over netlink). Rules before the routes they use.
    let mut cmds: Vec<IpCommand> = Vec::new();
    for family in [Family::V4, Family::V6] {
        if let Some(routing) = env.probe.routing(family) {
            // Duplicates included: each removal takes one.
            cmds.extend(ip::leftovers(family, &routing, &[]));
        }
    }
    for c in &plan.ip {
        if !cmds.contains(c) {
            cmds.push(c.clone());
        }
    }
    cmds.sort_by_key(|c| match c {
        IpCommand::RuleAdd { .. } => 0,
        IpCommand::RouteAddLocal { .. } => 1,
        IpCommand::AddInboundV6Address => 2,
    });
    for cmd in &cmds {
        match ip::present(cmd, env.probe, env.runner) {
            Ok(true) => match env.runner.run("ip", &ip::undo_args(cmd), None) {
                Ok(_) => summary
                    .ip_changed
                    .push(format!("ip {}", ip::undo_args(cmd).join(" "))),
                Err(error) => errors.push(CleanupError::Ip {
                    command: cmd.clone(),
                    error,
                }),
            },
            Ok(false) => {}
            Err(e) => tracing::debug!("checking `{cmd}`: {e}"),
        }
    }
    if errors.is_empty() {
        Ok(summary)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{build as config, plan};
    use crate::model::NoResolver;
    use std::collections::BTreeMap;

    /// A fake machine: programs answer from a script of (program prefix, stdout, fail?).
    #[derive(Default)]
    struct Fake {
        calls: Vec<(String, Vec<String>, Option<String>)>,
        save_output: String,
        /// Successive outputs of one save program, before falling back to `save_output`.
        saves: BTreeMap<String, std::collections::VecDeque<String>>,
        fail_program: Option<String>,
    }

    impl Runner for Fake {
        fn run(
            &mut self,
            program: &str,
            args: &[String],
            stdin: Option<&str>,
        ) -> Result<String, ExecError> {
            self.calls
                .push((program.into(), args.to_vec(), stdin.map(String::from)));
            if self.fail_program.as_deref() == Some(program)
                && args.first().map(String::as_str) == Some("--noflush")
            {
                return Err(ExecError::Failed {
                    command: program.into(),
                    status: std::os::unix::process::ExitStatusExt::from_raw(256),
                    stderr: "ip6tables-restore: line 3 failed".into(),
                });
            }
            if program.ends_with("-save") {
                let queued = self.saves.get_mut(program).and_then(|q| q.pop_front());
                return Ok(queued.unwrap_or_else(|| self.save_output.clone()));
            }
            Ok(String::new())
        }
    }

    /// Legacy tables in a namespace without nft tables: the apply goes to legacy, and runs
    /// no nft program.
    #[test]
    fn legacy_tables_without_nft_tables_apply_with_legacy() {
        struct LegacyOnly;
        impl Probe for LegacyOnly {
            fn in_path(&self, _: &str) -> bool {
                true
            }
            fn legacy_tables(&self, _: Family) -> Vec<String> {
                vec!["nat".into()]
            }
            fn nft_tables(&self, _: Family) -> Option<usize> {
                Some(0)
            }
            fn nft_inet_tables(&self) -> Option<Vec<String>> {
                Some(vec![])
            }
        }
        let p = plan(config(&["-p", "15001", "-b", "*"], &[]).unwrap());
        let mut fake = Fake::default();
        let mut env = Env {
            runner: &mut fake,
            probe: &LegacyOnly,
            resolver: &NoResolver,
        };
        apply(&p, &OPTS, &mut env).unwrap();
        let ran: Vec<&str> = fake.calls.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(ran, ["iptables-legacy-save", "iptables-legacy-restore"]);
    }

    use crate::system::backend::NftOnly;

    const OPTS: Options = Options {
        tproxy_mark: 1337,
        tproxy_route_table: 133,
        flavor: None,
        policy: Policy {
            reconcile: true,
            force: false,
        },
        lock_wait_secs: 10,
    };

    /// Applies through the fake runner on an nft-only machine.
    fn apply_nft(plan: &Plan, opts: &Options, fake: &mut Fake) -> Result<Summary, ApplyError> {
        apply(
            plan,
            opts,
            &mut Env {
                runner: fake,
                probe: &NftOnly,
                resolver: &NoResolver,
            },
        )
    }

    #[test]
    fn fresh_apply_runs_one_save_and_one_restore_per_family() {
        let plan = plan(config(&["-b", "*", "-i", "*"], &[]).unwrap());
        let mut fake = Fake::default();
        let s = apply_nft(&plan, &OPTS, &mut fake).unwrap();
        let programs: Vec<&str> = fake.calls.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(programs, vec!["iptables-nft-save", "iptables-nft-restore"]);
        assert_eq!(fake.calls[1].1, vec!["--noflush"]);
        assert_eq!(s.committed, vec![Family::V4]);
    }

    #[test]
    fn failed_ipv6_commit_restores_ipv4() {
        let plan = plan(config(&["-b", "*"], &[("ENABLE_INBOUND_IPV6", "true")]).unwrap());
        let committed = "*nat\n:PREROUTING ACCEPT [0:0]\n:ISTIO_INBOUND - [0:0]\nCOMMIT\n";
        let mut fake = Fake {
            fail_program: Some("ip6tables-nft-restore".into()),
            // Read before the run, re-read before restoring, re-read to check.
            saves: BTreeMap::from([(
                "iptables-nft-save".to_string(),
                ["", committed, ""].map(String::from).into(),
            )]),
            ..Default::default()
        };
        let e = apply_nft(&plan, &OPTS, &mut fake).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("committing IPv6 rules with ip6tables-nft-restore"),
            "{msg}"
        );
        assert!(msg.contains("at `-N ISTIO_REDIRECT`"), "{msg}");
        assert!(
            msg.contains("previous state was restored (IPv4; checked by re-reading"),
            "{msg}"
        );
        // The IPv4 nat table did not exist before: it is dropped, not left empty.
        let nft = fake.calls.iter().find(|c| c.0 == "nft").unwrap();
        assert_eq!(nft.2.as_deref(), Some("delete table ip nat\n"));
        // No ip command ran.
        assert!(!fake.calls.iter().any(|c| c.0 == "ip"));
    }

    #[test]
    fn a_rollback_that_does_not_take_says_what_is_left() {
        let plan = plan(config(&["-b", "*"], &[("ENABLE_INBOUND_IPV6", "true")]).unwrap());
        let committed = "*nat\n:PREROUTING ACCEPT [0:0]\n:ISTIO_INBOUND - [0:0]\nCOMMIT\n";
        let mut fake = Fake {
            fail_program: Some("ip6tables-nft-restore".into()),
            // The table is still there after the rollback.
            saves: BTreeMap::from([(
                "iptables-nft-save".to_string(),
                ["", committed, committed].map(String::from).into(),
            )]),
            ..Default::default()
        };
        let msg = apply_nft(&plan, &OPTS, &mut fake).unwrap_err().to_string();
        assert!(msg.contains("ROLLBACK FAILED"), "{msg}");
        assert!(
            msg.contains(
                "IPv4 tables still differing from before the run: nat (0 rules, ISTIO chains: \
                 ISTIO_INBOUND)"
            ),
            "{msg}"
        );
        assert!(!msg.contains("restored ("), "{msg}");
    }

    #[test]
    fn conflict_without_reconcile_changes_nothing() {
        let plan = plan(config(&["-b", "8080"], &[]).unwrap());
        let mut fake = Fake {
            save_output: "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:ISTIO_INBOUND - [0:0]\n-A PREROUTING -p tcp -j ISTIO_INBOUND\nCOMMIT\n".into(),
            ..Default::default()
        };
        let opts = Options {
            policy: Policy {
                reconcile: false,
                force: false,
            },
            ..OPTS
        };
        let e = apply_nft(&plan, &opts, &mut fake).unwrap_err();
        assert!(matches!(e, ApplyError::Conflict { .. }), "{e}");
        assert!(fake.calls.iter().all(|c| c.0.ends_with("-save")));
    }
}
