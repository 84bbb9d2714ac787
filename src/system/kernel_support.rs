//! Whether the kernel supports a netfilter feature (an iptables match or target, a legacy
//! table, an nftables expression, conntrack zones), read without changing anything: the
//! x_tables extensions registered (`/proc/net/ip_tables_matches` and friends), the modules
//! loaded (`/proc/modules`), the kernel's config (`/proc/config.gz`, `/boot/config-R`) and
//! its module lists (`/lib/modules/R/modules.builtin`, `modules.dep`). What none of them
//! answers is [`Support::Unknown`]: only adding a rule would tell (the kernel loads a module
//! on first use), and doctor does not add rules.
//!
//! Which option and module provide a feature is this file's table ([`Feature`]'s
//! constructors): the kernel has no interface that maps one to the other.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::model::Family;

/// A kernel feature a config's rules need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Feature {
    /// How the rules name it: `-m owner`, `-j TPROXY`, `nat table (legacy)`, `nft tproxy`.
    pub name: String,
    /// The family whose x_tables list shows it (`None`: not an x_tables extension).
    #[serde(skip)]
    xt: Option<(Family, XtKind, String)>,
    /// The module that provides it (`None`: the kernel's core).
    #[serde(skip)]
    module: Option<&'static str>,
    /// The kernel config option that provides it.
    #[serde(skip)]
    config: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XtKind {
    Match,
    Target,
}

impl Feature {
    /// An iptables match (`-m NAME`); `None` when this file does not know it.
    pub fn xt_match(family: Family, name: &str) -> Option<Feature> {
        let (module, config) = match name {
            "owner" => ("xt_owner", "CONFIG_NETFILTER_XT_MATCH_OWNER"),
            "socket" => ("xt_socket", "CONFIG_NETFILTER_XT_MATCH_SOCKET"),
            "mark" => ("xt_mark", "CONFIG_NETFILTER_XT_MARK"),
            "connmark" => ("xt_connmark", "CONFIG_NETFILTER_XT_CONNMARK"),
            "conntrack" => ("xt_conntrack", "CONFIG_NETFILTER_XT_MATCH_CONNTRACK"),
            "state" => ("xt_state", "CONFIG_NETFILTER_XT_MATCH_STATE"),
            "multiport" => ("xt_multiport", "CONFIG_NETFILTER_XT_MATCH_MULTIPORT"),
            "addrtype" => ("xt_addrtype", "CONFIG_NETFILTER_XT_MATCH_ADDRTYPE"),
            "tcp" | "udp" => ("xt_tcpudp", "CONFIG_NETFILTER_XTABLES"),
            _ => return None,
        };
        Some(Feature {
            name: format!("{family} -m {name}"),
            xt: Some((family, XtKind::Match, name.to_string())),
            module: Some(module),
            config,
        })
    }

    /// An iptables target (`-j NAME`); `None` for the built-in verdicts and chains, and for
    /// a target this file does not know.
    pub fn xt_target(family: Family, name: &str) -> Option<Feature> {
        let (module, config) = match name {
            "REDIRECT" => ("xt_REDIRECT", "CONFIG_NETFILTER_XT_TARGET_REDIRECT"),
            "TPROXY" => ("xt_TPROXY", "CONFIG_NETFILTER_XT_TARGET_TPROXY"),
            "MARK" => ("xt_mark", "CONFIG_NETFILTER_XT_MARK"),
            "CONNMARK" => ("xt_connmark", "CONFIG_NETFILTER_XT_CONNMARK"),
            "CT" => ("xt_CT", "CONFIG_NETFILTER_XT_TARGET_CT"),
            "DNAT" | "SNAT" => ("xt_nat", "CONFIG_NETFILTER_XT_NAT"),
            "REJECT" if family == Family::V4 => ("ipt_REJECT", "CONFIG_IP_NF_TARGET_REJECT"),
            "REJECT" => ("ip6t_REJECT", "CONFIG_IP6_NF_TARGET_REJECT"),
            _ => return None,
        };
        Some(Feature {
            name: format!("{family} -j {name}"),
            xt: Some((family, XtKind::Target, name.to_string())),
            module: Some(module),
            config,
        })
    }

    /// A legacy (x_tables) table: `iptable_nat`, `ip6table_mangle`, ...
    pub fn legacy_table(family: Family, table: &str) -> Option<Feature> {
        let (module, config) = match (family, table) {
            (Family::V4, "nat") => ("iptable_nat", "CONFIG_IP_NF_NAT"),
            (Family::V4, "mangle") => ("iptable_mangle", "CONFIG_IP_NF_MANGLE"),
            (Family::V4, "raw") => ("iptable_raw", "CONFIG_IP_NF_RAW"),
            (Family::V4, "filter") => ("iptable_filter", "CONFIG_IP_NF_FILTER"),
            (Family::V6, "nat") => ("ip6table_nat", "CONFIG_IP6_NF_NAT"),
            (Family::V6, "mangle") => ("ip6table_mangle", "CONFIG_IP6_NF_MANGLE"),
            (Family::V6, "raw") => ("ip6table_raw", "CONFIG_IP6_NF_RAW"),
            (Family::V6, "filter") => ("ip6table_filter", "CONFIG_IP6_NF_FILTER"),
            _ => return None,
        };
        Some(Feature {
            name: format!("{family} {table} table (iptables-legacy)"),
            xt: None,
            module: Some(module),
            config,
        })
    }

    /// An nftables part: `compat` (x_tables matches and targets in nftables, what
    /// iptables-nft uses for them), `nat` (nat chains), `redir`, `tproxy`, `socket`, `ct`
    /// (conntrack expressions), `zones` (conntrack zones).
    pub fn nft(part: &str) -> Option<Feature> {
        let (name, module, config) = match part {
            "compat" => (
                "nft compat (x_tables in nftables)",
                Some("nft_compat"),
                "CONFIG_NFT_COMPAT",
            ),
            "nat" => ("nft nat chains", Some("nft_chain_nat"), "CONFIG_NFT_NAT"),
            "redir" => ("nft redirect", Some("nft_redir"), "CONFIG_NFT_REDIR"),
            "tproxy" => ("nft tproxy", Some("nft_tproxy"), "CONFIG_NFT_TPROXY"),
            "socket" => ("nft socket", Some("nft_socket"), "CONFIG_NFT_SOCKET"),
            "ct" => ("nft ct", Some("nft_ct"), "CONFIG_NF_CONNTRACK"),
            "zones" => ("conntrack zones", None, "CONFIG_NF_CONNTRACK_ZONES"),
            _ => return None,
        };
        Some(Feature {
            name: name.to_string(),
            xt: None,
            module,
            config,
        })
    }

    /// What to load or build for it, for a finding's fix.
    pub fn fix(&self) -> String {
        match self.module {
            Some(m) => format!(
                "load the module on the node (`modprobe {m}`), or use a kernel built with {}",
                self.config
            ),
            None => format!("use a kernel built with {}", self.config),
        }
    }
}

/// Whether the kernel has a feature, and how that is known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", content = "how", rename_all = "snake_case")]
pub enum Support {
    /// It is there: the text says how that is known.
    Yes(String),
    /// It is not: the text says how that is known.
    No(String),
    /// Not checkable without a change: the text says what was read.
    Unknown(String),
}

/// What the kernel shows of itself, read once.
#[derive(Debug, Default)]
pub struct Kernel {
    /// `uname -r`.
    release: String,
    /// Registered x_tables extensions: (family, kind, name).
    xt: Vec<(Family, XtKind, String)>,
    /// Loaded modules (`/proc/modules`).
    modules: Option<Vec<String>>,
    /// The kernel's config, and where it was read.
    config: Option<(String, String)>,
    /// `modules.builtin` and `modules.dep` of /lib/modules/RELEASE.
    module_lists: Option<String>,
}

impl Kernel {
    /// Reads what this kernel shows (of the current network namespace, for the x_tables
    /// lists).
    pub fn read() -> Kernel {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut xt = Vec::new();
        for (family, prefix) in [(Family::V4, "ip"), (Family::V6, "ip6")] {
            for (kind, file) in [(XtKind::Match, "matches"), (XtKind::Target, "targets")] {
                let path = format!("/proc/thread-self/net/{prefix}_tables_{file}");
                if let Ok(text) = std::fs::read_to_string(path) {
                    xt.extend(text.lines().map(|l| (family, kind, l.trim().to_string())));
                }
            }
        }
        let modules = std::fs::read_to_string("/proc/modules").ok().map(|t| {
            t.lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_string)
                .collect()
        });
        let config = read_gz("/proc/config.gz")
            .map(|c| (c, "/proc/config.gz".to_string()))
            .or_else(|| {
                let p = format!("/boot/config-{release}");
                std::fs::read_to_string(&p).ok().map(|c| (c, p))
            });
        let dir = PathBuf::from(format!("/lib/modules/{release}"));
        let module_lists = ["modules.builtin", "modules.dep"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(dir.join(f)).ok())
            .reduce(|a, b| a + &b);
        Kernel {
            release,
            xt,
            modules,
            config,
            module_lists,
        }
    }

    /// Whether the kernel has `f`.
    pub fn supports(&self, f: &Feature) -> Support {
        if let Some(x) = &f.xt
            && self.xt.contains(x)
        {
            let (family, kind, _) = x;
            let prefix = if *family == Family::V4 { "ip" } else { "ip6" };
            let file = if *kind == XtKind::Match {
                "matches"
            } else {
                "targets"
            };
            return Support::Yes(format!("registered (/proc/net/{prefix}_tables_{file})"));
        }
        if let (Some(m), Some(loaded)) = (f.module, &self.modules)
            && loaded.iter().any(|l| l == m)
        {
            return Support::Yes(format!("module {m} loaded"));
        }
        if let Some((config, path)) = &self.config {
            return match config_value(config, f.config) {
                Some("y") => Support::Yes(format!("built in ({}=y, {path})", f.config)),
                Some("m") => Support::Yes(format!(
                    "a module ({}=m, {path}), loaded by the first rule that needs it",
                    f.config
                )),
                _ => Support::No(format!("{} is not set ({path})", f.config)),
            };
        }
        if let (Some(m), Some(lists)) = (f.module, &self.module_lists) {
            let file = format!("/{m}.ko");
            let listed = lists.lines().any(|l| {
                l.split(':')
                    .next()
                    .is_some_and(|p| p.contains(&file) || p.starts_with(&file[1..]))
            });
            let dir = format!("/lib/modules/{}", self.release);
            return if listed {
                Support::Yes(format!("{m} is in {dir}'s module lists"))
            } else {
                Support::No(format!("{m} is not in {dir}'s module lists"))
            };
        }
        Support::Unknown(format!(
            "not checkable without a change: {}neither the kernel's config nor its module \
             list can be read here; the first rule that needs it loads it, or fails",
            match f.module {
                Some(m) => format!("{m} is not loaded, "),
                None => String::new(),
            }
        ))
    }
}

/// The value of `option` in a kernel config (`y`, `m`, a number), `None` when not set.
fn config_value<'a>(config: &'a str, option: &str) -> Option<&'a str> {
    config.lines().find_map(|l| {
        let rest = l.strip_prefix(option)?;
        rest.strip_prefix('=')
    })
}

/// A gzip file's text (`/proc/config.gz`).
fn read_gz(path: impl AsRef<Path>) -> Option<String> {
    let file = std::fs::File::open(path).ok()?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel() -> Kernel {
        Kernel {
            release: "6.1.0".into(),
            xt: vec![(Family::V4, XtKind::Match, "owner".into())],
            modules: Some(vec!["xt_TPROXY".into()]),
            config: None,
            module_lists: None,
        }
    }

    #[test]
    fn registered_loaded_or_unknown() {
        let k = kernel();
        let owner = Feature::xt_match(Family::V4, "owner").unwrap();
        assert!(matches!(k.supports(&owner), Support::Yes(h) if h.contains("ip_tables_matches")));
        // The IPv6 list does not show it.
        let owner6 = Feature::xt_match(Family::V6, "owner").unwrap();
        assert!(
            matches!(k.supports(&owner6), Support::Unknown(h) if h.contains("not checkable without a change"))
        );
        let tproxy = Feature::xt_target(Family::V6, "TPROXY").unwrap();
        assert_eq!(
            k.supports(&tproxy),
            Support::Yes("module xt_TPROXY loaded".into())
        );
        assert_eq!(Feature::xt_target(Family::V4, "RETURN"), None);
        assert_eq!(Feature::xt_target(Family::V4, "ISTIO_OUTPUT"), None);
    }

    #[test]
    fn config_and_module_lists_decide() {
        let mut k = kernel();
        k.config = Some((
            "CONFIG_NFT_TPROXY=m\nCONFIG_NFT_SOCKET=y\n# CONFIG_NF_CONNTRACK_ZONES is not set\n"
                .into(),
            "/proc/config.gz".into(),
        ));
        let s = |k: &Kernel, p| k.supports(&Feature::nft(p).unwrap());
        assert!(matches!(s(&k, "tproxy"), Support::Yes(h) if h.contains("=m")));
        assert!(matches!(s(&k, "socket"), Support::Yes(h) if h.contains("built in")));
        assert!(
            matches!(s(&k, "zones"), Support::No(h) if h.contains("CONFIG_NF_CONNTRACK_ZONES is not set"))
        );
        k.config = None;
        k.module_lists = Some("kernel/net/netfilter/nft_socket.ko:\n".into());
        assert!(matches!(s(&k, "socket"), Support::Yes(_)));
        assert!(matches!(s(&k, "tproxy"), Support::No(h) if h.contains("/lib/modules/6.1.0")));
        assert!(
            Feature::nft("zones")
                .unwrap()
                .fix()
                .contains("CONFIG_NF_CONNTRACK_ZONES")
        );
        assert!(
            Feature::legacy_table(Family::V4, "nat")
                .unwrap()
                .fix()
                .contains("modprobe iptable_nat")
        );
    }

    /// This machine's kernel is read: what it registers shows.
    #[test]
    fn this_kernel_is_read() {
        let k = Kernel::read();
        assert!(!k.release.is_empty());
    }
}
