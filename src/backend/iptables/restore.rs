//! Renders a family's rules as an iptables-restore payload, exactly as Istio writes it:
//! tables in alphabetical order; per table, `-N` for every ISTIO_* chain (chains with rules, in
//! order of their first rule, then chains only jumped to), then the rules in order, then COMMIT.

use std::fmt::Write as _;

use crate::model::{Rule, Table, chain};

/// The ISTIO_* chains a table's rules need, in Istio's order: chains with rules in the order
/// of their first rule, then chains that are only jumped to.
pub fn declared_chains(rules: &[&Rule]) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    // A rule can only jump to one of our chains if one of its words is that chain's name:
    // the others (thousands of `-d CIDR -j RETURN`) are not parsed for their target.
    let names = rules.iter().map(|r| r.chain).chain(
        rules
            .iter()
            .filter(|r| r.args.iter().any(|a| owned_chain(a).is_some()))
            .filter_map(|r| r.target())
            .filter_map(|t| owned_chain(&t)),
    );
    for c in names {
        if c.starts_with(chain::PREFIX) && !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

/// How a section names its table: `* nat` as Istio's payload does (the dry-run script matches
/// Istio's byte for byte), or `*nat` as iptables-save does (the transactions we commit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    Istio,
    Save,
}

/// Appends one table's section of an iptables-restore input to `out`: the `*` line, what
/// `body` writes (whole lines), `COMMIT`. The one writer of that framing.
pub fn section(out: &mut String, table: &str, header: Header, body: impl FnOnce(&mut String)) {
    match header {
        Header::Istio => out.push_str("* "),
        Header::Save => out.push('*'),
    }
    out.push_str(table);
    out.push('\n');
    body(out);
    out.push_str("COMMIT\n");
}

/// The rules of one family as an iptables-restore payload.
pub fn payload(rules: &[Rule]) -> String {
    payload_of(&rules.iter().collect::<Vec<_>>())
}

/// [`payload`] of borrowed rules.
pub fn payload_of(rules: &[&Rule]) -> String {
    let mut out = String::new();
    for table in Table::ALL {
        let in_table: Vec<&Rule> = rules.iter().copied().filter(|r| r.table == table).collect();
        if in_table.is_empty() {
            continue;
        }
        section(&mut out, table.name(), Header::Istio, |out| {
            for c in declared_chains(&in_table) {
                let _ = writeln!(out, "-N {c}");
            }
            for r in in_table {
                let _ = writeln!(out, "{r}");
            }
        });
    }
    out
}

/// The static name of one of our chains (`ISTIO_*`), if `name` is one.
pub fn owned_chain(name: &str) -> Option<&'static str> {
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
    use crate::model::Position;

    fn rule(table: Table, chain: &'static str, args: &[&str]) -> Rule {
        Rule {
            table,
            chain,
            position: Position::Append,
            args: args.iter().map(|s| crate::model::token(s)).collect(),
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
