//! Running external programs (iptables-restore, iptables-save, nft). Distinguishes "not
//! installed", "not permitted", "could not start", "ran and failed", "did not finish in
//! time" and "stopped by a signal", and always keeps the program's stderr for the error
//! message. Payloads go on stdin: no temp files.
//!
//! A program cannot hang us:
//! - its stdin is fed while its stdout and stderr are drained, all at once (poll(2) on the
//!   three pipes): a restore that writes more than a pipe holds (64 KiB) of diagnostics
//!   before it reads the whole payload does not block both processes;
//! - every program has a deadline ([`SystemRunner::with_deadline`], from
//!   `IPTABLES_PROGRAM_TIMEOUT_SECONDS`): past it the program is killed with SIGKILL, with
//!   everything it started (each program runs in a process group of its own), reaped, and
//!   the error names the program, the command and the deadline;
//! - a SIGTERM or SIGINT ([`crate::system::signals`]) kills the program running then, or keeps
//!   the next one from starting, once: the error says so, and the programs after it (the
//!   rollback) run. Killing is safe: iptables-restore and nft commit in one kernel
//!   transaction, so a killed program has committed all or nothing, and the rollback reads
//!   the kernel again before it puts anything back; waiting instead could use up the grace
//!   period (Kubernetes' is 30 s before SIGKILL) that the rollback needs.

use std::ffi::OsString;
use std::io::{self, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::cli::env_only;
use crate::system::signals::{Caught, Signals};

/// A program's deadline when none is set: the config's default with the default
/// `IPTABLES_LOCK_WAIT_SECONDS` (30 s for the xtables lock, and 30 s more for the work).
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);

/// How often a signal is looked for while a program runs, at the latest (a signal that
/// reaches this thread wakes it at once).
const SIGNAL_CHECK: Duration = Duration::from_millis(20);

/// At most this much of a program's stderr is kept (the end of it, where iptables and nft
/// report the line that failed); the rest is read and dropped.
const STDERR_KEPT: usize = 64 * 1024;

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
    /// Killed at its deadline (boxed: a cold path, and every `Result` carries the size).
    #[error(transparent)]
    TimedOut(Box<TimedOut>),
    #[error("{}", stopped_message(*.signal, .command.as_deref(), *.killed))]
    Stopped {
        signal: Caught,
        /// The program running (`killed`) or about to start when the signal came.
        command: Option<String>,
        killed: bool,
    },
}

/// A program killed at its deadline.
#[derive(Debug, thiserror::Error)]
#[error(
    "{program} did not finish within {} (`{command}`): killed it ({} sets the deadline, in \
     seconds){}",
    humantime::format_duration(*.deadline),
    env_only::PROGRAM_TIMEOUT,
    stderr_suffix(.stderr)
)]
pub struct TimedOut {
    pub program: String,
    pub command: String,
    pub deadline: Duration,
    /// What it wrote to stderr before it was killed.
    pub stderr: String,
}

fn stderr_suffix(stderr: &str) -> String {
    let t = stderr.trim();
    if t.is_empty() {
        String::new()
    } else {
        format!(": {}", t.replace('\n', "; "))
    }
}

fn stopped_message(signal: Caught, command: Option<&str>, killed: bool) -> String {
    match (command, killed) {
        (Some(c), true) => format!("stopped by {signal} while `{c}` ran (killed it)"),
        (Some(c), false) => format!("stopped by {signal} before `{c}`"),
        (None, _) => format!("stopped by {signal}"),
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

    /// A safe point between steps that run no program: `Err` once a signal asked the run to
    /// stop, unless a program's error said so already. Once said, it is not said again, so
    /// that the rollback runs.
    fn check_stop(&mut self) -> Result<(), ExecError> {
        Ok(())
    }

    /// The signal that asked the run to stop, if one did (said or not).
    fn stop_signal(&self) -> Option<Caught> {
        None
    }
}

/// iptables' xtables lock when `XTABLES_LOCKFILE` does not name another.
const XTABLES_LOCK: &str = "/run/xtables.lock";

/// Spawns real processes, in this process's environment plus `env`.
#[derive(Debug)]
pub struct SystemRunner {
    /// Set in every child's environment (ours stays as it is).
    env: Vec<(OsString, OsString)>,
    /// How long a program may run.
    deadline: Duration,
    /// SIGTERM and SIGINT, as the handlers note them.
    signals: Signals,
    /// The signal has been reported (by an error): the programs after it run.
    stop_reported: bool,
}

impl Default for SystemRunner {
    fn default() -> SystemRunner {
        SystemRunner {
            env: Vec::new(),
            deadline: DEFAULT_DEADLINE,
            signals: Signals::none(),
            stop_reported: false,
        }
    }
}

impl SystemRunner {
    /// A runner whose children also get `env` (e.g. `XTABLES_LOCKFILE` in CNI mode).
    pub fn with_env(env: Vec<(OsString, OsString)>) -> SystemRunner {
        SystemRunner {
            env,
            ..SystemRunner::default()
        }
    }

    /// Every program is killed once it has run for `deadline`.
    pub fn with_deadline(self, deadline: Duration) -> SystemRunner {
        SystemRunner { deadline, ..self }
    }

    /// A signal `signals` catches stops the run (once: see [`Runner::check_stop`]).
    pub fn with_signals(self, signals: Signals) -> SystemRunner {
        SystemRunner { signals, ..self }
    }

    /// A program run with `--wait=SECS` (legacy iptables) waits that long for the xtables
    /// lock, silently: say so when another process holds it now, as the wait for the
    /// namespace's lock does.
    fn say_if_xtables_lock_held(&self, program: &str, wait: &str) {
        let path = self
            .env
            .iter()
            .chain(&std::env::vars_os().collect::<Vec<_>>())
            .find(|(k, _)| k == "XTABLES_LOCKFILE")
            .map(|(_, v)| std::path::PathBuf::from(v))
            .unwrap_or_else(|| XTABLES_LOCK.into());
        if let Some(holders) = crate::system::nslock::flock_holders(&path) {
            let holders = holders
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            tracing::info!(
                "the xtables lock {} is held by {}: {program} waits for it up to {wait} s",
                path.display(),
                if holders.is_empty() {
                    "another process"
                } else {
                    &holders
                },
            );
        }
    }

    /// The signal to report now, once.
    fn stop_now(&mut self) -> Option<Caught> {
        if self.stop_reported {
            return None;
        }
        let c = self.signals.caught()?;
        self.stop_reported = true;
        Some(c)
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
            // Its own process group: a kill reaches what it started too, and a terminal's
            // Ctrl-C reaches only us (we decide what happens to it).
            .process_group(0)
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
        if let Some(signal) = self.stop_now() {
            return Err(ExecError::Stopped {
                signal,
                command: Some(command),
                killed: false,
            });
        }
        tracing::debug!(%command, "running");
        if let Some(wait) = args.iter().find_map(|a| a.strip_prefix("--wait=")) {
            self.say_if_xtables_lock_held(program, wait);
        }
        let mut child = self.spawn(program, args, stdin.is_some())?;
        let deadline = Instant::now() + self.deadline;
        let signals = self.signals.clone();
        let stop = || signals.caught().filter(|_| !self.stop_reported);
        let spawn_error = |error| ExecError::Spawn {
            program: program.to_string(),
            error,
        };
        let out = match drain(&mut child, stdin.unwrap_or("").as_bytes(), deadline, &stop) {
            Ok(out) => out,
            Err(e) => {
                kill(&mut child);
                return Err(spawn_error(e));
            }
        };
        let end = match out.cut {
            None => wait(&mut child, deadline, &stop).map_err(spawn_error)?,
            Some(cut) => Err(cut),
        };
        let stderr = out.stderr();
        let status = match end {
            Ok(status) => status,
            Err(cut) => {
                kill(&mut child);
                return Err(match cut {
                    Cut::Deadline => ExecError::TimedOut(Box::new(TimedOut {
                        program: program.to_string(),
                        command,
                        deadline: self.deadline,
                        stderr,
                    })),
                    Cut::Signal(signal) => {
                        self.stop_reported = true;
                        ExecError::Stopped {
                            signal,
                            command: Some(command),
                            killed: true,
                        }
                    }
                });
            }
        };
        if !status.success() {
            return Err(ExecError::Failed {
                command,
                status,
                stderr,
            });
        }
        if !stderr.trim().is_empty() {
            tracing::debug!(%command, stderr = %stderr.trim(), "stderr");
        }
        // Valid UTF-8 (what the programs print) becomes the String in place: a save of
        // 60,000 rules is not copied once more.
        Ok(String::from_utf8(out.stdout)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }

    fn check_stop(&mut self) -> Result<(), ExecError> {
        match self.stop_now() {
            Some(signal) => Err(ExecError::Stopped {
                signal,
                command: None,
                killed: false,
            }),
            None => Ok(()),
        }
    }

    fn stop_signal(&self) -> Option<Caught> {
        self.signals.caught()
    }
}

/// Why a program was cut short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    Deadline,
    Signal(Caught),
}

/// What a program wrote, and whether it was cut short.
#[derive(Debug, Default)]
struct Drained {
    stdout: Vec<u8>,
    /// The end of its stderr ([`STDERR_KEPT`]).
    stderr: Vec<u8>,
    /// Bytes of stderr dropped from the front.
    stderr_dropped: usize,
    cut: Option<Cut>,
}

impl Drained {
    fn stderr(&self) -> String {
        let kept = self.stderr.len().min(STDERR_KEPT);
        let dropped = self.stderr_dropped + self.stderr.len() - kept;
        let text = String::from_utf8_lossy(&self.stderr[self.stderr.len() - kept..]);
        if dropped == 0 {
            text.into_owned()
        } else {
            format!("[first {dropped} bytes of stderr left out]\n{text}")
        }
    }

    fn keep_stderr(&mut self, bytes: &[u8]) {
        self.stderr.extend_from_slice(bytes);
        // Trimmed in steps, not on every read.
        if self.stderr.len() > 2 * STDERR_KEPT {
            let cut = self.stderr.len() - STDERR_KEPT;
            self.stderr.drain(..cut);
            self.stderr_dropped += cut;
        }
    }
}

/// Feeds `input` to the child's stdin while reading its stdout and stderr, until both are
/// closed, `deadline` passes or `stop` says a signal came.
fn drain(
    child: &mut Child,
    input: &[u8],
    deadline: Instant,
    stop: &dyn Fn() -> Option<Caught>,
) -> io::Result<Drained> {
    let mut input = input;
    let mut stdin: Option<ChildStdin> = child.stdin.take().filter(|_| !input.is_empty());
    if let Some(pipe) = &stdin {
        // Written when poll says there is room, never blocking.
        nix::fcntl::fcntl(
            pipe,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
    }
    let mut stdout: Option<ChildStdout> = child.stdout.take();
    let mut stderr: Option<ChildStderr> = child.stderr.take();
    let mut out = Drained::default();
    let mut buf = vec![0u8; 64 * 1024];
    while stdin.is_some() || stdout.is_some() || stderr.is_some() {
        if let Some(c) = stop() {
            out.cut = Some(Cut::Signal(c));
            return Ok(out);
        }
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            out.cut = Some(Cut::Deadline);
            return Ok(out);
        };
        let timeout = PollTimeout::try_from(left.min(SIGNAL_CHECK)).unwrap_or(PollTimeout::MAX);
        let ready = {
            let mut fds = Vec::with_capacity(3);
            let mut which = Vec::with_capacity(3);
            if let Some(p) = &stdin {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLOUT));
                which.push(0);
            }
            if let Some(p) = &stdout {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
                which.push(1);
            }
            if let Some(p) = &stderr {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
                which.push(2);
            }
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let mut ready = [false; 3];
            for (fd, w) in fds.iter().zip(which) {
                ready[w] = fd.revents().is_some_and(|r| !r.is_empty());
            }
            ready
        };
        if ready[0]
            && let Some(pipe) = &mut stdin
        {
            match pipe.write(input) {
                Ok(n) => input = &input[n..],
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Closed early: the program exited or stopped reading; its exit status
                // tells why.
                Err(_) => input = &[],
            }
            if input.is_empty() {
                stdin = None;
            }
        }
        if ready[1]
            && let Some(pipe) = &mut stdout
        {
            match read_some(pipe, &mut buf)? {
                Some(0) => stdout = None,
                Some(n) => out.stdout.extend_from_slice(&buf[..n]),
                None => {}
            }
        }
        if ready[2]
            && let Some(pipe) = &mut stderr
        {
            match read_some(pipe, &mut buf)? {
                Some(0) => stderr = None,
                Some(n) => out.keep_stderr(&buf[..n]),
                None => {}
            }
        }
    }
    Ok(out)
}

/// One read; `None` when interrupted by a signal.
fn read_some(pipe: &mut impl io::Read, buf: &mut [u8]) -> io::Result<Option<usize>> {
    match pipe.read(buf) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(e),
    }
}

/// Waits for the child to exit (it has closed its stdout and stderr), up to `deadline` or a
/// signal.
fn wait(
    child: &mut Child,
    deadline: Instant,
    stop: &dyn Fn() -> Option<Caught>,
) -> io::Result<Result<ExitStatus, Cut>> {
    // It is exiting, as a rule: look again soon, then less and less often.
    let mut pause = Duration::from_micros(50);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Ok(status));
        }
        if let Some(c) = stop() {
            return Ok(Err(Cut::Signal(c)));
        }
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return Ok(Err(Cut::Deadline));
        };
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(SIGNAL_CHECK);
    }
}

/// Kills the child and everything in its process group, and reaps it.
fn kill(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    if nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL).is_err() {
        let _ = child.kill();
    }
    let _ = child.wait();
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

    /// A program that writes 1 MiB to stderr before it reads its 1 MiB of stdin: both are
    /// moved at once, or both processes would wait on each other until the deadline.
    #[test]
    fn stdin_is_fed_while_stdout_and_stderr_are_drained() {
        let payload: String = (0..1 << 20)
            .map(|i| (b'a' + (i % 26) as u8) as char)
            .collect();
        let started = Instant::now();
        let out = SystemRunner::default()
            .with_deadline(Duration::from_secs(20))
            .run(
                "sh",
                &[
                    "-c".into(),
                    "head -c 1048576 /dev/zero | tr '\\0' x >&2; cat; echo done >&2; exit 1".into(),
                ],
                Some(&payload),
            )
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10), "{out}");
        let ExecError::Failed { stderr, .. } = &out else {
            panic!("the program should have run to its end: {out}");
        };
        // The end of stderr is kept, the rest said to be left out.
        assert!(
            stderr.ends_with("xxxdone\n"),
            "{}",
            &stderr[stderr.len() - 20..]
        );
        assert!(stderr.len() < STDERR_KEPT + 100, "{}", stderr.len());
        assert!(stderr.starts_with("[first "), "{}", &stderr[..40]);
        let echoed = SystemRunner::default()
            .run(
                "sh",
                &["-c".into(), "head -c 1048576 /dev/zero >&2; cat".into()],
                Some(&payload),
            )
            .unwrap();
        assert!(echoed == payload, "stdout must hold the whole payload back");
    }

    /// A program that exits without reading its stdin: its status, not a broken pipe.
    #[test]
    fn a_program_that_reads_nothing_is_reported_by_its_status() {
        let payload = "x".repeat(1 << 20);
        let e = SystemRunner::default()
            .run("sh", &["-c".into(), "exit 3".into()], Some(&payload))
            .unwrap_err();
        assert!(
            matches!(&e, ExecError::Failed { status, .. } if status.code() == Some(3)),
            "{e}"
        );
    }

    /// Past its deadline a program is killed with what it started, and reaped; the error
    /// names the program, the command and the deadline.
    #[test]
    fn a_program_past_its_deadline_is_killed_with_its_children() {
        let dir = std::env::temp_dir().join(format!("exec-deadline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("sleep.pid");
        let script = format!(
            "echo before >&2; sleep 30 & echo $! > {}; wait",
            pidfile.display()
        );
        let started = Instant::now();
        let e = SystemRunner::default()
            .with_deadline(Duration::from_millis(300))
            .run("sh", &["-c".into(), script], Some("never read"))
            .unwrap_err();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(5),
            "{took:?}"
        );
        let msg = e.to_string();
        assert!(matches!(e, ExecError::TimedOut(_)), "{msg}");
        assert!(
            msg.starts_with("sh did not finish within 300ms (`sh -c echo before")
                && msg.contains("killed it (IPTABLES_PROGRAM_TIMEOUT_SECONDS sets the deadline")
                && msg.ends_with(": before"),
            "{msg}"
        );
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        // Killed: gone, or a zombie until init reaps it.
        let stat = format!("/proc/{}/stat", pid.trim());
        let alive = (0..100).all(|_| {
            let running = std::fs::read_to_string(&stat)
                .is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| !r.starts_with(" Z")));
            if running {
                std::thread::sleep(Duration::from_millis(10));
            }
            running
        });
        assert!(
            !alive,
            "the program's child (pid {}) must be killed too",
            pid.trim()
        );
    }

    /// A signal kills the program running then, once: the programs after it (the rollback)
    /// run. One that came before a program keeps it from starting.
    #[test]
    fn a_signal_stops_the_running_program_once() {
        let signals = Signals::none();
        let mut runner = SystemRunner::default().with_signals(signals.clone());
        assert!(runner.check_stop().is_ok());
        let raiser = {
            let s = signals.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                s.raise(Caught::Term);
            })
        };
        let started = Instant::now();
        let e = runner.run("sleep", &["30".into()], None).unwrap_err();
        raiser.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            e.to_string(),
            "stopped by SIGTERM while `sleep 30` ran (killed it)"
        );
        // Said once: what follows runs.
        assert!(runner.check_stop().is_ok());
        assert_eq!(
            runner.run("echo", &["after".into()], None).unwrap(),
            "after\n"
        );
        assert_eq!(runner.stop_signal(), Some(Caught::Term));

        let mut fresh = SystemRunner::default().with_signals(signals);
        let e = fresh.run("echo", &["no".into()], None).unwrap_err();
        assert_eq!(e.to_string(), "stopped by SIGTERM before `echo no`");
        let mut between = SystemRunner::default().with_signals(Signals::none());
        assert!(between.check_stop().is_ok());
    }

    #[test]
    fn a_signal_between_steps_is_said_once() {
        let signals = Signals::none();
        signals.raise(Caught::Int);
        let mut runner = SystemRunner::default().with_signals(signals);
        assert_eq!(
            runner.check_stop().unwrap_err().to_string(),
            "stopped by SIGINT"
        );
        assert!(runner.check_stop().is_ok());
        assert_eq!(runner.run("echo", &["x".into()], None).unwrap(), "x\n");
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
