//! The iptables backend: Istio's `istio-iptables` rules ([`build`]), their iptables-restore
//! text ([`restore`]) and `--dry-run` script ([`script`]), iptables-save read back
//! ([`save`]), one transaction per family that leaves exactly the wanted state ([`plan`]),
//! the programs that commit and restore it ([`commit`]), and a packet's walk through saved
//! rules ([`walk`]).

pub mod build;
pub mod commit;
pub mod detect;
pub mod plan;
pub mod restore;
pub mod save;
pub mod script;
pub mod walk;

use self::build::Plan;
use self::commit::{Error, Place, read_state, roll_back};
use self::detect::{self as detection, Program};
use self::plan::Transaction;
use crate::backend::walk::Source;
use crate::backend::{Backend, Drift, Over, Policy, Purpose, Rollback, Scope, Summary};
use crate::config::{Config, Flavor, HostFacts};
use crate::model::{Family, OwnerResolver, Table, chain};
use crate::routes::IpCommand;
use crate::system::Env;
use crate::system::exec::ExecError;

/// iptables, in the flavour `--force-iptables-binary` names or detection picks per family.
#[derive(Debug, Clone, Copy)]
pub struct Iptables {
    /// `--force-iptables-binary`.
    pub flavor: Option<Flavor>,
    /// Seconds to wait for the xtables lock (legacy).
    pub lock_wait_secs: u32,
}

/// The families read, each in every flavour that was read.
#[derive(Debug, Default)]
pub struct State {
    pub places: Vec<Place>,
}

/// One transaction per place (empty ones included: a family already in place).
#[derive(Debug)]
pub struct Change {
    purpose: Purpose,
    txs: Vec<Transaction>,
    /// Per place: a commit was attempted, so the place may have changed even if it failed.
    attempted: Vec<bool>,
}

impl Iptables {
    /// The flavours of `family` that may hold state of ours, whether or not detection would
    /// pick them (a forced flavour: only it).
    fn programs_with_state(&self, family: Family, env: &Env<'_>) -> Vec<Program> {
        let mut programs: Vec<Program> = Vec::new();
        match detection::detect(family, self.flavor, env.probe) {
            Ok(p) => programs.push(p),
            Err(e) => tracing::debug!("{family}: {e}"),
        }
        if self.flavor.is_none() {
            for f in [Flavor::Legacy, Flavor::Nft] {
                if programs.iter().any(|p| p.flavor == Some(f)) {
                    continue;
                }
                let may_hold = match f {
                    Flavor::Nft => {
                        env.probe.nft_chain_with_prefix(family, chain::PREFIX) != Some(false)
                    }
                    Flavor::Legacy => !env.probe.legacy_tables(family).is_empty(),
                };
                if may_hold && let Ok(p) = detection::detect(family, Some(f), env.probe) {
                    programs.push(p);
                }
            }
        }
        programs
    }
}

impl Backend for Iptables {
    type Rules = Plan;
    type State = State;
    type Change = Change;
    type Error = Error;

    fn name(&self) -> &'static str {
        "iptables"
    }

    fn build(&self, cfg: &Config, facts: &HostFacts) -> Plan {
        build::build(cfg, facts)
    }

    fn routes<'r>(&self, rules: &'r Plan) -> &'r [IpCommand] {
        &rules.ip
    }

    fn script(&self, cfg: &Config, facts: &HostFacts, rules: &Plan) -> String {
        script::render(cfg, facts, rules)
    }

    fn check(&self, _env: &Env<'_>) -> Result<(), Error> {
        // The programs are found per family by the read.
        Ok(())
    }

    fn read(&self, scope: Scope<'_>, env: &mut Env<'_>) -> Result<State, Error> {
        let mut places = Vec::new();
        match scope {
            Scope::Config(families) => {
                for &family in families {
                    let program = detection::detect(family, self.flavor, env.probe)
                        .map_err(|error| Error::Backend { family, error })?;
                    let before = read_state(&program, env.probe, env.runner)?;
                    places.push(Place { program, before });
                }
            }
            Scope::Everything => {
                for family in [Family::V4, Family::V6] {
                    for program in self.programs_with_state(family, env) {
                        let before = read_state(&program, env.probe, env.runner)?;
                        places.push(Place { program, before });
                    }
                }
            }
        }
        Ok(State { places })
    }

    fn plan(
        &self,
        rules: &Plan,
        state: &State,
        policy: Policy,
        env: &Env<'_>,
    ) -> Result<Change, Error> {
        let mut txs = Vec::new();
        for place in &state.places {
            let (family, program) = (place.program.family, &place.program);
            // The version is logged when the save printed it.
            match &place.before.version {
                Some(version) => {
                    tracing::info!(backend = %program.restore_program(), %version, reason = %program.reason, "{family} backend");
                }
                None => {
                    tracing::info!(backend = %program.restore_program(), reason = %program.reason, "{family} backend");
                }
            }
            let tx = plan::reconcile(&place.before, rules.rules(family), env.resolver, policy)
                .map_err(|error| Error::Conflict { family, error })?;
            txs.push(tx);
        }
        Ok(Change {
            purpose: Purpose::Apply,
            attempted: vec![false; txs.len()],
            txs,
        })
    }

    fn plan_removal(
        &self,
        cfg: &Config,
        facts: &HostFacts,
        state: &State,
        env: &Env<'_>,
    ) -> Change {
        // Built only when some iptables state may be ours (never in a fresh namespace).
        let mut ours: Option<Plan> = None;
        let mut txs = Vec::new();
        for place in &state.places {
            if place.before.tables.is_empty() {
                txs.push(Transaction::default());
                continue;
            }
            let ours = ours.get_or_insert_with(|| build::teardown(cfg, facts));
            let family = place.program.family;
            txs.push(plan::cleanup(
                &place.before,
                ours.rules(family),
                env.resolver,
            ));
        }
        Change {
            purpose: Purpose::Switch,
            attempted: vec![false; txs.len()],
            txs,
        }
    }

    fn describe(&self, state: &State, change: &Change) -> Vec<String> {
        state
            .places
            .iter()
            .zip(&change.txs)
            .filter(|(_, tx)| !tx.is_noop())
            .map(|(p, _)| {
                format!(
                    "{} ISTIO_* iptables rules ({})",
                    p.program.family,
                    p.program.restore_program()
                )
            })
            .collect()
    }

    fn commit(
        &self,
        state: &State,
        change: &mut Change,
        env: &mut Env<'_>,
        summary: &mut Summary,
    ) -> Result<(), Error> {
        for (i, place) in state.places.iter().enumerate() {
            let tx = &change.txs[i];
            let family = place.program.family;
            if tx.is_noop() {
                if change.purpose == Purpose::Apply {
                    tracing::info!("{family} rules are already in place: nothing to commit");
                }
                continue;
            }
            change.attempted[i] = true;
            commit::commit(place, tx, change.purpose, self.lock_wait_secs, env)?;
            summary.committed.push(family);
        }
        Ok(())
    }

    fn remove_everything(
        &self,
        cfg: &Config,
        facts: &HostFacts,
        env: &mut Env<'_>,
        summary: &mut Summary,
    ) -> Vec<Error> {
        let ours = build::teardown(cfg, facts);
        let mut errors = Vec::new();
        for family in [Family::V4, Family::V6] {
            for program in self.programs_with_state(family, env) {
                // ip6tables may be unusable where IPv6 is off: say so, but go on.
                let before = match read_state(&program, env.probe, env.runner) {
                    Ok(s) => s,
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                };
                let place = Place { program, before };
                let tx = plan::cleanup(&place.before, ours.rules(family), env.resolver);
                if tx.is_noop() {
                    continue;
                }
                match commit::commit(&place, &tx, Purpose::Cleanup, self.lock_wait_secs, env) {
                    Ok(()) => summary.committed.push(family),
                    Err(e) => errors.push(e),
                }
            }
        }
        errors
    }

    fn restore(
        &self,
        state: &State,
        change: &Change,
        every: bool,
        env: &mut Env<'_>,
        rollback: &mut Rollback,
    ) {
        for (place, _) in state
            .places
            .iter()
            .zip(&change.attempted)
            .filter(|(_, attempted)| every || **attempted)
        {
            match roll_back(place, self.lock_wait_secs, env) {
                Ok(true) => rollback.restored.push(place.program.family.to_string()),
                Ok(false) => {}
                Err(e) => rollback.failures.push(e.to_string()),
            }
        }
    }

    fn had_tproxy(&self, state: &State, family: Family) -> bool {
        state.places.iter().any(|p| {
            p.program.family == family
                && p.before
                    .table(Table::Mangle)
                    .is_some_and(|t| t.user_chains.iter().any(|c| c == chain::TPROXY))
        })
    }

    fn drift(&self, rules: &Plan, state: &State, resolver: &dyn OwnerResolver) -> Vec<Drift> {
        state
            .places
            .iter()
            .flat_map(|p| {
                let family = p.program.family;
                plan::diff(family, &p.before, rules.rules(family), resolver)
            })
            .collect()
    }

    fn leftovers(&self, env: &mut Env<'_>) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        for family in [Family::V4, Family::V6] {
            // Where no iptables is installed, none can hold rules.
            let Ok(program) = detection::detect(family, self.flavor, env.probe) else {
                continue;
            };
            match read_state(&program, env.probe, env.runner) {
                Ok(st) => out.extend(ours_in(family, &st)),
                Err(Error::Read {
                    error: ExecError::NotFound { .. },
                    ..
                }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn walk<'a>(
        &'a self,
        over: Over<'a, Plan, State>,
        family: Family,
        resolver: &'a dyn OwnerResolver,
    ) -> Vec<Source<'a>> {
        match over {
            Over::Config { rules, ipv6 } => vec![walk::config_source(
                rules.rules(family),
                family,
                ipv6,
                resolver,
            )],
            // Every flavour read, each a place of its own: the kernel runs them all.
            Over::Live(st) => st
                .places
                .iter()
                .filter(|p| p.program.family == family)
                .filter_map(|p| walk::live_source(p, resolver))
                .collect(),
        }
    }
}

/// Our iptables chains, and rules jumping to them, per table: one line each.
fn ours_in(family: Family, st: &save::SaveState) -> Vec<String> {
    let ours = |s: &str| s.starts_with(chain::PREFIX);
    let mut out = Vec::new();
    for (name, ts) in &st.tables {
        let chains: Vec<&str> = ts
            .user_chains
            .iter()
            .map(String::as_str)
            .filter(|c| ours(c))
            .collect();
        let rules = ts
            .rules
            .iter()
            .filter(|(c, toks)| ours(c) || toks.iter().any(|t| ours(t)))
            .count();
        if !chains.is_empty() || rules > 0 {
            out.push(format!(
                "{family} iptables table {name}: {rules} ISTIO_* rule(s), chains {}",
                if chains.is_empty() {
                    "-".to_string()
                } else {
                    chains.join(",")
                }
            ));
        }
    }
    out
}
