//! Applying the `ip` steps, for either backend: what a config wants added, what an earlier
//! TPROXY config left removed, each change remembered so that a failed run can undo it; and
//! the removal of all of it by a cleanup.

use crate::model::Family;
use crate::routes::{self as ip, IpCommand};
use crate::system::Env;
use crate::system::exec::ExecError;

/// An `ip` change made by this run, for rollback.
#[derive(Debug, Clone)]
pub enum IpChange {
    Added(IpCommand),
    /// With the rule's priority, when known, to put it back where it was.
    Removed(IpCommand, Option<u32>),
}

/// An `ip` step that failed, with the changes made before it (to undo).
#[derive(Debug)]
pub struct IpFailed {
    pub command: IpCommand,
    pub error: ExecError,
    pub done: Vec<IpChange>,
}

/// The mark and table of this config's TPROXY routing: what an earlier TPROXY config of the
/// same settings left is removed by them where netlink cannot show the routing.
#[derive(Debug, Clone, Copy)]
pub struct TproxyRouting {
    pub mark: u32,
    pub table: u32,
}

/// Removes TPROXY routing an earlier run added that `wanted` no longer has, then adds what
/// is missing of `wanted`. `had_tproxy(family)`: whether the state read before the run shows
/// a TPROXY config (used only when netlink cannot tell). `changed` gets each command run.
pub fn apply(
    wanted: &[IpCommand],
    had_tproxy: &dyn Fn(Family) -> bool,
    configured: TproxyRouting,
    env: &mut Env<'_>,
    changed: &mut Vec<String>,
) -> Result<Vec<IpChange>, IpFailed> {
    // TPROXY routing an earlier run added (whatever mark and table it used, found over
    // netlink: a `fwmark` rule whose table holds our `local default dev lo` route) that this
    // config no longer wants is removed. In process, so a REDIRECT apply runs no `ip` at all.
    let mut stale: Vec<(IpCommand, Option<u32>)> = Vec::new();
    for family in [Family::V4, Family::V6] {
        match env.probe.routing(family) {
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
                        mark: configured.mark,
                        table: configured.table,
                    },
                    IpCommand::RouteAddLocal {
                        family,
                        table: configured.table,
                    },
                ] {
                    if !wanted.contains(&cmd) {
                        stale.push((cmd, None));
                    }
                }
            }
        }
    }
    // `::6` on lo is Istio's own (its cleanup deletes it whatever the config): an IPv6
    // config added it, and one without IPv6 removes it.
    if !wanted.contains(&IpCommand::AddInboundV6Address) {
        stale.push((IpCommand::AddInboundV6Address, None));
    }
    // The route before the rule that looks it up: a run killed in between leaves a route
    // nothing uses (and the next run finds it), never a rule into an empty table.
    let mut wanted_ip: Vec<&IpCommand> = wanted.iter().collect();
    wanted_ip.sort_by_key(|c| match c {
        IpCommand::AddInboundV6Address => 0,
        IpCommand::RouteAddLocal { .. } => 1,
        IpCommand::RuleAdd { .. } => 2,
    });

    let mut done: Vec<IpChange> = Vec::new();
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
                changed.push(cmd.to_string());
                done.push(change);
            }
            Ok(None) => {}
            Err(error) => {
                return Err(IpFailed {
                    command: cmd.clone(),
                    error,
                    done,
                });
            }
        }
    }
    Ok(done)
}

/// What undoing one `ip` change found.
#[derive(Debug, thiserror::Error)]
pub enum UndoError {
    #[error("undoing the change to `{command}`: {error}")]
    Run {
        command: IpCommand,
        /// Printed in the message, so not exposed as `source` too.
        error: ExecError,
    },
    #[error("undoing the change to `{command}` did not take: it is still {}", if *.present { "missing" } else { "present" })]
    DidNotTake { command: IpCommand, present: bool },
    #[error("checking `{command}` after undoing it: {error}")]
    Check {
        command: IpCommand,
        /// Printed in the message, so not exposed as `source` too.
        error: ExecError,
    },
}

/// Undoes `done`, newest first, checking each by asking the kernel again; goes on past a
/// failure and returns all of them.
pub fn undo(done: &[IpChange], env: &mut Env<'_>) -> Vec<UndoError> {
    let mut failures = Vec::new();
    for change in done.iter().rev() {
        let (cmd, args, present) = match change {
            IpChange::Added(c) => (c, ip::undo_args(c), false),
            IpChange::Removed(c, priority) => (c, ip::change_args(c, true, *priority), true),
        };
        if let Err(error) = env.runner.run("ip", &args, None) {
            failures.push(UndoError::Run {
                command: cmd.clone(),
                error,
            });
            continue;
        }
        match ip::present(cmd, env.probe, env.runner) {
            Ok(p) if p == present => {}
            Ok(_) => failures.push(UndoError::DidNotTake {
                command: cmd.clone(),
                present,
            }),
            Err(error) => failures.push(UndoError::Check {
                command: cmd.clone(),
                error,
            }),
        }
    }
    failures
}

/// A removal a cleanup could not make.
#[derive(Debug, thiserror::Error)]
#[error("removing `{command}`: {error}")]
pub struct RemoveError {
    pub command: IpCommand,
    /// Printed in the message, so not exposed as `source` too.
    pub error: ExecError,
}

/// Removes `configured` (the config's own steps) and whatever TPROXY routing earlier runs
/// added with other marks and tables (found over netlink); rules before the routes they use.
/// Goes on past a failure; `removed` gets each command run.
pub fn remove_all(
    configured: &[IpCommand],
    env: &mut Env<'_>,
    removed: &mut Vec<String>,
) -> Vec<RemoveError> {
    let mut cmds: Vec<IpCommand> = Vec::new();
    for family in [Family::V4, Family::V6] {
        if let Some(routing) = env.probe.routing(family) {
            // Duplicates included: each removal takes one.
            cmds.extend(ip::leftovers(family, &routing, &[]));
        }
    }
    for c in configured {
        if !cmds.contains(c) {
            cmds.push(c.clone());
        }
    }
    cmds.sort_by_key(|c| match c {
        IpCommand::RuleAdd { .. } => 0,
        IpCommand::RouteAddLocal { .. } => 1,
        IpCommand::AddInboundV6Address => 2,
    });
    let mut errors = Vec::new();
    for cmd in &cmds {
        match ip::present(cmd, env.probe, env.runner) {
            Ok(true) => match env.runner.run("ip", &ip::undo_args(cmd), None) {
                Ok(_) => removed.push(format!("ip {}", ip::undo_args(cmd).join(" "))),
                Err(error) => errors.push(RemoveError {
                    command: cmd.clone(),
                    error,
                }),
            },
            Ok(false) => {}
            Err(e) => tracing::debug!("checking `{cmd}`: {e}"),
        }
    }
    errors
}
