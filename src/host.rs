//! The real answers to `config::Host`: users, interface addresses, files.

use std::net::IpAddr;
use std::path::Path;

use crate::config::Host;
use crate::state::OwnerResolver;

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

impl Host for RealHost {
    fn user_uid(&self, name: &str) -> Option<u32> {
        nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    }

    /// Istio's rule: the first usable address decides; with dual stack, any IPv6 one does.
    fn detect_ipv6(&self, dual_stack: bool) -> Option<bool> {
        let addrs = nix::ifaddrs::getifaddrs().ok()?;
        let mut found: Option<bool> = None;
        for ifa in addrs {
            let Some(sa) = ifa.address else { continue };
            let ip = if let Some(v4) = sa.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else if let Some(v6) = sa.as_sockaddr_in6() {
                IpAddr::V6(v6.ip())
            } else {
                continue;
            };
            if !usable(ip) {
                continue;
            }
            let is_v6 =
                ip.is_ipv6() && !matches!(ip, IpAddr::V6(a) if a.to_ipv4_mapped().is_some());
            if !dual_stack {
                return Some(is_v6);
            }
            found = Some(found.unwrap_or(false) || is_v6);
        }
        found
    }

    fn read_file(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
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

#[cfg(test)]
mod tests {
    use super::*;

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
