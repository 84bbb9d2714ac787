//! `verify` for the native nftables backend: our live tables against the ones the config
//! asks for, table by table and chain by chain, in the canonical text of
//! [`nftstate`](crate::backend::nft::state) on both sides. A table or chain that is missing
//! or not wanted, a base chain attached elsewhere, a rule missing, extra or out of order,
//! and any listing line that is neither a chain nor a rule (we never write one) are drift.

use crate::backend::nft::build::{FAMILY, Table};
use crate::backend::nft::state::{Chain, NftState, TableState};
use crate::backend::{Drift, Place};

/// A drift of one of our tables or chains, nothing in it yet.
fn drift(table: Table, chain: Option<String>) -> Drift {
    Drift {
        place: Place::Nftables,
        table: table.name().to_string(),
        chain,
        missing: Vec::new(),
        extra: Vec::new(),
        out_of_order: false,
        unread: Vec::new(),
    }
}

fn is_empty(d: &Drift) -> bool {
    d.missing.is_empty() && d.extra.is_empty() && !d.out_of_order && d.unread.is_empty()
}

/// `live` against `want`: the differences, tables in Istio's order, chains in the wanted
/// order, then the unwanted ones.
pub fn diff(live: &NftState, want: &NftState) -> Vec<Drift> {
    let mut out = Vec::new();
    for table in Table::ALL {
        let (w, l) = (want.tables.get(&table), live.tables.get(&table));
        if w.is_none() && l.is_none() {
            continue;
        }
        let empty = TableState::default();
        let mut top = drift(table, None);
        let line = format!("table {FAMILY} {table}");
        match (w, l) {
            (Some(_), None) => top.missing.push(line),
            (None, Some(_)) => top.extra.push(line),
            _ => {}
        }
        let (w, l) = (w.unwrap_or(&empty), l.unwrap_or(&empty));
        top.unread = l.other.clone();
        if !is_empty(&top) {
            out.push(top);
        }
        let mut names: Vec<&str> = w.chains.iter().map(|c| c.name.as_str()).collect();
        for c in &l.chains {
            if !names.contains(&c.name.as_str()) {
                names.push(&c.name);
            }
        }
        for name in names {
            let d = chain_diff(table, w.chain(name), l.chain(name));
            if !is_empty(&d) {
                out.push(d);
            }
        }
    }
    out
}

fn chain_diff(table: Table, want: Option<&Chain>, live: Option<&Chain>) -> Drift {
    let mut d = drift(table, want.or(live).map(|c| c.name.clone()));
    match (want, live) {
        (Some(w), None) => d.missing.push(w.to_string()),
        (None, Some(l)) => d.extra.push(l.to_string()),
        (Some(w), Some(l)) if w.hook != l.hook => {
            d.missing.push(w.to_string());
            d.extra.push(l.to_string());
        }
        _ => {}
    }
    let none = Vec::new();
    let w = want.map_or(&none, |c| &c.rules);
    let l = live.map_or(&none, |c| &c.rules);
    let mut pool: Vec<&String> = l.iter().collect();
    for r in w {
        match pool.iter().position(|x| *x == r) {
            Some(i) => {
                pool.remove(i);
            }
            None => d.missing.push(r.clone()),
        }
    }
    d.extra.extend(pool.into_iter().cloned());
    let same_rules = d.missing.is_empty() && d.extra.is_empty();
    d.out_of_order = same_rules && w != l;
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::nft::build::build;
    use crate::backend::nft::state::desired;
    use crate::config::tests::{SEED, build as config};
    use crate::model::NoResolver;

    fn seed() -> NftState {
        let (c, f) = config(SEED, &[]).unwrap();
        desired(&build(&c, &f), &NoResolver)
    }

    #[test]
    fn equal_states_have_no_difference() {
        assert_eq!(diff(&seed(), &seed()), []);
    }

    #[test]
    fn a_missing_rule_an_extra_chain_and_a_reorder_are_each_named() {
        let want = seed();
        let mut live = seed();
        let nat = live.tables.get_mut(&Table::Nat).unwrap();
        let out = nat
            .chains
            .iter_mut()
            .find(|c| c.name == "istio-output")
            .unwrap();
        let gone = out.rules.remove(1);
        nat.chains.push(Chain {
            name: "x".into(),
            hook: None,
            rules: vec!["counter return".into()],
        });
        let pre = nat
            .chains
            .iter_mut()
            .find(|c| c.name == "prerouting")
            .unwrap();
        pre.rules.push("counter accept".into());
        pre.rules.rotate_right(1);
        let d = diff(&live, &want);
        assert_eq!(d.len(), 3, "{d:#?}");
        assert_eq!(d[0].chain.as_deref(), Some("prerouting"));
        assert_eq!(d[0].extra, ["counter accept"]);
        assert!(!d[0].out_of_order);
        assert_eq!(d[1].chain.as_deref(), Some("istio-output"));
        assert_eq!(d[1].missing, [gone]);
        assert_eq!(d[2].extra, ["chain x", "counter return"]);

        let mut live = seed();
        let out = live
            .tables
            .get_mut(&Table::Nat)
            .unwrap()
            .chains
            .iter_mut()
            .find(|c| c.name == "istio-output")
            .unwrap();
        out.rules.swap(0, 1);
        let d = diff(&live, &want);
        assert_eq!(d.len(), 1);
        assert!(d[0].out_of_order && d[0].missing.is_empty() && d[0].extra.is_empty());
    }

    #[test]
    fn missing_and_unwanted_tables_and_unread_lines_are_drift() {
        let want = seed();
        let mut live = seed();
        live.tables.remove(&Table::Nat);
        live.tables.insert(Table::Raw, TableState::default());
        live.tables.get_mut(&Table::Raw).unwrap().other = vec!["flags dormant".into()];
        let d = diff(&live, &want);
        assert_eq!(d[0].missing, ["table inet istio-proxy-nat"]);
        assert!(d[1].missing[0].starts_with("chain prerouting { type nat hook prerouting"));
        let raw = d.iter().find(|x| x.table == "istio-proxy-raw").unwrap();
        assert_eq!(raw.extra, ["table inet istio-proxy-raw"]);
        assert_eq!(raw.unread, ["flags dormant"]);
        let mut hooked = seed();
        let pre = hooked
            .tables
            .get_mut(&Table::Nat)
            .unwrap()
            .chains
            .iter_mut()
            .find(|c| c.name == "output")
            .unwrap();
        pre.hook.as_mut().unwrap().priority = 0;
        let d = diff(&hooked, &want);
        assert_eq!(d.len(), 1);
        assert!(d[0].extra[0].contains("priority 0;"), "{d:?}");
    }
}
