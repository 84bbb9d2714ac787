//! The iptables backend: Istio's `istio-iptables` rules ([`build`]), their iptables-restore
//! text ([`restore`]) and `--dry-run` script ([`script`]), iptables-save read back
//! ([`save`]), one transaction per family that leaves exactly the wanted state ([`plan`]),
//! the programs that commit and restore it ([`commit`]), and a packet's walk through saved
//! rules ([`walk`]).

pub mod build;
pub mod commit;
pub mod detect;
pub mod inventory;
pub mod kernel;
pub mod plan;
pub mod restore;
pub mod save;
pub mod script;
pub mod shadow;
pub mod walk;

use self::build::Plan;
use self::commit::{Error, Place, read_state, roll_back};
use self::detect::{self as detection, Program};
use self::plan::Transaction;
use crate::backend::walk::Source;
use crate::backend::{Backend, Drift, Inventory, Over, Policy, Purpose, Rollback, Scope, Summary};
use crate::config::{Config, Flavor, HostFacts};
use crate::model::{self, Family, Finding, OwnerResolver, Table, chain};
use crate::routes::IpCommand;
use crate::system::Env;
use crate::system::host::Capability;
use crate::system::host_view::Probe;

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
    /// Every place of `family` that may hold iptables state, read once: each installed
    /// flavour (nothing runs where a flavour has no tables), or the unflavoured programs
    /// where neither is installed. With `target`, the place the config's rules go to comes
    /// first, chosen as Istio does (detection needs the legacy save); the others follow when
    /// they hold anything.
    fn read_family(
        &self,
        family: Family,
        target: bool,
        env: &mut Env<'_>,
    ) -> Result<Vec<Place>, Error> {
        let mut read: Vec<Place> = Vec::new();
        for f in [Flavor::Legacy, Flavor::Nft] {
            let Some(program) = detection::installed(family, f, env.probe) else {
                continue;
            };
            let before = read_state(&program, env.probe, env.runner)?;
            read.push(Place {
                program,
                before,
                target: false,
            });
        }
        if target {
            let legacy_rules = read
                .iter()
                .find(|p| p.program.flavor == Some(Flavor::Legacy))
                .map(|p| p.before.tables_with_rules())
                .unwrap_or_default();
            let program = detection::detect(family, self.flavor, env.probe, &legacy_rules)
                .map_err(|error| Error::Backend { family, error })?;
            let place = match read.iter().position(|p| p.program.flavor == program.flavor) {
                Some(i) => {
                    let mut p = read.remove(i);
                    p.program = program;
                    p
                }
                None => Place {
                    before: read_state(&program, env.probe, env.runner)?,
                    program,
                    target: true,
                },
            };
            read.insert(
                0,
                Place {
                    target: true,
                    ..place
                },
            );
        }
        // A place whose save the kernel contradicts is kept too: it may hide ours.
        read.retain(|p| p.target || !p.before.is_empty() || !p.before.unreadable.is_empty());
        Ok(read)
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

    /// iptables-nft speaks nf_tables (CAP_NET_ADMIN); the legacy programs also open a raw
    /// socket (CAP_NET_RAW). They run where a family's rules go to legacy (forced, or
    /// detected without the legacy read: nft not installed) or where legacy tables exist
    /// (their save is read, and detection may choose legacy from it).
    fn capabilities(&self, probe: &dyn Probe) -> Vec<Capability> {
        let legacy_runs = [Family::V4, Family::V6].into_iter().any(|family| {
            !probe.legacy_tables(family).is_empty()
                || detection::detect(family, self.flavor, probe, &[])
                    .is_ok_and(|p| p.flavor != Some(Flavor::Nft))
        });
        if legacy_runs {
            vec![Capability::NetAdmin, Capability::NetRaw]
        } else {
            vec![Capability::NetAdmin]
        }
    }

    fn check(&self, _env: &Env<'_>) -> Result<(), Error> {
        // The programs are found per family by the read.
        Ok(())
    }

    fn read(&self, scope: Scope<'_>, env: &mut Env<'_>) -> Result<State, Error> {
        let mut places = Vec::new();
        for family in [Family::V4, Family::V6] {
            let target = match scope {
                Scope::Config(families) => families.contains(&family),
                Scope::Everything => false,
            };
            places.extend(self.read_family(family, target, env)?);
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
            readable(place)?;
            if !place.target {
                // Our state where this config's rules do not go: removed, as a reconfigure
                // removes what the new config leaves out; without --reconcile, a conflict.
                let tx = plan::cleanup(&place.before);
                warn_kept(program, &tx);
                if !tx.is_noop() && !policy.reconcile {
                    if !policy.force {
                        return Err(Error::Elsewhere {
                            family,
                            program: program.restore_program(),
                        });
                    }
                    txs.push(Transaction::default());
                    continue;
                }
                txs.push(tx);
                continue;
            }
            // The version is logged when the save printed it.
            match &place.before.version {
                Some(version) => {
                    tracing::info!(backend = %program.restore_program(), %version, reason = %program.reason, "{family} backend");
                }
                None => {
                    tracing::info!(backend = %program.restore_program(), reason = %program.reason, "{family} backend");
                }
            }
            let mut tx = plan::reconcile(&place.before, rules.rules(family), env.resolver, policy)
                .map_err(|error| Error::Conflict { family, error })?;
            warn_kept(program, &tx);
            tx.wake = to_wake(place, rules.rules(family))?;
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
        _cfg: &Config,
        _facts: &HostFacts,
        state: &State,
        _env: &Env<'_>,
    ) -> Result<Change, Error> {
        let mut txs = Vec::new();
        for place in &state.places {
            readable(place)?;
            let tx = plan::cleanup(&place.before);
            warn_kept(&place.program, &tx);
            txs.push(tx);
        }
        Ok(Change {
            purpose: Purpose::Switch,
            attempted: vec![false; txs.len()],
            txs,
        })
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
                    p.program.save_program()
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
            let purpose = match change.purpose {
                Purpose::Apply if !place.target => Purpose::Stale,
                p => p,
            };
            commit::commit(place, tx, purpose, self.lock_wait_secs, env)?;
            summary.committed.push(place.program.place_name());
        }
        Ok(())
    }

    fn remove_everything(
        &self,
        _cfg: &Config,
        _facts: &HostFacts,
        env: &mut Env<'_>,
        summary: &mut Summary,
    ) -> Vec<Error> {
        let mut errors = Vec::new();
        for family in [Family::V4, Family::V6] {
            // ip6tables may be unusable where IPv6 is off: say so, but go on.
            let places = match self.read_family(family, false, env) {
                Ok(p) => p,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            for place in places {
                if let Err(e) = readable(&place) {
                    errors.push(e);
                    continue;
                }
                let tx = plan::cleanup(&place.before);
                warn_kept(&place.program, &tx);
                if tx.is_noop() {
                    continue;
                }
                match commit::commit(&place, &tx, Purpose::Cleanup, self.lock_wait_secs, env) {
                    Ok(()) => summary.committed.push(place.program.place_name()),
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

    fn drift(&self, rules: &Plan, state: &State, resolver: &dyn OwnerResolver) -> Vec<Drift> {
        state
            .places
            .iter()
            .flat_map(|p| {
                let family = p.program.family;
                // Where the config's rules do not go, nothing of ours is wanted: a stale copy
                // is drift.
                let wanted = if p.target { rules.rules(family) } else { &[] };
                let mut drift = plan::diff(family, &p.before, wanted, resolver);
                // What a table the save cannot show holds is unknown, not missing.
                drift.retain(|d| !p.before.unreadable.iter().any(|u| u.table == d.table));
                drift.extend(kernel_drift(&p.before, wanted));
                for d in &mut drift {
                    d.place = crate::backend::Place::Iptables(family, p.program.flavor);
                }
                drift
            })
            .collect()
    }

    fn findings(&self, rules: &Plan, state: &State, env: &mut Env<'_>) -> Vec<Finding> {
        use crate::backend::foreign::{self, HOOK_OUTPUT, HOOK_PREROUTING};
        use crate::system::nftprobe::NfFamily;
        let mut out = Vec::new();
        let (mut families, mut captures) = (vec![NfFamily::Inet], Vec::new());
        // Where the config's rules go (our state elsewhere is drift already).
        for p in state.places.iter().filter(|p| p.target) {
            let (family, nft) = (p.program.family, p.program.flavor == Some(Flavor::Nft));
            let flavor = p.program.flavor.map(|f| f.to_string());
            let place = shadow::label(family, flavor.as_deref());
            let wanted = rules.rules(family);
            out.extend(shadow::findings(&place, &p.before, wanted, env.resolver));
            // Rules of our shape the config does not write, kept (nothing proves them ours).
            out.extend(
                plan::kept(&p.before, wanted, env.resolver)
                    .into_iter()
                    .map(|rule| Finding {
                        place: place.clone(),
                        rule,
                        effect: "has the shape of a rule istio-iptables writes, but this config \
                                 does not write it and nothing shows it is ours: kept by apply \
                                 and cleanup; delete it by hand if it is ours"
                            .into(),
                    }),
            );
            // A table iptables-nft-save cannot show, read with nft.
            for name in p.before.incompatible.iter().filter(|_| nft) {
                let (Some(table), true) = (Table::from_name(name), env.probe.in_path("nft")) else {
                    continue;
                };
                let args = ["list", "table", p.program.nft_family(), name].map(String::from);
                if let Ok(text) = env.runner.run("nft", &args, None) {
                    let listing = foreign::parse_listing(&text);
                    out.extend(shadow::incompatible(&place, table, &listing, wanted));
                }
            }
            families.push(NfFamily::of(family));
            captures.extend(shadow::captures(family, &place, wanted));
        }
        // Other nftables tables at our hooks: not iptables-nft's own chains, nor our native
        // tables (verify reports those as the other backend's).
        let flavors: Vec<(NfFamily, bool)> = state
            .places
            .iter()
            .map(|p| {
                (
                    NfFamily::of(p.program.family),
                    p.program.flavor == Some(Flavor::Nft),
                )
            })
            .collect();
        let skip = |f: NfFamily, t: &str, c: &str| {
            let iptables_own = flavors.contains(&(f, true))
                && Table::from_name(t).is_some()
                && matches!(
                    c,
                    "PREROUTING" | "INPUT" | "FORWARD" | "OUTPUT" | "POSTROUTING"
                );
            iptables_own || (f == NfFamily::Inet && t.starts_with("istio-proxy-"))
        };
        let others = foreign::read(env, &families, &[HOOK_PREROUTING, HOOK_OUTPUT], &skip);
        for f in foreign::judge(&others, &captures) {
            if !out.contains(&f) {
                out.push(f);
            }
        }
        out
    }

    fn leftovers(&self, env: &mut Env<'_>) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        for place in self.read(Scope::Everything, env)?.places {
            out.extend(ours_in(&place.program, &place.before));
        }
        Ok(out)
    }

    fn inventory(&self, rules: &Plan, state: &State, chosen: bool, env: &Env<'_>) -> Inventory {
        inventory::of(rules, state, chosen, env)
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

/// Refuses a place whose save disagrees with the kernel in a table iptables writes (see
/// [`kernel`]): what it holds there is unknown.
fn readable(place: &Place) -> Result<(), Error> {
    let unreadable: Vec<String> = place
        .before
        .unreadable
        .iter()
        .filter(|u| Table::from_name(&u.table).is_some())
        .map(ToString::to_string)
        .collect();
    if unreadable.is_empty() {
        return Ok(());
    }
    Err(Error::Unreadable {
        family: place.program.family,
        program: place.program.save_program(),
        unreadable,
    })
}

/// What the kernel shows beside the save: a table that cannot be read safely (what our
/// rules there do is unknown), a dormant table holding our chains or meant to hold our rules
/// (none of them sees a packet).
fn kernel_drift(before: &save::SaveState, wanted: &[model::Rule]) -> Vec<Drift> {
    let table_drift = |table: &str, unread: String| Drift {
        place: crate::backend::Place::Iptables(Family::V4, None),
        table: table.to_string(),
        chain: None,
        missing: Vec::new(),
        extra: Vec::new(),
        out_of_order: false,
        unread: vec![unread],
    };
    let mut out: Vec<Drift> = before
        .unreadable
        .iter()
        .filter(|u| Table::from_name(&u.table).is_some())
        .map(|u| table_drift(&u.table, format!("cannot be read safely: {}", u.reason)))
        .collect();
    for name in &before.dormant {
        let ours = before
            .tables
            .get(name)
            .is_some_and(|t| t.user_chains.iter().any(|c| c.starts_with(chain::PREFIX)));
        if ours || wanted.iter().any(|r| r.table.name() == name) {
            out.push(table_drift(
                name,
                "flags dormant: none of its rules sees a packet".into(),
            ));
        }
    }
    out
}

/// The dormant tables the config's rules go to that are to be woken: those holding our
/// chains (ours to repair); one without is another's, and refused.
fn to_wake(place: &Place, wanted: &[model::Rule]) -> Result<Vec<String>, Error> {
    let mut wake = Vec::new();
    for name in &place.before.dormant {
        let ours = place
            .before
            .tables
            .get(name)
            .is_some_and(|t| t.user_chains.iter().any(|c| c.starts_with(chain::PREFIX)));
        let needed = wanted.iter().any(|r| r.table.name() == name);
        if ours {
            wake.push(name.clone());
        } else if needed {
            return Err(Error::Dormant {
                family: place.program.family,
                table: name.clone(),
            });
        }
    }
    Ok(wake)
}

/// Says which rules of our shape `tx` keeps (see [`plan`]'s module doc).
fn warn_kept(program: &Program, tx: &Transaction) {
    for rule in &tx.kept {
        tracing::warn!(
            "kept {} {rule} ({}): it has the shape of a rule istio-iptables writes, but this \
             config does not write it and nothing shows it is ours; delete it by hand if it is",
            program.family,
            program.save_program()
        );
    }
}

/// How many rules of `ts` are ours: in an ISTIO_* chain, or naming one (a jump).
fn our_rules(ts: &save::TableState) -> usize {
    let ours = |s: &str| s.starts_with(chain::PREFIX);
    ts.rules
        .iter()
        .filter(|(c, toks)| ours(c) || toks.iter().any(|t| ours(t)))
        .count()
}

/// Our iptables chains, and rules jumping to them, per table: one line each.
fn ours_in(program: &Program, st: &save::SaveState) -> Vec<String> {
    let family = program.family;
    let save = program.save_program();
    let ours = |s: &str| s.starts_with(chain::PREFIX);
    let mut out = Vec::new();
    for (name, ts) in &st.tables {
        let chains: Vec<&str> = ts
            .user_chains
            .iter()
            .map(String::as_str)
            .filter(|c| ours(c))
            .collect();
        let rules = our_rules(ts);
        if !chains.is_empty() || rules > 0 {
            out.push(format!(
                "{family} iptables table {name} ({save}): {rules} ISTIO_* rule(s), chains {}",
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
