//! Asks the kernel over netlink whether an nftables family has any table at all, so that a
//! fresh namespace needs no `iptables-nft-save` process to learn that it is empty. Any
//! failure means "unknown", and the caller runs the save as usual.

use nix::sys::socket::SockProtocol;

use crate::model::Family;
use crate::system::netlink;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// The number of nftables tables of `family` in the current network namespace, or `None`
/// when the kernel could not be asked.
pub fn table_count(family: Family) -> Option<usize> {
    // nfgenmsg: family, NFNETLINK_V0, res_id (big endian).
    let nfproto = match family {
        Family::V4 => NFPROTO_IPV4,
        Family::V6 => NFPROTO_IPV6,
    };
    let body = [nfproto, 0, 0, 0];
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
}
