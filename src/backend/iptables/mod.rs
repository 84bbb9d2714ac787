//! The iptables backend: Istio's `istio-iptables` rules ([`build`]), their iptables-restore
//! text ([`restore`]) and `--dry-run` script ([`script`]), and a packet's walk through
//! saved rules ([`walk`]).

pub mod build;
pub mod plan;
pub mod restore;
pub mod save;
pub mod script;
pub mod walk;
