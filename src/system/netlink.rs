//! Netlink for the nf_tables reads and changes (`nftprobe.rs`): open a socket of
//! `protocol`, send an `NLM_F_DUMP` request and hand every reply message to the caller until
//! `NLMSG_DONE`, ask one question, or send a batch and wait for its acknowledgement. One
//! socket can serve several requests in turn. Any failure of a read (no socket, a short or
//! malformed reply, an error from the kernel) means "unknown": `None`, and the caller falls
//! back.
//!
//! Hand-written because nf_tables has no well-kept Rust crate (its reads need three message
//! types and a handful of attributes). rtnetlink, reads and changes, goes over
//! `netlink-packet-route` instead (`rtnl.rs`).

use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    setsockopt, socket, sockopt::ReceiveTimeout,
};
use nix::sys::time::TimeVal;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
/// Size of `struct nlmsghdr`.
const HEADER: usize = 16;
/// Receive buffer: the kernel fills a dump reply up to the reader's buffer size (32 KiB at
/// most), and one message of ours is far smaller.
const BUF: usize = 32 * 1024;
/// How long a reply may take before the request counts as failed.
pub(crate) const REPLY_TIMEOUT_SECS: i64 = 10;

/// A bound netlink socket, with the buffer its replies are received into.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Socket {
    /// A socket of `protocol` bound to a kernel-chosen port; `None` when that fails.
    pub fn open(protocol: SockProtocol) -> Option<Socket> {
        Socket::open_with(protocol, SockFlag::SOCK_CLOEXEC).ok()
    }

    fn open_with(protocol: SockProtocol, flags: SockFlag) -> Result<Socket, Errno> {
        let fd = socket(AddressFamily::Netlink, SockType::Raw, flags, protocol)?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        // The kernel answers at once; a reply that never comes must not hang the run.
        setsockopt(&fd, ReceiveTimeout, &TimeVal::new(REPLY_TIMEOUT_SECS, 0))?;
        Ok(Socket {
            fd,
            seq: 0,
            buf: vec![0; BUF],
        })
    }

    /// Sends a dump request of message type `kind` whose body (after the 16-byte header) is
    /// `body`, and calls `each(type, body)` for every message of the reply. `None` when the
    /// kernel could not be asked or answered with an error.
    pub fn dump(&mut self, kind: u16, body: &[u8], each: impl FnMut(u16, &[u8])) -> Option<()> {
        self.dump_or_errno(kind, body, each).ok()
    }

    /// [`Socket::dump`], with the reason of a failure: the kernel's errno, or `EBADMSG` for a
    /// reply that could not be read.
    pub fn dump_or_errno(
        &mut self,
        kind: u16,
        body: &[u8],
        mut each: impl FnMut(u16, &[u8]),
    ) -> Result<(), Errno> {
        self.seq += 1;
        let seq = self.seq;
        let mut msg = Vec::with_capacity(HEADER + body.len());
        push_message(&mut msg, kind, NLM_F_DUMP, seq, body)?;
        send(self.fd.as_raw_fd(), &msg, MsgFlags::empty())?;
        let mut done = Err(Errno::EBADMSG);
        self.receive(|ty, _, m| match ty {
            NLMSG_DONE => {
                done = Ok(());
                true
            }
            NLMSG_ERROR => {
                done = ack_errno(m);
                true
            }
            _ => {
                each(ty, m);
                false
            }
        })?;
        done
    }

    /// Sends `messages` (type, flags besides `NLM_F_REQUEST`, body) in one datagram, as
    /// nfnetlink wants a batch, with consecutive sequence numbers, and waits for the first
    /// acknowledgement of one of them (so one message at least should ask for it with
    /// `NLM_F_ACK`; errors are always acknowledged): `Ok` when it says success, else its errno.
    pub fn transact(&mut self, messages: &[(u16, u16, &[u8])]) -> Result<(), Errno> {
        let first = self.seq.wrapping_add(1);
        let mut msg = Vec::new();
        for (kind, flags, body) in messages {
            self.seq = self.seq.wrapping_add(1);
            push_message(&mut msg, *kind, *flags, self.seq, body)?;
        }
        let last = self.seq;
        send(self.fd.as_raw_fd(), &msg, MsgFlags::empty())?;
        let mut done = Err(Errno::EBADMSG);
        // Anything else (a late reply to an earlier request) is skipped.
        self.receive(|ty, seq, m| {
            let ours = ty == NLMSG_ERROR && (first..=last).contains(&seq);
            if ours {
                done = ack_errno(m);
            }
            ours
        })?;
        done
    }

    /// Receives datagrams and calls `each(type, seq, body)` for their messages until it says
    /// the reply is complete (`true`), then stops.
    fn receive(&mut self, mut each: impl FnMut(u16, u32, &[u8]) -> bool) -> Result<(), Errno> {
        let buf = &mut self.buf;
        for _ in 0..100_000 {
            let n = recv(self.fd.as_raw_fd(), buf, MsgFlags::empty())?;
            if n == 0 {
                return Err(Errno::EBADMSG);
            }
            let mut off = 0;
            while off + HEADER <= n {
                let word = |at: usize| {
                    u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
                };
                let len = word(off) as usize;
                let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
                let seq = word(off + 8);
                if len < HEADER || off + len > n {
                    return Err(Errno::EBADMSG);
                }
                if each(ty, seq, &buf[off + HEADER..off + len]) {
                    return Ok(());
                }
                off += (len + 3) & !3;
            }
        }
        Err(Errno::EBADMSG)
    }
}

/// The errno an `NLMSG_ERROR` body (`struct nlmsgerr`) carries: `Ok` for an acknowledgement.
fn ack_errno(body: &[u8]) -> Result<(), Errno> {
    let code = i32::from_ne_bytes(
        body.get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or(Errno::EBADMSG)?,
    );
    match code {
        0 => Ok(()),
        c => Err(Errno::from_raw(-c)),
    }
}

/// Appends one request message to `out`: the 16-byte header (`NLM_F_REQUEST` and `flags`,
/// `seq`, port 0: the kernel), then `body`.
fn push_message(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    body: &[u8],
) -> Result<(), Errno> {
    let len = u32::try_from(HEADER + body.len()).map_err(|_| Errno::EMSGSIZE)?;
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(body);
    // Messages of a datagram start 4-aligned.
    out.resize(out.len().next_multiple_of(4), 0);
    Ok(())
}

/// Appends a netlink attribute of type `ty` to `out`, padded to 4 bytes (the counterpart of
/// [`attributes`]).
pub fn push_attribute(out: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = u16::try_from(4 + payload.len()).expect("a short attribute");
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(4), 0);
}

impl Socket {
    /// Sends one request of message type `kind` (not a dump) whose body is `body`, and
    /// returns the kernel's answer: the reply message (type, body), or the errno of an error
    /// reply. `None` when the kernel could not be asked or the reply could not be read.
    pub fn request(&mut self, kind: u16, body: &[u8]) -> Option<Result<(u16, Vec<u8>), i32>> {
        self.seq += 1;
        let mut msg = Vec::with_capacity(HEADER + body.len());
        push_message(&mut msg, kind, 0, self.seq, body).ok()?;
        send(self.fd.as_raw_fd(), &msg, MsgFlags::empty()).ok()?;
        let n = recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty()).ok()?;
        let buf = &self.buf[..n];
        if n < HEADER {
            return None;
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().ok()?) as usize;
        let ty = u16::from_ne_bytes(buf[4..6].try_into().ok()?);
        if len < HEADER || len > n {
            return None;
        }
        let reply = &buf[HEADER..len];
        if ty == NLMSG_ERROR {
            let errno = i32::from_ne_bytes(reply.get(..4)?.try_into().ok()?);
            return Some(Err(-errno));
        }
        Some(Ok((ty, reply.to_vec())))
    }
}

/// The netlink attributes of one level of `b`, in order: (type without the nested and
/// byte-order flags, payload). A malformed attribute ends the list with `(u16::MAX, [])`, a
/// type no reader asks for, so that a reader checking which types are present refuses it.
pub fn attributes(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            out.push((u16::MAX, &b[..0]));
            break;
        }
        out.push((ty, &b[4..len]));
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    out
}
