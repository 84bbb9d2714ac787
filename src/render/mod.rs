//! Rules → text: the iptables-restore payload Istio writes, and the `--dry-run` script.

pub mod restore;
pub mod script;
