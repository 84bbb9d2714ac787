//! Applying a plan: feed each family's payload to iptables-restore, then run the `ip`
//! commands. The executor is a small trait so that the dry-run script is just another
//! implementation of the same sequence.

use crate::config::Flavor;
use crate::exec::{ExecError, Runner, failed_restore_line};
use crate::restore;
use crate::rules::{Family, IpCommand, Plan};

/// An apply step that failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{family} rules were rejected by {program}{}: {source}", rejected_suffix(.rejected))]
    Restore {
        family: Family,
        program: String,
        /// The payload line iptables-restore named, if it named one.
        rejected: Option<String>,
        #[source]
        source: ExecError,
    },
    #[error("`{command}` failed: {source}")]
    Ip {
        command: String,
        #[source]
        source: ExecError,
    },
}

fn rejected_suffix(line: &Option<String>) -> String {
    line.as_ref()
        .map(|l| format!(" at `{l}`"))
        .unwrap_or_default()
}

/// Does the side effects of a plan.
pub trait Executor {
    /// Commits one family's iptables-restore payload (with --noflush).
    fn restore(&mut self, family: Family, payload: &str) -> Result<(), ApplyError>;
    /// Runs one `ip` command.
    fn ip(&mut self, cmd: &IpCommand) -> Result<(), ApplyError>;
}

/// Applies `plan` through `exec`: IPv4, then IPv6 (only when the plan uses it), then `ip`.
pub fn apply(plan: &Plan, exec: &mut dyn Executor) -> Result<(), ApplyError> {
    for family in plan.families() {
        let payload = restore::payload(plan.rules(family));
        if !payload.is_empty() {
            exec.restore(family, &payload)?;
        }
    }
    for cmd in &plan.ip {
        exec.ip(cmd)?;
    }
    Ok(())
}

/// The iptables-restore program for a family and flavour.
pub fn restore_program(family: Family, flavor: Option<Flavor>) -> String {
    let base = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    match flavor {
        None => format!("{base}-restore"),
        Some(f) => format!("{base}-{f}-restore"),
    }
}

/// Runs the real programs.
pub struct CommandExecutor<R: Runner> {
    pub runner: R,
    pub flavor: Option<Flavor>,
}

impl<R: Runner> Executor for CommandExecutor<R> {
    fn restore(&mut self, family: Family, payload: &str) -> Result<(), ApplyError> {
        let program = restore_program(family, self.flavor);
        tracing::info!(%program, "applying {family} rules:\n{}", payload.trim_end());
        self.runner
            .run(&program, &["--noflush".to_string()], Some(payload))
            .map(|_| ())
            .map_err(|source| {
                let rejected = source
                    .stderr()
                    .and_then(failed_restore_line)
                    .and_then(|n| payload.lines().nth(n.saturating_sub(1)))
                    .map(str::to_string);
                ApplyError::Restore {
                    family,
                    program,
                    rejected,
                    source,
                }
            })
    }

    fn ip(&mut self, cmd: &IpCommand) -> Result<(), ApplyError> {
        tracing::info!(command = %cmd, "configuring");
        self.runner
            .run("ip", &cmd.args(), None)
            .map(|_| ())
            .map_err(|source| ApplyError::Ip {
                command: cmd.to_string(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::build as config;
    use crate::rules;

    /// Records calls; fails the call whose program matches `fail`.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<(String, Vec<String>, Option<String>)>,
        fail: Option<(&'static str, &'static str)>,
    }

    impl Runner for Recorder {
        fn run(
            &mut self,
            program: &str,
            args: &[String],
            stdin: Option<&str>,
        ) -> Result<String, ExecError> {
            self.calls
                .push((program.into(), args.to_vec(), stdin.map(String::from)));
            match self.fail {
                Some((p, stderr)) if p == program => Err(ExecError::Failed {
                    command: program.into(),
                    status: std::os::unix::process::ExitStatusExt::from_raw(256),
                    stderr: stderr.into(),
                }),
                _ => Ok(String::new()),
            }
        }
    }

    #[test]
    fn applies_each_family_once_then_ip_commands() {
        let c = config(
            &["-m", "TPROXY", "-b", "*"],
            &[("ENABLE_INBOUND_IPV6", "true")],
        )
        .unwrap();
        let plan = rules::build(&c);
        let mut exec = CommandExecutor {
            runner: Recorder::default(),
            flavor: Some(Flavor::Legacy),
        };
        apply(&plan, &mut exec).unwrap();
        let programs: Vec<&str> = exec.runner.calls.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(
            programs,
            vec![
                "iptables-legacy-restore",
                "ip6tables-legacy-restore",
                "ip",
                "ip",
                "ip",
                "ip",
                "ip"
            ]
        );
        assert_eq!(exec.runner.calls[0].1, vec!["--noflush"]);
        assert!(
            exec.runner.calls[0]
                .2
                .as_deref()
                .unwrap()
                .starts_with("* mangle\n")
        );
    }

    #[test]
    fn ipv4_only_plan_never_runs_ip6tables() {
        let c = config(&[], &[]).unwrap();
        let mut exec = CommandExecutor {
            runner: Recorder::default(),
            flavor: None,
        };
        apply(&rules::build(&c), &mut exec).unwrap();
        assert_eq!(exec.runner.calls.len(), 1);
        assert_eq!(exec.runner.calls[0].0, "iptables-restore");
    }

    #[test]
    fn rejected_line_is_named() {
        let c = config(&[], &[]).unwrap();
        let plan = rules::build(&c);
        let mut exec = CommandExecutor {
            runner: Recorder {
                fail: Some(("iptables-restore", "iptables-restore: line 2 failed")),
                ..Default::default()
            },
            flavor: None,
        };
        let e = apply(&plan, &mut exec).unwrap_err();
        assert!(e.to_string().contains("at `-N ISTIO_INBOUND`"), "{e}");
    }
}
