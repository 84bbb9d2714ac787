//! Renders a family's rules as an iptables-restore payload, exactly as Istio writes it:
//! tables in alphabetical order; per table, `-N` for every ISTIO_* chain (chains with rules, in
//! order of their first rule, then chains only jumped to), then the rules in order, then COMMIT.

use std::collections::BTreeMap;

use crate::rules::{Rule, Table, chain};

/// The rules of one family grouped by table, with the chains each table declares.
pub fn payload(rules: &[Rule]) -> String {
    let mut tables: BTreeMap<Table, (Vec<&'static str>, Vec<String>)> = BTreeMap::new();
    let declare =
        |table: Table,
         name: &str,
         tables: &mut BTreeMap<Table, (Vec<&'static str>, Vec<String>)>| {
            let entry = tables.entry(table).or_default();
            if let Some(c) = owned_chain(name)
                && !entry.0.contains(&c)
            {
                entry.0.push(c);
            }
        };
    for r in rules {
        declare(r.table, r.chain, &mut tables);
    }
    for r in rules {
        if let Some(t) = r.target() {
            declare(r.table, t, &mut tables);
        }
    }
    for r in rules {
        tables.entry(r.table).or_default().1.push(r.to_string());
    }
    let mut out = String::new();
    for (table, (chains, lines)) in tables {
        out.push_str(&format!("* {table}\n"));
        for c in chains {
            out.push_str(&format!("-N {c}\n"));
        }
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// The static name of one of our chains (`ISTIO_*`), if `name` is one.
fn owned_chain(name: &str) -> Option<&'static str> {
    [
        chain::INBOUND,
        chain::REDIRECT,
        chain::IN_REDIRECT,
        chain::OUTPUT,
        chain::OUTPUT_DNS,
        chain::DIVERT,
        chain::TPROXY,
        chain::DROP,
    ]
    .into_iter()
    .find(|c| *c == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Position;

    fn rule(table: Table, chain: &'static str, args: &[&str]) -> Rule {
        Rule {
            table,
            chain,
            position: Position::Append,
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn tables_sorted_chains_declared_in_first_use_order() {
        let rules = vec![
            rule(Table::Raw, "OUTPUT", &["-j", chain::OUTPUT_DNS]),
            rule(
                Table::Nat,
                chain::REDIRECT,
                &["-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001"],
            ),
            rule(Table::Nat, "OUTPUT", &["-j", chain::OUTPUT]),
            rule(Table::Nat, chain::OUTPUT, &["-j", "RETURN"]),
            rule(Table::Mangle, chain::DROP, &["-j", "DROP"]),
        ];
        assert_eq!(
            payload(&rules),
            "* mangle\n-N ISTIO_DROP\n-A ISTIO_DROP -j DROP\nCOMMIT\n\
             * nat\n-N ISTIO_REDIRECT\n-N ISTIO_OUTPUT\n-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n\
             -A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -j RETURN\nCOMMIT\n\
             * raw\n-N ISTIO_OUTPUT_DNS\n-A OUTPUT -j ISTIO_OUTPUT_DNS\nCOMMIT\n"
        );
    }

    #[test]
    fn empty_rules_give_empty_payload() {
        assert_eq!(payload(&[]), "");
    }
}
