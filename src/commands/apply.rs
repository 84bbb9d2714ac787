//! Applying a config, and `--cleanup-only`, with either backend.
//!
//! An apply reads the chosen backend's places and the other backend's state of ours, works
//! out both transactions (the config's rules; the removal of everything of ours in the other
//! backend) before anything changes, then commits in the order that keeps the pod captured
//! throughout: the chosen backend, the `ip` steps, the other backend's removal. When any
//! step fails, everything done is put back (`ip` changes, the other backend, the chosen one)
//! and read again to prove it before the error says so.

use crate::backend::{Backend, Policy, Rollback, Scope, StepError, Summary};
use crate::config::{Config, HostFacts};
use crate::routes::apply::{self as route_steps, IpFailed, PlanError, RemoveError, StepFailure};
use crate::routes::{self, IpCommand, TproxyRouting};
use crate::system::Env;
use crate::system::exec::ExecError;
use crate::system::signals::Caught;

/// A failed apply. Every variant says the phase; a failure after the first change says
/// whether the earlier steps were put back.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Before anything changed: a check, a read or the plan.
    #[error("{error}")]
    Before {
        /// Printed in the message, so not exposed as `source` too.
        error: Box<dyn StepError>,
    },
    /// `--reconcile=false`, and the other backend holds capture state of ours.
    #[error(
        "the namespace already holds different capture rules ({detail}); nothing was changed. \
         Run with --reconcile=true (the default) to replace them, or remove them first with \
         --cleanup-only"
    )]
    OtherBackend { detail: String },
    /// A commit failed; `rollback` says what was put back.
    #[error("{error}; {rollback}")]
    Commit {
        /// Printed in the message, so not exposed as `source` too.
        error: Box<dyn StepError>,
        rollback: String,
    },
    /// Reading the routing before any change failed.
    #[error("{}; nothing was changed", route_steps::with_causes(.0))]
    Routes(PlanError),
    #[error("configuring routes: `{step}`: {}; {rollback}", route_steps::with_causes(.failure))]
    Ip {
        /// The step, as the `ip` command Istio prints for it.
        step: String,
        /// Printed in the message, so not exposed as `source` too.
        failure: Box<StepFailure>,
        rollback: String,
    },
    /// SIGTERM or SIGINT stopped the run at a safe point (`error`: the step it stopped, or
    /// the signal between two steps); `rollback` says what was put back.
    #[error("{error}; {rollback}")]
    Stopped {
        /// Printed in the message, so not exposed as `source` too.
        error: Box<dyn StepError>,
        rollback: String,
    },
}

/// A signal between two steps is a step's failure too.
impl StepError for ExecError {}

impl ApplyError {
    /// `--reconcile=false` met different state (exit code 4).
    pub fn is_conflict(&self) -> bool {
        match self {
            ApplyError::Before { error } => error.is_conflict(),
            ApplyError::OtherBackend { .. } => true,
            ApplyError::Commit { .. }
            | ApplyError::Ip { .. }
            | ApplyError::Routes(_)
            | ApplyError::Stopped { .. } => false,
        }
    }
}

fn before(error: impl StepError) -> ApplyError {
    ApplyError::Before {
        error: Box::new(error),
    }
}

/// How to apply: the parts of the config that are not rules.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// `--reconcile` / `--force-apply`.
    pub policy: Policy,
    /// This config's TPROXY mark and routing table.
    pub tproxy: TproxyRouting,
}

impl Options {
    pub fn from_config(cfg: &Config) -> Options {
        Options {
            policy: Policy {
                reconcile: cfg.reconcile,
                force: cfg.force_apply,
            },
            tproxy: TproxyRouting::of(cfg),
        }
    }
}

/// Applies `cfg` with `chosen`, and removes our state from `other`.
///
/// A SIGTERM or SIGINT ([`crate::system::signals`]) stops it at the next safe point: the
/// program running then is killed (or the next one does not start), or it is seen between
/// two steps; what was done is then put back as for a failure ([`ApplyError::Stopped`] when
/// no step failed of it).
pub fn apply<C: Backend, O: Backend>(
    chosen: &C,
    other: &O,
    cfg: &Config,
    facts: &HostFacts,
    opts: &Options,
    env: &mut Env<'_>,
) -> Result<Summary, ApplyError> {
    match apply_steps(chosen, other, cfg, facts, opts, env) {
        // A read or check the signal stopped: nothing had changed.
        Err(ApplyError::Before { error }) if env.runner.stop_signal().is_some() => {
            Err(ApplyError::Stopped {
                error,
                rollback: "nothing was changed".into(),
            })
        }
        r => r,
    }
}

/// What an apply reads before it changes anything: the config's rules, the chosen
/// backend's places and the other backend's state of ours (doctor shows the same snapshot).
pub struct Snapshot<C: Backend, O: Backend> {
    pub rules: C::Rules,
    pub state: C::State,
    pub other_state: O::State,
}

/// What an apply would commit, worked out from a [`Snapshot`] before anything changes.
pub struct Planned<C: Backend, O: Backend> {
    change: C::Change,
    removal: O::Change,
    route_plan: Vec<route_steps::Step>,
}

/// The apply's reads: the backend's own checks, then every place (nothing is changed).
pub fn read<C: Backend, O: Backend>(
    chosen: &C,
    other: &O,
    cfg: &Config,
    facts: &HostFacts,
    env: &mut Env<'_>,
) -> Result<Snapshot<C, O>, ApplyError> {
    chosen.check(env).map_err(before)?;
    let rules = chosen.build(cfg, facts);
    let state = chosen
        .read(Scope::Config(&facts.families()), env)
        .map_err(before)?;
    let other_state = other.read(Scope::Everything, env).map_err(before)?;
    Ok(Snapshot {
        rules,
        state,
        other_state,
    })
}

/// The apply's plan from `snap`: both transactions and the `ip` steps, or why the apply
/// would stop before its first change (nothing is changed). Without --reconcile but with
/// --force-apply, the other backend's state is left as it is (`snap` then holds none).
pub fn plan<C: Backend, O: Backend>(
    chosen: &C,
    other: &O,
    cfg: &Config,
    facts: &HostFacts,
    opts: &Options,
    snap: &mut Snapshot<C, O>,
    env: &Env<'_>,
) -> Result<Planned<C, O>, ApplyError> {
    let change = chosen
        .plan(&snap.rules, &snap.state, opts.policy, env)
        .map_err(before)?;
    let mut removal = other
        .plan_removal(cfg, facts, &snap.other_state, env)
        .map_err(before)?;
    let leftovers = other.describe(&snap.other_state, &removal);
    if !opts.policy.reconcile && !leftovers.is_empty() {
        if !opts.policy.force {
            return Err(ApplyError::OtherBackend {
                detail: leftovers.join("; "),
            });
        }
        // Istio's own behaviour: its rules on top, nothing else removed (nor restored).
        snap.other_state = O::State::default();
        removal = other
            .plan_removal(cfg, facts, &snap.other_state, env)
            .map_err(before)?;
    }
    let route_plan = route_steps::plan(chosen.routes(&snap.rules), opts.tproxy, env.probe)
        .map_err(ApplyError::Routes)?;
    Ok(Planned {
        change,
        removal,
        route_plan,
    })
}

fn apply_steps<C: Backend, O: Backend>(
    chosen: &C,
    other: &O,
    cfg: &Config,
    facts: &HostFacts,
    opts: &Options,
    env: &mut Env<'_>,
) -> Result<Summary, ApplyError> {
    let mut snap = read(chosen, other, cfg, facts, env)?;
    let Planned {
        mut change,
        mut removal,
        route_plan,
    } = plan(chosen, other, cfg, facts, opts, &mut snap, env)?;
    let Snapshot {
        state, other_state, ..
    } = snap;

    // The last safe point before the first change.
    env.runner.check_stop().map_err(before)?;
    let mut summary = Summary::default();
    if let Err(error) = chosen.commit(&state, &mut change, env, &mut summary) {
        let mut rollback = Rollback::default();
        chosen.restore(&state, &change, false, env, &mut rollback);
        return Err(ApplyError::Commit {
            error: Box::new(error),
            rollback: rollback.describe(),
        });
    }

    if let Err(error) = env.runner.check_stop() {
        let mut rollback = Rollback::default();
        chosen.restore(&state, &change, false, env, &mut rollback);
        return Err(stopped(error, rollback));
    }

    let done = match route_steps::apply(&route_plan, env, &mut summary.ip_changed) {
        Ok(done) => done,
        Err(IpFailed {
            step,
            failure,
            done,
        }) => {
            let mut rollback = undo_routes(&done, env);
            chosen.restore(&state, &change, false, env, &mut rollback);
            return Err(ApplyError::Ip {
                step: step.to_string(),
                failure: Box::new(failure),
                rollback: rollback.describe(),
            });
        }
    };

    if let Err(error) = env.runner.check_stop() {
        let mut rollback = undo_routes(&done, env);
        chosen.restore(&state, &change, false, env, &mut rollback);
        return Err(stopped(error, rollback));
    }

    // The other backend's state of ours goes last, once this config captures.
    let removed = other
        .commit(&other_state, &mut removal, env, &mut summary)
        .map_err(|e| -> Box<dyn StepError> { Box::new(e) })
        // A signal during the last step undoes the whole run too: exiting with the signal's
        // code always means put back (or "rerun to repair").
        .and_then(|()| env.runner.check_stop().map_err(|e| Box::new(e) as _));
    if let Err(error) = removed {
        let mut rollback = undo_routes(&done, env);
        other.restore(&other_state, &removal, false, env, &mut rollback);
        chosen.restore(&state, &change, true, env, &mut rollback);
        return Err(ApplyError::Commit {
            error,
            rollback: rollback.describe(),
        });
    }
    Ok(summary)
}

fn stopped(error: ExecError, rollback: Rollback) -> ApplyError {
    ApplyError::Stopped {
        error: Box::new(error),
        rollback: rollback.describe(),
    }
}

/// Undoes `ip` changes (newest first), checked by reading the kernel again.
fn undo_routes(done: &[route_steps::IpChange], env: &mut Env<'_>) -> Rollback {
    let failures = route_steps::undo(done, env);
    Rollback {
        restored: Vec::new(),
        failures: failures.iter().map(ToString::to_string).collect(),
        routes: !done.is_empty(),
    }
}

/// One failure of a cleanup, which goes on past it (see [`cleanup`]).
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// A backend could not read or remove its state.
    #[error("{0}")]
    Backend(Box<dyn StepError>),
    #[error(transparent)]
    Route(#[from] RemoveError),
    /// A signal stopped the cleanup between two of its parts.
    #[error("{signal} stopped the cleanup before it was done; rerun --cleanup-only to finish")]
    Stopped { signal: Caught },
}

/// Removes every ISTIO_* chain and jump (and our other built-in chain rules) on every
/// iptables flavour and family that holds them, our native nftables tables, then the `ip`
/// steps of this config and whatever TPROXY routing earlier runs added. Keeps going after a
/// failure and reports all of them.
pub fn cleanup<C: Backend, O: Backend>(
    chosen: &C,
    other: &O,
    cfg: &Config,
    facts: &HostFacts,
    env: &mut Env<'_>,
) -> Result<Summary, Vec<CleanupError>> {
    let mut summary = Summary::default();
    let mut errors = Vec::new();
    // Stops between its parts once a signal came (a program it killed failed its part).
    let stop = |env: &Env<'_>, errors: &mut Vec<CleanupError>| match env.runner.stop_signal() {
        Some(signal) => {
            errors.push(CleanupError::Stopped { signal });
            true
        }
        None => false,
    };
    for e in chosen.remove_everything(cfg, facts, env, &mut summary) {
        errors.push(CleanupError::Backend(Box::new(e)));
    }
    if stop(env, &mut errors) {
        return Err(errors);
    }
    for e in other.remove_everything(cfg, facts, env, &mut summary) {
        errors.push(CleanupError::Backend(Box::new(e)));
    }
    if stop(env, &mut errors) {
        return Err(errors);
    }
    let configured: Vec<IpCommand> = routes::teardown(cfg);
    errors.extend(
        route_steps::remove_all(
            &configured,
            TproxyRouting::of(cfg),
            env,
            &mut summary.ip_changed,
        )
        .into_iter()
        .map(CleanupError::Route),
    );
    if errors.is_empty() {
        Ok(summary)
    } else {
        Err(errors)
    }
}

/// The capabilities a run with `chosen` needs, `other`'s state of ours included.
pub fn capabilities_needed<C: Backend, O: Backend>(
    chosen: &C,
    other: &O,
) -> Vec<crate::system::host::Capability> {
    let mut needed = chosen.capabilities(&crate::system::host_view::SystemProbe);
    needed.extend(other.capabilities(&crate::system::host_view::SystemProbe));
    needed
}

/// [`capabilities_needed`], checked against those this process holds.
pub fn check_capabilities<C: Backend, O: Backend>(
    chosen: &C,
    other: &O,
) -> Result<(), crate::system::host::MissingCapabilities> {
    crate::system::host::check_caps(&capabilities_needed(chosen, other))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::iptables::Iptables;
    use crate::backend::nft::Nftables;
    use crate::config::tests::build as config;
    use crate::model::Family;
    use crate::model::NoResolver;
    use crate::system::exec::ExecError;
    use crate::system::exec::Runner;
    use crate::system::host_view::{NftOnly, Probe};
    use crate::system::nftprobe::{NfChain, NfFamily, NfTable, NfTables, NfWrite};
    use std::collections::BTreeMap;

    /// A fake machine: programs answer from a script of (program prefix, stdout, fail?).
    #[derive(Default)]
    struct Fake {
        calls: Vec<(String, Vec<String>, Option<String>)>,
        save_output: String,
        /// Successive outputs of one save program, before falling back to `save_output`.
        saves: BTreeMap<String, std::collections::VecDeque<String>>,
        fail_program: Option<String>,
        /// A signal comes once this many programs have run (said once by `check_stop`).
        signal_after: Option<usize>,
        signal_said: bool,
    }

    impl Runner for Fake {
        fn check_stop(&mut self) -> Result<(), ExecError> {
            if self.stop_signal().is_some() && !self.signal_said {
                self.signal_said = true;
                return Err(ExecError::Stopped {
                    signal: Caught::Term,
                    command: None,
                    killed: false,
                });
            }
            Ok(())
        }

        fn stop_signal(&self) -> Option<Caught> {
            self.signal_after
                .filter(|n| self.calls.len() >= *n)
                .map(|_| Caught::Term)
        }

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

    /// iptables-nft installed (no `nft`); netlink shows no native nftables table, and the
    /// `ip` family's structure read after read from `ip_structures` (then none).
    #[derive(Default)]
    struct NftInstalled {
        ip_structures: std::cell::RefCell<std::collections::VecDeque<NfTables>>,
    }
    impl Probe for NftInstalled {
        fn in_path(&self, p: &str) -> bool {
            p.contains("-nft-")
        }
        fn legacy_tables(&self, _: Family) -> Vec<String> {
            vec![]
        }
        fn nft_inet_tables(&self) -> Option<Vec<String>> {
            Some(vec![])
        }
        fn nft_structure(&self, family: NfFamily) -> Option<NfTables> {
            match family {
                NfFamily::Ip => self.ip_structures.borrow_mut().pop_front(),
                _ => None,
            }
        }
        fn routing(&self, _: Family) -> Option<crate::system::rtnl::Routing> {
            Some(crate::system::rtnl::Routing::default())
        }
        fn lo_has_v6_host_address(&self, _: std::net::Ipv6Addr) -> Option<bool> {
            Some(false)
        }
    }

    /// Records the nf_tables changes asked for, and makes them.
    #[derive(Default)]
    struct Recording(Vec<String>);
    impl NfWrite for Recording {
        fn delete_table(&mut self, family: NfFamily, name: &str) -> Result<(), nix::errno::Errno> {
            self.0
                .push(format!("delete table {} {name}", family.name()));
            Ok(())
        }
        fn set_table_flags(
            &mut self,
            family: NfFamily,
            name: &str,
            flags: u32,
        ) -> Result<(), nix::errno::Errno> {
            self.0
                .push(format!("flags {} {name} {flags}", family.name()));
            Ok(())
        }
    }

    const OPTS: Options = Options {
        tproxy: TproxyRouting {
            mark: 1337,
            table: 133,
        },
        policy: Policy {
            reconcile: true,
            force: false,
        },
    };

    const IPTABLES: Iptables = Iptables {
        flavor: None,
        lock_wait_secs: 10,
    };

    /// Applies `argv`/`env` with iptables through the fake runner.
    fn apply_with(
        argv: &[&str],
        vars: &[(&str, &str)],
        opts: &Options,
        probe: &dyn Probe,
        fake: &mut Fake,
    ) -> Result<Summary, ApplyError> {
        let (cfg, facts) = config(argv, vars).unwrap();
        apply(
            &IPTABLES,
            &Nftables,
            &cfg,
            &facts,
            opts,
            &mut Env {
                runner: fake,
                probe,
                nf: &mut crate::system::nftprobe::NoWrites,
                rtnl: &mut crate::system::rtnl_change::fake::Recorder::default(),
                resolver: &NoResolver,
            },
        )
    }

    /// Legacy rules in a namespace without nft tables: the apply goes to legacy, and runs
    /// no nft program. An empty legacy table (what `iptables-legacy -L` leaves) does not
    /// count (istio#61024): the apply then goes to nft.
    #[test]
    fn legacy_rules_without_nft_tables_apply_with_legacy() {
        struct LegacyOnly;
        impl Probe for LegacyOnly {
            fn in_path(&self, _: &str) -> bool {
                true
            }
            fn legacy_tables(&self, family: Family) -> Vec<String> {
                match family {
                    Family::V4 => vec!["nat".into(), "filter".into()],
                    Family::V6 => vec![],
                }
            }
            fn lo_has_v6_host_address(&self, _: std::net::Ipv6Addr) -> Option<bool> {
                Some(false)
            }
            fn nft_tables(&self, _: Family) -> Option<usize> {
                Some(0)
            }
            fn nft_inet_tables(&self) -> Option<Vec<String>> {
                Some(vec![])
            }
            fn routing(&self, _: Family) -> Option<crate::system::rtnl::Routing> {
                Some(crate::system::rtnl::Routing::default())
            }
        }
        let empty = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n";
        for (legacy, restore) in [
            (
                format!("{empty}*raw\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j ACCEPT\nCOMMIT\n"),
                "iptables-legacy-restore",
            ),
            (empty.to_string(), "iptables-nft-restore"),
        ] {
            let mut fake = Fake::default();
            fake.saves.insert(
                "iptables-legacy-save".into(),
                [legacy].into_iter().collect(),
            );
            apply_with(
                &["-p", "15001", "-b", "*"],
                &[],
                &OPTS,
                &LegacyOnly,
                &mut fake,
            )
            .unwrap();
            let ran: Vec<&str> = fake.calls.iter().map(|c| c.0.as_str()).collect();
            assert_eq!(ran, ["iptables-legacy-save", restore]);
        }
    }

    /// Every place is read (this probe cannot count nft tables, so IPv6 is read too, though
    /// IPv6 is off), one restore where the rules go.
    #[test]
    fn fresh_apply_reads_every_place_and_runs_one_restore() {
        let mut fake = Fake::default();
        let s = apply_with(&["-b", "*", "-i", "*"], &[], &OPTS, &NftOnly, &mut fake).unwrap();
        let programs: Vec<&str> = fake.calls.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(
            programs,
            vec![
                "iptables-nft-save",
                "ip6tables-nft-save",
                "iptables-nft-restore"
            ]
        );
        assert_eq!(fake.calls[2].1, vec!["--noflush"]);
        assert_eq!(s.committed.len(), 1);
        assert!(s.committed[0].starts_with("iptables"), "{:?}", s.committed);
    }

    #[test]
    fn failed_ipv6_commit_restores_ipv4() {
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
        // The kernel's list of tables: none before, nat after the IPv4 commit, none after
        // the rollback.
        let nat = NfTables {
            tables: vec![NfTable {
                name: "nat".into(),
                chains: vec![NfChain {
                    name: "ISTIO_INBOUND".into(),
                    base: None,
                    rules: None,
                }],
                ..NfTable::default()
            }],
        };
        let probe = NftInstalled {
            ip_structures: vec![NfTables::default(), nat, NfTables::default()]
                .into_iter()
                .collect::<std::collections::VecDeque<_>>()
                .into(),
        };
        let mut nf = Recording::default();
        let vars = [("ENABLE_INBOUND_IPV6", "true")];
        let (cfg, facts) = config(&["-b", "*"], &vars).unwrap();
        let e = apply(
            &IPTABLES,
            &Nftables,
            &cfg,
            &facts,
            &OPTS,
            &mut Env {
                runner: &mut fake,
                probe: &probe,
                nf: &mut nf,
                rtnl: &mut crate::system::rtnl_change::fake::Recorder::default(),
                resolver: &NoResolver,
            },
        )
        .unwrap_err();
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
        // The IPv4 nat table did not exist before (netlink showed none): it is dropped over
        // netlink, not left empty, and without the nft program.
        assert_eq!(nf.0, vec!["delete table ip nat"]);
        // No ip or nft command ran.
        assert!(!fake.calls.iter().any(|c| c.0 == "ip" || c.0 == "nft"));
    }

    #[test]
    fn a_rollback_that_does_not_take_says_what_is_left() {
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
        let vars = [("ENABLE_INBOUND_IPV6", "true")];
        let msg = apply_with(&["-b", "*"], &vars, &OPTS, &NftOnly, &mut fake)
            .unwrap_err()
            .to_string();
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

    /// A signal after the reads stops the run before the first change; one after the IPv4
    /// commit puts IPv4 back (re-read to prove it), and nothing after it runs.
    #[test]
    fn a_signal_stops_at_the_next_safe_point_and_rolls_back() {
        let mut fake = Fake {
            signal_after: Some(2),
            ..Default::default()
        };
        let msg = apply_with(
            &["-b", "*"],
            &[],
            &OPTS,
            &NftInstalled::default(),
            &mut fake,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(msg, "stopped by SIGTERM; nothing was changed");
        assert!(fake.calls.iter().all(|c| c.0.ends_with("-save")));

        let committed = "*nat\n:PREROUTING ACCEPT [0:0]\n:ISTIO_INBOUND - [0:0]\nCOMMIT\n";
        let mut fake = Fake {
            signal_after: Some(3),
            saves: BTreeMap::from([(
                "iptables-nft-save".to_string(),
                ["", committed, ""].map(String::from).into(),
            )]),
            ..Default::default()
        };
        let e = apply_with(
            &["-b", "*"],
            &[],
            &OPTS,
            &NftInstalled::default(),
            &mut fake,
        )
        .unwrap_err();
        assert!(matches!(e, ApplyError::Stopped { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("stopped by SIGTERM; the previous state was restored (IPv4; checked"),
            "{msg}"
        );
        let ran: Vec<&str> = fake.calls.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(
            ran,
            [
                "iptables-nft-save",
                "ip6tables-nft-save",
                "iptables-nft-restore",
                "iptables-nft-save",
                "iptables-nft-save"
            ],
            "the rollback, and nothing else, after the signal"
        );
    }

    #[test]
    fn conflict_without_reconcile_changes_nothing() {
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
        let e = apply_with(&["-b", "8080"], &[], &opts, &NftOnly, &mut fake).unwrap_err();
        assert!(e.is_conflict(), "{e}");
        assert!(fake.calls.iter().all(|c| c.0.ends_with("-save")));
    }
}
