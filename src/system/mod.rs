//! Everything that touches the host: programs run, the kernel read over netlink, the network
//! namespace entered and locked, users and addresses looked up, iptables-save parsed.

pub mod backend;
pub mod exec;
pub mod host;
pub mod netlink;
pub mod netns;
pub mod nftprobe;
pub mod nslock;
pub mod probe;
pub mod rtnl;
