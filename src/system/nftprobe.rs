//! Asks the kernel over netlink whether an nftables family has any table at all, so that a
//! fresh namespace needs no `iptables-nft-save` process to learn that it is empty. Any
//! failure means "unknown", and the caller runs the save as usual.

use std::os::fd::AsRawFd;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    socket,
};

use crate::model::Family;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// The number of nftables tables of `family` in the current network namespace, or `None`
/// when the kernel could not be asked.
pub fn table_count(family: Family) -> Option<usize> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .ok()?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).ok()?;
    // nlmsghdr (16 bytes) + nfgenmsg (4 bytes), native endian except res_id (big endian).
    let mut msg = Vec::with_capacity(20);
    msg.extend_from_slice(&20u32.to_ne_bytes());
    msg.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE).to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    msg.push(match family {
        Family::V4 => NFPROTO_IPV4,
        Family::V6 => NFPROTO_IPV6,
    });
    msg.push(0); // NFNETLINK_V0
    msg.extend_from_slice(&0u16.to_be_bytes());
    send(fd.as_raw_fd(), &msg, MsgFlags::empty()).ok()?;

    let mut count = 0;
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..10_000 {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).ok()?;
        if n == 0 {
            return None;
        }
        let mut off = 0;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().ok()?) as usize;
            let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().ok()?);
            if len < 16 || off + len > n {
                return None;
            }
            match kind {
                NLMSG_DONE => return Some(count),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(buf[off + 16..off + 20].try_into().ok()?);
                    return if errno == 0 { Some(count) } else { None };
                }
                k if k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE => count += 1,
                _ => {}
            }
            off += (len + 3) & !3;
        }
    }
    None
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
