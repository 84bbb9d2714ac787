//! Everything that touches the host: programs run, the kernel read over netlink, the network
//! namespace entered and locked, users and addresses looked up, the validation probe's sockets.

pub mod exec;
pub mod host;
pub mod host_view;
pub mod kernel_support;
pub mod netlink;
pub mod netns;
pub mod nftprobe;
pub mod nslock;
pub mod probe;
pub mod rtnl;
pub mod rtnl_change;
pub mod signals;

use crate::model::OwnerResolver;

/// What a command needs from the host, as narrow interfaces (the tests give fakes):
/// programs to run, what the kernel shows without running anything, the nf_tables changes
/// and the routing changes made in process (netlink), and user names.
pub struct Env<'a> {
    pub runner: &'a mut dyn exec::Runner,
    pub probe: &'a dyn host_view::Probe,
    pub nf: &'a mut dyn nftprobe::NfWrite,
    pub rtnl: &'a mut dyn rtnl_change::Rtnl,
    pub resolver: &'a dyn OwnerResolver,
}
