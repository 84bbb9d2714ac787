//! Asks the kernel over netlink whether an nftables family has any table at all, so that a
//! fresh namespace needs no `iptables-nft-save` process to learn that it is empty. Any
//! failure means "unknown", and the caller runs the save as usual.

use nix::sys::socket::SockProtocol;

use crate::model::Family;
use crate::system::netlink;

pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(crate) const NFT_MSG_NEWTABLE: u16 = 0;
pub(crate) const NFT_MSG_GETTABLE: u16 = 1;
pub(crate) const NFT_MSG_NEWCHAIN: u16 = 3;
pub(crate) const NFT_MSG_GETCHAIN: u16 = 4;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
/// `NFTA_TABLE_NAME` and `NFTA_CHAIN_NAME`.
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;

/// The number of nftables tables of `family` in the current network namespace, or `None`
/// when the kernel could not be asked.
pub fn table_count(family: Family) -> Option<usize> {
    // nfgenmsg: family, NFNETLINK_V0, res_id (big endian).
    let body = [nfproto(family), 0, 0, 0];
    let mut count = 0;
    netlink::dump(
        SockProtocol::NetlinkNetFilter,
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
        &body,
        |kind, _| {
            if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE {
                count += 1;
            }
        },
    )?;
    Some(count)
}

/// The nfgenmsg family of iptables-nft's tables of `family`.
pub(crate) fn nfproto(family: Family) -> u8 {
    match family {
        Family::V4 => NFPROTO_IPV4,
        Family::V6 => NFPROTO_IPV6,
    }
}

/// The value of attribute `kind` in a netfilter message body (a 4-byte `nfgenmsg`, then
/// netlink attributes), as text.
fn attr(body: &[u8], kind: u16) -> Option<String> {
    let (_, v) = netlink::attributes(body.get(4..)?)
        .into_iter()
        .find(|(t, _)| *t == kind)?;
    let v = v.strip_suffix(&[0]).unwrap_or(v);
    Some(String::from_utf8_lossy(v).into_owned())
}

/// What one dump of the tables of every family tells: how many tables iptables-nft's
/// families have and the names of the `inet` ones (native nftables'); `None` when the kernel
/// could not be asked.
pub fn overview() -> Option<Overview> {
    let mut out = Overview::default();
    netlink::dump(
        SockProtocol::NetlinkNetFilter,
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
        &[0, 0, 0, 0],
        |kind, body| {
            if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE {
                return;
            }
            match body.first() {
                Some(&NFPROTO_IPV4) => out.ipv4 += 1,
                Some(&NFPROTO_IPV6) => out.ipv6 += 1,
                Some(&NFPROTO_INET) => out.inet.extend(attr(body, NFTA_TABLE_NAME)),
                _ => {}
            }
        },
    )?;
    Some(out)
}

/// See [`overview`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overview {
    pub ipv4: usize,
    pub ipv6: usize,
    pub inet: Vec<String>,
}

impl Overview {
    /// The number of tables of `family`'s iptables-nft family.
    pub fn tables(&self, family: Family) -> usize {
        match family {
            Family::V4 => self.ipv4,
            Family::V6 => self.ipv6,
        }
    }
}

/// The names of the `inet` tables here (native nftables' family), or `None` when the kernel
/// could not be asked.
pub fn inet_tables() -> Option<Vec<String>> {
    let mut names = Vec::new();
    netlink::dump(
        SockProtocol::NetlinkNetFilter,
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
        &[NFPROTO_INET, 0, 0, 0],
        |kind, body| {
            if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE
                && let Some(n) = attr(body, NFTA_TABLE_NAME)
            {
                names.push(n);
            }
        },
    )?;
    Some(names)
}

/// Whether any nftables table of `family` (where iptables-nft keeps its tables) has a chain
/// whose name starts with `prefix`; `None` when the kernel could not be asked.
pub fn has_chain_with_prefix(family: Family, prefix: &str) -> Option<bool> {
    let mut found = false;
    netlink::dump(
        SockProtocol::NetlinkNetFilter,
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETCHAIN,
        &[nfproto(family), 0, 0, 0],
        |kind, body| {
            if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN
                && attr(body, NFTA_CHAIN_NAME).is_some_and(|n| n.starts_with(prefix))
            {
                found = true;
            }
        },
    )?;
    Some(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_tables_in_a_private_namespace() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED nftprobe::counts_tables_in_a_private_namespace: needs root");
            return;
        }
        let r = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            let before = table_count(Family::V4);
            let ok = std::process::Command::new("iptables-nft")
                .args(["-t", "nat", "-N", "PROBE_TEST"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            (before, ok, table_count(Family::V4), table_count(Family::V6))
        })
        .join()
        .unwrap();
        assert_eq!(r.0, Some(0));
        if r.1 {
            assert_eq!(r.2, Some(1));
            assert_eq!(r.3, Some(0));
        }
    }

    #[test]
    fn lists_inet_tables_and_finds_istio_chains() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED nftprobe::lists_inet_tables_and_finds_istio_chains: needs root");
            return;
        }
        let r = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            let before = (inet_tables(), has_chain_with_prefix(Family::V4, "ISTIO_"));
            let run = |args: &[&str]| {
                std::process::Command::new(args[0])
                    .args(&args[1..])
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            };
            let ok = run(&["nft", "add table inet istio-proxy-nat"])
                && run(&["nft", "add table inet other"])
                && run(&["iptables-nft", "-t", "nat", "-N", "ISTIO_OUTPUT"]);
            (
                before,
                ok,
                inet_tables(),
                has_chain_with_prefix(Family::V4, "ISTIO_"),
                has_chain_with_prefix(Family::V6, "ISTIO_"),
            )
        })
        .join()
        .unwrap();
        assert_eq!(r.0, (Some(vec![]), Some(false)));
        assert!(r.1, "nft and iptables-nft must work here");
        assert_eq!(
            r.2,
            Some(vec!["istio-proxy-nat".to_string(), "other".to_string()])
        );
        assert_eq!(r.3, Some(true));
        assert_eq!(r.4, Some(false));
    }
}
