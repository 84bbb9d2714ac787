//! The commands: what each does with the config, the backend and the host.

pub mod apply;
pub mod validate;
