//! The native nftables backend (`--native-nftables`): Istio's `istio-nftables` rules
//! ([`build`]), the live tables read back ([`state`]), their differences ([`drift`]) and a
//! packet's walk through them ([`walk`]).

pub mod build;
pub mod drift;
pub mod state;
pub mod walk;
