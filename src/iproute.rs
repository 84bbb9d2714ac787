//! The `ip` plumbing (TPROXY policy routing, the ::6 address), made idempotent: each command
//! is run only when its effect is missing, and can be undone. We shell out to iproute2's `ip`.

use crate::exec::{ExecError, Runner};
use crate::rules::{Family, IpCommand};

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
        IpCommand::RuleAdd { family, .. } => args(&[fam(*family), "rule", "show"]),
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
                let n = m
                    .strip_prefix("0x")
                    .map(|h| u32::from_str_radix(h, 16).ok())
                    .unwrap_or_else(|| m.parse().ok());
                n == Some(*mark)
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

/// Whether `cmd`'s effect already exists.
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
    fn undo_mirrors_add() {
        let rule = IpCommand::RuleAdd {
            family: Family::V6,
            mark: 7,
            table: 9,
        };
        assert_eq!(undo_args(&rule).join(" "), "-6 rule del fwmark 7 lookup 9");
    }
}
