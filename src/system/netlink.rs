//! One netlink dump, the part the nftables probe and the rtnetlink reads share: open a
//! socket of `protocol`, send one `NLM_F_DUMP` request, hand every reply message to the
//! caller until `NLMSG_DONE`. Any failure (no socket, a short or malformed reply, an error
//! from the kernel) means "unknown": `None`, and the caller falls back.

use std::os::fd::AsRawFd;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    socket,
};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
/// Size of `struct nlmsghdr`.
const HEADER: usize = 16;

/// Sends a dump request of message type `kind` whose body (after the 16-byte header) is
/// `body`, and calls `each(type, body)` for every message of the reply. `None` when the
/// kernel could not be asked or answered with an error.
pub fn dump(
    protocol: SockProtocol,
    kind: u16,
    body: &[u8],
    mut each: impl FnMut(u16, &[u8]),
) -> Option<()> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        protocol,
    )
    .ok()?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).ok()?;
    let len = u32::try_from(HEADER + body.len()).ok()?;
    let mut msg = Vec::with_capacity(HEADER + body.len());
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    msg.extend_from_slice(body);
    send(fd.as_raw_fd(), &msg, MsgFlags::empty()).ok()?;

    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..100_000 {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).ok()?;
        if n == 0 {
            return None;
        }
        let mut off = 0;
        while off + HEADER <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().ok()?) as usize;
            let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().ok()?);
            if len < HEADER || off + len > n {
                return None;
            }
            match ty {
                NLMSG_DONE => return Some(()),
                NLMSG_ERROR => {
                    let errno =
                        i32::from_ne_bytes(buf[off + HEADER..off + HEADER + 4].try_into().ok()?);
                    return (errno == 0).then_some(());
                }
                _ => each(ty, &buf[off + HEADER..off + len]),
            }
            off += (len + 3) & !3;
        }
    }
    None
}
