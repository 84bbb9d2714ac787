//! Applying the `ip` steps, for either backend: what a config wants added, what an earlier
//! TPROXY config left removed, each change made over rtnetlink, read back, and remembered so
//! that a failed run can undo it; and the removal of all of it by a cleanup.
//!
//! A run plans first ([`plan`]: every read, before the kernel changes), then changes
//! ([`apply`]). Each change is read back after it is made: the kernel's answer alone does not
//! say what it holds (a change can take effect and still report a failure), so a change the
//! re-read shows is undone by a rollback whatever the answer was, and a failure names the
//! step as the `ip` command Istio prints for it.

use crate::model::Family;
use crate::routes::{self as ip, IpCommand, ReadError, TproxyRouting};
use crate::system::Env;
use crate::system::host_view::Probe;
use crate::system::rtnl_change::RtnlError;

/// One change of the plan: add or remove `command`'s effect (a rule at `priority`, when
/// known: exactly that rule goes, or comes back there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub command: IpCommand,
    pub add: bool,
    pub priority: Option<u32>,
}

impl Step {
    /// The reverse change.
    fn undo(&self) -> Step {
        Step {
            add: !self.add,
            ..self.clone()
        }
    }
}

impl std::fmt::Display for Step {
    /// As the `ip` command that makes it: `ip -4 rule del priority 100 fwmark 1400 lookup 140`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let args = ip::change_args(&self.command, self.add, self.priority);
        write!(f, "ip {}", args.join(" "))
    }
}

/// A change made by this run, for rollback.
pub type IpChange = Step;

/// Why one step did not end as wanted.
#[derive(Debug, thiserror::Error)]
pub enum StepFailure {
    #[error("over rtnetlink")]
    Netlink(#[source] RtnlError),
    #[error("the kernel acknowledged it, but reading it back shows it did not take")]
    DidNotTake,
    #[error("reading it back")]
    Read(#[source] ReadError),
}

/// `e` and its causes, each after a colon (for a message that goes on after it).
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// An `ip` step that failed, with the changes made before it (to undo): `done` includes the
/// failed step itself when reading it back shows it took effect (or could not tell).
#[derive(Debug)]
pub struct IpFailed {
    pub step: Step,
    pub failure: StepFailure,
    pub done: Vec<IpChange>,
}

/// The routing could not be read before the first change (so nothing was changed).
#[derive(Debug, thiserror::Error)]
#[error("reading the routing before any change")]
pub struct PlanError(#[source] pub ReadError);

/// The steps a config needs, read from the kernel before anything changes: TPROXY routing
/// an earlier run added that `wanted` no longer has (whatever its mark and table; rules
/// before the routes they use), `::6` when unwanted, then what is missing of `wanted` (the
/// address, the routes, then the rules that look them up).
pub fn plan(
    wanted: &[IpCommand],
    configured: TproxyRouting,
    probe: &dyn Probe,
) -> Result<Vec<Step>, PlanError> {
    let mut steps = Vec::new();
    let mut routing = Vec::new();
    for family in [Family::V4, Family::V6] {
        let r = ip::routing(family, probe).map_err(PlanError)?;
        // Leftovers go first: the kernel numbers a new rule below the lowest one there, so
        // adding ours first would give it another priority than a fresh apply does.
        for (command, priority) in ip::leftovers_at(family, &r, wanted, configured) {
            steps.push(Step {
                command,
                add: false,
                priority,
            });
        }
        routing.push((family, r));
    }
    // `::6` on lo is Istio's own (its cleanup deletes it whatever the config): an IPv6
    // config added it, and one without IPv6 removes it.
    let v6 = IpCommand::AddInboundV6Address;
    let v6_present = ip::present(&v6, None, probe).map_err(PlanError)?;
    if !wanted.contains(&v6) && v6_present {
        steps.push(Step {
            command: v6.clone(),
            add: false,
            priority: None,
        });
    }
    // The route before the rule that looks it up: a run killed in between leaves a route
    // nothing uses (and the next run finds it), never a rule into an empty table.
    let mut wanted_ip: Vec<&IpCommand> = wanted.iter().collect();
    wanted_ip.sort_by_key(|c| match c {
        IpCommand::AddInboundV6Address => 0,
        IpCommand::RouteAddLocal { .. } => 1,
        IpCommand::RuleAdd { .. } => 2,
    });
    for cmd in wanted_ip {
        let present = match cmd {
            IpCommand::AddInboundV6Address => v6_present,
            _ => routing
                .iter()
                .find(|(f, _)| *f == ip::family_of(cmd))
                .and_then(|(_, r)| ip::present_in_routing(cmd, None, r))
                .unwrap_or(false),
        };
        if present {
            tracing::debug!(command = %cmd, "already as wanted");
        } else {
            steps.push(Step {
                command: cmd.clone(),
                add: true,
                priority: None,
            });
        }
    }
    Ok(steps)
}

/// Makes `step` over rtnetlink and reads it back: `Ok` when the kernel now holds what the
/// step asked for; else the failure, with whether the change is (or may be) there.
fn make(step: &Step, env: &mut Env<'_>) -> Result<(), (StepFailure, bool)> {
    let sent = env
        .rtnl
        .change(step.add, &ip::target(&step.command, step.priority));
    match (sent, ip::present(&step.command, step.priority, env.probe)) {
        (Ok(()), Ok(p)) if p == step.add => Ok(()),
        (Ok(()), Ok(_)) => Err((StepFailure::DidNotTake, false)),
        (Err(e), Ok(p)) => Err((StepFailure::Netlink(e), p == step.add)),
        // Not known: counted as made, so that a rollback undoes (and checks) it.
        (Err(e), Err(_)) => Err((StepFailure::Netlink(e), true)),
        (Ok(()), Err(e)) => Err((StepFailure::Read(e), true)),
    }
}

/// Makes the planned steps in order; `changed` gets each one made.
pub fn apply(
    steps: &[Step],
    env: &mut Env<'_>,
    changed: &mut Vec<String>,
) -> Result<Vec<IpChange>, IpFailed> {
    let mut done: Vec<IpChange> = Vec::new();
    for step in steps {
        if step.add {
            tracing::info!(command = %step, "configuring");
        } else {
            tracing::info!(command = %step, "removing routing left by an earlier TPROXY config");
        }
        match make(step, env) {
            Ok(()) => {
                changed.push(step.to_string());
                done.push(step.clone());
            }
            Err((failure, made)) => {
                if made {
                    done.push(step.clone());
                }
                return Err(IpFailed {
                    step: step.clone(),
                    failure,
                    done,
                });
            }
        }
    }
    Ok(done)
}

/// What undoing one change found.
#[derive(Debug, thiserror::Error)]
#[error("undoing `{step}` (`{undo}`): {}", with_causes(.failure))]
pub struct UndoError {
    pub step: Step,
    pub undo: Step,
    /// Printed in the message, so not exposed as `source` too.
    pub failure: StepFailure,
}

/// Undoes `done`, newest first (so a removed route comes back before the rule that looks it
/// up), checking each by reading the kernel again; goes on past a failure and returns all of
/// them.
pub fn undo(done: &[IpChange], env: &mut Env<'_>) -> Vec<UndoError> {
    let mut failures = Vec::new();
    for step in done.iter().rev() {
        let undo = step.undo();
        tracing::info!(command = %undo, "rolling back");
        if let Err((failure, _)) = make(&undo, env) {
            failures.push(UndoError {
                step: step.clone(),
                undo,
                failure,
            });
        }
    }
    failures
}

/// A removal a cleanup could not make.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("removing `{step}`: {}", with_causes(.failure))]
    Step {
        step: Step,
        /// Printed in the message, so not exposed as `source` too.
        failure: StepFailure,
    },
    #[error("removing the TPROXY routing and ::6")]
    Read(#[source] ReadError),
}

/// Removes `configured` (the config's own steps) and whatever TPROXY routing earlier runs
/// added with other marks and tables (found over netlink); rules before the routes they use.
/// Goes on past a failure; `removed` gets each change made.
pub fn remove_all(
    configured: &[IpCommand],
    mark_and_table: TproxyRouting,
    env: &mut Env<'_>,
    removed: &mut Vec<String>,
) -> Vec<RemoveError> {
    let mut errors = Vec::new();
    let mut steps: Vec<Step> = Vec::new();
    for family in [Family::V4, Family::V6] {
        match ip::routing(family, env.probe) {
            // Duplicates included, each by its priority.
            Ok(r) => steps.extend(
                ip::leftovers_at(family, &r, &[], mark_and_table)
                    .into_iter()
                    .map(|(command, priority)| Step {
                        command,
                        add: false,
                        priority,
                    }),
            ),
            Err(e) => errors.push(RemoveError::Read(e)),
        }
    }
    for c in configured {
        if !steps.iter().any(|s| &s.command == c) {
            steps.push(Step {
                command: c.clone(),
                add: false,
                priority: None,
            });
        }
    }
    steps.sort_by_key(|s| match s.command {
        IpCommand::RuleAdd { .. } => 0,
        IpCommand::RouteAddLocal { .. } => 1,
        IpCommand::AddInboundV6Address => 2,
    });
    for step in &steps {
        match ip::present(&step.command, step.priority, env.probe) {
            Ok(true) => match make(step, env) {
                Ok(()) => removed.push(step.to_string()),
                Err((failure, _)) => errors.push(RemoveError::Step {
                    step: step.clone(),
                    failure,
                }),
            },
            Ok(false) => {}
            Err(e) => errors.push(RemoveError::Read(e)),
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NoResolver;
    use crate::system::exec::{ExecError, Runner};
    use crate::system::rtnl::{Routing, Rule};
    use crate::system::rtnl_change::{Rtnl, Target};
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    struct NoPrograms;
    impl Runner for NoPrograms {
        fn run(&mut self, p: &str, _: &[String], _: Option<&str>) -> Result<String, ExecError> {
            panic!("no program may run, but {p} was");
        }
    }

    /// A kernel in memory: its rules, `local default dev lo` tables and `::6`, changed by
    /// the requests it accepts. `refuse`: the request of that index fails (after taking
    /// effect when `takes` is set).
    #[derive(Default)]
    struct Kernel {
        rules: Vec<(u32, u32, u32)>,
        tables: BTreeSet<u32>,
        v6: bool,
        calls: Vec<(bool, Target)>,
        refuse: Option<usize>,
        takes: bool,
    }

    struct View<'a>(&'a RefCell<Kernel>);
    struct Writer<'a>(&'a RefCell<Kernel>);

    impl crate::system::host_view::Probe for View<'_> {
        fn in_path(&self, _: &str) -> bool {
            false
        }
        fn legacy_tables(&self, _: Family) -> Vec<String> {
            vec![]
        }
        fn routing(&self, family: Family) -> Option<Routing> {
            let k = self.0.borrow();
            if family == Family::V6 {
                return Some(Routing::default());
            }
            Some(Routing {
                rules: k
                    .rules
                    .iter()
                    .map(|&(priority, mark, table)| Rule {
                        priority,
                        mark: Some(mark),
                        table,
                        ..Rule::default()
                    })
                    .collect(),
                local_default_tables: k.tables.clone(),
                tables_with_routes: k.tables.clone(),
            })
        }
        fn lo_has_v6_host_address(&self, _: std::net::Ipv6Addr) -> Option<bool> {
            Some(self.0.borrow().v6)
        }
    }

    impl Rtnl for Writer<'_> {
        fn change(&mut self, add: bool, target: &Target) -> Result<(), RtnlError> {
            let mut k = self.0.borrow_mut();
            k.calls.push((add, *target));
            let refused = k.refuse == Some(k.calls.len() - 1);
            if refused && !k.takes {
                return Err(RtnlError::Refused(std::io::Error::from_raw_os_error(13)));
            }
            match *target {
                Target::Rule {
                    mark,
                    table,
                    priority,
                    ..
                } => {
                    if add {
                        let p = priority.unwrap_or(32000 - k.rules.len() as u32);
                        k.rules.push((p, mark, table));
                    } else if let Some(i) = k.rules.iter().position(|&(p, m, t)| {
                        m == mark && t == table && priority.is_none_or(|x| x == p)
                    }) {
                        k.rules.remove(i);
                    }
                }
                Target::LocalDefaultRoute { table, .. } => {
                    if add {
                        k.tables.insert(table);
                    } else {
                        k.tables.remove(&table);
                    }
                }
                Target::LoV6HostAddress(_) => k.v6 = add,
            }
            if refused {
                return Err(RtnlError::Refused(std::io::Error::from_raw_os_error(17)));
            }
            Ok(())
        }
    }

    const CONFIGURED: TproxyRouting = TproxyRouting {
        mark: 1337,
        table: 133,
    };

    fn run(kernel: &RefCell<Kernel>, wanted: &[IpCommand]) -> Result<Vec<IpChange>, IpFailed> {
        let steps = plan(wanted, CONFIGURED, &View(kernel)).unwrap();
        let mut w = Writer(kernel);
        let mut env = Env {
            runner: &mut NoPrograms,
            probe: &View(kernel),
            nf: &mut crate::system::nftprobe::NoWrites,
            rtnl: &mut w,
            resolver: &NoResolver,
        };
        let mut changed = Vec::new();
        match apply(&steps, &mut env, &mut changed) {
            Ok(done) => Ok(done),
            Err(f) => {
                let failures = undo(&f.done, &mut env);
                assert!(failures.is_empty(), "{failures:?}");
                Err(f)
            }
        }
    }

    fn tproxy_v4(mark: u32, table: u32) -> Vec<IpCommand> {
        vec![
            IpCommand::RuleAdd {
                family: Family::V4,
                mark,
                table,
            },
            IpCommand::RouteAddLocal {
                family: Family::V4,
                table,
            },
        ]
    }

    #[test]
    fn routes_go_in_before_the_rules_that_use_them() {
        let k = RefCell::new(Kernel::default());
        run(&k, &tproxy_v4(1337, 133)).unwrap();
        let k = k.into_inner();
        assert!(matches!(
            k.calls[0],
            (true, Target::LocalDefaultRoute { table: 133, .. })
        ));
        assert!(matches!(
            k.calls[1],
            (true, Target::Rule { mark: 1337, .. })
        ));
        assert_eq!(k.tables, BTreeSet::from([133]));
    }

    /// TPROXY -> another mark and table, failing at the new rule: the old rule and route
    /// come back (route first), the new route goes; no rule into an empty table.
    #[test]
    fn a_failed_change_of_mark_and_table_puts_the_route_back_before_its_rule() {
        let k = RefCell::new(Kernel {
            rules: vec![(32765, 1337, 133)],
            tables: [133].into(),
            // del rule, del route, add route 140, add rule 1400 (refused)
            refuse: Some(3),
            ..Kernel::default()
        });
        let e = run(&k, &tproxy_v4(1400, 140)).unwrap_err();
        assert_eq!(e.step.to_string(), "ip -4 rule add fwmark 1400 lookup 140");
        let k = k.into_inner();
        assert_eq!(k.rules, vec![(32765, 1337, 133)]);
        assert_eq!(k.tables, BTreeSet::from([133]));
        let adds: Vec<&Target> = k.calls[4..].iter().map(|(_, t)| t).collect();
        assert!(
            matches!(
                adds[..],
                [
                    Target::LocalDefaultRoute { table: 140, .. },
                    Target::LocalDefaultRoute { table: 133, .. },
                    Target::Rule {
                        mark: 1337,
                        priority: Some(32765),
                        ..
                    }
                ]
            ),
            "{adds:?}"
        );
    }

    /// A change that takes effect and still reports a failure is undone too: reading back
    /// shows it, and the message names the step.
    #[test]
    fn a_change_that_took_and_failed_is_undone() {
        let k = RefCell::new(Kernel {
            refuse: Some(0),
            takes: true,
            ..Kernel::default()
        });
        let e = run(&k, &[IpCommand::AddInboundV6Address]).unwrap_err();
        assert_eq!(e.step.to_string(), "ip -6 addr add ::6/128 dev lo");
        assert_eq!(e.done.len(), 1);
        assert!(!k.borrow().v6, "::6 is still on lo");
        // A removal is named as one.
        let k = RefCell::new(Kernel {
            rules: vec![(100, 1337, 133)],
            tables: [133].into(),
            refuse: Some(1),
            takes: true,
            ..Kernel::default()
        });
        let e = run(&k, &[]).unwrap_err();
        assert_eq!(
            e.step.to_string(),
            "ip -4 route del local default dev lo table 133"
        );
        let k = k.into_inner();
        assert_eq!(
            (k.rules, k.tables),
            (vec![(100, 1337, 133)], BTreeSet::from([133]))
        );
    }

    #[test]
    fn undo_failures_say_which_step_and_why() {
        let e = UndoError {
            step: Step {
                command: IpCommand::AddInboundV6Address,
                add: true,
                priority: None,
            },
            undo: Step {
                command: IpCommand::AddInboundV6Address,
                add: false,
                priority: None,
            },
            failure: StepFailure::Netlink(RtnlError::Refused(std::io::Error::from_raw_os_error(1))),
        };
        assert_eq!(
            e.to_string(),
            "undoing `ip -6 addr add ::6/128 dev lo` (`ip -6 addr del ::6/128 dev lo`): over \
             rtnetlink: the kernel refused it: Operation not permitted (os error 1)"
        );
    }
}
