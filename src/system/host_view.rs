//! What the host shows without running anything: programs on PATH, the legacy tables of this
//! namespace (/proc), nftables and policy routing (netlink), and the version compiled into a
//! program's binary. [`Probe`] is the interface (the tests give fakes), [`SystemProbe`] the
//! real machine.

use std::path::{Path, PathBuf};

use crate::model::Family;
use crate::system::nftprobe::{self, NfFamily};

/// What the host shows without running anything: what iptables detection, the backends'
/// reads, the `ip` steps and inspect ask (the tests give fakes). Where a method has a
/// default, `None` means "could not tell" and the caller does without it.
pub trait Probe {
    /// Whether `program` is an executable on PATH.
    fn in_path(&self, program: &str) -> bool;
    /// Legacy (x_tables) tables loaded in the current network namespace.
    fn legacy_tables(&self, family: Family) -> Vec<String>;
    /// How many nftables tables the family has here (`None`: could not tell).
    fn nft_tables(&self, _family: Family) -> Option<usize> {
        None
    }
    /// The family's policy routing rules and the tables of its routes (`None`: could not
    /// tell).
    fn routing(&self, _family: Family) -> Option<crate::system::rtnl::Routing> {
        None
    }
    /// Whether `lo` has `addr/128` (`None`: could not tell).
    fn lo_has_v6_host_address(&self, _addr: std::net::Ipv6Addr) -> Option<bool> {
        None
    }
    /// The names of the nftables `inet` tables here (`None`: could not tell).
    fn nft_inet_tables(&self) -> Option<Vec<String>> {
        None
    }
    /// The version of `program`, as compiled into its binary (`None`: could not tell).
    fn version(&self, _program: &str) -> Option<String> {
        None
    }
    /// Whether an nftables table of `family` (iptables-nft's) has a chain named `prefix…`
    /// (`None`: could not tell).
    fn nft_chain_with_prefix(&self, _family: Family, _prefix: &str) -> Option<bool> {
        None
    }
    /// The nftables tables of `family` with their chains (base chains with hook, type,
    /// priority and policy) and rule counts (`None`: could not tell).
    fn nft_structure(&self, _family: NfFamily) -> Option<nftprobe::NfTables> {
        None
    }
    /// nf_tables' generation, which every committed change moves (`None`: could not tell).
    fn nft_generation(&self) -> Option<u32> {
        None
    }
    /// The addresses of this namespace's interfaces: (interface, address) (`None`: could not
    /// tell).
    fn addresses(&self) -> Option<Vec<(String, std::net::IpAddr)>> {
        None
    }
    /// The route the kernel picks for a packet to `dst` from a socket of `uid` (`None`: could
    /// not tell).
    fn route(
        &self,
        _dst: std::net::IpAddr,
        _uid: Option<u32>,
    ) -> Option<crate::system::rtnl::Route> {
        None
    }
}

/// The real machine.
#[derive(Debug, Default)]
pub struct SystemProbe;

/// Full path of `program`: the first directory on PATH that has it as an executable file
/// (symlinks followed: iptables-nft-save is one). Looked up each time it is asked (one `stat`
/// per directory until found), so nothing is remembered between calls. PATH is split as
/// `std::env::split_paths` splits it on Unix, with one buffer for the candidates (a path per
/// directory was most of the cost of a lookup).
pub fn which(program: &str) -> Option<PathBuf> {
    which_in(&std::env::var_os("PATH")?, program)
}

/// [`which`] with `path` for PATH.
fn which_in(path: &std::ffi::OsStr, program: &str) -> Option<PathBuf> {
    use nix::sys::stat::{SFlag, stat};
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt as _;
    let mut candidate = PathBuf::new();
    path.as_bytes().split(|&b| b == b':').find_map(|dir| {
        let dir = Path::new(OsStr::from_bytes(dir));
        candidate.as_mut_os_string().clear();
        // An empty entry means the current directory, as for a shell.
        candidate.push(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        });
        candidate.push(program);
        let st = stat(&candidate).ok()?;
        let file = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG;
        (file && st.st_mode & 0o111 != 0).then(|| dir.join(program))
    })
}

impl Probe for SystemProbe {
    fn in_path(&self, program: &str) -> bool {
        which(program).is_some()
    }

    fn legacy_tables(&self, family: Family) -> Vec<String> {
        let file = match family {
            Family::V4 => "ip_tables_names",
            Family::V6 => "ip6_tables_names",
        };
        // thread-self: the namespace this thread entered with --network-namespace.
        std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))
            .map(|s| {
                s.lines()
                    .map(str::to_string)
                    .filter(|l| !l.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn nft_tables(&self, family: Family) -> Option<usize> {
        nftprobe::tables(NfFamily::of(family)).map(|t| t.tables.len())
    }

    fn routing(&self, family: Family) -> Option<crate::system::rtnl::Routing> {
        crate::system::rtnl::routing(family)
    }

    fn lo_has_v6_host_address(&self, addr: std::net::Ipv6Addr) -> Option<bool> {
        crate::system::rtnl::lo_has_v6_host_address(addr)
    }

    fn nft_inet_tables(&self) -> Option<Vec<String>> {
        nftprobe::tables(NfFamily::Inet).map(|t| t.names())
    }

    fn version(&self, program: &str) -> Option<String> {
        binary_version(program)
    }

    fn nft_structure(&self, family: NfFamily) -> Option<nftprobe::NfTables> {
        nftprobe::read(family)
    }

    fn nft_generation(&self) -> Option<u32> {
        nftprobe::generation()
    }

    fn addresses(&self) -> Option<Vec<(String, std::net::IpAddr)>> {
        crate::system::rtnl::addresses()
    }

    fn route(&self, dst: std::net::IpAddr, uid: Option<u32>) -> Option<crate::system::rtnl::Route> {
        crate::system::rtnl::route(dst, uid)
    }

    fn nft_chain_with_prefix(&self, family: Family, prefix: &str) -> Option<bool> {
        let t = nftprobe::read(NfFamily::of(family))?;
        Some(
            t.tables
                .iter()
                .flat_map(|t| &t.chains)
                .any(|c| c.name.starts_with(prefix)),
        )
    }
}

/// A machine with only the nft flavour of iptables installed and no legacy tables (unit
/// tests' probe).
#[cfg(test)]
pub struct NftOnly;

#[cfg(test)]
impl Probe for NftOnly {
    fn in_path(&self, p: &str) -> bool {
        p.contains("-nft-")
    }
    fn legacy_tables(&self, _: Family) -> Vec<String> {
        vec![]
    }
    fn lo_has_v6_host_address(&self, _: std::net::Ipv6Addr) -> Option<bool> {
        Some(false)
    }
    fn routing(&self, _: Family) -> Option<crate::system::rtnl::Routing> {
        Some(crate::system::rtnl::Routing::default())
    }
}

/// The version compiled into the binary (read from its file, so that detection runs no
/// process): the first NUL-separated string of the form `1.8.9` or `1.8.9 (nf_tables)`.
pub fn binary_version(program: &str) -> Option<String> {
    read_binary_version(&which(program)?)
}

fn read_binary_version(path: &Path) -> Option<String> {
    let path = std::fs::canonicalize(path).ok()?;
    let bytes = std::fs::read(path).ok()?;
    let is_version = |v: &str| {
        let mut parts = v.split('.');
        (0..3).all(|_| {
            parts.next().is_some_and(|p| {
                !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit())
            })
        }) && parts.next().is_none()
    };
    // nft builds carry "X.Y.Z (nf_tables)": find the rare '(' bytes instead of every string.
    const NFT: &[u8] = b" (nf_tables)\0";
    let mut i = 0;
    while let Some(p) = bytes[i..].iter().position(|b| *b == b'(') {
        let at = i + p;
        if at >= 1 && bytes[at - 1..].starts_with(NFT) {
            let start = bytes[..at - 1]
                .iter()
                .rposition(|b| *b == 0)
                .map_or(0, |z| z + 1);
            if let Ok(v) = std::str::from_utf8(&bytes[start..at - 1])
                && is_version(v)
            {
                return Some(v.to_string());
            }
        }
        i = at + 1;
    }
    // Legacy builds: a bare "X.Y.Z" string.
    bytes
        .split(|b| *b == 0)
        .filter(|s| (5..=11).contains(&s.len()) && s[0].is_ascii_digit())
        .find_map(|s| {
            let v = std::str::from_utf8(s).ok()?;
            is_version(v).then(|| v.to_string())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first directory with an executable file of that name; an empty entry is the
    /// current directory; a directory or a file without an execute bit is passed over.
    #[test]
    fn which_finds_the_first_executable_file_on_path() {
        use std::os::unix::fs::PermissionsExt as _;
        let base = std::env::temp_dir().join(format!("which-{}", std::process::id()));
        let (a, b, c) = (base.join("a"), base.join("b"), base.join("c"));
        for d in [&a, &b, &c] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(a.join("prog"), "").unwrap(); // not executable
        std::fs::create_dir_all(b.join("prog")).unwrap(); // a directory
        for d in [&b, &c] {
            let f = d.join("other");
            std::fs::write(&f, "").unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::write(c.join("prog"), "").unwrap();
        std::fs::set_permissions(c.join("prog"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::join_paths([&a, &b, &c]).unwrap();
        assert_eq!(which_in(&path, "prog"), Some(c.join("prog")));
        assert_eq!(which_in(&path, "other"), Some(b.join("other")));
        assert_eq!(which_in(&path, "missing"), None);
        let here = std::ffi::OsString::from(format!(":{}", c.display()));
        assert_eq!(
            which_in(&here, "prog"),
            Some(c.join("prog")),
            "empty entry: cwd has none"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn version_from_binary_or_none() {
        assert_eq!(binary_version("definitely-not-a-program"), None);
        if which("iptables-nft-restore").is_some() {
            let v = binary_version("iptables-nft-restore").expect("version string in binary");
            assert!(v.starts_with("1."), "{v}");
        }
    }
}
