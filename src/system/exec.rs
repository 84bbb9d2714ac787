//! Running external programs (iptables-restore, iptables-save, nft). Distinguishes "not
//! installed", "not permitted", "could not start" and "ran and failed", and always keeps the
//! program's stderr for the error message. Payloads go on stdin: no temp files.

use std::ffi::OsString;
use std::io::{self, Write};
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, ExitStatus, Stdio};

/// Why running a program failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{program} was not found in PATH (install the iptables package)")]
    NotFound { program: String },
    #[error("{program}: permission denied (run as root, or with NET_ADMIN and NET_RAW)")]
    PermissionDenied { program: String },
    #[error("could not start {program}: {error}")]
    Spawn {
        program: String,
        /// Printed in the message, so not exposed as `source` too.
        error: io::Error,
    },
    #[error("`{command}` failed ({status}){}", stderr_suffix(.stderr))]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    let t = stderr.trim();
    if t.is_empty() {
        String::new()
    } else {
        format!(": {}", t.replace('\n', "; "))
    }
}

impl ExecError {
    /// The program's stderr, when it ran and failed.
    pub fn stderr(&self) -> Option<&str> {
        match self {
            ExecError::Failed { stderr, .. } => Some(stderr),
            _ => None,
        }
    }
}

/// Runs programs. The real one spawns processes; tests can substitute their own.
pub trait Runner {
    /// Runs `program args`, feeding `stdin`, and returns its stdout.
    fn run(
        &mut self,
        program: &str,
        args: &[String],
        stdin: Option<&str>,
    ) -> Result<String, ExecError>;
}

/// Spawns real processes, in this process's environment plus `env`.
#[derive(Debug, Default)]
pub struct SystemRunner {
    /// Set in every child's environment (ours stays as it is).
    env: Vec<(OsString, OsString)>,
}

impl SystemRunner {
    /// A runner whose children also get `env` (e.g. `XTABLES_LOCKFILE` in CNI mode).
    pub fn with_env(env: Vec<(OsString, OsString)>) -> SystemRunner {
        SystemRunner { env }
    }

    fn spawn(&self, program: &str, args: &[String], stdin: bool) -> Result<Child, ExecError> {
        // Found on PATH here (a stat per directory): the child then makes one execve, not
        // one per PATH directory before it. argv[0] stays the name: iptables' multi-call
        // binary dispatches on it.
        let path = if program.contains('/') {
            std::path::PathBuf::from(program)
        } else {
            crate::system::host_view::which(program).ok_or_else(|| ExecError::NotFound {
                program: program.to_string(),
            })?
        };
        Command::new(path)
            .arg0(program)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => ExecError::NotFound {
                    program: program.to_string(),
                },
                io::ErrorKind::PermissionDenied => ExecError::PermissionDenied {
                    program: program.to_string(),
                },
                _ => ExecError::Spawn {
                    program: program.to_string(),
                    error: e,
                },
            })
    }
}

impl Runner for SystemRunner {
    fn run(
        &mut self,
        program: &str,
        args: &[String],
        stdin: Option<&str>,
    ) -> Result<String, ExecError> {
        let command = std::iter::once(program.to_string())
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        tracing::debug!(%command, "running");
        let mut child = self.spawn(program, args, stdin.is_some())?;
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("piped stdin");
            // A program that exits early closes the pipe; its exit status tells why.
            let _ = pipe.write_all(input.as_bytes());
        }
        let out = child.wait_with_output().map_err(|e| ExecError::Spawn {
            program: program.to_string(),
            error: e,
        })?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            return Err(ExecError::Failed {
                command,
                status: out.status,
                stderr,
            });
        }
        if !stderr.trim().is_empty() {
            tracing::debug!(%command, stderr = %stderr.trim(), "stderr");
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_program_is_reported_as_not_found() {
        let e = SystemRunner::default()
            .run("/nonexistent/iptables-restore", &[], None)
            .unwrap_err();
        assert!(matches!(e, ExecError::NotFound { .. }), "{e}");
    }

    #[test]
    fn extra_env_reaches_the_child_only() {
        let mut runner =
            SystemRunner::with_env(vec![("ISTIO_IPTABLES_TEST_VAR".into(), "pod".into())]);
        let out = runner
            .run(
                "sh",
                &["-c".into(), "printf %s \"$ISTIO_IPTABLES_TEST_VAR\"".into()],
                None,
            )
            .unwrap();
        assert_eq!(out, "pod");
        assert_eq!(std::env::var_os("ISTIO_IPTABLES_TEST_VAR"), None);
    }

    #[test]
    fn failure_keeps_stderr() {
        let e = SystemRunner::default()
            .run(
                "sh",
                &["-c".into(), "echo oops >&2; exit 3".into()],
                Some("input"),
            )
            .unwrap_err();
        assert_eq!(e.stderr(), Some("oops\n"));
        assert!(e.to_string().contains("oops"));
    }
}
