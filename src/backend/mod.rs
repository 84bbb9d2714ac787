//! The two ways of programming the capture: iptables ([`iptables`]) and native nftables
//! ([`nft`]), each a folder of its own that never imports the other.

pub mod iptables;
pub mod nft;
pub mod walk;
