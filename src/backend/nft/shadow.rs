//! What takes the packet before our `inet istio-proxy-*` chains can (verify): other tables'
//! base chains at our hooks, at an earlier priority (or the same one, "perhaps"), whose rules
//! drop the packet, NAT it themselves, untrack it before conntrack or take it with a `tproxy`
//! of their own ([`foreign::judge`], nft's semantics: an earlier `accept` takes nothing).
//! Our own tables are wholly ours (what differs in them is drift). Pure: over the config's
//! ruleset and the other tables as read ([`foreign::read`]).

use crate::backend::foreign::{
    self, Capture, ForeignTable, HOOK_OUTPUT, HOOK_PREROUTING, Kind, Packets,
};
use crate::backend::nft::build::{FAMILY, Ruleset, Table, chain};
use crate::model::Finding;

/// Every nft family sees what an `inet` chain does.
const FAMILIES: &[&str] = &["ip", "ip6", "inet"];

/// The hook and priority Istio attaches `table`'s base chain `name` at.
fn attachment(table: Table, name: &str) -> Option<(u32, i32)> {
    let hook = table.chains().iter().find(|c| c.name == name)?.hook?;
    let number = match hook.hook {
        "prerouting" => HOOK_PREROUTING,
        "output" => HOOK_OUTPUT,
        _ => return None,
    };
    Some((number, hook.priority))
}

/// Our base chains that capture, for [`foreign::judge`].
pub fn captures(rules: &Ruleset) -> Vec<Capture> {
    let has = |t: Table, c: &str| rules.rules_in(t).any(|r| r.chain == c);
    let dns = has(Table::Nat, chain::OUTPUT_DNS);
    let tproxy = has(Table::Mangle, chain::TPROXY);
    let mut out = Vec::new();
    for (table, name, kind, wanted, lost) in [
        (
            Table::Nat,
            chain::OUTPUT,
            Kind::Nat,
            true,
            "outbound TCP is not captured",
        ),
        (
            Table::Nat,
            chain::PREROUTING,
            Kind::Nat,
            true,
            "inbound TCP is not captured",
        ),
        (
            Table::Mangle,
            chain::PREROUTING,
            Kind::Tproxy,
            tproxy,
            "inbound TCP is not captured",
        ),
        (
            Table::Mangle,
            chain::OUTPUT,
            Kind::Marks,
            tproxy,
            "TPROXY's marks are not set or restored on outbound TCP (the proxy's replies to \
             captured inbound connections are not routed back to it)",
        ),
    ] {
        if !wanted || !has(table, name) {
            continue;
        }
        let Some((hook, priority)) = attachment(table, name) else {
            continue;
        };
        out.push(Capture {
            hook,
            priority,
            kind,
            packets: Packets {
                tcp: true,
                dns: dns && name == chain::OUTPUT && table == Table::Nat,
            },
            families: FAMILIES,
            ours: format!("{FAMILY} {table} {name}"),
            lost: lost.to_string(),
        });
    }
    out
}

/// The other tables' rules that decide, or may decide, what `rules` captures before our
/// chains can.
pub fn findings(rules: &Ruleset, others: &[ForeignTable]) -> Vec<Finding> {
    foreign::judge(others, &captures(rules))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::foreign::{Base, ForeignChain};
    use crate::backend::nft::build;
    use crate::config::tests::{SEED, build as config};

    fn ruleset(mode: &str, extra: &[&str]) -> Ruleset {
        let mut args = SEED.to_vec();
        let m = args.iter().position(|a| *a == "-m").unwrap();
        args[m + 1] = mode;
        args.extend_from_slice(extra);
        let (cfg, facts) = config(&args, &[]).unwrap();
        build::build(&cfg, &facts)
    }

    fn other(hook: u32, kind: &str, priority: i32, rules: &[&str]) -> ForeignTable {
        ForeignTable {
            family: "ip".into(),
            name: "foo".into(),
            chains: vec![ForeignChain {
                name: "c".into(),
                base: Some(Base {
                    hook,
                    kind: kind.into(),
                    priority,
                    drops: false,
                }),
                count: rules.len(),
                rules: Some(rules.iter().map(|r| r.to_string()).collect()),
            }],
        }
    }

    #[test]
    fn our_chains_are_the_captures() {
        let c = captures(&ruleset("REDIRECT", &[]));
        let ours: Vec<(&str, i32)> = c.iter().map(|c| (c.ours.as_str(), c.priority)).collect();
        assert_eq!(
            ours,
            [
                ("inet istio-proxy-nat output", -100),
                ("inet istio-proxy-nat prerouting", -100)
            ]
        );
        assert!(!c[0].packets.dns);
        let c = captures(&ruleset(
            "REDIRECT",
            &["--redirect-dns", "--capture-all-dns"],
        ));
        assert!(c[0].packets.dns && !c[1].packets.dns);
        let c = captures(&ruleset("TPROXY", &[]));
        let kinds: Vec<Kind> = c.iter().map(|c| c.kind).collect();
        assert_eq!(kinds, [Kind::Nat, Kind::Tproxy, Kind::Marks]);
        assert_eq!(c[1].priority, -150);
    }

    #[test]
    fn an_earlier_nat_chain_that_redirects_or_drops() {
        let rules = ruleset("REDIRECT", &[]);
        let f = findings(
            &rules,
            &[other(
                HOOK_OUTPUT,
                "nat",
                -150,
                &["meta l4proto tcp redirect to :9999"],
            )],
        );
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].place, "nft table ip foo chain c");
        assert!(
            f[0].effect.ends_with(
                "before ours (inet istio-proxy-nat output, priority -100), and NAT is decided \
                 once per connection, by the first nat chain that NATs: outbound TCP is not \
                 captured"
            ),
            "{f:?}"
        );
        let f = findings(
            &rules,
            &[other(
                HOOK_PREROUTING,
                "filter",
                -300,
                &["tcp dport 8080 drop"],
            )],
        );
        assert!(
            f[0].effect
                .starts_with("for packets matching `tcp dport 8080`, TCP is dropped")
        );
    }

    #[test]
    fn an_earlier_accept_or_a_later_chain_takes_nothing() {
        let rules = ruleset("REDIRECT", &[]);
        assert_eq!(
            findings(
                &rules,
                &[other(
                    HOOK_OUTPUT,
                    "nat",
                    -150,
                    &["meta l4proto tcp accept"]
                )]
            ),
            []
        );
        assert_eq!(
            findings(
                &rules,
                &[other(
                    HOOK_OUTPUT,
                    "nat",
                    0,
                    &["meta l4proto tcp redirect to :1"]
                )]
            ),
            []
        );
        // UDP only, without DNS capture.
        assert_eq!(
            findings(
                &rules,
                &[other(HOOK_OUTPUT, "filter", -300, &["udp dport 53 drop"])]
            ),
            []
        );
    }
}
