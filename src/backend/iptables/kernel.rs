//! What `iptables-nft-save` printed, held against nf_tables' own structure read over netlink
//! (`system::nftprobe`): the save is trusted only where the two agree.
//!
//! The save hides what iptables cannot express: a dormant table reads as live; a table
//! holding one rule iptables cannot translate prints as a comment only; a base chain another
//! tool added is left out with its rules. Read as the save shows them, each makes a run see
//! "nothing of ours" where our capture is live, or "nothing to commit" where it is switched
//! off. So every disagreement in one of iptables' tables is a reason the table "cannot be
//! read safely" ([`Unreadable`]), and a dormant table is named ([`SaveState::dormant`]) for
//! the plan to wake (when it holds our chains) or refuse.

use std::collections::BTreeMap;

use super::save::{SaveState, Unreadable};
use crate::system::nftprobe::{BaseChain, NfTables};

/// The tables iptables-nft makes (and iptables-nft-save prints); other tables of the
/// family are another tool's, judged elsewhere (verify's findings).
const IPTABLES_TABLES: [&str; 5] = ["filter", "mangle", "nat", "raw", "security"];

/// The base chains iptables-nft makes in `table`: (name, hook, type, priority).
fn builtin_chains(table: &str) -> &'static [(&'static str, u32, &'static str, i32)] {
    match table {
        "filter" => &[
            ("INPUT", 1, "filter", 0),
            ("FORWARD", 2, "filter", 0),
            ("OUTPUT", 3, "filter", 0),
        ],
        "nat" => &[
            ("PREROUTING", 0, "nat", -100),
            ("INPUT", 1, "nat", 100),
            ("OUTPUT", 3, "nat", -100),
            ("POSTROUTING", 4, "nat", 100),
        ],
        "mangle" => &[
            ("PREROUTING", 0, "filter", -150),
            ("INPUT", 1, "filter", -150),
            ("FORWARD", 2, "filter", -150),
            ("OUTPUT", 3, "route", -150),
            ("POSTROUTING", 4, "filter", -150),
        ],
        "raw" => &[
            ("PREROUTING", 0, "filter", -300),
            ("OUTPUT", 3, "filter", -300),
        ],
        "security" => &[
            ("INPUT", 1, "filter", 50),
            ("FORWARD", 2, "filter", 50),
            ("OUTPUT", 3, "filter", 50),
        ],
        _ => &[],
    }
}

/// Records in `save` what the kernel's structure shows of it: the tables netlink listed
/// (the only proof a table was absent before a run), the dormant ones, and every
/// disagreement as [`Unreadable`].
pub fn check(save: &mut SaveState, kernel: &NfTables) {
    save.kernel_tables = Some(kernel.names());
    let mut unreadable = Vec::new();
    let mut bad = |table: &str, reason: String| {
        unreadable.push(Unreadable {
            table: table.to_string(),
            reason,
        })
    };
    for name in &save.incompatible {
        bad(
            name,
            "iptables-nft-save cannot show it (\"incompatible, use 'nft' tool\"): it holds a \
             rule written with nft in a form iptables cannot print"
                .into(),
        );
    }
    for name in save.tables.keys() {
        if kernel.table(name).is_none() {
            bad(
                name,
                "iptables-nft-save shows it, the kernel does not hold it".into(),
            );
        }
    }
    for t in &kernel.tables {
        let name = t.name.as_str();
        if !IPTABLES_TABLES.contains(&name) || save.incompatible.iter().any(|n| n == name) {
            continue;
        }
        if t.is_dormant() {
            save.dormant.push(name.to_string());
        }
        let Some(shown) = save.tables.get(name) else {
            bad(
                name,
                "the kernel holds it, iptables-nft-save leaves it out".into(),
            );
            continue;
        };
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for (chain, _) in &shown.rules {
            *counts.entry(chain.as_str()).or_default() += 1;
        }
        for c in &t.chains {
            let known = match &c.base {
                Some(base) => builtin_chains(name).iter().any(|&(n, hook, kind, prio)| {
                    c.name == n && base.hook == hook && base.kind == kind && base.priority == prio
                }),
                None => shown.user_chains.contains(&c.name),
            };
            if !known {
                bad(name, unknown_chain(&c.name, c.base.as_ref()));
                continue;
            }
            // Counted in base chains (where other tools insert rules ahead of our jumps).
            let printed = counts.get(c.name.as_str()).copied().unwrap_or(0);
            if let Some(held) = c.rules.filter(|&held| held != printed) {
                bad(
                    name,
                    format!(
                        "chain {} holds {held} rule(s) in the kernel, iptables-nft-save shows {printed}",
                        c.name
                    ),
                );
            }
        }
        for user in &shown.user_chains {
            if t.chain(user).is_none() {
                bad(
                    name,
                    format!("iptables-nft-save shows chain {user}, the kernel does not hold it"),
                );
            }
        }
    }
    save.unreadable = unreadable;
}

fn unknown_chain(name: &str, base: Option<&BaseChain>) -> String {
    match base {
        Some(b) => format!(
            "base chain {name} (hook {}, type {}, priority {}) is not one iptables makes",
            hook_name(b.hook),
            b.kind,
            b.priority
        ),
        None => format!("chain {name} is in the kernel, iptables-nft-save does not show it"),
    }
}

fn hook_name(hook: u32) -> String {
    match hook {
        0 => "prerouting".into(),
        1 => "input".into(),
        2 => "forward".into(),
        3 => "output".into(),
        4 => "postrouting".into(),
        n => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::iptables::save::parse_save;
    use crate::system::nftprobe::{NfChain, NfTable, TABLE_F_DORMANT};

    const SAVE: &str = "# Generated by iptables-nft-save v1.8.9 (nf_tables)\n\
        *nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
        :POSTROUTING ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n\
        -A OUTPUT -p tcp -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -j RETURN\nCOMMIT\n";

    fn base(name: &str, hook: u32, prio: i32, rules: usize) -> NfChain {
        NfChain {
            name: name.into(),
            base: Some(BaseChain {
                hook,
                kind: "nat".into(),
                priority: prio,
                policy: Some(1),
            }),
            rules: Some(rules),
        }
    }

    fn nat(flags: u32, extra: Vec<NfChain>) -> NfTables {
        let mut chains = vec![
            base("OUTPUT", 3, -100, 1),
            NfChain {
                name: "ISTIO_OUTPUT".into(),
                base: None,
                rules: None,
            },
        ];
        chains.extend(extra);
        NfTables {
            tables: vec![NfTable {
                name: "nat".into(),
                flags,
                owner: None,
                chains,
            }],
        }
    }

    fn checked(text: &str, kernel: &NfTables) -> SaveState {
        let mut s = parse_save(text).unwrap();
        check(&mut s, kernel);
        s
    }

    #[test]
    fn agreement_is_readable() {
        let s = checked(SAVE, &nat(0, vec![]));
        assert_eq!(s.unreadable, vec![]);
        assert!(s.dormant.is_empty());
        assert_eq!(s.kernel_tables, Some(vec!["nat".to_string()]));
    }

    #[test]
    fn a_dormant_table_is_named() {
        let s = checked(SAVE, &nat(TABLE_F_DORMANT, vec![]));
        assert_eq!(s.dormant, vec!["nat"]);
        assert_eq!(s.unreadable, vec![]);
    }

    #[test]
    fn an_incompatible_table_cannot_be_read() {
        let s = checked(
            "# Table `nat' is incompatible, use 'nft' tool.\n",
            &nat(0, vec![base("OUTPUT", 3, -100, 2)]),
        );
        assert_eq!(s.unreadable.len(), 1, "{:?}", s.unreadable);
        assert_eq!(s.unreadable[0].table, "nat");
        assert!(s.unreadable[0].reason.contains("incompatible"));
    }

    #[test]
    fn a_table_the_save_leaves_out_cannot_be_read() {
        let s = checked("", &nat(0, vec![]));
        assert_eq!(s.unreadable.len(), 1);
        assert!(
            s.unreadable[0].reason.contains("leaves it out"),
            "{:?}",
            s.unreadable
        );
    }

    #[test]
    fn a_foreign_base_chain_or_hidden_rules_cannot_be_read() {
        let s = checked(SAVE, &nat(0, vec![base("foo", 3, 0, 1)]));
        assert_eq!(s.unreadable.len(), 1);
        assert_eq!(
            s.unreadable[0].reason,
            "base chain foo (hook output, type nat, priority 0) is not one iptables makes"
        );
        // OUTPUT at another priority is not iptables' OUTPUT.
        let mut k = nat(0, vec![]);
        k.tables[0].chains[0] = base("OUTPUT", 3, 0, 1);
        assert_eq!(checked(SAVE, &k).unreadable.len(), 1);
        // A rule the save does not print.
        let mut k = nat(0, vec![]);
        k.tables[0].chains[0].rules = Some(2);
        let s = checked(SAVE, &k);
        assert_eq!(
            s.unreadable[0].reason,
            "chain OUTPUT holds 2 rule(s) in the kernel, iptables-nft-save shows 1"
        );
    }

    #[test]
    fn tables_of_other_tools_are_not_iptables_business() {
        let mut k = nat(0, vec![]);
        k.tables.push(NfTable {
            name: "kube-proxy".into(),
            flags: TABLE_F_DORMANT,
            owner: None,
            chains: vec![base("x", 0, 0, 5)],
        });
        let s = checked(SAVE, &k);
        assert_eq!(s.unreadable, vec![]);
        assert!(s.dormant.is_empty());
    }
}
