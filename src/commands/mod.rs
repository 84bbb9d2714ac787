//! The commands: what each does with the config, the backends and the host. Each takes the
//! chosen backend (and, where our state elsewhere matters, the other one) as a parameter:
//! none of them names a backend.

pub mod apply;
pub mod doctor;
pub mod dry_run;
pub mod explain;
pub mod output;
pub mod run;
pub mod validate;
pub mod verify;
