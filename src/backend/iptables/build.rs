//! The rule builder: config in, ordered rules per family and table out. Pure — no I/O.
//!
//! The order and text of every rule reproduce Istio's `capture/run.go`, because operators diff
//! our output against Istio's and because iptables evaluates rules in order.

use crate::config::{
    Config, HostFacts, InboundPorts, Mode, OutboundCidrs, Owner, OwnerGroups, PortSpec,
};
use crate::model::{
    DNS_PROXY_PORT, Family, OUTBOUND_MARK, Position, Rule, Table, Token, chain, token,
};
use crate::routes::{IpCommand, ip_commands};

/// Everything a config asks for: rules per family in order, then `ip` commands. The only
/// thing this crate calls a plan: what `rules` builds and `render`, `apply` and `inspect` take.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub v4: Vec<Rule>,
    pub v6: Vec<Rule>,
    pub ip: Vec<IpCommand>,
    /// Whether IPv6 is in use (ip6tables is left alone otherwise).
    pub ipv6: bool,
}

impl Plan {
    pub fn rules(&self, family: Family) -> &[Rule] {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }

    /// The families this plan touches.
    pub fn families(&self) -> Vec<Family> {
        Family::in_use(self.ipv6)
    }
}

/// Placeholder in rule templates replaced by the family's address (Istio's IPVersionSpecific).
const VERSIONED: &str = "\u{0}VERSIONED";

struct Builder {
    plan: Plan,
}

impl Builder {
    fn push(
        &mut self,
        family: Family,
        table: Table,
        chain: &'static str,
        position: Position,
        args: Vec<String>,
    ) {
        // Kept for the whole run, 30,000 rules' worth at times: common words borrowed, no
        // spare capacity.
        let args: Vec<Token> = args.iter().map(|a| token(a)).collect();
        let rule = Rule {
            table,
            chain,
            position,
            args,
        };
        match family {
            Family::V4 => self.plan.v4.push(rule),
            Family::V6 if self.plan.ipv6 => self.plan.v6.push(rule),
            Family::V6 => {}
        }
    }

    fn append_to(&mut self, family: Family, table: Table, chain: &'static str, args: Vec<String>) {
        self.push(family, table, chain, Position::Append, args);
    }

    fn append(&mut self, table: Table, chain: &'static str, args: Vec<String>) {
        self.append_to(Family::V4, table, chain, args.clone());
        self.append_to(Family::V6, table, chain, args);
    }

    fn insert_to(
        &mut self,
        family: Family,
        table: Table,
        chain: &'static str,
        pos: u32,
        args: Vec<String>,
    ) {
        self.push(family, table, chain, Position::Insert(pos), args);
    }

    fn insert(&mut self, table: Table, chain: &'static str, pos: u32, args: Vec<String>) {
        self.insert_to(Family::V4, table, chain, pos, args.clone());
        self.insert_to(Family::V6, table, chain, pos, args);
    }

    /// Appends to both families, replacing `VERSIONED` with the family's value.
    fn append_versioned(
        &mut self,
        v4: &str,
        v6: &str,
        table: Table,
        chain: &'static str,
        args: Vec<String>,
    ) {
        let subst = |val: &str| -> Vec<String> {
            args.iter()
                .map(|a| {
                    if a == VERSIONED {
                        val.to_string()
                    } else {
                        a.clone()
                    }
                })
                .collect()
        };
        self.append_to(Family::V4, table, chain, subst(v4));
        self.append_to(Family::V6, table, chain, subst(v6));
    }
}

/// One rule's tokens from its text as iptables writes it:
/// `rule!("-p tcp --dport {port} -j RETURN")`. Every value a rule holds (ports, CIDRs,
/// owners, interface names) is validated to hold no whitespace, so splitting on it is exact.
macro_rules! rule {
    ($($fmt:tt)*) => {
        format!($($fmt)*)
            .split_whitespace()
            .map(String::from)
            .collect::<Vec<String>>()
    };
}

/// `["-x", "y"]` from displayable pieces.
macro_rules! args {
    ($($x:expr),* $(,)?) => { vec![$($x.to_string()),*] };
}

/// `-p P --dport X`: Istio's master writes one rule per excluded port (no multiport).
fn dport(proto: &str, port: &PortSpec) -> Vec<String> {
    args!["-p", proto, "--dport", port]
}

fn with_target(mut m: Vec<String>, target: &str) -> Vec<String> {
    m.extend(args!["-j", target]);
    m
}

fn owner_match(kind: &str, o: &Owner) -> Vec<String> {
    args!["-m", "owner", kind, o]
}

/// What a cleanup removes: this config's rules in both families, whatever IPv6 says (they
/// help recognise ours among the live rules), and the `ip` steps of [`ip::teardown`].
pub fn teardown(cfg: &Config, facts: &HostFacts) -> Plan {
    let both = HostFacts {
        ipv6: true,
        ..facts.clone()
    };
    let mut plan = build(cfg, &both);
    plan.ip = crate::routes::teardown(cfg);
    plan
}

/// What the phases share, worked out once from the config.
struct Ctx<'a> {
    cfg: &'a Config,
    facts: &'a HostFacts,
    tproxy: bool,
    loopback_v4: String,
    loopback_v6: &'static str,
    tunnel: String,
    /// `-i` names a loopback CIDR: the app's own traffic over lo is then captured.
    include_has_loopback: bool,
    /// DNS capture is asked for and has something to capture.
    redirect_dns: bool,
}

impl<'a> Ctx<'a> {
    fn new(cfg: &'a Config, facts: &'a HostFacts) -> Self {
        let redirect_dns = cfg.dns_capture_on(facts);
        if cfg.redirect_dns && !redirect_dns {
            tracing::warn!(
                "REDIRECT_DNS is set, but CAPTURE_ALL_DNS is false, and no DNS servers provided. DNS capture disabled."
            );
        }
        Ctx {
            cfg,
            facts,
            tproxy: cfg.mode == Mode::Tproxy,
            loopback_v4: cfg.host_loopback_cidr.to_string(),
            loopback_v6: "::1/128",
            tunnel: cfg.inbound_tunnel_port.to_string(),
            include_has_loopback: cfg.include_has_loopback(),
            redirect_dns,
        }
    }
}

/// Builds Istio's rule set for `cfg` on a host with `facts`: its phases, in the order of
/// Istio's `run.go`.
pub fn build(cfg: &Config, facts: &HostFacts) -> Plan {
    let mut b = Builder {
        plan: Plan {
            ipv6: facts.ipv6,
            ..Plan::default()
        },
    };
    let x = Ctx::new(cfg, facts);
    exclude_interfaces(&mut b, &x);
    kube_virt_interfaces_return(&mut b, &x);
    drop_invalid(&mut b, &x);
    proxy_chains(&mut b, &x);
    inbound(&mut b, &x);
    outbound_entry(&mut b, &x);
    proxy_traffic(&mut b, &x);
    owner_groups(&mut b, &x);
    dns(&mut b, &x);
    outbound_excludes(&mut b, &x);
    outbound_captures(&mut b, &x);
    tproxy_marks(&mut b, &x);
    b.plan.ip = ip_commands(cfg, facts);
    b.plan
}

/// Excluded interfaces are never captured (nat, and mangle in TPROXY mode).
fn exclude_interfaces(b: &mut Builder, x: &Ctx) {
    use Table::{Mangle, Nat};
    let cfg = x.cfg;
    let tproxy = x.tproxy;
    for i in &cfg.exclude_interfaces {
        b.append(Nat, "PREROUTING", args!["-i", i, "-j", "RETURN"]);
        b.append(Nat, "OUTPUT", args!["-o", i, "-j", "RETURN"]);
    }
    if tproxy {
        for i in &cfg.exclude_interfaces {
            b.append(Mangle, "PREROUTING", args!["-i", i, "-j", "RETURN"]);
            b.append(Mangle, "OUTPUT", args!["-o", i, "-j", "RETURN"]);
        }
    }
}

/// Virtual interfaces are not captured as inbound.
fn kube_virt_interfaces_return(b: &mut Builder, x: &Ctx) {
    use Table::Nat;
    let cfg = x.cfg;
    for i in &cfg.kube_virt_interfaces {
        b.insert(Nat, "PREROUTING", 1, args!["-i", i, "-j", "RETURN"]);
    }
}

/// `--drop-invalid`: mangle ISTIO_DROP for INVALID packets.
fn drop_invalid(b: &mut Builder, x: &Ctx) {
    use Table::Mangle;
    let cfg = x.cfg;
    if cfg.drop_invalid {
        b.append(
            Mangle,
            "PREROUTING",
            args!["-m", "conntrack", "--ctstate", "INVALID", "-j", chain::DROP],
        );
        b.append(Mangle, chain::DROP, args!["-j", "DROP"]);
    }
}

/// The chains every capture jumps to: the tunnel port's exemption, ISTIO_REDIRECT and
/// ISTIO_IN_REDIRECT.
fn proxy_chains(b: &mut Builder, x: &Ctx) {
    use Table::Nat;
    let cfg = x.cfg;
    let tunnel = x.tunnel.as_str();
    b.append(
        Nat,
        chain::INBOUND,
        args!["-p", "tcp", "--dport", tunnel, "-j", "RETURN"],
    );
    b.append(
        Nat,
        chain::REDIRECT,
        args!["-p", "tcp", "-j", "REDIRECT", "--to-ports", cfg.proxy_port],
    );
    b.append(
        Nat,
        chain::IN_REDIRECT,
        rule!("-p tcp -j REDIRECT --to-ports {}", cfg.inbound_capture_port),
    );
}

/// Inbound: PREROUTING to ISTIO_INBOUND, then per port (or all but the excluded ones) to
/// the proxy, through REDIRECT or TPROXY (Istio's `handleInboundPortsInclude`).
fn inbound(b: &mut Builder, x: &Ctx) {
    use Table::{Mangle, Nat};
    let cfg = x.cfg;
    let tproxy = x.tproxy;
    let loopback_v4 = x.loopback_v4.as_str();
    let loopback_v6 = x.loopback_v6;
    if cfg.inbound_ports != InboundPorts::None {
        let table = if tproxy {
            b.append(
                Mangle,
                chain::DIVERT,
                args!["-j", "MARK", "--set-mark", cfg.tproxy_mark],
            );
            b.append(Mangle, chain::DIVERT, args!["-j", "ACCEPT"]);
            b.append_versioned(
                loopback_v4,
                loopback_v6,
                Mangle,
                chain::TPROXY,
                rule!(
                    "! -d {VERSIONED} -p tcp -j TPROXY --tproxy-mark {}/0xffffffff --on-port {}",
                    cfg.tproxy_mark,
                    cfg.inbound_capture_port
                ),
            );
            Mangle
        } else {
            Nat
        };
        b.append(
            table,
            "PREROUTING",
            args!["-p", "tcp", "-j", chain::INBOUND],
        );
        // Sends inbound TCP (to `port`, or to every port) to the proxy.
        let to_proxy = |b: &mut Builder, port: Option<&PortSpec>| {
            let mut m = args!["-p", "tcp"];
            if let Some(p) = port {
                m.extend(args!["--dport", p]);
            }
            if tproxy {
                let mut divert = m.clone();
                divert.extend(rule!(
                    "-m conntrack --ctstate RELATED,ESTABLISHED -j {}",
                    chain::DIVERT
                ));
                b.append(Mangle, chain::INBOUND, divert);
                m.extend(args!["-j", chain::TPROXY]);
                b.append(Mangle, chain::INBOUND, m);
            } else {
                m.extend(args!["-j", chain::IN_REDIRECT]);
                b.append(Nat, chain::INBOUND, m);
            }
        };
        match &cfg.inbound_ports {
            InboundPorts::All => {
                for p in &cfg.inbound_ports_exclude {
                    b.append(
                        table,
                        chain::INBOUND,
                        with_target(dport("tcp", p), "RETURN"),
                    );
                }
                to_proxy(b, None);
            }
            InboundPorts::Only(ports) => {
                for p in ports {
                    to_proxy(b, Some(p));
                }
            }
            InboundPorts::None => unreachable!("checked above"),
        }
    }
}

/// Outbound entry: OUTPUT to ISTIO_OUTPUT, excluded ports, the passthrough source.
fn outbound_entry(b: &mut Builder, x: &Ctx) {
    use Table::Nat;
    let cfg = x.cfg;
    b.append(Nat, "OUTPUT", args!["-j", chain::OUTPUT]);
    // Per port, TCP then UDP, as Istio's handleOutboundPortsExclude does.
    for p in &cfg.outbound_ports_exclude {
        for proto in ["tcp", "udp"] {
            b.append(Nat, chain::OUTPUT, with_target(dport(proto, p), "RETURN"));
        }
    }
    // 127.0.0.6 / ::6 is the source of the inbound passthrough cluster.
    b.append_versioned(
        "127.0.0.6/32",
        "::6/128",
        Nat,
        chain::OUTPUT,
        args!["-o", "lo", "-s", VERSIONED, "-j", "RETURN"],
    );
}

/// The proxy's own traffic, and the app's calls back to itself over lo.
fn proxy_traffic(b: &mut Builder, x: &Ctx) {
    use Table::Nat;
    let facts = x.facts;
    let loopback_v4 = x.loopback_v4.as_str();
    let loopback_v6 = x.loopback_v6;
    let tunnel = x.tunnel.as_str();
    let include_has_loopback = x.include_has_loopback;
    let redirect_dns = x.redirect_dns;
    for (kind, owners) in [
        ("--uid-owner", &facts.proxy_uids),
        ("--gid-owner", &facts.proxy_gids),
    ] {
        for o in owners {
            // App calls back to itself through a VIP go via the inbound side of the proxy.
            let mut r = args!["-o", "lo", "!", "-d", VERSIONED, "-p", "tcp"];
            if redirect_dns && kind == "--uid-owner" {
                r.extend(rule!("-m multiport ! --dports 53,{tunnel}"));
            } else {
                r.extend(args!["!", "--dport", tunnel]);
            }
            r.extend(owner_match(kind, o));
            r.extend(args!["-j", chain::IN_REDIRECT]);
            b.append_versioned(loopback_v4, loopback_v6, Nat, chain::OUTPUT, r);

            // App to itself over lo is not captured (unless loopback is explicitly included).
            if !include_has_loopback {
                let mut r = args!["-o", "lo"];
                if redirect_dns {
                    r.extend(args!["-p", "tcp", "!", "--dport", "53"]);
                }
                r.extend(args!["-m", "owner", "!", kind, o, "-j", "RETURN"]);
                b.append(Nat, chain::OUTPUT, r);
            }
            // The proxy's own traffic is never captured.
            let mut r = owner_match(kind, o);
            r.extend(args!["-j", "RETURN"]);
            b.append(Nat, chain::OUTPUT, r);
        }
    }
}

/// Owner groups captured or not (Istio's `handleCaptureByOwnerGroup`).
fn owner_groups(b: &mut Builder, x: &Ctx) {
    use Table::Nat;
    let cfg = x.cfg;
    match &cfg.owner_groups {
        OwnerGroups::AllExcept(groups) => {
            for g in groups {
                b.append(
                    Nat,
                    chain::OUTPUT,
                    args!["-m", "owner", "--gid-owner", g, "-j", "RETURN"],
                );
            }
        }
        OwnerGroups::Only(groups) => {
            let mut r = Vec::new();
            for g in groups {
                r.extend(args!["-m", "owner", "!", "--gid-owner", g]);
            }
            r.extend(args!["-j", "RETURN"]);
            b.append(Nat, chain::OUTPUT, r);
        }
    }
}

/// DNS capture, when asked for and possible (Istio's `SetupDNSRedir`).
fn dns(b: &mut Builder, x: &Ctx) {
    let cfg = x.cfg;
    let redirect_dns = x.redirect_dns;
    if redirect_dns {
        dns_rules(b, cfg, x.facts);
    }
}

/// What outbound is never captured: localhost, excluded CIDRs; then ports always captured
/// (Istio's `handleOutboundPortsInclude`).
fn outbound_excludes(b: &mut Builder, x: &Ctx) {
    use Table::Nat;
    let cfg = x.cfg;
    let loopback_v4 = x.loopback_v4.as_str();
    let loopback_v6 = x.loopback_v6;
    // Traffic to localhost is not captured.
    b.append_versioned(
        loopback_v4,
        loopback_v6,
        Nat,
        chain::OUTPUT,
        args!["-d", VERSIONED, "-j", "RETURN"],
    );
    let ex = &cfg.outbound_exclude;
    let v4 = ex.v4.iter().map(|n| (Family::V4, n.to_string()));
    let excluded = v4.chain(ex.v6.iter().map(|n| (Family::V6, n.to_string())));
    for (family, n) in excluded {
        b.append_to(family, Nat, chain::OUTPUT, args!["-d", n, "-j", "RETURN"]);
    }
    for p in &cfg.outbound_ports_include {
        b.append(
            Nat,
            chain::OUTPUT,
            args!["-p", "tcp", "--dport", p, "-j", chain::REDIRECT],
        );
    }
}

/// Outbound CIDRs captured, and virtual interfaces' traffic treated as outbound (Istio's
/// `handleOutboundIncludeRules`).
fn outbound_captures(b: &mut Builder, x: &Ctx) {
    use Table::Nat;
    let cfg = x.cfg;
    for family in [Family::V4, Family::V6] {
        match &cfg.outbound_include {
            OutboundCidrs::All => {
                b.append_to(family, Nat, chain::OUTPUT, args!["-j", chain::REDIRECT]);
                for i in &cfg.kube_virt_interfaces {
                    b.insert_to(
                        family,
                        Nat,
                        "PREROUTING",
                        1,
                        args!["-i", i, "-j", chain::REDIRECT],
                    );
                }
            }
            OutboundCidrs::Only(cidrs) => {
                let nets: Vec<String> = match family {
                    Family::V4 => cidrs.v4.iter().map(|n| n.to_string()).collect(),
                    Family::V6 => cidrs.v6.iter().map(|n| n.to_string()).collect(),
                };
                for n in nets {
                    for i in &cfg.kube_virt_interfaces {
                        b.insert_to(
                            family,
                            Nat,
                            "PREROUTING",
                            1,
                            args!["-i", i, "-d", n, "-j", chain::REDIRECT],
                        );
                    }
                    b.append_to(
                        family,
                        Nat,
                        chain::OUTPUT,
                        args!["-d", n, "-j", chain::REDIRECT],
                    );
                }
            }
        }
    }
}

/// TPROXY mode's marks: connmark save/restore, the proxy's outbound mark, and the
/// ISTIO_INBOUND exemptions for marked and passthrough traffic.
fn tproxy_marks(b: &mut Builder, x: &Ctx) {
    use Table::Mangle;
    let cfg = x.cfg;
    let tproxy = x.tproxy;
    let loopback_v4 = x.loopback_v4.as_str();
    let loopback_v6 = x.loopback_v6;
    if tproxy {
        let mark = cfg.tproxy_mark;
        // Save the mark set by Envoy's original_src filter as the connection mark.
        b.append(
            Mangle,
            "PREROUTING",
            rule!("-p tcp -m mark --mark {mark} -j CONNMARK --save-mark"),
        );
        // Already marked (envoy -> app): leave it.
        b.append(
            Mangle,
            "OUTPUT",
            rule!("-p tcp -o lo -m mark --mark {mark} -j RETURN"),
        );
        for (kind, owners) in [
            ("--uid-owner", &x.facts.proxy_uids),
            ("--gid-owner", &x.facts.proxy_gids),
        ] {
            for o in owners {
                let mut r = args!["!", "-d", VERSIONED, "-p", "tcp", "-o", "lo"];
                r.extend(owner_match(kind, o));
                r.extend(args!["-j", "MARK", "--set-mark", OUTBOUND_MARK]);
                b.append_versioned(loopback_v4, loopback_v6, Mangle, "OUTPUT", r);
            }
        }
        b.append(
            Mangle,
            "OUTPUT",
            rule!("-p tcp -m connmark --mark {mark} -j CONNMARK --restore-mark"),
        );
        b.insert(
            Mangle,
            chain::INBOUND,
            1,
            args!["-p", "tcp", "-m", "mark", "--mark", mark, "-j", "RETURN"],
        );
        b.insert_to(
            Family::V4,
            Mangle,
            chain::INBOUND,
            2,
            rule!("-p tcp -s 127.0.0.6/32 -i lo -j RETURN"),
        );
        b.insert_to(
            Family::V6,
            Mangle,
            chain::INBOUND,
            2,
            args!["-p", "tcp", "-s", "::6/128", "-i", "lo", "-j", "RETURN"],
        );
        b.insert(
            Mangle,
            chain::INBOUND,
            3,
            rule!("-p tcp -i lo -m mark ! --mark {OUTBOUND_MARK} -j RETURN"),
        );
    }
}

/// DNS capture: nat redirection to the agent and raw-table conntrack zones.
fn dns_rules(b: &mut Builder, cfg: &Config, facts: &HostFacts) {
    use Table::{Nat, Raw};
    let all = cfg.capture_all_dns;
    let v4 = &facts.dns_servers_v4;
    let v6 = &facts.dns_servers_v6;
    let dns_port = DNS_PROXY_PORT;

    b.append(Raw, "OUTPUT", args!["-j", chain::OUTPUT_DNS]);
    if all || !v4.is_empty() {
        b.append_to(
            Family::V4,
            Nat,
            chain::OUTPUT,
            args!["-j", chain::OUTPUT_DNS],
        );
    }
    if all || !v6.is_empty() {
        b.append_to(
            Family::V6,
            Nat,
            chain::OUTPUT,
            args!["-j", chain::OUTPUT_DNS],
        );
    }
    let servers = |fam: Family| -> Vec<String> {
        match fam {
            Family::V4 => v4.iter().map(|s| format!("{}/32", s.text)).collect(),
            Family::V6 => v6.iter().map(|s| format!("{}/128", s.text)).collect(),
        }
    };
    for (proto, to) in [("tcp", "--to-ports"), ("udp", "--to-port")] {
        if all {
            b.append(
                Nat,
                chain::OUTPUT_DNS,
                args!["-p", proto, "--dport", "53", "-j", "REDIRECT", to, dns_port],
            );
        } else {
            for fam in [Family::V4, Family::V6] {
                for s in servers(fam) {
                    b.append_to(
                        fam,
                        Nat,
                        chain::OUTPUT_DNS,
                        rule!("-p {proto} --dport 53 -d {s} -j REDIRECT {to} {dns_port}"),
                    );
                }
            }
        }
    }
    // Conntrack zones: proxy <-> upstream servers in zone 1, app <-> proxy in zone 2.
    for (kind, owners) in [
        ("--uid-owner", &facts.proxy_uids),
        ("--gid-owner", &facts.proxy_gids),
    ] {
        for o in owners {
            let mut r = args!["-p", "udp", "--dport", "53"];
            r.extend(owner_match(kind, o));
            r.extend(args!["-j", "CT", "--zone", "1"]);
            b.append(Raw, chain::OUTPUT_DNS, r);
            let mut r = args!["-p", "udp", "--sport", dns_port];
            r.extend(owner_match(kind, o));
            r.extend(args!["-j", "CT", "--zone", "2"]);
            b.append(Raw, chain::OUTPUT_DNS, r);
        }
    }
    if all {
        b.append(Raw, "PREROUTING", args!["-j", chain::INBOUND]);
        b.append(
            Raw,
            chain::OUTPUT_DNS,
            args!["-p", "udp", "--dport", "53", "-j", "CT", "--zone", "2"],
        );
        b.append(
            Raw,
            chain::INBOUND,
            args!["-p", "udp", "--sport", "53", "-j", "CT", "--zone", "1"],
        );
    } else {
        for fam in [Family::V4, Family::V6] {
            let list = servers(fam);
            if !list.is_empty() {
                b.append_to(fam, Raw, "PREROUTING", args!["-j", chain::INBOUND]);
            }
            for s in list {
                b.append_to(
                    fam,
                    Raw,
                    chain::OUTPUT_DNS,
                    rule!("-p udp --dport 53 -d {s} -j CT --zone 2"),
                );
                b.append_to(
                    fam,
                    Raw,
                    chain::INBOUND,
                    rule!("-p udp --sport 53 -s {s} -j CT --zone 1"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{SEED, build as config};

    fn lines(rules: &[Rule]) -> Vec<String> {
        rules.iter().map(|r| format!("{} {}", r.table, r)).collect()
    }

    #[test]
    fn seed_command_captures_all_inbound_and_outbound() {
        let (c, f) = config(SEED, &[]).unwrap();
        let plan = build(&c, &f);
        let l = lines(&plan.v4);
        assert!(l.contains(&"nat -A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN".to_string()));
        assert!(l.contains(&"nat -A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN".to_string()));
        assert!(l.contains(&"nat -A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT".to_string()));
        assert_eq!(l.last().unwrap(), "nat -A ISTIO_OUTPUT -j ISTIO_REDIRECT");
        assert!(plan.v6.is_empty());
        assert!(plan.ip.is_empty());
    }

    #[test]
    fn ipv6_rules_use_v6_addresses_and_add_loopback_address() {
        let (c, f) = config(
            &["-i", "10.0.0.0/8,fd00::/8"],
            &[("ENABLE_INBOUND_IPV6", "true")],
        )
        .unwrap();
        let plan = build(&c, &f);
        let v6 = lines(&plan.v6);
        assert!(v6.contains(&"nat -A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN".to_string()));
        assert!(v6.contains(&"nat -A ISTIO_OUTPUT -d fd00::/8 -j ISTIO_REDIRECT".to_string()));
        assert!(!v6.iter().any(|l| l.contains("10.0.0.0/8")));
        assert_eq!(plan.ip, vec![IpCommand::AddInboundV6Address]);
    }

    #[test]
    fn tproxy_adds_routes_per_family() {
        let (c, f) = config(
            &["-m", "TPROXY", "-b", "*", "-t", "7", "-r", "99"],
            &[("ENABLE_INBOUND_IPV6", "true")],
        )
        .unwrap();
        let plan = build(&c, &f);
        let ip: Vec<String> = plan.ip.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            ip,
            vec![
                "ip -6 addr add ::6/128 dev lo",
                "ip -4 route add local default dev lo table 99",
                "ip -6 route add local default dev lo table 99",
                "ip -4 rule add fwmark 7 lookup 99",
                "ip -6 rule add fwmark 7 lookup 99",
            ]
        );
        assert!(
            lines(&plan.v4).contains(&"mangle -A ISTIO_DIVERT -j MARK --set-mark 7".to_string())
        );
    }

    #[test]
    fn loopback_include_keeps_app_to_self_traffic_captured() {
        let (c, f) = config(&["-i", "127.0.0.0/8"], &[]).unwrap();
        let l = lines(&build(&c, &f).v4);
        assert!(!l.iter().any(|r| r.contains("! --uid-owner")), "{l:#?}");
    }

    #[test]
    fn dns_without_servers_is_disabled() {
        let (c, f) = config(
            &["--redirect-dns", "--resolv-conf", "/etc/resolv.conf"],
            &[],
        )
        .unwrap();
        assert!(
            lines(&build(&c, &f).v4)
                .iter()
                .any(|l| l.contains("ISTIO_OUTPUT_DNS"))
        );
        let mut f = f;
        f.dns_servers_v4.clear();
        f.dns_servers_v6.clear();
        assert!(
            !lines(&build(&c, &f).v4)
                .iter()
                .any(|l| l.contains("ISTIO_OUTPUT_DNS"))
        );
    }

    #[test]
    fn capture_all_dns_ignores_servers() {
        let (c, f) = config(&["--redirect-dns", "--capture-all-dns"], &[]).unwrap();
        let l = lines(&build(&c, &f).v4);
        assert!(l.contains(
            &"nat -A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-port 15053".to_string()
        ));
        assert!(l.contains(&"raw -A ISTIO_INBOUND -p udp --sport 53 -j CT --zone 1".to_string()));
    }

    #[test]
    fn port_exclusions_are_one_rule_per_port_as_istio_master_writes_them() {
        let (c, f) = config(
            &["-b", "*", "-d", "15090,15020,8000:8010", "-o", "22,443"],
            &[],
        )
        .unwrap();
        let l = lines(&build(&c, &f).v4);
        let inbound: Vec<&String> = l
            .iter()
            .filter(|r| r.starts_with("nat -A ISTIO_INBOUND") && r.ends_with("-j RETURN"))
            .collect();
        assert_eq!(
            inbound,
            [
                "nat -A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
                "nat -A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
                "nat -A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
                "nat -A ISTIO_INBOUND -p tcp --dport 8000:8010 -j RETURN",
            ],
            "{l:#?}"
        );
        let outbound: Vec<&String> = l
            .iter()
            .filter(|r| r.starts_with("nat -A ISTIO_OUTPUT -p"))
            .collect();
        assert_eq!(
            outbound,
            [
                "nat -A ISTIO_OUTPUT -p tcp --dport 22 -j RETURN",
                "nat -A ISTIO_OUTPUT -p udp --dport 22 -j RETURN",
                "nat -A ISTIO_OUTPUT -p tcp --dport 443 -j RETURN",
                "nat -A ISTIO_OUTPUT -p udp --dport 443 -j RETURN",
            ],
            "{l:#?}"
        );
        assert!(
            !l.iter().any(|r| r.contains("multiport")
                && r.contains("RETURN")
                && !r.contains("! --dports"))
        );
    }

    #[test]
    fn outbound_port_exclusion_covers_tcp_and_udp() {
        let (c, f) = config(&["-o", "3306"], &[]).unwrap();
        let l = lines(&build(&c, &f).v4);
        assert!(l.contains(&"nat -A ISTIO_OUTPUT -p tcp --dport 3306 -j RETURN".to_string()));
        assert!(l.contains(&"nat -A ISTIO_OUTPUT -p udp --dport 3306 -j RETURN".to_string()));
    }
}
