//! Facts about the host the rules depend on, apart from the pure [`Config`]: the proxy
//! user's uid, whether IPv6 rules are on, the DNS servers in resolv.conf, and whether the
//! owner names of -u/-g exist. [`HostFacts::detect`] reads them in one step, in the target
//! network namespace (a dry run reads them where it runs). Asked through the [`Host`] trait
//! (the real answers are `system::host::RealHost`), so that they are tested without a machine.

use std::net::IpAddr;

use super::{Config, ConfigError, DEFAULT_PROXY_UID, Owner, OwnerGroups, RunMode, quoted};
use crate::model::{Host, RESOLV_CONF_MAX_BYTES};

/// A DNS server from resolv.conf: the parsed address and the text as written (Istio writes
/// the text into the rule, e.g. `::127.0.0.53/128`; it only ever holds a valid address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsServer {
    pub addr: IpAddr,
    pub text: String,
}

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

/// Istio's rule (see `Host::detect_ipv6`), no usable address meaning IPv4 only; and whether
/// global IPv6 addresses exist.
fn detect_ipv6(host: &dyn Host, dual_stack: bool) -> (bool, bool) {
    let (ipv6, global) = host.detect_ipv6_and_global(dual_stack);
    let ipv6 = ipv6.unwrap_or_else(|| {
        tracing::warn!(
            "no non-loopback, non-link-local address found; generating IPv4 rules only \
             (set ENABLE_INBOUND_IPV6=true to force IPv6)"
        );
        false
    });
    (ipv6, global)
}

/// What the rules need to know about the host, read by [`HostFacts::detect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// The proxy's uids: -u as given, else the uid of ENVOY_USER here (1337 when it does
    /// not exist, as in Istio).
    pub proxy_uids: Vec<Owner>,
    /// The proxy's gids: -g as given, else the proxy uids.
    pub proxy_gids: Vec<Owner>,
    /// Generate IPv6 rules: ENABLE_INBOUND_IPV6 when set, else detected from this
    /// namespace's addresses.
    pub ipv6: bool,
    /// IPv6 was detected off (the first address is IPv4), yet this namespace has global
    /// IPv6 addresses: their traffic is not captured (worth a warning when applying).
    pub ipv6_uncaptured: bool,
    /// IPv4 DNS servers from resolv.conf (with --redirect-dns).
    pub dns_servers_v4: Vec<DnsServer>,
    /// IPv6 DNS servers from resolv.conf (with --redirect-dns).
    pub dns_servers_v6: Vec<DnsServer>,
}

impl HostFacts {
    /// The families the rules go to.
    pub fn families(&self) -> Vec<crate::model::Family> {
        crate::model::Family::in_use(self.ipv6)
    }

    /// Reads the facts `cfg` needs from `host`. An owner name of -u/-g that does not exist
    /// here, or a resolv.conf that cannot be read, is an error naming its flag, as a bad
    /// value in [`Config::build`] is.
    pub fn detect(cfg: &Config, host: &dyn Host) -> Result<HostFacts, ConfigError> {
        let proxy_uids = cfg.proxy_uids.clone().unwrap_or_else(|| {
            vec![Owner::Id(
                host.user_uid(&cfg.envoy_user).unwrap_or(DEFAULT_PROXY_UID),
            )]
        });
        let proxy_gids = cfg.proxy_gids.clone().unwrap_or_else(|| proxy_uids.clone());
        // (Uncaptured only when detected: ENABLE_INBOUND_IPV6=false is a choice, not a
        // surprise.)
        let (ipv6, ipv6_uncaptured) = match cfg.enable_inbound_ipv6 {
            Some(on) => (on, false),
            None => {
                let (ipv6, global) = detect_ipv6(host, cfg.dual_stack);
                (ipv6, !ipv6 && global)
            }
        };

        // Names are resolved by iptables (or nft) when the rules are applied: a name that
        // does not exist here would fail there, after the first steps ran. A dry run prints
        // names as given (the script may run on another machine); a cleanup must always run.
        if matches!(cfg.run, RunMode::Apply | RunMode::SkipApply) {
            // Without -g, the gids are the -u value (as in Istio).
            let gid_note = if cfg.proxy_gids.is_none() {
                " (--proxy-gid defaults to the --proxy-uid value)"
            } else {
                ""
            };
            let groups = match &cfg.owner_groups {
                OwnerGroups::AllExcept(g) | OwnerGroups::Only(g) => g,
            };
            let names = |owners: &[Owner]| -> Vec<String> {
                owners
                    .iter()
                    .filter_map(|o| match o {
                        Owner::Name(n) => Some(n.clone()),
                        Owner::Id(_) => None,
                    })
                    .collect()
            };
            for n in names(&proxy_uids) {
                if host.user_uid(&n).is_none() {
                    return Err(cfg
                        .given
                        .proxy_uid
                        .item_err(&n, "names no user on this machine"));
                }
            }
            for (given, owners, note) in [
                (&cfg.given.proxy_gid, &proxy_gids, gid_note),
                (&cfg.given.owner_groups, groups, ""),
            ] {
                for n in names(owners) {
                    if host.group_gid(&n).is_none() {
                        let why = format!("names no group on this machine{note}");
                        return Err(given.item_err(&n, why));
                    }
                }
            }
        }

        let (dns_servers_v4, dns_servers_v6) = if cfg.redirect_dns && !cfg.capture_all_dns {
            let bytes = host.read_file(&cfg.resolv_conf).map_err(|e| {
                // --resolv-conf given: its path is the value at fault. Else DNS capture is.
                match &cfg.given.resolv_conf {
                    Some(given) => given.err(format!("cannot read it: {e}")),
                    None => cfg.given.redirect_dns.err(format!(
                        "DNS capture needs the DNS servers listed in {}, which cannot be read \
                         ({e}); capture all DNS traffic with --capture-all-dns instead, or name \
                         another file with --resolv-conf",
                        cfg.resolv_conf.display()
                    )),
                }
            })?;
            parse_resolv_conf(&bytes)
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(HostFacts {
            proxy_uids,
            proxy_gids,
            ipv6,
            ipv6_uncaptured,
            dns_servers_v4,
            dns_servers_v6,
        })
    }
}
