//! The `ip` plumbing (TPROXY policy routing, the ::6 address), in one place: which steps a
//! config needs, and for each step how it is added, shown, recognised in the output and
//! undone. Applying makes it idempotent: each step is run only when its effect is missing,
//! and can be undone. We shell out to iproute2's `ip`.

pub mod apply;
pub mod shadow;

use std::fmt;

use crate::config::{Config, HostFacts, InboundPorts, Mode};
use crate::model::{Family, parse_number};
use crate::system::exec::{ExecError, Runner};
use crate::system::host_view::Probe;
use crate::system::rtnl::Routing;

/// `::6`, the source address of inbound passthrough over IPv6 (on `lo`, as `::6/128`).
const INBOUND_V6_ADDRESS: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

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

/// The `ip` plumbing a config needs, in Istio's order (its `tproxy.ConfigureRoutes`, shared
/// by the iptables and nftables backends): the ::6 address, then TPROXY rules, then routes.
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
            ip.push(IpCommand::RuleAdd {
                family,
                mark: cfg.tproxy_mark,
                table: cfg.tproxy_route_table,
            });
        }
        for &family in families {
            ip.push(IpCommand::RouteAddLocal {
                family,
                table: cfg.tproxy_route_table,
            });
        }
    }
    ip
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

/// The `ip ... show` command whose output tells whether `cmd`'s effect exists.
fn show_args(cmd: &IpCommand) -> Vec<String> {
    match cmd {
        IpCommand::AddInboundV6Address => args(&["-6", "addr", "show", "dev", "lo"]),
        // -N: table numbers, not names (`main`, `default`, `local`).
        IpCommand::RuleAdd { family, .. } => args(&["-N", fam(*family), "rule", "show"]),
        IpCommand::RouteAddLocal { family, table } => {
            let t = table.to_string();
            args(&[fam(*family), "route", "show", "table", &t])
        }
    }
}

/// Whether `show` output (of `show_args(cmd)`) contains `cmd`'s effect.
pub fn present_in(cmd: &IpCommand, show: &str) -> bool {
    match cmd {
        IpCommand::AddInboundV6Address => show
            .lines()
            .any(|l| l.trim_start().starts_with("inet6 ::6/128 ")),
        IpCommand::RuleAdd { mark, table, .. } => show.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let after = |k: &str| {
                w.iter()
                    .position(|x| *x == k)
                    .and_then(|i| w.get(i + 1))
                    .copied()
            };
            let mark_ok = after("fwmark").is_some_and(|m| {
                let m = m.split('/').next().unwrap_or(m);
                parse_number(m) == Some(u64::from(*mark))
            });
            mark_ok && after("lookup") == Some(table.to_string().as_str())
        }),
        IpCommand::RouteAddLocal { .. } => {
            show.lines().any(|l| l.starts_with("local default dev lo"))
        }
    }
}

/// The command that removes `cmd`'s effect.
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

/// Whether `cmd`'s effect is in `routing` (`None` for the address, which it does not hold).
pub fn present_in_routing(cmd: &IpCommand, routing: &Routing) -> Option<bool> {
    match cmd {
        IpCommand::AddInboundV6Address => None,
        IpCommand::RuleAdd { mark, table, .. } => {
            Some(routing.rules.iter().any(|r| {
                r.plain && r.mark == Some(*mark) && r.mask == u32::MAX && r.table == *table
            }))
        }
        IpCommand::RouteAddLocal { table, .. } => {
            Some(routing.local_default_tables.contains(table))
        }
    }
}

/// Whether `cmd`'s effect exists: read in process (netlink, getifaddrs) when the probe can,
/// else with `ip`.
pub fn present(
    cmd: &IpCommand,
    probe: &dyn Probe,
    runner: &mut dyn Runner,
) -> Result<bool, ExecError> {
    let known = match cmd {
        IpCommand::AddInboundV6Address => probe.lo_has_v6_host_address(INBOUND_V6_ADDRESS),
        _ => probe
            .routing(family_of(cmd))
            .and_then(|r| present_in_routing(cmd, &r)),
    };
    if let Some(p) = known {
        return Ok(p);
    }
    is_present(cmd, runner)
}

/// The TPROXY policy routing this tool added (in any earlier run, whatever mark and table it
/// used) that `wanted` does not ask for, as the commands that added it; rules first, then
/// routes. Ours: a plain `fwmark M lookup T` rule whose table T holds a `local default dev
/// lo` route, and such a route no remaining rule looks up. Duplicates of a wanted rule are
/// leftovers too.
pub fn leftovers(family: Family, routing: &Routing, wanted: &[IpCommand]) -> Vec<IpCommand> {
    leftovers_at(family, routing, wanted)
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
) -> Vec<(IpCommand, Option<u32>)> {
    let mut out = Vec::new();
    let mut kept: Vec<IpCommand> = Vec::new();
    let mut others: Vec<u32> = Vec::new();
    // Oldest first: the kernel numbers a new rule below the lowest one there, so the highest
    // number is the rule a fresh apply made; a duplicate added later goes.
    let mut rules: Vec<&crate::system::rtnl::Rule> = routing.rules.iter().collect();
    rules.sort_by_key(|r| std::cmp::Reverse(r.priority));
    for r in rules {
        let ours = r.plain
            && r.mask == u32::MAX
            && r.mark.is_some()
            && routing.local_default_tables.contains(&r.table);
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

/// The `ip` arguments that add (`add`) or remove (`!add`) `cmd`'s effect; a rule with a
/// known priority is named by it too, so that exactly that rule goes, or comes back there.
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

/// Whether `cmd`'s effect already exists, asking `ip`.
pub fn is_present(cmd: &IpCommand, runner: &mut dyn Runner) -> Result<bool, ExecError> {
    match runner.run("ip", &show_args(cmd), None) {
        Ok(out) => Ok(present_in(cmd, &out)),
        // A routing table that was never used does not exist yet: nothing is in it.
        Err(e) if e.stderr().is_some_and(|s| s.contains("does not exist")) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_existing_state() {
        let rule = IpCommand::RuleAdd {
            family: Family::V4,
            mark: 1337,
            table: 133,
        };
        assert!(present_in(
            &rule,
            "0:\tfrom all lookup local\n32765:\tfrom all fwmark 0x539 lookup 133\n"
        ));
        assert!(!present_in(
            &rule,
            "32765:\tfrom all fwmark 0x53a lookup 133\n"
        ));
        assert!(!present_in(
            &rule,
            "32765:\tfrom all fwmark 0x539 lookup 134\n"
        ));
        let route = IpCommand::RouteAddLocal {
            family: Family::V6,
            table: 133,
        };
        assert!(present_in(
            &route,
            "local default dev lo metric 1024 pref medium\n"
        ));
        assert!(!present_in(&route, ""));
        let addr = IpCommand::AddInboundV6Address;
        assert!(present_in(
            &addr,
            "1: lo: <LOOPBACK>\n    inet6 ::6/128 scope global \n"
        ));
        assert!(!present_in(&addr, "    inet6 ::1/128 scope host \n"));
    }

    #[test]
    fn leftovers_are_found_by_their_route_whatever_mark_and_table() {
        use crate::system::rtnl::Rule;
        let rule = |priority, mark: Option<u32>, table, plain| Rule {
            priority,
            mark,
            mask: u32::MAX,
            table,
            plain,
            ..Rule::default()
        };
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
        };
        let v4 = Family::V4;
        let wanted = vec![
            IpCommand::RuleAdd {
                family: v4,
                mark: 1337,
                table: 133,
            },
            IpCommand::RouteAddLocal {
                family: v4,
                table: 133,
            },
        ];
        assert_eq!(
            leftovers(v4, &routing, &wanted),
            vec![
                // A later duplicate of ours, the earlier config's rule; not table 300 (no
                // route of ours there) nor the rule with other selectors.
                IpCommand::RuleAdd {
                    family: v4,
                    mark: 1337,
                    table: 133
                },
                IpCommand::RuleAdd {
                    family: v4,
                    mark: 1400,
                    table: 140
                },
                // Routes nothing looks up any more; table 150 is still looked up.
                IpCommand::RouteAddLocal {
                    family: v4,
                    table: 140
                },
                IpCommand::RouteAddLocal {
                    family: v4,
                    table: 160
                },
            ]
        );
        assert_eq!(present_in_routing(&wanted[0], &routing), Some(true));
        assert_eq!(present_in_routing(&wanted[1], &routing), Some(true));
        let at = leftovers_at(v4, &routing, &wanted);
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
        assert_eq!(leftovers(v4, &Routing::default(), &wanted), vec![]);
    }

    #[test]
    fn undo_mirrors_add() {
        let rule = IpCommand::RuleAdd {
            family: Family::V6,
            mark: 7,
            table: 9,
        };
        assert_eq!(undo_args(&rule).join(" "), "-6 rule del fwmark 7 lookup 9");
    }
}
