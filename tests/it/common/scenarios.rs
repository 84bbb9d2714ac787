//! The traffic scenarios of `tests/it/traffic.rs` (which sends them for real) and
//! `tests/it/explain.rs` (which sends them and asks `explain` too): one table, so that what the
//! two expect cannot drift apart. Each test file turns a row into its own probe and check.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::Topology;
use super::{APP, Ident, LOCALHOST_V4, LOCALHOST_V6, PASSTHROUGH_V4, PASSTHROUGH_V6, PROXY};

/// A non-root application.
pub const OTHER_APP: Ident = Ident {
    uid: 5000,
    gid: 5000,
};
/// A process of a non-root, non-proxy user in the proxy's group.
pub const PROXY_GROUP: Ident = Ident {
    uid: 5000,
    gid: 1337,
};
/// A process of the proxy's user (uid 1337) in another group: only the uid rules leave it
/// alone (the proxy itself, uid and gid 1337, is left alone by either).
pub const PROXY_USER: Ident = Ident {
    uid: 1337,
    gid: 5000,
};
/// An address outside the topology's subnets, on the peer's `lo`, routed from the pod via the
/// peer.
pub const OUTSIDE_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const OUTSIDE_V6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 2);

/// Who sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// A process in the pod with these identities.
    Pod(Ident),
    /// The proxy in the pod, bound to the passthrough source (127.0.0.6 or `::6`).
    ProxyFromPassthrough,
    /// The app in the peer namespace (inbound to the pod).
    Peer,
}

/// Where to, in a [`Topology`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// The peer's address.
    Peer,
    /// The peer's second address in the subnet.
    Second,
    /// [`OUTSIDE_V4`] / [`OUTSIDE_V6`], on the peer.
    Outside,
    /// The pod's own address.
    Pod,
    /// Localhost, in the pod.
    Localhost,
}

impl Dest {
    /// The namespace holding the address: `pod` or `peer`.
    pub fn side(self) -> &'static str {
        match self {
            Dest::Pod | Dest::Localhost => "pod",
            Dest::Peer | Dest::Second | Dest::Outside => "peer",
        }
    }

    /// The address in `t`, of the IPv6 family with `v6`.
    pub fn addr(self, t: &Topology, v6: bool) -> IpAddr {
        match (self, v6) {
            (Dest::Peer, false) => t.peer_v4.into(),
            (Dest::Peer, true) => t.peer_v6.into(),
            (Dest::Second, false) => t.v4(3).into(),
            (Dest::Second, true) => t.v6(3).into(),
            (Dest::Outside, false) => OUTSIDE_V4.into(),
            (Dest::Outside, true) => OUTSIDE_V6.into(),
            (Dest::Pod, false) => t.pod_v4.into(),
            (Dest::Pod, true) => t.pod_v6.into(),
            (Dest::Localhost, false) => LOCALHOST_V4,
            (Dest::Localhost, true) => LOCALHOST_V6,
        }
    }
}

/// The passthrough source address of a family.
pub fn passthrough(v6: bool) -> IpAddr {
    if v6 { PASSTHROUGH_V6 } else { PASSTHROUGH_V4 }
}

/// Where a TCP connection must land.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lands {
    /// REDIRECTed to this port in the pod (original destination kept in conntrack).
    Redirect(u16),
    /// TPROXY to this (transparent) port in the pod, destination address intact.
    Tproxy(u16),
    /// At the destination itself.
    NotCaptured,
}

/// One row: a TCP connection (or a UDP datagram) and where it must land.
#[derive(Debug, Clone, Copy)]
pub struct TrafficScenario {
    pub what: &'static str,
    pub from: Sender,
    pub to: Dest,
    pub port: u16,
    pub lands: Lands,
    /// A UDP datagram rather than a TCP connection.
    pub udp: bool,
}

impl TrafficScenario {
    const fn udp(self) -> TrafficScenario {
        TrafficScenario { udp: true, ..self }
    }
}

const fn row(
    what: &'static str,
    from: Sender,
    to: Dest,
    port: u16,
    lands: Lands,
) -> TrafficScenario {
    TrafficScenario {
        what,
        from,
        to,
        port,
        lands,
        udp: false,
    }
}

const APP_: Sender = Sender::Pod(APP);
const PROXY_: Sender = Sender::Pod(PROXY);

// Rows that more than one table holds.
const APP_OUTBOUND: TrafficScenario = row(
    "app's outbound is captured",
    APP_,
    Dest::Peer,
    80,
    Lands::Redirect(15001),
);

const PROXY_OUTBOUND: TrafficScenario = row(
    "proxy's outbound is not captured",
    PROXY_,
    Dest::Peer,
    80,
    Lands::NotCaptured,
);

const EXCLUDED_INBOUND_PORT: TrafficScenario = row(
    "inbound to an excluded port (-d 15090) is not captured",
    Sender::Peer,
    Dest::Pod,
    15090,
    Lands::NotCaptured,
);

const PASSTHROUGH: TrafficScenario = row(
    "inbound passthrough (proxy from the passthrough source) is not captured",
    Sender::ProxyFromPassthrough,
    Dest::Pod,
    8080,
    Lands::NotCaptured,
);

/// [`SEED`](super::SEED), IPv4 or IPv6 (with ENABLE_INBOUND_IPV6=true): outbound and inbound
/// capture, the proxy's own traffic, localhost, app-to-self, passthrough, exclusions.
pub const SEED_SCENARIOS: &[TrafficScenario] = &[
    APP_OUTBOUND,
    PROXY_OUTBOUND,
    row(
        "a non-root app's outbound is captured",
        Sender::Pod(OTHER_APP),
        Dest::Peer,
        80,
        Lands::Redirect(15001),
    ),
    row(
        "outbound of the proxy's user in another group (uid 1337, gid 5000) is not captured",
        Sender::Pod(PROXY_USER),
        Dest::Peer,
        80,
        Lands::NotCaptured,
    ),
    row(
        "outbound of a process in the proxy's group (gid 1337) is not captured",
        Sender::Pod(PROXY_GROUP),
        Dest::Peer,
        80,
        Lands::NotCaptured,
    ),
    row(
        "inbound is captured",
        Sender::Peer,
        Dest::Pod,
        8080,
        Lands::Redirect(15006),
    ),
    EXCLUDED_INBOUND_PORT,
    row(
        "inbound to the tunnel port 15008 is not captured",
        Sender::Peer,
        Dest::Pod,
        15008,
        Lands::NotCaptured,
    ),
    row(
        "app to localhost is not captured",
        APP_,
        Dest::Localhost,
        8080,
        Lands::NotCaptured,
    ),
    row(
        "proxy to localhost is not captured",
        PROXY_,
        Dest::Localhost,
        8080,
        Lands::NotCaptured,
    ),
    row(
        "app to its own pod IP is not captured",
        APP_,
        Dest::Pod,
        8080,
        Lands::NotCaptured,
    ),
    row(
        "proxy to its own pod IP (a VIP resolving to itself) goes to the inbound side",
        PROXY_,
        Dest::Pod,
        8080,
        Lands::Redirect(15006),
    ),
    PASSTHROUGH,
];

/// `-i <subnet> -x <peer>/32 -b '*'` (IPv4): only the included range is captured, minus the
/// excluded address.
pub const CIDR_SCENARIOS: &[TrafficScenario] = &[
    row(
        "destination in -i but in -x is not captured",
        APP_,
        Dest::Peer,
        80,
        Lands::NotCaptured,
    ),
    row(
        "other destination in -i is captured",
        APP_,
        Dest::Second,
        80,
        Lands::Redirect(15001),
    ),
    row(
        "destination outside -i is not captured",
        APP_,
        Dest::Outside,
        80,
        Lands::NotCaptured,
    ),
    row(
        "proxy's outbound into the included range is not captured",
        PROXY_,
        Dest::Second,
        80,
        Lands::NotCaptured,
    ),
];

/// `-i '*' -b '*' -o 80` (IPv4): outbound to an excluded port is not captured, other ports are.
pub const OUTBOUND_PORT_EXCLUDE_SCENARIOS: &[TrafficScenario] = &[
    row(
        "outbound to the excluded port (-o 80) is not captured",
        APP_,
        Dest::Peer,
        80,
        Lands::NotCaptured,
    ),
    row(
        "outbound to another port is captured",
        APP_,
        Dest::Peer,
        443,
        Lands::Redirect(15001),
    ),
];

/// `-i '*' -b 8080` (IPv4): only the listed inbound ports are captured.
pub const INBOUND_PORT_INCLUDE_SCENARIOS: &[TrafficScenario] = &[
    row(
        "inbound to a listed port (-b 8080) is captured",
        Sender::Peer,
        Dest::Pod,
        8080,
        Lands::Redirect(15006),
    ),
    row(
        "inbound to an unlisted port is not captured",
        Sender::Peer,
        Dest::Pod,
        9090,
        Lands::NotCaptured,
    ),
];

/// [`SEED`](super::SEED) with `-m TPROXY`, each family: inbound is delivered, unaltered, to the transparent
/// inbound listener; outbound still uses REDIRECT.
pub const TPROXY_SCENARIOS: &[TrafficScenario] = &[
    row(
        "inbound is delivered to the transparent inbound listener, destination intact",
        Sender::Peer,
        Dest::Pod,
        8080,
        Lands::Tproxy(15006),
    ),
    EXCLUDED_INBOUND_PORT,
    PASSTHROUGH,
    APP_OUTBOUND,
    PROXY_OUTBOUND,
];

/// `-i '*' -b '*' --redirect-dns` with the peer's address as the resolv.conf server, each
/// family: the app's DNS to it (UDP and TCP) goes to the agent on 15053; the proxy's own DNS
/// and DNS to another server (the peer's second address) is left alone.
pub const DNS_SCENARIOS: &[TrafficScenario] = &[
    row(
        "app's DNS query to the resolv.conf server is captured by the agent",
        APP_,
        Dest::Peer,
        53,
        Lands::Redirect(15053),
    )
    .udp(),
    row(
        "proxy's DNS query reaches the real server",
        PROXY_,
        Dest::Peer,
        53,
        Lands::NotCaptured,
    )
    .udp(),
    row(
        "app's DNS query to a server not in resolv.conf is not captured",
        APP_,
        Dest::Second,
        53,
        Lands::NotCaptured,
    )
    .udp(),
    row(
        "app's DNS over TCP to the resolv.conf server is captured by the agent",
        APP_,
        Dest::Peer,
        53,
        Lands::Redirect(15053),
    ),
    row(
        "proxy's DNS over TCP reaches the real server",
        PROXY_,
        Dest::Peer,
        53,
        Lands::NotCaptured,
    ),
];
