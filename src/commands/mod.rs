//! The commands: what each does with the config, the backend and the host.

pub mod validate;
