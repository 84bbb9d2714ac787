//! SIGTERM and SIGINT. A run that changes the kernel must not die between two of its changes
//! (IPv4 without IPv6, rules without routes). While it holds the namespace lock
//! ([`Signals::defer`]) a signal is only noted: the run stops at its next safe point (the
//! program it waits on is killed, the next one does not start, or between two steps that run
//! none), rolls back as for a failure, and exits with the signal's code. Everywhere else (the
//! dry run, explain, verify, before the lock is taken and after it is released) nothing of
//! ours is half done, and the signal ends the process at once with that code.
//!
//! The codes are the shells' and Kubernetes' convention for a process ended by a signal,
//! 128 + its number: 130 for SIGINT, 143 for SIGTERM ([`Exit::Interrupted`],
//! [`Exit::Terminated`]).
//!
//! The handlers are `signal-hook`'s: one notes the signal in a flag this module owns (an
//! `Arc`, no global of ours), the other exits with the code when the flag "at once" is set.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM};

use crate::cli::Exit;

/// A signal that asks us to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caught {
    Int,
    Term,
}

impl Caught {
    const ALL: [Caught; 2] = [Caught::Int, Caught::Term];

    fn number(self) -> i32 {
        match self {
            Caught::Int => SIGINT,
            Caught::Term => SIGTERM,
        }
    }

    fn from_number(n: usize) -> Option<Caught> {
        Caught::ALL.into_iter().find(|c| c.number() as usize == n)
    }

    /// The exit code of a run this signal stopped.
    pub fn exit(self) -> Exit {
        match self {
            Caught::Int => Exit::Interrupted,
            Caught::Term => Exit::Terminated,
        }
    }
}

impl fmt::Display for Caught {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Caught::Int => "SIGINT",
            Caught::Term => "SIGTERM",
        })
    }
}

/// The handlers could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("installing the SIGTERM and SIGINT handlers")]
pub struct SignalError(#[source] std::io::Error);

/// What the handlers share with the run. Cloning shares it.
#[derive(Debug, Clone)]
pub struct Signals {
    /// The number of the last signal caught; 0 before any.
    caught: Arc<AtomicUsize>,
    /// Whether a signal ends the process at once (outside [`Signals::defer`]).
    at_once: Arc<AtomicBool>,
}

impl Signals {
    /// Installs the handlers for SIGTERM and SIGINT: from now on a signal ends the process
    /// with its code, except while [`Signals::defer`]red.
    pub fn install() -> Result<Signals, SignalError> {
        let s = Signals::none();
        for c in Caught::ALL {
            let n = c.number();
            signal_hook::flag::register_usize(n, Arc::clone(&s.caught), n as usize)
                .map_err(SignalError)?;
            signal_hook::flag::register_conditional_shutdown(
                n,
                c.exit().code().into(),
                Arc::clone(&s.at_once),
            )
            .map_err(SignalError)?;
        }
        Ok(s)
    }

    /// No handler: nothing is ever caught (tests, and where installing failed).
    pub fn none() -> Signals {
        Signals {
            caught: Arc::new(AtomicUsize::new(0)),
            at_once: Arc::new(AtomicBool::new(true)),
        }
    }

    /// The signal caught, if one was.
    pub fn caught(&self) -> Option<Caught> {
        Caught::from_number(self.caught.load(Ordering::SeqCst))
    }

    /// Until the guard is dropped, a signal is only noted ([`Signals::caught`]) for the run
    /// to act on at its next safe point.
    pub fn defer(&self) -> Deferred<'_> {
        self.at_once.store(false, Ordering::SeqCst);
        Deferred(self)
    }

    /// Notes `c` as a handler would (tests).
    #[cfg(test)]
    pub fn raise(&self, c: Caught) {
        self.caught.store(c.number() as usize, Ordering::SeqCst);
    }
}

/// Signals are deferred while this lives ([`Signals::defer`]).
#[derive(Debug)]
pub struct Deferred<'a>(&'a Signals);

impl Drop for Deferred<'_> {
    fn drop(&mut self) {
        self.0.at_once.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_128_plus_the_signal_number() {
        assert_eq!(Caught::Int.exit().code(), 130);
        assert_eq!(Caught::Term.exit().code(), 143);
        for c in Caught::ALL {
            assert_eq!(i32::from(c.exit().code()), 128 + c.number());
            assert_eq!(Caught::from_number(c.number() as usize), Some(c));
        }
        assert_eq!(Caught::from_number(0), None);
    }

    #[test]
    fn a_raised_signal_is_seen_by_every_clone() {
        let s = Signals::none();
        let t = s.clone();
        assert_eq!(t.caught(), None);
        s.raise(Caught::Term);
        assert_eq!(t.caught(), Some(Caught::Term));
        let d = t.defer();
        assert!(!s.at_once.load(Ordering::SeqCst));
        drop(d);
        assert!(s.at_once.load(Ordering::SeqCst));
    }
}
