//! The native nftables backend (`--native-nftables`): Istio's `istio-nftables` rules
//! ([`build`]), the live tables read back ([`state`]), `nft` at work ([`commit`]), their
//! differences ([`drift`]) and a packet's walk through them ([`walk`]).
//!
//! One `nft -f -` transaction for all our tables (both families: the tables are `inet`),
//! all or nothing.
//! - **Fresh namespace:** the transaction is Istio's text, and `nft` is the only program
//!   run: netlink says none of our tables exist.
//! - **Re-run:** the live tables are read once (`nft list ruleset inet`) and compared with
//!   what the config wants ([`state`]); equal tables are left alone, and nothing runs when
//!   all are equal. A table that differs or is no longer wanted is deleted and written anew
//!   in the same transaction, so a changed config ends exactly as a fresh apply would (Istio
//!   only flushes, leaving stale chains and tables).
//! - **Failures:** a failed transaction changes nothing (nft is atomic; re-read to prove it).

pub mod build;
pub mod commit;
pub mod drift;
pub mod inventory;
pub mod shadow;
pub mod state;
pub mod walk;

use std::borrow::Cow;
use std::fmt::Write as _;

use self::build::{FAMILY, Ruleset, Table};
use self::commit::{Error, check_nft, list, none_in, run_nft};
use self::state::{Live, NftState};
use crate::backend::walk::Source;
use crate::backend::{Backend, Drift, Inventory, Over, Policy, Purpose, Rollback, Scope, Summary};
use crate::config::{Config, HostFacts};
use crate::model::{Family, Finding, OwnerResolver};
use crate::routes::IpCommand;
use crate::system::Env;
use crate::system::host::Capability;
use crate::system::host_view::Probe;

/// Native nftables: Istio's `inet istio-proxy-*` tables.
#[derive(Debug, Clone, Copy, Default)]
pub struct Nftables;

/// Our tables as read.
#[derive(Debug, Default)]
pub struct State {
    pub live: Live,
}

/// One `nft -f -` transaction.
#[derive(Debug)]
pub struct Change {
    purpose: Purpose,
    text: String,
    /// The tables it writes anew (or deletes).
    tables: Vec<Table>,
    attempted: bool,
}

impl Nftables {
    /// The transaction that deletes every table of ours in `state`.
    fn removal(&self, state: &State, purpose: Purpose) -> Change {
        let tables: Vec<Table> = state.live.state.tables.keys().copied().collect();
        let mut text = String::new();
        for t in &tables {
            let _ = writeln!(text, "delete table {FAMILY} {t}");
        }
        Change {
            purpose,
            text,
            tables,
            attempted: false,
        }
    }
}

impl Backend for Nftables {
    type Rules = Ruleset;
    type State = State;
    type Change = Change;
    type Error = Error;

    fn name(&self) -> &'static str {
        "nftables"
    }

    fn build(&self, cfg: &Config, facts: &HostFacts) -> Ruleset {
        build::build(cfg, facts)
    }

    fn routes<'r>(&self, rules: &'r Ruleset) -> &'r [IpCommand] {
        &rules.ip
    }

    fn script(&self, cfg: &Config, facts: &HostFacts, rules: &Ruleset) -> String {
        build::script(cfg, facts, rules)
    }

    /// `nft` and our netlink reads speak nf_tables only: CAP_NET_ADMIN.
    fn capabilities(&self, _probe: &dyn Probe) -> Vec<Capability> {
        vec![Capability::NetAdmin]
    }

    fn check(&self, env: &Env<'_>) -> Result<(), Error> {
        check_nft(env)?;
        tracing::info!("native nftables enabled, using nft rules for traffic redirection.");
        Ok(())
    }

    fn read(&self, scope: Scope<'_>, env: &mut Env<'_>) -> Result<State, Error> {
        // Netlink first: a namespace without any of our tables needs no process.
        let names = env.probe.nft_inet_tables();
        if none_in(names.as_deref()) {
            return Ok(State::default());
        }
        if scope == Scope::Everything && !env.probe.in_path("nft") {
            // Our tables, seen over netlink, cannot be removed without nft; without netlink
            // nothing can be known here.
            return match names {
                Some(_) => Err(Error::NotInstalledToRemove),
                None => Ok(State::default()),
            };
        }
        Ok(State { live: list(env)? })
    }

    fn plan(
        &self,
        rules: &Ruleset,
        state: &State,
        policy: Policy,
        env: &Env<'_>,
    ) -> Result<Change, Error> {
        let live = &state.live;
        let ops = rules.transaction();
        let order: Vec<Table> = Table::ALL
            .into_iter()
            .filter(|t| ops.iter().any(|op| op.table() == *t))
            .collect();
        // What the tables must hold, in nft's words: only needed when some of ours exist.
        let want = if live.order.is_empty() {
            NftState {
                tables: order.iter().map(|t| (*t, Default::default())).collect(),
            }
        } else {
            state::desired(rules, env.resolver)
        };
        let mut changed = commit::to_rewrite(live, &want, &order);
        if !policy.reconcile && !policy.force {
            let found: Vec<String> = commit::differing(&live.state, &want)
                .iter()
                .filter(|t| live.state.tables.contains_key(t))
                .map(|t| format!("table {FAMILY} {t} differs"))
                .collect();
            if !found.is_empty() {
                return Err(Error::Conflict {
                    detail: found.join("; "),
                });
            }
        }
        if policy.force {
            changed = Table::ALL
                .into_iter()
                .filter(|t| want.tables.contains_key(t) || live.state.tables.contains_key(t))
                .collect();
        }
        Ok(Change {
            purpose: Purpose::Apply,
            text: commit::transaction(&ops, live, &changed, policy.reconcile),
            tables: changed,
            attempted: false,
        })
    }

    fn plan_removal(
        &self,
        _cfg: &Config,
        _facts: &HostFacts,
        state: &State,
        _env: &Env<'_>,
    ) -> Result<Change, Error> {
        Ok(self.removal(state, Purpose::Switch))
    }

    fn describe(&self, _state: &State, change: &Change) -> Vec<String> {
        if change.text.is_empty() {
            return Vec::new();
        }
        change
            .tables
            .iter()
            .map(|t| format!("nftables table {FAMILY} {t}"))
            .collect()
    }

    fn commit(
        &self,
        _state: &State,
        change: &mut Change,
        env: &mut Env<'_>,
        summary: &mut Summary,
    ) -> Result<(), Error> {
        let text = &change.text;
        if text.is_empty() {
            if change.purpose == Purpose::Apply {
                tracing::info!("nftables rules are already in place: nothing to commit");
            }
            return Ok(());
        }
        match change.purpose {
            // Istio logs the transaction once it is programmed (below); the input goes to
            // debug.
            Purpose::Apply => tracing::debug!(
                "Running nft -f - with the following input:\n{}",
                text.trim_end()
            ),
            Purpose::Switch | Purpose::Stale | Purpose::Cleanup => {
                tracing::info!("removing the native nftables tables:\n{}", text.trim_end())
            }
        }
        change.attempted = true;
        if let Err(error) = run_nft(text, env) {
            let error = Box::new(error);
            return Err(match change.purpose {
                Purpose::Apply => Error::Commit {
                    rejected: commit::rejected_line(text, &error),
                    error,
                },
                Purpose::Switch | Purpose::Stale => Error::Switch { error },
                Purpose::Cleanup => Error::Cleanup { error },
            });
        }
        let names = change.tables.iter().map(|t| t.name().to_string());
        match change.purpose {
            Purpose::Apply => summary.nft_tables.extend(names),
            Purpose::Switch | Purpose::Stale | Purpose::Cleanup => {
                summary.nft_removed.extend(names)
            }
        }
        if change.purpose == Purpose::Apply {
            tracing::info!("nftables rules programmed:\n{} \n", text.trim_end());
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
        let result = self.read(Scope::Everything, env).and_then(|state| {
            self.commit(
                &state,
                &mut self.removal(&state, Purpose::Cleanup),
                env,
                summary,
            )
        });
        result.err().into_iter().collect()
    }

    fn restore(
        &self,
        state: &State,
        change: &Change,
        every: bool,
        env: &mut Env<'_>,
        rollback: &mut Rollback,
    ) {
        if !(change.attempted || every) {
            return;
        }
        match commit::restore(&state.live, env) {
            Ok(true) => rollback.restored.push("nftables".into()),
            Ok(false) => {}
            Err(e) => rollback.failures.push(e.to_string()),
        }
    }

    fn drift(&self, rules: &Ruleset, state: &State, resolver: &dyn OwnerResolver) -> Vec<Drift> {
        drift::diff(&state.live.state, &state::desired(rules, resolver))
    }

    fn findings(&self, rules: &Ruleset, _state: &State, env: &mut Env<'_>) -> Vec<Finding> {
        use crate::backend::foreign::{self, HOOK_OUTPUT, HOOK_PREROUTING};
        use crate::system::nftprobe::NfFamily;
        // Every other table at our hooks (ours are wholly ours: what differs there is drift).
        let skip =
            |f: NfFamily, t: &str, _: &str| f == NfFamily::Inet && Table::from_name(t).is_some();
        let families = [NfFamily::Ip, NfFamily::Ip6, NfFamily::Inet];
        let others = foreign::read(env, &families, &[HOOK_PREROUTING, HOOK_OUTPUT], &skip);
        shadow::findings(rules, &others)
    }

    fn leftovers(&self, env: &mut Env<'_>) -> Result<Vec<String>, Error> {
        // Our tables, where netlink can tell (no `nft` run).
        let names = env.probe.nft_inet_tables().unwrap_or_default();
        Ok(names
            .iter()
            .filter(|n| Table::from_name(n).is_some())
            .map(|n| format!("nftables table {FAMILY} {n}, written by --native-nftables"))
            .collect())
    }

    fn inventory(&self, rules: &Ruleset, state: &State, chosen: bool, env: &Env<'_>) -> Inventory {
        inventory::of(rules, state, chosen, env)
    }

    fn walk<'a>(
        &'a self,
        over: Over<'a, Ruleset, State>,
        family: Family,
        resolver: &'a dyn OwnerResolver,
    ) -> Vec<Source<'a>> {
        match over {
            Over::Config { rules, ipv6 } => {
                let note = (family == Family::V6 && !ipv6).then_some(
                    "IPv6 is off for this config: no ip6 rules are generated, but inet rules that name no address see IPv6 too",
                );
                vec![walk::source(
                    Cow::Owned(state::desired(rules, resolver)),
                    "nftables rules from the config",
                    note,
                    resolver,
                )]
            }
            // Our tables are inet: they see both families.
            Over::Live(st) if st.live.state.tables.is_empty() => Vec::new(),
            Over::Live(st) => vec![walk::source(
                Cow::Borrowed(&st.live.state),
                &walk::live_name(),
                None,
                resolver,
            )],
        }
    }
}
