//! The real answers to `config::Host`: users, interface addresses, files.

use std::net::IpAddr;
use std::path::Path;

use crate::model::OwnerResolver;
use crate::model::{Host, RESOLV_CONF_MAX_BYTES};

/// The machine we run on.
#[derive(Debug, Default)]
pub struct RealHost;

fn usable(addr: IpAddr) -> bool {
    let addr = match addr {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    match addr {
        IpAddr::V4(a) => !(a.is_loopback() || a.is_link_local() || a.octets()[..3] == [224, 0, 0]),
        IpAddr::V6(a) => {
            let seg0 = a.segments()[0];
            !a.is_loopback() && (seg0 & 0xffc0) != 0xfe80 && (seg0 & 0xff0f) != 0xff02
        }
    }
}

/// The addresses of this namespace's interfaces, in the kernel's order (`None`: could not
/// be read).
fn addresses() -> Option<Vec<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    Some(
        addrs
            .filter_map(|ifa| ifa.address)
            .filter_map(|sa| {
                if let Some(v4) = sa.as_sockaddr_in() {
                    Some(IpAddr::V4(v4.ip()))
                } else {
                    sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                }
            })
            .collect(),
    )
}

/// Istio's rule over `addrs` (see [`Host::detect_ipv6`]).
fn ipv6_of(addrs: &[IpAddr], dual_stack: bool) -> Option<bool> {
    let mut found: Option<bool> = None;
    for &ip in addrs {
        if !usable(ip) {
            continue;
        }
        let is_v6 = ip.is_ipv6() && !matches!(ip, IpAddr::V6(a) if a.to_ipv4_mapped().is_some());
        if !dual_stack {
            return Some(is_v6);
        }
        found = Some(found.unwrap_or(false) || is_v6);
    }
    found
}

/// Whether `addrs` has an IPv6 address of global scope.
fn has_global_ipv6(addrs: &[IpAddr]) -> bool {
    addrs.iter().any(|ip| match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().is_none() && usable(*ip),
        IpAddr::V4(_) => false,
    })
}

impl Host for RealHost {
    fn user_uid(&self, name: &str) -> Option<u32> {
        nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    }

    /// Istio's rule: the first usable address decides; with dual stack, any IPv6 one does.
    fn detect_ipv6(&self, dual_stack: bool) -> Option<bool> {
        ipv6_of(&addresses()?, dual_stack)
    }

    fn detect_ipv6_and_global(&self, dual_stack: bool) -> (Option<bool>, bool) {
        let addrs = addresses().unwrap_or_default();
        (ipv6_of(&addrs, dual_stack), has_global_ipv6(&addrs))
    }

    fn group_gid(&self, name: &str) -> Option<u32> {
        OwnerResolver::gid(self, name)
    }

    /// Whether this namespace has an IPv6 address of global scope (not loopback,
    /// link-local or multicast), e.g. to warn when IPv6 rules are off.
    fn has_global_ipv6(&self) -> bool {
        has_global_ipv6(&addresses().unwrap_or_default())
    }

    /// Opens without blocking (a FIFO would wait for a writer), refuses what is not a
    /// regular file once symlinks are followed, and reads a bounded amount.
    fn read_file(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(path)?;
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        let mut buf = Vec::new();
        file.take(RESOLV_CONF_MAX_BYTES as u64 + 1)
            .read_to_end(&mut buf)?;
        Ok(buf)
    }
}

impl OwnerResolver for RealHost {
    fn uid(&self, name: &str) -> Option<u32> {
        self.user_uid(name)
    }
    fn gid(&self, name: &str) -> Option<u32> {
        nix::unistd::Group::from_name(name)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    }
}

/// A capability a run may need, by its bit number in linux/capability.h. Which ones a run
/// needs is the backends' business (`Backend::capabilities`); this module only reports what
/// the process holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Capability {
    /// nf_tables and rtnetlink changes, iptables' get/set of the legacy tables.
    NetAdmin = 12,
    /// The raw socket the legacy iptables programs open.
    NetRaw = 13,
}

impl Capability {
    /// Its name in a pod spec (`NET_ADMIN`).
    pub fn name(self) -> &'static str {
        match self {
            Capability::NetAdmin => "NET_ADMIN",
            Capability::NetRaw => "NET_RAW",
        }
    }

    fn bit(self) -> u64 {
        1 << self as u32
    }
}

/// Without a capability it needs iptables only says "Permission denied (you must be root)",
/// which misleads in a container running as root: we name what is missing and the fix.
#[derive(Debug, thiserror::Error)]
#[error(
    "this process lacks {}, which this run needs to read and change the rules. In a \
     Kubernetes pod spec, grant them to this (init) container: securityContext: \
     {{capabilities: {{add: [{}]}}}}; elsewhere run as root with all capabilities",
    self.missing.iter().map(|c| format!("CAP_{}", c.name())).collect::<Vec<_>>().join(" and "),
    self.missing.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ")
)]
pub struct MissingCapabilities {
    pub missing: Vec<Capability>,
}

/// Checks that this process has each of `needed` in effect.
pub fn check_caps(needed: &[Capability]) -> Result<(), MissingCapabilities> {
    let missing = missing_caps(needed);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MissingCapabilities { missing })
    }
}

/// Those of `needed` that this process does not have in effect, in order and once each.
/// Empty when the effective set cannot be read (we then let the programs tell).
pub fn missing_caps(needed: &[Capability]) -> Vec<Capability> {
    let Some(eff) = effective_caps() else {
        return Vec::new();
    };
    missing_from(eff, needed)
}

/// The effective capability set: `CapEff:` of /proc/self/status.
fn effective_caps() -> Option<u64> {
    cap_eff_from_status(&std::fs::read_to_string("/proc/self/status").ok()?)
}

fn missing_from(eff: u64, needed: &[Capability]) -> Vec<Capability> {
    let mut missing: Vec<Capability> = needed
        .iter()
        .copied()
        .filter(|c| eff & c.bit() == 0)
        .collect();
    missing.sort();
    missing.dedup();
    missing
}

/// Whether process `pid` has CAP_NET_ADMIN in effect (`CapEff:` of its /proc status);
/// `None` when that cannot be read.
pub fn net_admin_in_effect(pid: i32) -> Option<bool> {
    let eff = cap_eff_from_status(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)?;
    Some(eff & Capability::NetAdmin.bit() != 0)
}

/// `CapEff:` of a /proc status.
fn cap_eff_from_status(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

#[cfg(test)]
fn missing_from_status(status: &str) -> Option<Vec<Capability>> {
    use Capability::*;
    cap_eff_from_status(status).map(|eff| missing_from(eff, &[NetRaw, NetAdmin, NetRaw]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_capabilities_from_proc_status() {
        use Capability::*;
        let all = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert_eq!(missing_from_status(all), Some(vec![]));
        let no_raw = "CapEff:\t0000000000001000\n";
        assert_eq!(missing_from_status(no_raw), Some(vec![NetRaw]));
        let none = "CapEff:\t0000000000000000\n";
        assert_eq!(missing_from_status(none), Some(vec![NetAdmin, NetRaw]));
        // Only what is asked for is reported.
        assert_eq!(missing_from(0, &[NetAdmin]), vec![NetAdmin]);
        assert_eq!(missing_from_status("Name: x\n"), None);
    }

    /// This process's own effective set can be read.
    #[test]
    fn effective_capabilities_of_this_process() {
        assert!(effective_caps().is_some());
    }

    #[test]
    fn the_message_names_the_missing_capabilities_and_the_pod_spec_fix() {
        let e = MissingCapabilities {
            missing: vec![Capability::NetRaw],
        };
        let text = e.to_string();
        assert!(
            text.starts_with("this process lacks CAP_NET_RAW, which"),
            "{text}"
        );
        assert!(text.contains("{capabilities: {add: [NET_RAW]}}"), "{text}");
    }

    #[test]
    fn loopback_and_link_local_are_not_usable() {
        for a in ["127.0.0.1", "::1", "fe80::1", "169.254.1.1"] {
            assert!(!usable(a.parse().unwrap()), "{a}");
        }
        for a in ["10.1.2.3", "fd00::5", "2001:db8::1"] {
            assert!(usable(a.parse().unwrap()), "{a}");
        }
    }
}
