//! Reconcile: from the current state of one family (parsed iptables-save) and the rules we
//! want, compute one iptables-restore --noflush input (committed table by table by
//! iptables-restore; `apply` rolls back across tables) that leaves exactly the desired
//! state: our ISTIO_* chains with exactly our rules, exactly our rules in the built-in chains
//! (stale ones and duplicates removed), foreign rules and chains untouched. Pure: no I/O.
//!
//! Ownership of rules in built-in chains: a rule is ours when it jumps to an ISTIO_* chain,
//! nothing else. The other rules this tool writes into built-in chains (interface RETURNs
//! for `-c`, the TPROXY mark rules) are what anyone may write too, and the kernel's state
//! cannot tell the two apart: such a rule is never deleted. A wanted one is served by an
//! identical rule already there (so an identical re-run changes nothing, and a foreign
//! look-alike is kept); one of our shape that the config does not want is kept and named
//! ([`Transaction::kept`]), for a warning and for verify.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use crate::backend::iptables::restore::{self, Header};
use crate::backend::iptables::save::{SaveState, TableState, canonical, tokenize};
use crate::backend::{Drift, Place, Policy};
use crate::model::{Family, Match, Position, Rule, RuleSpec, Table, Target, chain};
use crate::model::{NoResolver, OwnerResolver, Token};

/// The namespace holds ISTIO_* state that differs and reconcile is off.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the {table} table already has different ISTIO_* rules ({detail}); nothing was changed. \
     Run with --reconcile=true (the default) to replace them, or remove them first with \
     --cleanup-only"
)]
pub struct Conflict {
    pub table: Table,
    pub detail: String,
}

/// One family's transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transaction {
    /// The iptables-restore --noflush input; empty when nothing needs to change.
    pub payload: String,
    /// Tables the payload changes.
    pub touched: Vec<Table>,
    /// Touched tables that hold nothing at all afterwards (nft can drop them).
    pub emptied: Vec<Table>,
    /// Rules of the shape this tool writes into built-in chains that the config does not
    /// want, kept because nothing proves they are ours (`nat PREROUTING: -i eth9 -j RETURN`).
    pub kept: Vec<String>,
    /// Dormant iptables-nft tables holding our chains, woken before the payload is committed.
    pub wake: Vec<String>,
}

impl Transaction {
    pub fn is_noop(&self) -> bool {
        self.payload.is_empty() && self.wake.is_empty()
    }
}

fn is_builtin(chain: &str) -> bool {
    matches!(
        chain,
        "PREROUTING" | "INPUT" | "FORWARD" | "OUTPUT" | "POSTROUTING"
    )
}

fn is_ours(chain: &str) -> bool {
    chain.starts_with(chain::PREFIX)
}

/// Target of a rule's tokens (the name after `-j`/`-g`).
fn target(tokens: &[Token]) -> Option<String> {
    RuleSpec::parse(tokens).target_name().map(str::to_string)
}

/// The interface of an interface RETURN (`-i X -j RETURN` / `-o X -j RETURN`, by `flag`),
/// read from a rule's canonical text.
fn iface_return(canon: &str, flag: &str) -> Option<String> {
    let spec = RuleSpec::parse(&tokenize(canon));
    match (spec.matches.as_slice(), spec.target) {
        (
            [m],
            Some(Target {
                goto: false,
                name: Some(name),
                options,
            }),
        ) if !m.negated
            && m.flag == flag
            && m.values.len() == 1
            && name == "RETURN"
            && options.is_empty() =>
        {
            Some(m.value().to_string())
        }
        _ => None,
    }
}

/// Whether `m` is `FLAG VALUE`, not negated (any value when `value` is None).
fn is(m: Option<&Match>, flag: &str, value: Option<&str>) -> bool {
    m.is_some_and(|m| {
        !m.negated
            && m.flag == flag
            && !m.values.is_empty()
            && value.is_none_or(|v| m.values == [v])
    })
}

/// Whether the matches begin `-p tcp -m MODULE --mark VALUE` after `skip` matches.
fn tcp_mark_first(spec: &RuleSpec, skip: usize, module: &str) -> bool {
    let m = |i: usize| spec.matches.get(skip + i);
    is(m(0), "-p", Some("tcp")) && is(m(1), "-m", Some(module)) && is(m(2), "--mark", None)
}

/// Whether the target is `-j NAME` with exactly `options`.
fn jumps_to(spec: &RuleSpec, name: &str, options: &[&str]) -> bool {
    spec.target
        .as_ref()
        .is_some_and(|t| !t.goto && t.name.as_deref() == Some(name) && t.options == options)
}

/// Shapes of the non-jump rules this tool writes into built-in chains, read from a rule's
/// canonical text.
fn has_our_shape(table: Table, chain: &str, canon: &str) -> bool {
    let spec = RuleSpec::parse(&tokenize(canon));
    match (table, chain) {
        (Table::Nat | Table::Mangle, "PREROUTING") if iface_return(canon, "-i").is_some() => true,
        (Table::Nat | Table::Mangle, "OUTPUT") if iface_return(canon, "-o").is_some() => true,
        (Table::Mangle, "PREROUTING") => {
            tcp_mark_first(&spec, 0, "mark") && jumps_to(&spec, "CONNMARK", &["--save-mark"])
        }
        (Table::Mangle, "OUTPUT") => {
            // -o lo -p tcp -m mark --mark M -j RETURN
            (is(spec.matches.first(), "-o", Some("lo"))
                && tcp_mark_first(&spec, 1, "mark")
                && jumps_to(&spec, "RETURN", &[]))
                // -p tcp -m connmark --mark M -j CONNMARK --restore-mark
                || (tcp_mark_first(&spec, 0, "connmark")
                    && jumps_to(&spec, "CONNMARK", &["--restore-mark"]))
                // ! -d ADDR ... -o lo -p tcp -m owner ... -j MARK --set-xmark M
                || (spec
                    .matches
                    .first()
                    .is_some_and(|m| m.negated && m.flag == "-d" && !m.values.is_empty())
                    && spec.matches.windows(3).any(|w| {
                        w[0].flag == "-o"
                            && w[0].values == ["lo"]
                            && is(w.get(1), "-p", Some("tcp"))
                            && is(w.get(2), "-m", Some("owner"))
                    })
                    && spec.target.as_ref().is_some_and(|t| {
                        !t.goto
                            && t.name.as_deref() == Some("MARK")
                            && t.options.first().is_some_and(|o| o == "--set-xmark")
                            && t.options.len() > 1
                    }))
        }
        _ => false,
    }
}

/// Applies append/insert operations to a chain's content.
fn simulate(mut content: Vec<String>, ops: &[(Position, String)]) -> Vec<String> {
    for (pos, r) in ops {
        pos.place(&mut content, r.clone());
    }
    content
}

/// Our view of one table: which current rules are ours and what every chain should hold.
struct TableView<'a> {
    name: &'static str,
    /// Borrowed from the save: a clone would double the memory of a 7,000-rule table.
    cur: Cow<'a, TableState>,
    desired: Vec<&'a Rule>,
    /// Desired ISTIO_* chains in Istio's declaration order.
    desired_chains: Vec<&'static str>,
    /// Canonical desired content per chain.
    want: BTreeMap<String, Vec<String>>,
    /// Canonical current content per chain, with ownership flags (built-in chains).
    have: BTreeMap<String, Vec<(String, bool)>>,
    /// Per built-in chain, per current rule: a rule not ours that serves a wanted one.
    serving: BTreeMap<String, Vec<bool>>,
    /// Per chain, per desired rule (in order): already served, so not written again.
    served: BTreeMap<String, Vec<bool>>,
    /// Per built-in chain rewritten with explicit positions: its restore lines.
    lines: BTreeMap<String, Vec<String>>,
    /// Rules of our shape the config does not want, kept (see the module doc).
    kept: Vec<String>,
}

/// The wanted side of one table.
struct Wanted<'a> {
    desired: Vec<&'a Rule>,
    /// Desired ISTIO_* chains in Istio's declaration order.
    desired_chains: Vec<&'static str>,
    /// Canonical desired operations per chain.
    ops: BTreeMap<String, Vec<(Position, String)>>,
}

impl<'a> Wanted<'a> {
    fn new(table: Table, rules: &'a [Rule], resolver: &dyn OwnerResolver) -> Self {
        let desired: Vec<&Rule> = rules.iter().filter(|r| r.table == table).collect();
        let desired_chains = restore::declared_chains(&desired);
        let mut ops: BTreeMap<String, Vec<(Position, String)>> = BTreeMap::new();
        for r in &desired {
            ops.entry(r.chain.to_string())
                .or_default()
                .push((r.position, canonical(&r.args, resolver)));
        }
        Wanted {
            desired,
            desired_chains,
            ops,
        }
    }
}

/// Where `wanted` appears in `have` in order (other rules between allowed): the index of
/// each, matched as early as possible; `None` when it does not.
fn in_order(wanted: &[String], have: &[String]) -> Option<Vec<usize>> {
    let mut at = 0;
    let mut out = Vec::with_capacity(wanted.len());
    for w in wanted {
        let i = at + have[at..].iter().position(|h| h == w)?;
        out.push(i);
        at = i + 1;
    }
    Some(out)
}

fn is_jump_to_ours(canon: &str) -> bool {
    target(&tokenize(canon)).is_some_and(|t| is_ours(&t))
}

/// A built-in chain that needs no change: its jumps to ISTIO_* chains are exactly the
/// wanted ones, and every wanted rule is there in the wanted order. Returns, per current
/// rule, whether it is a rule not ours that serves a wanted one.
fn in_place(current: &[(String, bool)], ops: &[(Position, String)]) -> Option<Vec<bool>> {
    let order = simulate(Vec::new(), ops);
    let jumps = current.iter().filter(|(_, o)| *o).map(|(r, _)| r);
    if !jumps.eq(order.iter().filter(|r| is_jump_to_ours(r))) {
        return None;
    }
    let all: Vec<String> = current.iter().map(|(r, _)| r.clone()).collect();
    let at = in_order(&order, &all)?;
    let mut serving = vec![false; current.len()];
    for i in at {
        serving[i] = !current[i].1;
    }
    Some(serving)
}

/// How a built-in chain that must change is rewritten: our jumps go, and the wanted rules
/// are written onto the rules that are not ours (`kept`, in order), except those an
/// identical kept rule already serves.
struct Rewrite {
    /// Per desired rule: served by a kept rule, so not written.
    served: Vec<bool>,
    /// Per kept rule: it serves a desired one.
    serving: Vec<bool>,
    /// The chain after the commit.
    content: Vec<String>,
    /// Restore lines that write the rest, when Istio's own positions would break the wanted
    /// order around a kept rule that serves (`None`: the desired rules as Istio writes them).
    lines: Option<Vec<String>>,
}

fn serve(chain: &str, kept: &[String], ops: &[(Position, String)]) -> Rewrite {
    let order = simulate(Vec::new(), ops);
    let mut serving = vec![false; kept.len()];
    let served: Vec<bool> = ops
        .iter()
        .map(|(_, r)| {
            let free = (0..kept.len()).find(|&i| !serving[i] && kept[i] == *r);
            match free {
                Some(i) if !is_jump_to_ours(r) => {
                    serving[i] = true;
                    true
                }
                _ => false,
            }
        })
        .collect();
    let written: Vec<(Position, String)> = ops
        .iter()
        .zip(&served)
        .filter(|(_, s)| !**s)
        .map(|(op, _)| op.clone())
        .collect();
    let content = simulate(kept.to_vec(), &written);
    if in_order(&order, &content).is_some() {
        return Rewrite {
            served,
            serving,
            content,
            lines: None,
        };
    }
    // Istio's positions put a written rule on the wrong side of a kept one that serves
    // (a TPROXY mark rule kept below the jump that goes): each wanted rule not served is
    // inserted just before the next wanted one, from the last to the first.
    let mut content = kept.to_vec();
    let mut lines = Vec::new();
    let mut before = content.len();
    let mut taken = vec![false; kept.len()];
    for w in order.iter().rev() {
        // Below `before` nothing was inserted yet: the indices are the kept rules'.
        let kept_at = (0..before.min(kept.len()))
            .rev()
            .find(|&i| !taken[i] && kept[i] == *w);
        match kept_at {
            Some(i) if !is_jump_to_ours(w) => {
                taken[i] = true;
                before = i;
            }
            _ => {
                content.insert(before, w.clone());
                lines.push(if before + 1 == content.len() {
                    format!("-A {chain} {w}")
                } else {
                    format!("-I {chain} {} {w}", before + 1)
                });
            }
        }
    }
    Rewrite {
        served: vec![true; ops.len()],
        serving: taken,
        content,
        lines: Some(lines),
    }
}

impl<'a> TableView<'a> {
    /// The view of one table: what is ours (see the module doc) and what each chain should
    /// hold.
    fn new(
        table: Table,
        current: &'a SaveState,
        wanted: &Wanted<'a>,
        resolver: &dyn OwnerResolver,
    ) -> Self {
        let name = table.name();
        let cur = current
            .table(table)
            .map_or_else(|| Cow::Owned(TableState::default()), Cow::Borrowed);
        let desired = wanted.desired.clone();
        let desired_chains = wanted.desired_chains.clone();
        let ops = &wanted.ops;

        let mut have: BTreeMap<String, Vec<(String, bool)>> = BTreeMap::new();
        // As saved, for the names of kept rules (what `iptables -D` takes).
        let mut saved: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (c, toks) in &cur.rules {
            let canon = canonical(toks, resolver);
            let owned = is_ours(c) || target(toks).is_some_and(|t| is_ours(&t));
            have.entry(c.clone()).or_default().push((canon, owned));
            if is_builtin(c) {
                saved.entry(c.as_str()).or_default().push(toks.join(" "));
            }
        }

        let mut want: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut serving = BTreeMap::new();
        let mut served = BTreeMap::new();
        let mut lines = BTreeMap::new();
        let mut kept = Vec::new();
        let chains: BTreeSet<String> = ops.keys().cloned().chain(have.keys().cloned()).collect();
        for c in chains {
            if !is_builtin(&c) && !is_ours(&c) {
                continue; // foreign user chains are not ours to judge
            }
            let chain_ops = ops.get(&c).map(Vec::as_slice).unwrap_or(&[]);
            if !is_builtin(&c) {
                if ops.contains_key(&c) {
                    want.insert(c, simulate(Vec::new(), chain_ops));
                }
                continue;
            }
            let current = have.get(&c).map(Vec::as_slice).unwrap_or(&[]);
            let (chain_serving, content) = match in_place(current, chain_ops) {
                Some(flags) => (flags, current.iter().map(|(r, _)| r.clone()).collect()),
                None => {
                    let not_ours: Vec<String> = current
                        .iter()
                        .filter(|(_, o)| !o)
                        .map(|(r, _)| r.clone())
                        .collect();
                    let rw = serve(&c, &not_ours, chain_ops);
                    served.insert(c.clone(), rw.served);
                    if let Some(l) = rw.lines {
                        lines.insert(c.clone(), l);
                    }
                    let content = rw.content;
                    let mut flags = rw.serving.into_iter();
                    let per_rule = current
                        .iter()
                        .map(|(_, o)| !o && flags.next().unwrap_or(false))
                        .collect();
                    (per_rule, content)
                }
            };
            let as_saved = saved.get(c.as_str()).map(Vec::as_slice).unwrap_or(&[]);
            for (((r, owned), serves), text) in current.iter().zip(&chain_serving).zip(as_saved) {
                if !owned && !serves && has_our_shape(table, &c, r) {
                    kept.push(format!("{name} {c}: -A {c} {text}"));
                }
            }
            serving.insert(c.clone(), chain_serving);
            if !content.is_empty() || ops.contains_key(&c) {
                want.insert(c, content);
            }
        }
        TableView {
            name,
            cur,
            desired,
            desired_chains,
            want,
            have,
            serving,
            served,
            lines,
            kept,
        }
    }

    fn current_ours(&self) -> Vec<&str> {
        self.cur
            .user_chains
            .iter()
            .filter(|c| is_ours(c))
            .map(String::as_str)
            .collect()
    }

    fn has_our_state(&self) -> bool {
        !self.current_ours().is_empty() || self.have.values().flatten().any(|(_, owned)| *owned)
    }

    /// Whether chain `c` holds exactly what we want (canonically, in order).
    fn chain_matches(&self, c: &str) -> bool {
        let have = self.have.get(c).map(Vec::as_slice).unwrap_or(&[]);
        let want = self.want.get(c).map(Vec::as_slice).unwrap_or(&[]);
        have.iter().map(|(r, _)| r).eq(want.iter())
    }

    /// Built-in chains whose content must change.
    fn changed_builtin(&self) -> Vec<String> {
        let names: BTreeSet<&String> = self
            .want
            .keys()
            .chain(self.have.keys())
            .filter(|c| is_builtin(c))
            .collect();
        names
            .into_iter()
            .filter(|c| !self.chain_matches(c))
            .cloned()
            .collect()
    }

    fn istio_chains_match(&self) -> bool {
        let cur: BTreeSet<&str> = self.current_ours().into_iter().collect();
        let want: BTreeSet<&str> = self.desired_chains.iter().copied().collect();
        cur == want && want.iter().all(|c| self.chain_matches(c))
    }

    fn is_current(&self) -> bool {
        self.istio_chains_match() && self.changed_builtin().is_empty()
    }

    /// Describes the first difference, for messages.
    fn difference(&self) -> String {
        let cur: BTreeSet<&str> = self.current_ours().into_iter().collect();
        let want: BTreeSet<&str> = self.desired_chains.iter().copied().collect();
        if let Some(c) = cur.difference(&want).next() {
            return format!("chain {c} is not in the new config");
        }
        if let Some(c) = want.difference(&cur).next() {
            return format!("chain {c} is missing");
        }
        if let Some(c) = self.changed_builtin().first() {
            return format!("the {c} chain has different ISTIO rules");
        }
        "an ISTIO_* chain has different rules".to_string()
    }

    /// The reconciling section of the transaction.
    fn section(&self) -> String {
        let changed = self.changed_builtin();
        let existing: Vec<&str> = self.current_ours();
        let mut s = String::new();
        restore::section(&mut s, self.name, Header::Save, |s| {
            for c in &self.desired_chains {
                if !existing.contains(c) {
                    s.push_str(&format!("-N {c}\n"));
                }
            }
            for c in &changed {
                if let Some(rules) = self.have.get(c) {
                    Self::delete_owned(s, c, rules);
                }
            }
            for c in &existing {
                s.push_str(&format!("-F {c}\n"));
            }
            for c in &existing {
                if !self.desired_chains.contains(c) {
                    s.push_str(&format!("-X {c}\n"));
                }
            }
            // A desired rule of a built-in chain that a rule already there serves is not
            // written again.
            let mut nth: BTreeMap<&str, usize> = BTreeMap::new();
            for r in &self.desired {
                let i = nth.entry(r.chain).or_default();
                let served = self
                    .served
                    .get(r.chain)
                    .and_then(|v| v.get(*i))
                    .copied()
                    .unwrap_or(false);
                *i += 1;
                if is_ours(r.chain) || (changed.iter().any(|c| c == r.chain) && !served) {
                    s.push_str(&format!("{r}\n"));
                }
            }
            for c in &changed {
                for l in self.lines.get(c).into_iter().flatten() {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        });
        s
    }

    /// `-D CHAIN N` for each of our rules in a built-in chain, last first (so that the
    /// numbers of the ones still to go do not move).
    fn delete_owned(s: &mut String, chain: &str, rules: &[(String, bool)]) {
        for (idx, (_, owned)) in rules.iter().enumerate().rev() {
            if *owned {
                s.push_str(&format!("-D {chain} {}\n", idx + 1));
            }
        }
    }

    /// Whether the table holds nothing but our state: only ISTIO_* chains, every built-in
    /// chain's policy ACCEPT, and every rule in the built-in chains ours.
    fn only_ours(&self) -> bool {
        self.cur.user_chains.iter().all(|c| is_ours(c))
            && self.cur.builtin.iter().all(|(_, p)| p == "ACCEPT")
            && self.have.values().flatten().all(|(_, owned)| *owned)
    }

    /// Whether the table holds nothing once the section is applied.
    fn empty_after(&self) -> bool {
        self.desired.is_empty() && self.only_ours()
    }
}

/// Whether the family holds no rules and no user chains at all.
fn is_empty(current: &SaveState) -> bool {
    current
        .tables
        .values()
        .all(|t| t.rules.is_empty() && t.user_chains.is_empty())
}

/// The transaction of a namespace without any rules of this family: Istio's payload as is
/// (nothing to compare).
fn fresh(desired: &[&Rule]) -> Transaction {
    let mut touched: Vec<Table> = desired.iter().map(|r| r.table).collect();
    touched.sort();
    touched.dedup();
    Transaction {
        payload: restore::payload_of(desired),
        touched,
        ..Transaction::default()
    }
}

/// Computes the transaction that makes one family's state equal `desired`.
pub fn reconcile(
    current: &SaveState,
    desired: &[Rule],
    resolver: &dyn OwnerResolver,
    policy: Policy,
) -> Result<Transaction, Conflict> {
    if is_empty(current) {
        return Ok(fresh(&desired.iter().collect::<Vec<_>>()));
    }
    // One table's view at a time (a 30,000-rule family's canonical texts, both sides, would
    // count several times over); a table neither wanted nor holding anything needs none.
    let view = |t: Table| -> Option<TableView> {
        let w = Wanted::new(t, desired, resolver);
        let idle = w.desired.is_empty()
            && current
                .table(t)
                .is_none_or(|s| s.rules.is_empty() && s.user_chains.is_empty());
        (!idle).then(|| TableView::new(t, current, &w, resolver))
    };

    if !policy.reconcile {
        let conflict = Table::ALL.into_iter().find_map(|t| {
            let p = view(t)?;
            (p.has_our_state() && !p.is_current()).then(|| (t, p.difference()))
        });
        if let Some((table, detail)) = conflict {
            if policy.force {
                tracing::warn!(
                    "--force-apply: adding our rules on top of existing, different ISTIO_* state"
                );
                // Every desired rule, table by table in `Table::ALL` order, each table's in
                // its order: what `restore::payload` writes.
                let all: Vec<&Rule> = Table::ALL
                    .into_iter()
                    .flat_map(|t| desired.iter().filter(move |r| r.table == t))
                    .collect();
                let mut touched: Vec<Table> = all.iter().map(|r| r.table).collect();
                touched.dedup();
                return Ok(Transaction {
                    payload: restore::payload_of(&all),
                    touched,
                    ..Transaction::default()
                });
            }
            return Err(Conflict { table, detail });
        }
    }

    let mut tx = Transaction::default();
    for table in Table::ALL {
        let Some(p) = view(table) else {
            continue;
        };
        tx.kept.extend(p.kept.iter().cloned());
        let forced = policy.force && !p.desired.is_empty();
        if p.is_current() && !forced {
            continue;
        }
        tx.payload.push_str(&p.section());
        tx.touched.push(table);
        if p.empty_after() {
            tx.emptied.push(table);
        }
    }
    Ok(tx)
}

/// The rules of our shape in built-in chains that `desired` does not write (see the module
/// doc): what [`reconcile`] keeps and names, without planning anything.
pub fn kept(current: &SaveState, desired: &[Rule], resolver: &dyn OwnerResolver) -> Vec<String> {
    Table::ALL
        .into_iter()
        .flat_map(|t| TableView::new(t, current, &Wanted::new(t, desired, resolver), resolver).kept)
        .collect()
}

/// Computes the transaction that removes every ISTIO_* chain and every jump into one; the
/// other rules of our shape are kept and named (see the module doc).
pub fn cleanup(current: &SaveState) -> Transaction {
    let mut tx = Transaction::default();
    for table in Table::ALL {
        let p = TableView::new(
            table,
            current,
            &Wanted::new(table, &[], &NoResolver),
            &NoResolver,
        );
        tx.kept.extend(p.kept.iter().cloned());
        if !p.has_our_state() {
            continue;
        }
        restore::section(&mut tx.payload, p.name, Header::Save, |s| {
            for (c, rules) in &p.have {
                if !is_ours(c) {
                    TableView::delete_owned(s, c, rules);
                }
            }
            for c in p.current_ours() {
                s.push_str(&format!("-F {c}\n"));
            }
            for c in p.current_ours() {
                s.push_str(&format!("-X {c}\n"));
            }
        });
        tx.touched.push(table);
        if p.only_ours() {
            tx.emptied.push(table);
        }
    }
    tx
}

/// How many times each text occurs.
fn multiset<'a>(keys: impl Iterator<Item = &'a str>) -> BTreeMap<&'a str, usize> {
    let mut n: BTreeMap<&str, usize> = BTreeMap::new();
    for k in keys {
        *n.entry(k).or_default() += 1;
    }
    n
}

/// Compares the current state of one family with `desired`, chain by chain (only our rules
/// are compared; foreign rules in built-in chains are ignored). Order matters.
pub fn diff(
    family: Family,
    current: &SaveState,
    desired: &[Rule],
    resolver: &dyn OwnerResolver,
) -> Vec<Drift> {
    let mut out = Vec::new();
    for table in Table::ALL {
        // The view keeps no reference to the wanted side: its canonical texts go at once
        // (the comparison below writes its own; 7,000 rules' worth twice would count).
        let p = TableView::new(
            table,
            current,
            &Wanted::new(table, desired, resolver),
            resolver,
        );
        // Ours, wanted, per chain: (canonical, rule), in final order. The text of a rule is
        // written only when it is reported: 7,000 of them would double the peak memory.
        let mut want: BTreeMap<String, Vec<(String, &Rule)>> = BTreeMap::new();
        for r in &p.desired {
            let entry = want.entry(r.chain.to_string()).or_default();
            let item = (canonical(&r.args, resolver), *r);
            r.position.place(entry, item);
        }
        for c in &p.desired_chains {
            want.entry(c.to_string()).or_default();
        }
        // Ours, present, per chain: (canonical, tokens).
        let mut have: BTreeMap<String, Vec<(&str, &[Token])>> = BTreeMap::new();
        for c in p.current_ours() {
            have.entry(c.to_string()).or_default();
        }
        let mut idx: BTreeMap<&str, usize> = BTreeMap::new();
        for (c, toks) in &p.cur.rules {
            let i = idx.entry(c.as_str()).or_default();
            let (canon, owned) = &p.have[c][*i];
            let serving = p.serving.get(c).and_then(|v| v.get(*i)).copied() == Some(true);
            *i += 1;
            if *owned || serving {
                have.entry(c.clone())
                    .or_default()
                    .push((canon.as_str(), toks.as_slice()));
            }
        }
        let chains: BTreeSet<&String> = want.keys().chain(have.keys()).collect();
        for c in chains {
            let w = want.get(c).map_or(&[][..], Vec::as_slice);
            let h = have.get(c).map_or(&[][..], Vec::as_slice);
            let chain_missing = is_ours(c) && !have.contains_key(c);
            let chain_extra = is_ours(c) && !want.contains_key(c);
            // Multisets of canonical texts: each rule wanted is served by one rule there.
            let take = |pool: &mut BTreeMap<&str, usize>, k: &str| match pool.get_mut(k) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    true
                }
                _ => false,
            };
            let mut missing = Vec::new();
            let mut pool = multiset(h.iter().map(|(k, _)| *k));
            for (k, r) in w {
                if !take(&mut pool, k) {
                    missing.push(format!("-A {} {}", r.chain, r.spec()));
                }
            }
            let mut extra = Vec::new();
            let mut pool = multiset(w.iter().map(|(k, _)| k.as_str()));
            for (k, toks) in h {
                if !take(&mut pool, k) {
                    extra.push(format!("-A {c} {}", toks.join(" ")));
                }
            }
            if chain_missing {
                missing.insert(0, format!("-N {c}"));
            }
            if chain_extra {
                extra.insert(0, format!("-N {c}"));
            }
            let same_order = w
                .iter()
                .map(|(k, _)| k.as_str())
                .eq(h.iter().map(|(k, _)| *k));
            let out_of_order = missing.is_empty() && extra.is_empty() && !same_order;
            if !missing.is_empty() || !extra.is_empty() || out_of_order {
                out.push(Drift {
                    place: Place::Iptables(family, None),
                    table: table.name().to_string(),
                    chain: Some(c.clone()),
                    missing,
                    extra,
                    out_of_order,
                    unread: Vec::new(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::iptables::save::{parse_save, tokenize};
    use crate::config::tests;
    use crate::model::NoResolver;

    const RECONCILE: Policy = Policy {
        reconcile: true,
        force: false,
    };

    /// What iptables-save would print after applying `payload` to `base` (a tiny model of
    /// iptables-restore --noflush good enough for our own payloads).
    fn apply_model(base: &SaveState, payload: &str) -> SaveState {
        let mut st = base.clone();
        let mut table = String::new();
        for line in payload.lines() {
            let toks = tokenize(line);
            if let Some(t) = line.strip_prefix('*') {
                table = t.trim().to_string();
                let ts = st.tables.entry(table.clone()).or_default();
                if ts.builtin.is_empty() {
                    ts.builtin = match table.as_str() {
                        "nat" => ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"].as_slice(),
                        "mangle" => {
                            ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"].as_slice()
                        }
                        "raw" => ["PREROUTING", "OUTPUT"].as_slice(),
                        _ => ["INPUT", "FORWARD", "OUTPUT"].as_slice(),
                    }
                    .iter()
                    .map(|c| (c.to_string(), "ACCEPT".to_string()))
                    .collect();
                }
                continue;
            }
            let ts = st.tables.get_mut(&table).unwrap();
            let chain_rules = |ts: &TableState, c: &str| -> Vec<usize> {
                ts.rules
                    .iter()
                    .enumerate()
                    .filter(|(_, (ch, _))| ch == c)
                    .map(|(i, _)| i)
                    .collect()
            };
            match toks.first().map(|t| &**t) {
                Some("-N") => ts.user_chains.push(toks[1].to_string()),
                Some("-X") => ts.user_chains.retain(|c| *c != toks[1]),
                Some("-F") => ts.rules.retain(|(c, _)| *c != toks[1]),
                Some("-D") => {
                    let idx = chain_rules(ts, &toks[1])[toks[2].parse::<usize>().unwrap() - 1];
                    ts.rules.remove(idx);
                }
                Some("-A") => ts.rules.push((toks[1].to_string(), toks[2..].to_vec())),
                Some("-I") => {
                    let n: usize = toks[2].parse().unwrap();
                    let idxs = chain_rules(ts, &toks[1]);
                    let at = idxs.get(n - 1).copied().unwrap_or(ts.rules.len());
                    ts.rules
                        .insert(at, (toks[1].to_string(), toks[3..].to_vec()));
                }
                _ => {}
            }
        }
        st
    }

    fn fresh(rules: &[Rule]) -> SaveState {
        apply_model(&SaveState::default(), &restore::payload(rules))
    }

    /// Per table: user chains and canonical rules per chain.
    type Canon = BTreeMap<String, (BTreeSet<String>, BTreeMap<String, Vec<String>>)>;

    fn canon_state(st: &SaveState) -> Canon {
        st.tables
            .iter()
            .map(|(t, ts)| {
                let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for (c, r) in &ts.rules {
                    chains
                        .entry(c.clone())
                        .or_default()
                        .push(canonical(r, &NoResolver));
                }
                let users: BTreeSet<String> = ts.user_chains.iter().cloned().collect();
                (t.clone(), (users, chains))
            })
            .filter(|(_, (u, c))| !u.is_empty() || !c.is_empty())
            .collect()
    }

    fn plan(argv: &[&str]) -> Vec<Rule> {
        tests::plan(tests::build(argv, &[]).unwrap()).v4
    }

    /// `st` without the rules a transaction kept (as [`Transaction::kept`] names them).
    fn without(st: &SaveState, kept: &[String]) -> SaveState {
        let mut st = st.clone();
        for (t, ts) in st.tables.iter_mut() {
            ts.rules.retain(|(c, r)| {
                let line = format!("{t} {c}: -A {c} {}", r.join(" "));
                !kept.contains(&line)
            });
        }
        st
    }

    /// Canonical texts are fixed points: the canonical text of a canonical text, tokenized,
    /// is itself. Held for every rule of these configs
    /// (every mode, DNS, exclusions, both families) and for the saved forms in
    /// `our_rules_equal_their_saved_form`.
    #[test]
    fn canonical_forms_are_fixed_points() {
        let configs: &[&[&str]] = &[
            &[
                "-p",
                "15001",
                "-z",
                "15006",
                "-u",
                "1337",
                "-m",
                "REDIRECT",
                "-i",
                "*",
                "-x",
                "10.0.0.0/8,192.168.1.1",
                "-b",
                "*",
                "-d",
                "15090,15020",
                "-o",
                "9000",
                "-q",
                "8080",
                "-k",
                "veth0",
                "-c",
                "eth9",
            ],
            &[
                "-m",
                "TPROXY",
                "-b",
                "80,443",
                "-i",
                "10.0.0.0/8",
                "-u",
                "1337",
                "-g",
                "1337,1338",
                "--drop-invalid",
                "--redirect-dns",
                "--capture-all-dns",
            ],
            &[
                "-m", "TPROXY", "-b", "*", "-d", "22", "-i", "*", "-t", "1400", "-r", "140",
            ],
        ];
        for argv in configs {
            for env in [&[][..], &[("ENABLE_INBOUND_IPV6", "true")][..]] {
                let p = tests::plan(tests::build(argv, env).unwrap());
                for r in p.v4.iter().chain(&p.v6) {
                    let c = canonical(&r.args, &NoResolver);
                    assert_eq!(canonical(&tokenize(&c), &NoResolver), c, "{r}");
                    assert!(!c.contains("  ") && !c.starts_with(' '), "{c:?}");
                }
            }
        }
    }

    #[test]
    fn our_tproxy_rules_in_built_in_chains_have_our_shape_and_near_misses_do_not() {
        let r = plan(&["-m", "TPROXY", "-b", "*", "-c", "eth1"]);
        let mut seen = 0;
        for rule in &r {
            let builtin = is_builtin(rule.chain);
            if !builtin || rule.target().is_some_and(|t| is_ours(&t)) {
                continue;
            }
            let canon = canonical(&rule.args, &NoResolver);
            assert!(has_our_shape(rule.table, rule.chain, &canon), "{rule}");
            seen += 1;
        }
        assert!(seen >= 4, "{seen} non-jump rules in built-in chains");
        for (table, chain, rule) in [
            (
                Table::Mangle,
                "PREROUTING",
                "-p tcp -m mark ! --mark 1337 -j CONNMARK --save-mark",
            ),
            (
                Table::Mangle,
                "PREROUTING",
                "-p udp -m mark --mark 1337 -j CONNMARK --save-mark",
            ),
            (
                Table::Mangle,
                "OUTPUT",
                "-o lo -p tcp -m mark --mark 1337 -j ACCEPT",
            ),
            (
                Table::Mangle,
                "OUTPUT",
                "-p tcp -m connmark --mark 1337 -j CONNMARK --save-mark",
            ),
            (
                Table::Mangle,
                "OUTPUT",
                "-d 10.0.0.1/32 -o lo -p tcp -m owner --uid-owner 1 -j MARK --set-mark 1",
            ),
            (Table::Nat, "PREROUTING", "! -i eth1 -j RETURN"),
            (Table::Nat, "OUTPUT", "-o eth1 -p tcp -j RETURN"),
        ] {
            let canon = canonical(&tokenize(rule), &NoResolver);
            assert!(
                !has_our_shape(table, chain, &canon),
                "{table}/{chain} {rule}"
            );
        }
    }

    #[test]
    fn fresh_namespace_gets_istios_payload() {
        let r = plan(&["-b", "*"]);
        let tx = reconcile(&SaveState::default(), &r, &NoResolver, RECONCILE).unwrap();
        assert_eq!(tx.payload, restore::payload(&r));
        assert_eq!(tx.touched, vec![Table::Nat]);
    }

    #[test]
    fn same_config_twice_commits_nothing() {
        let r = plan(&["-b", "*", "-c", "eth9", "-k", "veth1", "-i", "10.0.0.0/8"]);
        let tx = reconcile(&fresh(&r), &r, &NoResolver, RECONCILE).unwrap();
        assert!(tx.is_noop(), "{}", tx.payload);
    }

    #[test]
    fn changed_config_converges_to_fresh_apply() {
        let configs: &[&[&str]] = &[
            &["-b", "*"],
            &["-b", "8080"],
            &["-m", "TPROXY", "-b", "8080", "-c", "eth3"],
            &["-m", "TPROXY", "-b", "*", "-k", "veth0"],
            &["-b", "", "-i", "*", "-k", "veth0"],
            &["--drop-invalid", "-o", "3306"],
        ];
        for from in configs {
            for to in configs {
                let (a, b) = (plan(from), plan(to));
                let st = fresh(&a);
                let tx = reconcile(&st, &b, &NoResolver, RECONCILE).unwrap();
                let after = apply_model(&st, &tx.payload);
                // The earlier config's rules of our shape (interface RETURNs, TPROXY marks)
                // are kept and named; everything else is as a fresh apply leaves it.
                assert_eq!(
                    canon_state(&without(&after, &tx.kept)),
                    canon_state(&fresh(&b)),
                    "{from:?} -> {to:?}\n{}",
                    tx.payload
                );
                let again = reconcile(&after, &b, &NoResolver, RECONCILE).unwrap();
                assert!(
                    again.is_noop(),
                    "{from:?} -> {to:?} second run: {}",
                    again.payload
                );
                // Back and forth again: kept rules serve, nothing piles up.
                let back = apply_model(
                    &after,
                    &reconcile(&after, &a, &NoResolver, RECONCILE)
                        .unwrap()
                        .payload,
                );
                let forth = apply_model(
                    &back,
                    &reconcile(&back, &b, &NoResolver, RECONCILE)
                        .unwrap()
                        .payload,
                );
                assert_eq!(
                    canon_state(&forth),
                    canon_state(&after),
                    "{from:?} -> {to:?} -> {from:?} -> {to:?}"
                );
            }
        }
    }

    #[test]
    fn foreign_rules_survive_and_half_applied_state_is_repaired() {
        let r = plan(&["-b", "*", "-c", "eth9"]);
        let foreign = parse_save(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:FOREIGN - [0:0]\n-A OUTPUT -p tcp --dport 9 -j FOREIGN\n-A FOREIGN -j RETURN\nCOMMIT\n",
        )
        .unwrap();
        // Every prefix of the payload applied.
        let payload = restore::payload(&r);
        let lines: Vec<&str> = payload.lines().collect();
        for n in 1..lines.len() {
            let mut partial: String = lines[..n].join("\n");
            partial.push_str("\nCOMMIT\n");
            let st = apply_model(&foreign, &partial);
            let tx = reconcile(&st, &r, &NoResolver, RECONCILE).unwrap();
            let after = apply_model(&st, &tx.payload);
            let want = apply_model(&foreign, &payload);
            assert_eq!(
                canon_state(&after),
                canon_state(&want),
                "prefix {n}\n{}",
                tx.payload
            );
        }
        // Cleanup returns to the foreign-only state, but for the `-c eth9` RETURNs, which
        // anyone may have written: kept, and named.
        let st = apply_model(&foreign, &payload);
        let tx = cleanup(&st);
        assert_eq!(
            tx.kept,
            [
                "nat OUTPUT: -A OUTPUT -o eth9 -j RETURN",
                "nat PREROUTING: -A PREROUTING -i eth9 -j RETURN"
            ]
        );
        assert_eq!(
            canon_state(&without(&apply_model(&st, &tx.payload), &tx.kept)),
            canon_state(&foreign),
            "{}",
            tx.payload
        );
        assert!(tx.emptied.is_empty());
    }

    #[test]
    fn a_lone_foreign_rule_of_our_shape_stays_foreign_run_after_run() {
        for argv in [&["-b", "*"][..], &["-m", "TPROXY", "-b", "*"]] {
            let r = plan(argv);
            for foreign in [
                "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -i eth9 -j RETURN\nCOMMIT\n",
                "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -o eth9 -j RETURN\nCOMMIT\n",
                "*mangle\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -i eth9 -j RETURN\nCOMMIT\n",
            ] {
                let st = parse_save(foreign).unwrap();
                let tx = reconcile(&st, &r, &NoResolver, RECONCILE).unwrap();
                let first = apply_model(&st, &tx.payload);
                let again = reconcile(&first, &r, &NoResolver, RECONCILE).unwrap();
                assert!(again.is_noop(), "{argv:?} {foreign}: {}", again.payload);
            }
        }
    }

    #[test]
    fn dropped_interface_rules_are_kept_and_named() {
        // -k veth1 under TPROXY writes a lone `-i veth1 -j RETURN` into nat PREROUTING; no
        // one can tell it from another program's, so a reconfigure keeps it and says so.
        let (a, b) = (
            plan(&["-m", "TPROXY", "-b", "*", "-k", "veth1", "-c", "eth9"]),
            plan(&["-m", "TPROXY", "-b", "*"]),
        );
        let st = fresh(&a);
        let tx = reconcile(&st, &b, &NoResolver, RECONCILE).unwrap();
        assert!(
            tx.kept
                .contains(&"nat PREROUTING: -A PREROUTING -i veth1 -j RETURN".to_string()),
            "{:?}",
            tx.kept
        );
        assert!(
            tx.kept
                .contains(&"mangle PREROUTING: -A PREROUTING -i eth9 -j RETURN".to_string()),
            "{:?}",
            tx.kept
        );
        let after = apply_model(&st, &tx.payload);
        assert_eq!(
            canon_state(&without(&after, &tx.kept)),
            canon_state(&fresh(&b)),
            "{}",
            tx.payload
        );
        let again = reconcile(&after, &b, &NoResolver, RECONCILE).unwrap();
        assert!(again.is_noop(), "{}", again.payload);
        assert_eq!(again.kept, tx.kept, "named on every run");
    }

    /// Foreign look-alikes of every rule shape we write into built-in chains, there before
    /// the first run: an identical re-run commits nothing, and a cleanup keeps them.
    #[test]
    fn foreign_look_alikes_are_never_taken_for_ours() {
        let configs: &[&[&str]] = &[
            &["-b", "*", "-c", "eth9"],
            &["-m", "TPROXY", "-b", "*", "-c", "eth9", "-k", "veth1"],
        ];
        for argv in configs {
            let r = plan(argv);
            // Every non-jump rule the config writes into a built-in chain, written first by
            // someone else, plus a TPROXY mark rule with another mark.
            let mut foreign = String::new();
            for t in Table::ALL {
                let lines: Vec<String> = r
                    .iter()
                    .filter(|x| x.table == t && is_builtin(x.chain))
                    .filter(|x| !x.target().is_some_and(|n| is_ours(&n)))
                    .map(|x| format!("-A {} {}", x.chain, x.spec()))
                    .collect();
                if !lines.is_empty() {
                    foreign.push_str(&format!("*{}\n{}\nCOMMIT\n", t.name(), lines.join("\n")));
                }
            }
            foreign.push_str(
                "*mangle\n-A PREROUTING -p tcp -m mark --mark 0x1 -j CONNMARK --save-mark\nCOMMIT\n",
            );
            let st = parse_save(&foreign).unwrap();
            let tx = reconcile(&st, &r, &NoResolver, RECONCILE).unwrap();
            let first = apply_model(&st, &tx.payload);
            let again = reconcile(&first, &r, &NoResolver, RECONCILE).unwrap();
            assert!(again.is_noop(), "{argv:?}: {}", again.payload);
            // Every foreign rule is still there after the cleanup.
            let gone = apply_model(&first, &cleanup(&first).payload);
            for (t, ts) in &st.tables {
                for rule in &ts.rules {
                    assert!(
                        gone.tables[t].rules.contains(rule),
                        "{argv:?}: {t} {rule:?} was deleted"
                    );
                }
            }
        }
    }

    #[test]
    fn duplicate_jumps_are_collapsed() {
        let r = plan(&[]);
        let mut st = fresh(&r);
        st.tables
            .get_mut("nat")
            .unwrap()
            .rules
            .push(("OUTPUT".into(), tokenize("-j ISTIO_OUTPUT")));
        let tx = reconcile(&st, &r, &NoResolver, RECONCILE).unwrap();
        let after = apply_model(&st, &tx.payload);
        assert_eq!(after.tables["nat"].chain_rules("OUTPUT").count(), 1);
    }

    #[test]
    fn no_reconcile_refuses_conflicts_and_force_adds_on_top() {
        let (a, b) = (plan(&["-b", "*"]), plan(&["-b", "8080"]));
        let st = fresh(&a);
        let e = reconcile(
            &st,
            &b,
            &NoResolver,
            Policy {
                reconcile: false,
                force: false,
            },
        )
        .unwrap_err();
        assert_eq!(e.table, Table::Nat);
        assert!(
            reconcile(
                &st,
                &a,
                &NoResolver,
                Policy {
                    reconcile: false,
                    force: false
                }
            )
            .unwrap()
            .is_noop()
        );
        let tx = reconcile(
            &st,
            &b,
            &NoResolver,
            Policy {
                reconcile: false,
                force: true,
            },
        )
        .unwrap();
        assert_eq!(tx.payload, restore::payload(&b));
    }

    #[test]
    fn diff_names_missing_extra_and_reordered_rules() {
        let r = plan(&["-b", "*"]);
        let st = fresh(&r);
        assert!(diff(Family::V4, &st, &r, &NoResolver).is_empty());
        // Delete one rule.
        let mut gone = st.clone();
        let nat = gone.tables.get_mut("nat").unwrap();
        let i = nat
            .rules
            .iter()
            .position(|(c, _)| c == "ISTIO_INBOUND")
            .unwrap();
        nat.rules.remove(i);
        let d = diff(Family::V4, &gone, &r, &NoResolver);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].chain.as_deref(), Some("ISTIO_INBOUND"));
        assert_eq!(
            d[0].missing,
            vec!["-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN"]
        );
        // Add one.
        let mut more = st.clone();
        more.tables.get_mut("nat").unwrap().rules.push((
            "ISTIO_OUTPUT".into(),
            tokenize("-p tcp --dport 1 -j RETURN"),
        ));
        let d = diff(Family::V4, &more, &r, &NoResolver);
        assert_eq!(
            d[0].extra,
            vec!["-A ISTIO_OUTPUT -p tcp --dport 1 -j RETURN"]
        );
        // Swap two.
        let mut swapped = st.clone();
        let nat = swapped.tables.get_mut("nat").unwrap();
        let idx: Vec<usize> = nat
            .rules
            .iter()
            .enumerate()
            .filter(|(_, (c, _))| c == "ISTIO_OUTPUT")
            .map(|(i, _)| i)
            .collect();
        nat.rules.swap(idx[0], idx[1]);
        let d = diff(Family::V4, &swapped, &r, &NoResolver);
        assert!(
            d[0].out_of_order && d[0].missing.is_empty() && d[0].extra.is_empty(),
            "{d:?}"
        );
        // Foreign rules do not count.
        let mut foreign = st.clone();
        foreign
            .tables
            .get_mut("nat")
            .unwrap()
            .rules
            .push(("OUTPUT".into(), tokenize("-p tcp --dport 9 -j ACCEPT")));
        assert!(diff(Family::V4, &foreign, &r, &NoResolver).is_empty());
    }

    #[test]
    fn removing_everything_from_a_table_marks_it_emptied() {
        let (a, b) = (
            plan(&["-b", "80", "--redirect-dns", "--capture-all-dns"]),
            plan(&["-b", "80"]),
        );
        let tx = reconcile(&fresh(&a), &b, &NoResolver, RECONCILE).unwrap();
        assert_eq!(tx.emptied, vec![Table::Raw]);
        let tx = cleanup(&fresh(&a));
        assert_eq!(tx.emptied, vec![Table::Nat, Table::Raw]);
        // TPROXY's mark rules are kept: mangle is not emptied.
        let tx = cleanup(&fresh(&plan(&["-m", "TPROXY", "-b", "80"])));
        assert_eq!(tx.emptied, vec![Table::Nat]);
        assert!(!tx.kept.is_empty());
    }
}
