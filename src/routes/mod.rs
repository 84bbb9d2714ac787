//! The `ip` plumbing (TPROXY policy routing, the ::6 address), in one place: which steps a
//! config needs, and for each step how it is shown (as the `ip` command Istio prints: the
//! dry-run script and the messages), recognised in the kernel's state and undone. Applying
//! makes it idempotent: each step is made only when its effect is missing, and can be
//! undone. Real runs make the changes over rtnetlink ([`crate::system::rtnl_change`]) and
//! read them back over netlink ([`crate::system::rtnl`]): no `ip` program.

pub mod apply;
pub mod shadow;

use std::fmt;

use std::collections::BTreeSet;

use crate::config::{Config, HostFacts, InboundPorts, Mode};
use crate::model::Family;
use crate::system::host_view::Probe;
use crate::system::rtnl::Routing;
use crate::system::rtnl_change::Target;

/// `::6`, the source address of inbound passthrough over IPv6 (on `lo`, as `::6/128`).
pub const INBOUND_V6_ADDRESS: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// An `ip` command the mode needs, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpCommand {
    /// `ip -6 addr add ::6/128 dev lo`: the source address of inbound passthrough over IPv6.
    AddInboundV6Address,
    /// `ip -4|-6 rule add fwmark MARK lookup TABLE`.
    RuleAdd {
        family: Family,
        mark: u32,
        table: u32,
    },
    /// `ip -4|-6 route add local default dev lo table TABLE`.
    RouteAddLocal { family: Family, table: u32 },
}

impl IpCommand {
    /// Arguments for `ip`.
    pub fn args(&self) -> Vec<String> {
        let fam = |f: &Family| match f {
            Family::V4 => "-4",
            Family::V6 => "-6",
        };
        let v: Vec<String> = match self {
            IpCommand::AddInboundV6Address => vec!["-6", "addr", "add", "::6/128", "dev", "lo"]
                .into_iter()
                .map(String::from)
                .collect(),
            IpCommand::RuleAdd {
                family,
                mark,
                table,
            } => vec![
                fam(family).into(),
                "rule".into(),
                "add".into(),
                "fwmark".into(),
                mark.to_string(),
                "lookup".into(),
                table.to_string(),
            ],
            IpCommand::RouteAddLocal { family, table } => vec![
                fam(family).into(),
                "route".into(),
                "add".into(),
                "local".into(),
                "default".into(),
                "dev".into(),
                "lo".into(),
                "table".into(),
                table.to_string(),
            ],
        };
        v
    }
}

impl fmt::Display for IpCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ip {}", self.args().join(" "))
    }
}

/// The `ip` plumbing a config needs (Istio's `tproxy.ConfigureRoutes`, shared by the
/// iptables and nftables backends), in the order a real apply makes it: the ::6 address,
/// then the TPROXY routes, then the rules that look them up (Istio adds the rules first; a
/// run stopped in between would leave a rule into an empty table).
pub fn ip_commands(cfg: &Config, facts: &HostFacts) -> Vec<IpCommand> {
    let mut ip = Vec::new();
    if facts.ipv6 {
        ip.push(IpCommand::AddInboundV6Address);
    }
    if cfg.mode == Mode::Tproxy && cfg.inbound_ports != InboundPorts::None {
        let families: &[Family] = if facts.ipv6 {
            &[Family::V4, Family::V6]
        } else {
            &[Family::V4]
        };
        for &family in families {
            ip.push(IpCommand::RouteAddLocal {
                family,
                table: cfg.tproxy_route_table,
            });
        }
        for &family in families {
            ip.push(IpCommand::RuleAdd {
                family,
                mark: cfg.tproxy_mark,
                table: cfg.tproxy_route_table,
            });
        }
    }
    ip
}

/// `cmd` as a line of a dry-run script: Istio's `ip` command, run only when what it adds
/// is missing, so that running the script again changes nothing (`ip rule add` would add a
/// second rule, and `ip route add`, `ip addr add` fail with "File exists"). The check comes
/// first on the line, the command after `||`.
pub fn script_line(cmd: &IpCommand) -> String {
    let check = match cmd {
        IpCommand::AddInboundV6Address => {
            "ip -6 addr show dev lo | grep -q 'inet6 ::6/128 '".to_string()
        }
        IpCommand::RuleAdd {
            family,
            mark,
            table,
        } => format!(
            "ip {} rule show fwmark {mark} lookup {table} | grep -q .",
            fam(*family)
        ),
        IpCommand::RouteAddLocal { family, table } => format!(
            "ip {} route show table {table} 2>/dev/null | grep -q '^local default dev lo '",
            fam(*family)
        ),
    };
    format!("{check} || {cmd}")
}

/// The `ip` changes a cleanup undoes: both families, whatever IPv6 says, with this config's
/// TPROXY mark and table.
pub fn teardown(cfg: &Config) -> Vec<IpCommand> {
    let mut ip = vec![IpCommand::AddInboundV6Address];
    for family in [Family::V4, Family::V6] {
        ip.push(IpCommand::RuleAdd {
            family,
            mark: cfg.tproxy_mark,
            table: cfg.tproxy_route_table,
        });
        ip.push(IpCommand::RouteAddLocal {
            family,
            table: cfg.tproxy_route_table,
        });
    }
    ip
}

fn fam(f: Family) -> &'static str {
    match f {
        Family::V4 => "-4",
        Family::V6 => "-6",
    }
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The mark and table of this config's TPROXY routing (`--tproxy-mark`,
/// `--tproxy-route-table`), whatever the mode: a rule with either into an empty table is a
/// leftover of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TproxyRouting {
    pub mark: u32,
    pub table: u32,
}

impl TproxyRouting {
    pub fn of(cfg: &Config) -> TproxyRouting {
        TproxyRouting {
            mark: cfg.tproxy_mark,
            table: cfg.tproxy_route_table,
        }
    }
}

/// The `ip` command that removes `cmd`'s effect (how a removal is named).
pub fn undo_args(cmd: &IpCommand) -> Vec<String> {
    match cmd {
        IpCommand::AddInboundV6Address => args(&["-6", "addr", "del", "::6/128", "dev", "lo"]),
        IpCommand::RuleAdd {
            family,
            mark,
            table,
        } => {
            let (m, t) = (mark.to_string(), table.to_string());
            args(&[fam(*family), "rule", "del", "fwmark", &m, "lookup", &t])
        }
        IpCommand::RouteAddLocal { family, table } => {
            let t = table.to_string();
            args(&[
                fam(*family),
                "route",
                "del",
                "local",
                "default",
                "dev",
                "lo",
                "table",
                &t,
            ])
        }
    }
}

/// The family `cmd` acts on.
pub fn family_of(cmd: &IpCommand) -> Family {
    match cmd {
        IpCommand::AddInboundV6Address => Family::V6,
        IpCommand::RuleAdd { family, .. } | IpCommand::RouteAddLocal { family, .. } => *family,
    }
}

/// What the kernel is asked to add or remove for `cmd`; a rule with a known priority is
/// named by it too, so that exactly that rule goes, or comes back there.
pub fn target(cmd: &IpCommand, priority: Option<u32>) -> Target {
    match *cmd {
        IpCommand::AddInboundV6Address => Target::LoV6HostAddress(INBOUND_V6_ADDRESS),
        IpCommand::RuleAdd {
            family,
            mark,
            table,
        } => Target::Rule {
            family,
            mark,
            table,
            priority,
        },
        IpCommand::RouteAddLocal { family, table } => Target::LocalDefaultRoute { family, table },
    }
}

/// Whether `cmd`'s effect is in `routing` (`None` for the address, which it does not hold);
/// with a priority, whether exactly that rule is.
pub fn present_in_routing(
    cmd: &IpCommand,
    priority: Option<u32>,
    routing: &Routing,
) -> Option<bool> {
    match cmd {
        IpCommand::AddInboundV6Address => None,
        IpCommand::RuleAdd { mark, table, .. } => Some(routing.rules.iter().any(|r| {
            r.plain
                && r.mark == Some(*mark)
                && r.mask == u32::MAX
                && r.table == *table
                && priority.is_none_or(|p| r.priority == p)
        })),
        IpCommand::RouteAddLocal { table, .. } => {
            Some(routing.local_default_tables.contains(table))
        }
    }
}

/// The kernel's state could not be read over netlink.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("could not read the {family} policy routing over netlink")]
    Routing { family: Family },
    #[error("could not read the addresses of lo")]
    Addresses,
}

/// The policy routing of `family`, read over netlink.
pub fn routing(family: Family, probe: &dyn Probe) -> Result<Routing, ReadError> {
    probe.routing(family).ok_or(ReadError::Routing { family })
}

/// Whether `cmd`'s effect exists (exactly the rule at `priority`, when given), read in
/// process over rtnetlink.
pub fn present(
    cmd: &IpCommand,
    priority: Option<u32>,
    probe: &dyn Probe,
) -> Result<bool, ReadError> {
    match cmd {
        IpCommand::AddInboundV6Address => probe
            .lo_has_v6_host_address(INBOUND_V6_ADDRESS)
            .ok_or(ReadError::Addresses),
        _ => {
            let family = family_of(cmd);
            let routing = routing(family, probe)?;
            present_in_routing(cmd, priority, &routing).ok_or(ReadError::Routing { family })
        }
    }
}

/// The TPROXY policy routing this tool added (in any earlier run, whatever mark and table it
/// used) that `wanted` does not ask for, as the commands that added it; rules first, then
/// routes. Ours: a plain `fwmark M lookup T` rule whose table T holds a `local default dev
/// lo` route; such a rule into a table with no route at all whose mark or table is ours
/// (`configured`'s, or those of a rule of the first kind): a rule into an empty table, which
/// a run stopped between removing a route and its rule leaves; and a `local default dev lo`
/// route no remaining rule looks up. Duplicates of a wanted rule are leftovers too.
pub fn leftovers(
    family: Family,
    routing: &Routing,
    wanted: &[IpCommand],
    configured: TproxyRouting,
) -> Vec<IpCommand> {
    leftovers_at(family, routing, wanted, configured)
        .into_iter()
        .map(|(c, _)| c)
        .collect()
}

/// [`leftovers`], each rule with its priority (to remove exactly that rule, and to put it
/// back where it was).
pub fn leftovers_at(
    family: Family,
    routing: &Routing,
    wanted: &[IpCommand],
    configured: TproxyRouting,
) -> Vec<(IpCommand, Option<u32>)> {
    let fwmark_rule = |r: &crate::system::rtnl::Rule| r.plain && r.mask == u32::MAX;
    let routes_locally = |r: &crate::system::rtnl::Rule| {
        fwmark_rule(r) && r.mark.is_some() && routing.local_default_tables.contains(&r.table)
    };
    let mut our_marks: BTreeSet<u32> = BTreeSet::from([configured.mark]);
    our_marks.extend(
        routing
            .rules
            .iter()
            .filter(|r| routes_locally(r))
            .filter_map(|r| r.mark),
    );
    let our_tables: BTreeSet<u32> = routing
        .local_default_tables
        .iter()
        .copied()
        .chain([configured.table])
        .collect();
    let into_nothing = |r: &crate::system::rtnl::Rule| {
        // Never the kernel's own tables (a foreign rule may look up an empty main table).
        fwmark_rule(r)
            && !matches!(r.table, 0 | 253..=255)
            && r.mark
                .is_some_and(|m| our_marks.contains(&m) || our_tables.contains(&r.table))
            && !routing.tables_with_routes.contains(&r.table)
    };

    let mut out = Vec::new();
    let mut kept: Vec<IpCommand> = Vec::new();
    let mut others: Vec<u32> = Vec::new();
    // Oldest first: the kernel numbers a new rule below the lowest one there, so the highest
    // number is the rule a fresh apply made; a duplicate added later goes.
    let mut rules: Vec<&crate::system::rtnl::Rule> = routing.rules.iter().collect();
    rules.sort_by_key(|r| std::cmp::Reverse(r.priority));
    for r in rules {
        let ours = routes_locally(r) || into_nothing(r);
        let Some(mark) = r.mark.filter(|_| ours) else {
            others.push(r.table);
            continue;
        };
        let cmd = IpCommand::RuleAdd {
            family,
            mark,
            table: r.table,
        };
        if wanted.contains(&cmd) && !kept.contains(&cmd) {
            kept.push(cmd);
        } else {
            out.push((cmd, Some(r.priority)));
        }
    }
    for &table in &routing.local_default_tables {
        let cmd = IpCommand::RouteAddLocal { family, table };
        let looked_up = others.contains(&table)
            || kept
                .iter()
                .any(|k| matches!(k, IpCommand::RuleAdd { table: t, .. } if *t == table));
        if !wanted.contains(&cmd) && !looked_up {
            out.push((cmd, None));
        }
    }
    out
}

/// The `ip` command that adds (`add`) or removes (`!add`) `cmd`'s effect, as a message names
/// the step; a rule with a known priority is named by it too.
pub fn change_args(cmd: &IpCommand, add: bool, priority: Option<u32>) -> Vec<String> {
    match (cmd, priority) {
        (
            IpCommand::RuleAdd {
                family,
                mark,
                table,
            },
            Some(p),
        ) => {
            let (p, m, t) = (p.to_string(), mark.to_string(), table.to_string());
            let verb = if add { "add" } else { "del" };
            args(&[
                fam(*family),
                "rule",
                verb,
                "priority",
                &p,
                "fwmark",
                &m,
                "lookup",
                &t,
            ])
        }
        _ if add => cmd.args(),
        _ => undo_args(cmd),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::rtnl::Rule;

    const CONFIGURED: TproxyRouting = TproxyRouting {
        mark: 1337,
        table: 133,
    };

    fn rule(priority: u32, mark: Option<u32>, table: u32, plain: bool) -> Rule {
        Rule {
            priority,
            mark,
            mask: u32::MAX,
            table,
            plain,
            ..Rule::default()
        }
    }

    fn v4_rule(mark: u32, table: u32) -> IpCommand {
        IpCommand::RuleAdd {
            family: Family::V4,
            mark,
            table,
        }
    }

    fn v4_route(table: u32) -> IpCommand {
        IpCommand::RouteAddLocal {
            family: Family::V4,
            table,
        }
    }

    #[test]
    fn leftovers_are_found_by_their_route_whatever_mark_and_table() {
        let routing = Routing {
            rules: vec![
                rule(0, None, 255, true),
                rule(100, Some(1400), 140, true),
                rule(101, Some(1337), 133, true),
                rule(102, Some(1337), 133, true),
                rule(103, Some(9), 300, true),
                rule(104, Some(7), 150, false),
                rule(32766, None, 254, true),
            ],
            local_default_tables: [133, 140, 150, 160].into(),
            tables_with_routes: [133, 140, 150, 160, 254, 255, 300].into(),
        };
        let v4 = Family::V4;
        let wanted = vec![v4_rule(1337, 133), v4_route(133)];
        assert_eq!(
            leftovers(v4, &routing, &wanted, CONFIGURED),
            vec![
                // A later duplicate of ours, the earlier config's rule; not table 300 (no
                // route of ours there) nor the rule with other selectors.
                v4_rule(1337, 133),
                v4_rule(1400, 140),
                // Routes nothing looks up any more; table 150 is still looked up.
                v4_route(140),
                v4_route(160),
            ]
        );
        assert_eq!(present_in_routing(&wanted[0], None, &routing), Some(true));
        assert_eq!(
            present_in_routing(&wanted[0], Some(102), &routing),
            Some(true)
        );
        assert_eq!(
            present_in_routing(&wanted[0], Some(103), &routing),
            Some(false)
        );
        assert_eq!(present_in_routing(&wanted[1], None, &routing), Some(true));
        let at = leftovers_at(v4, &routing, &wanted, CONFIGURED);
        assert_eq!(at[0].1, Some(101));
        assert_eq!(at[1].1, Some(100));
        assert_eq!(
            change_args(&at[0].0, false, at[0].1).join(" "),
            "-4 rule del priority 101 fwmark 1337 lookup 133"
        );
        assert_eq!(
            change_args(&at[1].0, true, at[1].1).join(" "),
            "-4 rule add priority 100 fwmark 1400 lookup 140"
        );
        assert_eq!(
            change_args(&at[2].0, false, None).join(" "),
            "-4 route del local default dev lo table 140"
        );
        assert_eq!(
            leftovers(v4, &Routing::default(), &wanted, CONFIGURED),
            vec![]
        );
    }

    /// A rule of our mark or table into a table with no route is a leftover (what a rollback
    /// that put the rule back without its route left); a rule of another mark and table, one
    /// into a table that routes, or into the kernel's own tables, is not.
    #[test]
    fn a_rule_of_ours_into_an_empty_table_is_a_leftover() {
        let routing = Routing {
            rules: vec![
                // The configured mark into an empty table.
                rule(100, Some(1337), 133, true),
                // Another mark into the configured (empty) table.
                rule(101, Some(5), 133, true),
                // The mark of a rule that routes locally (1400 -> 140), into an empty table.
                rule(102, Some(1400), 141, true),
                rule(103, Some(1400), 140, true),
                // Foreign: mark and table not ours, or a table with routes, or main.
                rule(104, Some(9), 300, true),
                rule(105, Some(1337), 200, true),
                rule(106, Some(1337), 254, true),
                // Not plain (an interface selector): never ours.
                rule(107, Some(1337), 134, false),
            ],
            local_default_tables: [140].into(),
            tables_with_routes: [140, 200].into(),
        };
        let v4 = Family::V4;
        // REDIRECT: nothing wanted.
        assert_eq!(
            leftovers(v4, &routing, &[], CONFIGURED),
            vec![
                v4_rule(1400, 140),
                v4_rule(1400, 141),
                v4_rule(5, 133),
                v4_rule(1337, 133),
                v4_route(140),
            ]
        );
        // TPROXY of the configured mark and table: the rule stays (its route is added).
        let wanted = [v4_rule(1337, 133), v4_route(133)];
        assert!(!leftovers(v4, &routing, &wanted, CONFIGURED).contains(&v4_rule(1337, 133)),);
        // A rule into an empty table of another mark and table is not ours.
        let only = Routing {
            rules: vec![rule(100, Some(9), 300, true)],
            ..Routing::default()
        };
        assert_eq!(leftovers(v4, &only, &[], CONFIGURED), vec![]);
    }

    #[test]
    fn changes_name_the_step_and_the_target() {
        let rule = IpCommand::RuleAdd {
            family: Family::V6,
            mark: 7,
            table: 9,
        };
        assert_eq!(undo_args(&rule).join(" "), "-6 rule del fwmark 7 lookup 9");
        assert_eq!(
            target(&rule, Some(5)),
            Target::Rule {
                family: Family::V6,
                mark: 7,
                table: 9,
                priority: Some(5)
            }
        );
        assert_eq!(
            target(&IpCommand::AddInboundV6Address, None),
            Target::LoV6HostAddress("::6".parse().unwrap())
        );
    }
}
