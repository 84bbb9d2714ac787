//! Policy routing rules that take TPROXY's marked packets before ours can (verify): TPROXY
//! mode marks the inbound TCP it captures (`--tproxy-mark`, 1337 by default) and our `ip rule
//! add fwmark 1337 lookup 133` sends what carries the mark to `local default dev lo` in table
//! 133, where the proxy's transparent socket takes it. The kernel tries the rules in order
//! (by priority: `ip rule` lists them so); a rule listed before ours that matches the mark and
//! routes elsewhere (`lookup main`), or drops (`blackhole`, `unreachable`, `prohibit`),
//! decides first. Pure: over the rules read over netlink ([`crate::system::rtnl`]).

use crate::model::{Family, Finding};
use crate::routes::IpCommand;
use crate::system::rtnl::{
    FR_ACT_BLACKHOLE, FR_ACT_GOTO, FR_ACT_NOP, FR_ACT_PROHIBIT, FR_ACT_TO_TBL, FR_ACT_UNREACHABLE,
    Rule,
};

/// The local table: it holds only local and broadcast addresses, so a marked packet to
/// anywhere else goes on to the next rule (and one to a local address is delivered locally,
/// as our route would).
const LOCAL: u32 = 255;
const MAIN: u32 = 254;
const DEFAULT: u32 = 253;
/// IPPROTO_TCP: what TPROXY captures.
const TCP: u8 = 6;

/// A table as `ip rule` names it.
fn table_name(t: u32) -> String {
    match t {
        LOCAL => "local".into(),
        MAIN => "main".into(),
        DEFAULT => "default".into(),
        t => t.to_string(),
    }
}

/// `r` as `ip rule show` prints it (a space for its tab): `100: from all fwmark 0x539
/// lookup main`.
pub fn describe(r: &Rule) -> String {
    let mut s = format!("{}: ", r.priority);
    if r.invert {
        s.push_str("not ");
    }
    let from = r.selectors.iter().find(|x| x.starts_with("from "));
    s.push_str(from.map_or("from all", String::as_str));
    for x in r.selectors.iter().filter(|x| {
        !x.starts_with("from ") && !x.starts_with("goto ") && !x.starts_with("suppress_")
    }) {
        s.push(' ');
        s.push_str(x);
    }
    if let Some(p) = r.ip_proto {
        s.push_str(&format!(" ipproto {p}"));
    }
    if let Some(m) = r.mark {
        s.push_str(&format!(" fwmark 0x{m:x}"));
        if r.mask != u32::MAX {
            s.push_str(&format!("/0x{:x}", r.mask));
        }
    }
    match r.action {
        FR_ACT_TO_TBL => s.push_str(&format!(" lookup {}", table_name(r.table))),
        FR_ACT_GOTO => {
            let to = r.selectors.iter().find_map(|x| x.strip_prefix("goto "));
            s.push_str(&format!(" goto {}", to.unwrap_or("?")));
        }
        FR_ACT_NOP => s.push_str(" nop"),
        FR_ACT_BLACKHOLE => s.push_str(" blackhole"),
        FR_ACT_UNREACHABLE => s.push_str(" unreachable"),
        FR_ACT_PROHIBIT => s.push_str(" prohibit"),
        a => s.push_str(&format!(" action {a}")),
    }
    for x in r.selectors.iter().filter(|x| x.starts_with("suppress_")) {
        s.push(' ');
        s.push_str(x);
    }
    s
}

/// `ip -4 rule` or `ip -6 rule`.
fn place(family: Family) -> String {
    match family {
        Family::V4 => "ip -4 rule".into(),
        Family::V6 => "ip -6 rule".into(),
    }
}

/// The rules of `family` (`rules`, in the kernel's order) that decide, or may decide, packets
/// carrying one of `wanted`'s TPROXY marks before the rule of ours that routes them to the
/// proxy. A wanted rule that is not there is left out (verify reports it missing).
pub fn findings(family: Family, rules: &[Rule], wanted: &[IpCommand]) -> Vec<Finding> {
    let mut out: Vec<Finding> = Vec::new();
    for cmd in wanted {
        let IpCommand::RuleAdd {
            family: f,
            mark,
            table,
        } = cmd
        else {
            continue;
        };
        if *f != family {
            continue;
        }
        let is_ours = |r: &Rule| {
            r.plain
                && r.action == FR_ACT_TO_TBL
                && r.mark == Some(*mark)
                && r.mask == u32::MAX
                && r.table == *table
        };
        let Some(at) = rules.iter().position(is_ours) else {
            continue;
        };
        let ours = &rules[at];
        for r in &rules[..at] {
            let Some(effect) = judge(r, *mark, *table) else {
                continue;
            };
            let finding = Finding {
                place: place(family),
                rule: describe(r),
                effect: format!(
                    "{effect}, before our `fwmark {mark} lookup {table}` (priority {}) can send \
                     them to the proxy over lo: inbound TCP is not captured",
                    ours.priority
                ),
            };
            if !out.contains(&finding) {
                out.push(finding);
            }
        }
    }
    out
}

/// What `r` does to the packets marked `mark` (our rule looks up `table`), as the start of
/// the effect; `None` when it leaves them to the rules after it.
fn judge(r: &Rule, mark: u32, table: u32) -> Option<String> {
    if r.ip_proto.is_some_and(|p| p != TCP) && !r.invert {
        return None;
    }
    let marked = r.mark.is_none_or(|m| (mark & r.mask) == (m & r.mask));
    // Other selectors narrow it to some packets (or, inverted, widen it): said so.
    let specific = !r.selectors.iter().all(|x| x.starts_with("suppress_")) || r.ip_proto.is_some();
    let selectors: Vec<&str> = r
        .selectors
        .iter()
        .map(String::as_str)
        .filter(|x| !x.starts_with("goto ") && !x.starts_with("suppress_"))
        .collect();
    let matches = if r.invert {
        // Inverted: it takes what its selectors do not match. With the mark as its only
        // selector, exactly the packets of another mark.
        specific || !marked
    } else {
        marked
    };
    if !matches {
        return None;
    }
    let who = if specific {
        format!(
            "packets marked {mark} {}matching `{}`",
            if r.invert { "not " } else { "" },
            selectors.join(" ")
        )
    } else {
        format!("packets marked {mark}")
    };
    let suppressed = r.selectors.iter().any(|x| x.starts_with("suppress_"));
    let may = specific || suppressed;
    let text = match r.action {
        FR_ACT_TO_TBL if r.table == LOCAL || r.table == table => return None,
        FR_ACT_TO_TBL if r.table == MAIN && !may => {
            format!("{who} are routed by table main")
        }
        FR_ACT_TO_TBL => format!(
            "{who} may be routed by table {} (when it holds a route for their destination{})",
            table_name(r.table),
            if suppressed {
                " that the rule's suppress_ limit keeps"
            } else {
                ""
            }
        ),
        FR_ACT_GOTO => format!("{who} jump to another rule (goto) and may be routed elsewhere"),
        FR_ACT_NOP => return None,
        FR_ACT_BLACKHOLE | FR_ACT_UNREACHABLE | FR_ACT_PROHIBIT if !may => {
            format!("{who} are dropped")
        }
        FR_ACT_BLACKHOLE | FR_ACT_UNREACHABLE | FR_ACT_PROHIBIT => {
            format!("{who} may be dropped")
        }
        _ => format!("{who} may be routed elsewhere"),
    };
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours() -> IpCommand {
        IpCommand::RuleAdd {
            family: Family::V4,
            mark: 1337,
            table: 133,
        }
    }

    fn rule(priority: u32, mark: Option<u32>, table: u32) -> Rule {
        Rule {
            priority,
            mark,
            table,
            ..Rule::default()
        }
    }

    /// The rules of a fresh namespace, with ours at `at`, plus `extra`.
    fn with(extra: Vec<Rule>) -> Vec<Rule> {
        let mut rules = vec![rule(0, None, LOCAL)];
        rules.extend(extra);
        rules.push(rule(32765, Some(1337), 133));
        rules.push(rule(32766, None, MAIN));
        rules.push(rule(32767, None, DEFAULT));
        rules.sort_by_key(|r| r.priority);
        rules
    }

    #[test]
    fn a_fwmark_rule_to_main_before_ours_takes_the_marked_packets() {
        let rules = with(vec![rule(100, Some(1337), MAIN)]);
        let f = findings(Family::V4, &rules, &[ours()]);
        assert_eq!(
            f,
            [Finding {
                place: "ip -4 rule".into(),
                rule: "100: from all fwmark 0x539 lookup main".into(),
                effect: "packets marked 1337 are routed by table main, before our `fwmark 1337 \
                         lookup 133` (priority 32765) can send them to the proxy over lo: \
                         inbound TCP is not captured"
                    .into(),
            }]
        );
        // The same in IPv6, only for the IPv6 rule of ours.
        let v6 = IpCommand::RuleAdd {
            family: Family::V6,
            mark: 1337,
            table: 133,
        };
        assert_eq!(
            findings(Family::V6, &rules, std::slice::from_ref(&v6))[0].place,
            "ip -6 rule"
        );
        assert!(findings(Family::V6, &rules, &[ours()]).is_empty());
    }

    #[test]
    fn the_default_rules_and_rules_after_ours_decide_nothing() {
        assert!(findings(Family::V4, &with(vec![]), &[ours()]).is_empty());
        // After ours (it was there first: ours went before it).
        let mut rules = with(vec![]);
        rules.insert(2, rule(32765, Some(1337), MAIN));
        assert!(findings(Family::V4, &rules, &[ours()]).is_empty());
        // Ours missing: verify says so elsewhere.
        let rules = vec![rule(100, Some(1337), MAIN)];
        assert!(findings(Family::V4, &rules, &[ours()]).is_empty());
    }

    #[test]
    fn other_marks_and_masks() {
        // Another mark: not ours to judge.
        let rules = with(vec![rule(100, Some(1400), MAIN)]);
        assert!(findings(Family::V4, &rules, &[ours()]).is_empty());
        // A mask that 1337 (0x539) matches: 0x1/0x1.
        let rules = with(vec![Rule {
            mask: 1,
            ..rule(100, Some(1), MAIN)
        }]);
        let f = findings(Family::V4, &rules, &[ours()]);
        assert_eq!(f[0].rule, "100: from all fwmark 0x1/0x1 lookup main");
        // No mark at all: every packet, the marked ones too.
        let rules = with(vec![rule(100, None, MAIN)]);
        assert_eq!(findings(Family::V4, &rules, &[ours()]).len(), 1);
        // `not fwmark 1400`: the packets marked 1337 are among them.
        let rules = with(vec![Rule {
            invert: true,
            ..rule(100, Some(1400), MAIN)
        }]);
        assert_eq!(
            findings(Family::V4, &rules, &[ours()])[0].rule,
            "100: not from all fwmark 0x578 lookup main"
        );
        // `not fwmark 1337`: not them.
        let rules = with(vec![Rule {
            invert: true,
            ..rule(100, Some(1337), MAIN)
        }]);
        assert!(findings(Family::V4, &rules, &[ours()]).is_empty());
    }

    #[test]
    fn drops_other_tables_and_specific_selectors() {
        let rules = with(vec![Rule {
            action: FR_ACT_BLACKHOLE,
            ..rule(100, Some(1337), 0)
        }]);
        let f = findings(Family::V4, &rules, &[ours()]);
        assert_eq!(f[0].rule, "100: from all fwmark 0x539 blackhole");
        assert!(f[0].effect.starts_with("packets marked 1337 are dropped"));

        let rules = with(vec![rule(100, Some(1337), 300)]);
        let f = findings(Family::V4, &rules, &[ours()]);
        assert!(
            f[0].effect
                .starts_with("packets marked 1337 may be routed by table 300"),
            "{f:?}"
        );

        let rules = with(vec![Rule {
            selectors: vec!["from 10.0.0.0/8".into(), "iif eth0".into()],
            plain: false,
            ..rule(100, None, MAIN)
        }]);
        let f = findings(Family::V4, &rules, &[ours()]);
        assert_eq!(f[0].rule, "100: from 10.0.0.0/8 iif eth0 lookup main");
        assert!(
            f[0].effect.starts_with(
                "packets marked 1337 matching `from 10.0.0.0/8 iif eth0` may be routed by table main"
            ),
            "{f:?}"
        );

        // wg-quick's `lookup main suppress_prefixlength 0`: only routes more specific than
        // the default one take the packets.
        let rules = with(vec![Rule {
            selectors: vec!["suppress_prefixlength 0".into()],
            plain: false,
            ..rule(100, None, MAIN)
        }]);
        let f = findings(Family::V4, &rules, &[ours()]);
        assert_eq!(
            f[0].rule,
            "100: from all lookup main suppress_prefixlength 0"
        );
        assert!(f[0].effect.contains("may be routed by table main"), "{f:?}");

        // UDP only: not TPROXY's TCP.
        let rules = with(vec![Rule {
            ip_proto: Some(17),
            plain: false,
            ..rule(100, None, MAIN)
        }]);
        assert!(findings(Family::V4, &rules, &[ours()]).is_empty());
        // The local table, our own table, nop: nothing decided.
        for r in [
            rule(100, None, LOCAL),
            rule(100, Some(1337), 133),
            Rule {
                action: FR_ACT_NOP,
                ..rule(100, None, 0)
            },
        ] {
            let rules = with(vec![Rule { plain: false, ..r }]);
            assert!(
                findings(Family::V4, &rules, &[ours()]).is_empty(),
                "{rules:?}"
            );
        }
    }
}
