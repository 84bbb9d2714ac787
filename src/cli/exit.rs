//! How a run ends: the one list of exit codes, which `main` returns and `--help` and the
//! man page document.

use std::process::ExitCode;

/// The exit codes, in `--help`'s order (ascending).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done (also: nothing to do).
    Success,
    /// Applying or cleaning up failed (earlier steps were rolled back unless the message
    /// says otherwise), or the network namespace could not be entered.
    Failure,
    /// Bad input: unknown flag, invalid value. Nothing was run.
    Usage,
    /// verify: the live rules differ from the config.
    Drift,
    /// --reconcile=false and the namespace holds different ISTIO_* rules. Nothing changed.
    Conflict,
    /// verify: our rules match the config, but foreign rules take packets before them.
    Shadowed,
    /// explain: the verdict is unknown (a rule on the way cannot be evaluated, or hooks of
    /// equal priority whose order cannot be read decide); the walk so far was printed.
    Unknown,
    /// doctor: capture does not work as configured, and an apply would not make it so (each
    /// finding is printed with its fix).
    Unhealthy,
    /// --run-validation could not run its probe (listeners could not be opened).
    ValidationError,
    /// --run-validation: traffic was not captured within --probe-timeout (Istio's code).
    ValidationFailed,
    /// SIGINT stopped the run (128 + 2, the shells' convention); what it had changed was put
    /// back unless the message says otherwise.
    Interrupted,
    /// SIGTERM stopped the run (128 + 15); what it had changed was put back unless the
    /// message says otherwise.
    Terminated,
}

impl Exit {
    /// Every exit code, as `--help` and the man page list them.
    pub const ALL: [Exit; 12] = [
        Exit::Success,
        Exit::Failure,
        Exit::Usage,
        Exit::Drift,
        Exit::Conflict,
        Exit::Shadowed,
        Exit::Unknown,
        Exit::Unhealthy,
        Exit::ValidationError,
        Exit::ValidationFailed,
        Exit::Interrupted,
        Exit::Terminated,
    ];

    /// The process's exit status.
    pub const fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failure => 1,
            Exit::Usage => 2,
            Exit::Drift => 3,
            Exit::Conflict => 4,
            Exit::Shadowed => 5,
            Exit::Unknown => 6,
            Exit::Unhealthy => 7,
            Exit::ValidationError => 125,
            Exit::ValidationFailed => 126,
            Exit::Interrupted => 130,
            Exit::Terminated => 143,
        }
    }

    /// What the code means, for `--help` and the man page.
    pub const fn meaning(self) -> &'static str {
        match self {
            Exit::Success => "success (also: nothing to do)",
            Exit::Failure => {
                "applying or cleaning up failed (what had changed was restored unless the \
                 message says ROLLBACK FAILED), or the network namespace could not be entered"
            }
            Exit::Usage => {
                "bad input (unknown flag, invalid value, unreadable @PATH); nothing was run"
            }
            Exit::Drift => "verify: the live rules differ from the config",
            Exit::Conflict => {
                "--reconcile=false and the namespace holds different ISTIO_* rules; nothing changed"
            }
            Exit::Shadowed => {
                "verify: our rules match the config, but foreign rules (iptables, nftables, ip \
                 rule) take packets before them; drift (3) wins when both"
            }
            Exit::Unknown => {
                "explain: the verdict is unknown (a rule on the way cannot be evaluated, or the \
                 order of hooks of equal priority decides); the walk so far is printed"
            }
            Exit::Unhealthy => {
                "doctor: capture does not work as configured (each finding is printed with its fix)"
            }
            Exit::ValidationError => "--run-validation could not run its probe",
            Exit::ValidationFailed => {
                "--run-validation: traffic was not captured within --probe-timeout"
            }
            Exit::Interrupted => {
                "SIGINT stopped the run at its next safe point: an apply put back what it had \
                 changed (unless the message says ROLLBACK FAILED), a cleanup stopped (rerun \
                 it); during --run-validation the rules stay"
            }
            Exit::Terminated => {
                "SIGTERM stopped the run at its next safe point: an apply put back what it had \
                 changed (unless the message says ROLLBACK FAILED), a cleanup stopped (rerun \
                 it); during --run-validation the rules stay"
            }
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ALL` holds every variant once, in ascending order of code (the order documented).
    #[test]
    fn all_lists_every_code_once_in_order() {
        for e in Exit::ALL {
            // A new variant fails to compile here until it is added to `ALL` too.
            let index = match e {
                Exit::Success => 0,
                Exit::Failure => 1,
                Exit::Usage => 2,
                Exit::Drift => 3,
                Exit::Conflict => 4,
                Exit::Shadowed => 5,
                Exit::Unknown => 6,
                Exit::Unhealthy => 7,
                Exit::ValidationError => 8,
                Exit::ValidationFailed => 9,
                Exit::Interrupted => 10,
                Exit::Terminated => 11,
            };
            assert_eq!(Exit::ALL[index], e);
        }
        assert!(Exit::ALL.windows(2).all(|w| w[0].code() < w[1].code()));
    }
}
