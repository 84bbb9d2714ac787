//! Facts about the host a config needs: the proxy user's uid, whether the pod's address is
//! IPv6, the DNS servers in resolv.conf. Asked through the [`Host`] trait (the real answers
//! are `system::host::RealHost`), so that the config is tested without a machine.

use std::net::IpAddr;

use super::quoted;

/// A DNS server from resolv.conf: the parsed address and the text as written (Istio writes
/// the text into the rule, e.g. `::127.0.0.53/128`; it only ever holds a valid address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsServer {
    pub addr: IpAddr,
    pub text: String,
}

/// What `Config::build` needs to know about the machine (kept behind a trait for tests).
pub trait Host {
    /// uid of the user `name`, if it exists.
    fn user_uid(&self, name: &str) -> Option<u32>;
    /// Whether the pod's address is IPv6 (Istio's rule); `None` when it has no usable address.
    fn detect_ipv6(&self, dual_stack: bool) -> Option<bool>;
    /// gid of the group `name`, if it exists.
    fn group_gid(&self, name: &str) -> Option<u32>;
    /// Reads resolv.conf: at most [`RESOLV_CONF_MAX_BYTES`] + 1 bytes (so that a longer
    /// file shows), and only from a regular file (a FIFO or a device is an error).
    fn read_file(&self, path: &std::path::Path) -> std::io::Result<Vec<u8>>;
}

/// How much of resolv.conf is read, as resolvers do (musl reads lines up to a fixed buffer;
/// nobody's resolv.conf is anywhere near this).
pub const RESOLV_CONF_MAX_BYTES: usize = 64 * 1024;

/// Reads the `nameserver` lines of a resolv.conf as a resolver does: bytes, not text (a
/// Latin-1 comment is fine), every other line ignored, an address that does not parse
/// skipped with a warning, each server kept once in the order of first mention. Only the
/// first [`RESOLV_CONF_MAX_BYTES`] are read; a line cut there is dropped.
pub fn parse_resolv_conf(bytes: &[u8]) -> (Vec<DnsServer>, Vec<DnsServer>) {
    let mut bytes = bytes;
    if bytes.len() > RESOLV_CONF_MAX_BYTES {
        bytes = &bytes[..RESOLV_CONF_MAX_BYTES];
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        bytes = &bytes[..whole];
        tracing::warn!(
            "resolv.conf is longer than {RESOLV_CONF_MAX_BYTES} bytes; reading only its beginning"
        );
    }
    let (mut v4, mut v6): (Vec<DnsServer>, Vec<DnsServer>) = (Vec::new(), Vec::new());
    for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let mut fields = line
            .split(|b| b.is_ascii_whitespace())
            .filter(|f| !f.is_empty());
        if fields.next() != Some(b"nameserver".as_slice()) {
            continue;
        }
        let Some(field) = fields.next() else { continue };
        let text = String::from_utf8_lossy(field);
        let addr = match std::str::from_utf8(field).ok().map(str::parse::<IpAddr>) {
            Some(Ok(a)) => a,
            _ => {
                tracing::warn!(
                    line = n + 1,
                    server = %quoted(&text),
                    "ignoring resolv.conf nameserver that is not an IP address"
                );
                continue;
            }
        };
        let list = if addr.is_ipv4() { &mut v4 } else { &mut v6 };
        if list.iter().any(|d| d.addr == addr) {
            continue;
        }
        list.push(DnsServer {
            addr,
            text: text.into_owned(),
        });
    }
    (v4, v6)
}

/// Istio's rule (see `Host::detect_ipv6`); no usable address means IPv4 only.
pub fn detect_ipv6(host: &dyn Host, dual_stack: bool) -> bool {
    host.detect_ipv6(dual_stack).unwrap_or_else(|| {
        tracing::warn!(
            "no non-loopback, non-link-local address found; generating IPv4 rules only \
             (set ENABLE_INBOUND_IPV6=true to force IPv6)"
        );
        false
    })
}
