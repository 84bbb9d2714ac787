//! The two ways of programming the capture, behind one trait, [`Backend`]: iptables
//! ([`iptables`], Istio's `istio-iptables`) and native nftables ([`nft`], Istio's
//! `istio-nftables`). `main` chooses one for the config and hands the commands both, the
//! chosen one and the other (whose state of ours an apply removes). Each backend is a folder
//! that never imports the other; what their packet walks share is [`walk`].

pub mod foreign;
pub mod iptables;
pub mod nft;
pub mod walk;

use self::walk::Source;
use crate::config::{Config, Flavor, HostFacts};
use crate::model::{Family, Finding, OwnerResolver};
use crate::routes::IpCommand;
use crate::system::Env;
use crate::system::host::Capability;
use crate::system::host_view::Probe;

/// What to do when the namespace already holds different state of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Replace existing, different state (Istio's --reconcile, on by default).
    pub reconcile: bool,
    /// Commit even when nothing differs; without reconcile, add our rules on top of a conflict.
    pub force: bool,
}

/// Which of a backend's places [`Backend::read`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// The places the config's rules go to (iptables: these families, in the flavour
    /// detection picks).
    Config(&'a [Family]),
    /// Every place where state of ours may be (iptables: both families, every flavour that
    /// may hold some).
    Everything,
}

/// Why a change is made, for its log lines and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The config's rules.
    Apply,
    /// Our state in the backend not chosen, removed by an apply of the other one.
    Switch,
    /// Our state in a place of the chosen backend the config's rules do not go to (the other
    /// iptables flavour, a family the config does not use), removed by the apply.
    Stale,
    /// `--cleanup-only`.
    Cleanup,
}

/// What a rollback did, for the error message: what it proved restored, what it could not.
/// It claims only what re-reading the kernel proved.
#[derive(Debug, Default)]
pub struct Rollback {
    /// What was put back and proved so ("IPv4", "nftables", ...).
    pub restored: Vec<String>,
    pub failures: Vec<String>,
    /// `ip` changes were undone (and checked).
    pub routes: bool,
}

impl Rollback {
    /// The outcome, for the error message.
    pub fn describe(self) -> String {
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

/// What was committed, for the closing log line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// iptables places whose tables changed, as `iptables-nft` (IPv4) or `ip6tables-legacy`.
    pub committed: Vec<String>,
    /// `ip` commands run.
    pub ip_changed: Vec<String>,
    /// Native nftables tables written.
    pub nft_tables: Vec<String>,
    /// Native nftables tables deleted (a switch to iptables, a cleanup).
    pub nft_removed: Vec<String>,
}

/// A backend's failure: it says what failed at its step.
pub trait StepError: std::error::Error + Send + Sync + 'static {
    /// `--reconcile=false` met different state of ours (exit code 4).
    fn is_conflict(&self) -> bool {
        false
    }
}

/// Where a difference is: one iptables family in one flavour (`None`: the unflavoured
/// programs), or our native nftables tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Iptables(Family, Option<Flavor>),
    Nftables,
}

impl Place {
    /// How verify's text names it: `IPv4 iptables-nft`, `IPv6 ip6tables-legacy`, `inet`.
    pub fn label(self) -> String {
        match self {
            Place::Iptables(f, flavor) => format!("{f} {}", Self::program(f, flavor)),
            Place::Nftables => "inet".into(),
        }
    }

    /// The iptables programs of the place (`iptables-nft`), for verify's JSON.
    pub fn backend(self) -> Option<String> {
        match self {
            Place::Iptables(f, flavor) => Some(Self::program(f, flavor)),
            Place::Nftables => None,
        }
    }

    fn program(family: Family, flavor: Option<Flavor>) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        match flavor {
            Some(f) => format!("{base}-{f}"),
            None => base.to_string(),
        }
    }

    /// How verify's JSON names it: `ipv4`, `ipv6`, `inet`.
    pub fn json(self) -> &'static str {
        match self {
            Place::Iptables(Family::V4, _) => "ipv4",
            Place::Iptables(Family::V6, _) => "ipv6",
            Place::Nftables => "inet",
        }
    }
}

/// How one chain (or table) of ours differs from what the config wants (verify). A missing
/// or unwanted table or chain of nftables is listed as its own line among `missing`/`extra`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub place: Place,
    /// `nat`, `istio-proxy-nat`.
    pub table: String,
    /// `None`: the table itself.
    pub chain: Option<String>,
    /// Our rules the config wants that are not there.
    pub missing: Vec<String>,
    /// Our rules (or a whole chain of ours) that are there but not wanted.
    pub extra: Vec<String>,
    /// Same rules, different order.
    pub out_of_order: bool,
    /// Lines of a listing that are neither a chain nor a rule (a set, a flag): something in
    /// our table this tool never writes.
    pub unread: Vec<String>,
}

/// What doctor shows of one backend ([`Backend::inventory`]): every place its state can
/// live, the kernel features the config's rules need there, and what stops (or may
/// surprise) a run, each with its fix.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub places: Vec<PlaceView>,
    pub needs: Vec<crate::system::kernel_support::Feature>,
    pub notes: Vec<Note>,
}

/// One place our state can live, as a read saw it (empty ones included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceView {
    pub place: Place,
    /// The program that writes it (`iptables-nft-restore`, `nft`).
    pub program: String,
    /// Whether it is installed; its version, when known.
    pub installed: bool,
    pub version: Option<String>,
    /// The config's rules go here; why (the detection's reason).
    pub target: Option<String>,
    /// Its tables: name, rules, rules of ours (ISTIO_* chains, jumps to them; our tables).
    pub tables: Vec<(String, usize, usize)>,
}

impl PlaceView {
    /// How many rules of ours it holds.
    pub fn ours(&self) -> usize {
        self.tables.iter().map(|t| t.2).sum()
    }
}

/// Something doctor names, with its fix; `blocking`: capture does not work as configured
/// until it is fixed (else a warning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub problem: String,
    pub fix: String,
    pub blocking: bool,
}

/// The rules a packet's walk goes through (explain): the config's, or the live ones a
/// [`read`](Backend::read) saw.
#[derive(Debug, Clone, Copy)]
pub enum Over<'a, R, S> {
    /// The config's rules (`ipv6`: whether the config has IPv6 rules).
    Config { rules: &'a R, ipv6: bool },
    /// What the kernel holds.
    Live(&'a S),
}

/// One way of programming the capture. Pure parts ([`build`](Backend::build),
/// [`script`](Backend::script), [`plan`](Backend::plan)) apart from the steps that read or
/// change the kernel through [`Env`].
pub trait Backend {
    /// The rules a config wants.
    type Rules;
    /// What [`read`](Backend::read) saw (by default: nothing of ours).
    type State: Default;
    /// One transaction, worked out by [`plan`](Backend::plan) or
    /// [`plan_removal`](Backend::plan_removal); it remembers what [`commit`](Backend::commit)
    /// attempted, for [`restore`](Backend::restore).
    type Change;
    type Error: StepError;

    /// Istio's word for it: "Istio {name} environment".
    fn name(&self) -> &'static str;
    /// Istio's rules for `cfg` on a host with `facts`.
    fn build(&self, cfg: &Config, facts: &HostFacts) -> Self::Rules;
    /// The `ip` steps the rules need (policy routing, `::6`).
    fn routes<'r>(&self, rules: &'r Self::Rules) -> &'r [IpCommand];
    /// The `--dry-run` script of the rules.
    fn script(&self, cfg: &Config, facts: &HostFacts, rules: &Self::Rules) -> String;
    /// The capabilities this backend's reads and changes need on this host (what is
    /// installed, which legacy tables exist), checked before anything runs.
    fn capabilities(&self, probe: &dyn Probe) -> Vec<Capability>;
    /// What the backend needs of the host to apply, checked before anything is read.
    fn check(&self, env: &Env<'_>) -> Result<(), Self::Error>;
    /// The backend's places in `scope`, as the kernel holds them.
    fn read(&self, scope: Scope<'_>, env: &mut Env<'_>) -> Result<Self::State, Self::Error>;
    /// The transaction that leaves exactly `rules` where `state` was read.
    fn plan(
        &self,
        rules: &Self::Rules,
        state: &Self::State,
        policy: Policy,
        env: &Env<'_>,
    ) -> Result<Self::Change, Self::Error>;
    /// The transaction that removes everything of ours from `state` (when the other backend
    /// is applied); `cfg` and `facts` tell what ours looks like. Fails where `state` cannot
    /// show all of ours.
    fn plan_removal(
        &self,
        cfg: &Config,
        facts: &HostFacts,
        state: &Self::State,
        env: &Env<'_>,
    ) -> Result<Self::Change, Self::Error>;
    /// One line per place `change` would change (empty: nothing to do).
    fn describe(&self, state: &Self::State, change: &Self::Change) -> Vec<String>;
    /// Commits `change`; stops at the first failure.
    fn commit(
        &self,
        state: &Self::State,
        change: &mut Self::Change,
        env: &mut Env<'_>,
        summary: &mut Summary,
    ) -> Result<(), Self::Error>;
    /// `--cleanup-only`: reads every place and removes everything of ours from it, going on
    /// past a failure; returns every failure.
    fn remove_everything(
        &self,
        cfg: &Config,
        facts: &HostFacts,
        env: &mut Env<'_>,
        summary: &mut Summary,
    ) -> Vec<Self::Error>;
    /// Puts every place `change` attempted (`every`: every place read) back as `state` read
    /// it, re-reads the kernel to prove it, and says so in `rollback`.
    fn restore(
        &self,
        state: &Self::State,
        change: &Self::Change,
        every: bool,
        env: &mut Env<'_>,
        rollback: &mut Rollback,
    );
    /// How `state` differs from `rules`, place by place (verify).
    fn drift(
        &self,
        rules: &Self::Rules,
        state: &Self::State,
        resolver: &dyn OwnerResolver,
    ) -> Vec<Drift>;
    /// Foreign state that takes packets before our rules can (verify): other tools' rules
    /// ahead of our jumps in `state` (as [`read`](Backend::read) saw it), and other nftables
    /// tables' base chains at an earlier priority at our hooks. Read-only; what cannot be
    /// read is left out.
    fn findings(&self, rules: &Self::Rules, state: &Self::State, env: &mut Env<'_>)
    -> Vec<Finding>;
    /// What of ours this backend holds, one line per place, read without changing anything
    /// (verify of the backend not chosen: a pod must not have both).
    fn leftovers(&self, env: &mut Env<'_>) -> Result<Vec<String>, Self::Error>;
    /// What doctor shows of this backend (read-only, from `state` as a read saw it and
    /// what the host shows without running anything): every place, the kernel features
    /// `rules` need (where `chosen`: the config's rules go to this backend), and notes.
    fn inventory(
        &self,
        rules: &Self::Rules,
        state: &Self::State,
        chosen: bool,
        env: &Env<'_>,
    ) -> Inventory;
    /// The rules a packet of `family` meets in this backend, one [`Source`] per place that
    /// holds any (the config's rules: one): explain walks them with every other place's
    /// ([`walk::evaluate`]).
    fn walk<'a>(
        &'a self,
        over: Over<'a, Self::Rules, Self::State>,
        family: Family,
        resolver: &'a dyn OwnerResolver,
    ) -> Vec<Source<'a>>;
}
