//! The native nftables rule builder: config in, Istio's nftables transaction out. Pure — no
//! I/O.
//!
//! The phases, their order and the text of every rule reproduce Istio's
//! `tools/istio-nftables/pkg/capture/run.go` (`--native-nftables`), so that our transaction
//! equals the one Istio feeds to `nft -f -`, line by line. The text is what Istio's `knftables`
//! library writes for it: per table (nat, mangle, raw) `add table`, `flush table`, `add chain`
//! for each chain that gets rules (base chains with their type, hook and priority), then the
//! rules in the order they were built. Tables and chains without rules are not written.
//!
//! Deliberate differences, only where Istio's text is one nft refuses: a port range is written
//! `a-b` (Istio passes the iptables spelling `a:b` through), and an interface name that could
//! be an nft keyword is quoted, with the iptables wildcard `eth+` written as nft's `"eth*"`
//! and a literal trailing `*` as `"eth\*"` (see [`iface`]);
//! and without IPv6, IPv6 DNS servers do not count (Istio would jump to empty, undeclared
//! DNS chains when they are the only servers).
//!
//! With `--exclusion-sets` (ours, off by default) each list Istio writes one rule per item for
//! (`-i`, `-x`, `-b`, `-d`, `-q`, `-o`, the owner groups) is one rule over an anonymous set
//! instead, at the place of the first of those rules: every item of a list ends the walk the
//! same way, so the capture is the same (`Ctx::each`).

use std::collections::HashMap;
use std::fmt;

use ipnet::{Ipv4Net, Ipv6Net};

use crate::config::{
    Config, HostFacts, Iface, InboundPorts, Mode, OutboundCidrs, Owner, OwnerGroups, PortSpec,
};
use crate::model::{DNS_PROXY_PORT, OUTBOUND_MARK};
use crate::routes::{IpCommand, ip_commands};

use self::Table::{Mangle, Nat, Raw};
use self::chain::{
    DIVERT, DROP, IN_REDIRECT, INBOUND, OUTPUT, OUTPUT_DNS, OUTPUT_ISTIO, PREROUTING, REDIRECT,
    TPROXY,
};

/// The address family of our tables: one table serves IPv4 and IPv6.
pub const FAMILY: &str = "inet";

/// Our chain names (in each table, as Istio names them).
pub mod chain {
    pub const PREROUTING: &str = "prerouting";
    pub const OUTPUT: &str = "output";
    pub const INBOUND: &str = "istio-inbound";
    pub const REDIRECT: &str = "istio-redirect";
    pub const IN_REDIRECT: &str = "istio-in-redirect";
    pub const OUTPUT_ISTIO: &str = "istio-output";
    pub const OUTPUT_DNS: &str = "istio-output-dns";
    pub const DIVERT: &str = "istio-divert";
    pub const TPROXY: &str = "istio-tproxy";
    pub const DROP: &str = "istio-drop";
}

/// One of our three tables, in the order Istio writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Nat,
    Mangle,
    Raw,
}

/// A base chain's attachment: `{ type KIND hook HOOK priority PRIORITY ; }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    pub kind: &'static str,
    pub hook: &'static str,
    pub priority: i32,
}

/// A chain Istio declares in a table; `hook` is `None` for a regular chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    pub name: &'static str,
    pub hook: Option<Hook>,
}

const fn base(name: &'static str, kind: &'static str, hook: &'static str, priority: i32) -> Chain {
    Chain {
        name,
        hook: Some(Hook {
            kind,
            hook,
            priority,
        }),
    }
}

const fn regular(name: &'static str) -> Chain {
    Chain { name, hook: None }
}

/// knftables' named priorities, as numbers: dstnat, mangle, raw.
const DSTNAT: i32 = -100;
const MANGLE: i32 = -150;
const RAW: i32 = -300;

const NAT_CHAINS: [Chain; 7] = [
    base(chain::PREROUTING, "nat", "prerouting", DSTNAT),
    base(chain::OUTPUT, "nat", "output", DSTNAT),
    regular(chain::INBOUND),
    regular(chain::REDIRECT),
    regular(chain::IN_REDIRECT),
    regular(chain::OUTPUT_ISTIO),
    regular(chain::OUTPUT_DNS),
];

const MANGLE_CHAINS: [Chain; 6] = [
    base(chain::PREROUTING, "filter", "prerouting", MANGLE),
    base(chain::OUTPUT, "route", "output", MANGLE),
    regular(chain::DIVERT),
    regular(chain::TPROXY),
    regular(chain::INBOUND),
    regular(chain::DROP),
];

const RAW_CHAINS: [Chain; 4] = [
    base(chain::PREROUTING, "filter", "prerouting", RAW),
    base(chain::OUTPUT, "filter", "output", RAW),
    regular(chain::INBOUND),
    regular(chain::OUTPUT_DNS),
];

impl Table {
    pub const ALL: [Table; 3] = [Table::Nat, Table::Mangle, Table::Raw];

    pub fn name(self) -> &'static str {
        match self {
            Table::Nat => "istio-proxy-nat",
            Table::Mangle => "istio-proxy-mangle",
            Table::Raw => "istio-proxy-raw",
        }
    }

    /// The table named `name` (`istio-proxy-nat`...), if it is one of ours.
    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The chains Istio may declare in this table, in its order.
    pub fn chains(self) -> &'static [Chain] {
        match self {
            Table::Nat => &NAT_CHAINS,
            Table::Mangle => &MANGLE_CHAINS,
            Table::Raw => &RAW_CHAINS,
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One rule as built: where it goes, the 0-based index Istio asked to insert it at (`None`:
/// append), and its text (matches and statements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub table: Table,
    pub chain: &'static str,
    pub index: Option<u32>,
    pub expr: String,
}

/// Everything a config asks for: rules in build order (all tables), then `ip` commands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub rules: Vec<Rule>,
    pub ip: Vec<IpCommand>,
}

impl Ruleset {
    /// The rules of one table, in build order.
    pub fn rules_in(&self, table: Table) -> impl Iterator<Item = &Rule> {
        self.rules.iter().filter(move |r| r.table == table)
    }

    /// The transaction: per table with rules, `add table`, `flush table`, the chains that get
    /// rules, then the rules. An insert at an index the chain does not reach yet (nft refuses
    /// it) is an append, as Istio's `addIstioTableRules` decides.
    pub fn transaction(&self) -> Vec<Op> {
        let mut ops = Vec::new();
        for table in Table::ALL {
            let rules: Vec<&Rule> = self.rules_in(table).collect();
            let count = |name: &str| rules.iter().filter(|r| r.chain == name).count();
            let chains: Vec<Chain> = table
                .chains()
                .iter()
                .filter(|c| count(c.name) > 0)
                .copied()
                .collect();
            if chains.is_empty() {
                continue;
            }
            ops.push(Op::AddTable(table));
            ops.push(Op::FlushTable(table));
            ops.extend(chains.into_iter().map(|c| Op::AddChain(table, c)));
            // Rules written so far, per chain.
            let mut written: HashMap<&str, u32> = HashMap::new();
            for r in rules {
                let n = written.entry(r.chain).or_default();
                let index = r.index.filter(|&i| i < *n);
                *n += 1;
                ops.push(Op::Rule {
                    table,
                    chain: r.chain,
                    index,
                    expr: r.expr.clone(),
                });
            }
        }
        ops
    }
}

/// One line of the transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    AddTable(Table),
    FlushTable(Table),
    AddChain(Table, Chain),
    /// `add rule` (`index: None`) or `insert rule ... index N`.
    Rule {
        table: Table,
        chain: &'static str,
        index: Option<u32>,
        expr: String,
    },
}

impl Op {
    /// The table the line is about.
    pub fn table(&self) -> Table {
        match self {
            Op::AddTable(t) | Op::FlushTable(t) | Op::AddChain(t, _) => *t,
            Op::Rule { table, .. } => *table,
        }
    }
}

impl fmt::Display for Op {
    /// knftables' text for `nft -f -`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::AddTable(t) => write!(f, "add table {FAMILY} {t}"),
            Op::FlushTable(t) => write!(f, "flush table {FAMILY} {t}"),
            Op::AddChain(t, c) => {
                write!(f, "add chain {FAMILY} {t} {}", c.name)?;
                if let Some(h) = c.hook {
                    write!(
                        f,
                        " {{ type {} hook {} priority {} ; }}",
                        h.kind, h.hook, h.priority
                    )?;
                }
                Ok(())
            }
            Op::Rule {
                table,
                chain,
                index: None,
                expr,
            } => write!(f, "add rule {FAMILY} {table} {chain} {expr}"),
            Op::Rule {
                table,
                chain,
                index: Some(i),
                expr,
            } => write!(f, "insert rule {FAMILY} {table} {chain} index {i} {expr}"),
        }
    }
}

/// The transaction as `nft -f -` reads it: one operation per line.
pub fn render(ops: &[Op]) -> String {
    ops.iter().map(|op| format!("{op}\n")).collect()
}

/// A port or a range in nft's syntax (`8000-8010`).
fn port(p: &PortSpec) -> String {
    match p {
        PortSpec::One(p) => p.to_string(),
        PortSpec::Range(a, b) => format!("{a}-{b}"),
    }
}

/// A user or group name as nft reads it: a plain nft word as it is (as Istio writes it),
/// anything else quoted (config validation rules out quotes, backslashes and whitespace in names).
fn word(name: String) -> String {
    let mut chars = name.chars();
    let plain = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '.')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'));
    if plain { name } else { format!("\"{name}\"") }
}

/// An interface name, meaning in nft what it means in iptables: the iptables wildcard `eth+`
/// is nft's `"eth*"`, and a literal `*` at the end (iptables' `eth*`) is escaped, `"eth\*"`
/// (nft reads an unescaped one as a wildcard; a `*` elsewhere is literal in both). The name
/// is written bare, as Istio writes it, only when it cannot be an nft keyword: a word with a
/// digit or a dash (`eth0`, `not-istio-nic`: every interface in Istio's tests) that is not
/// one of [`KEYWORDS_WITH_DIGIT_OR_DASH`]. Any other is quoted: a bare `bridge`, `inet`,
/// `tcp` or `tproxy` is a keyword to nft, and the apply would fail. (`+` alone, every
/// interface, has no nft form: the config refuses it with `--native-nftables`.)
fn iface(i: &Iface) -> String {
    let name = i.to_string();
    let pattern = match (name.strip_suffix('+'), name.strip_suffix('*')) {
        (Some(stem), _) => format!("{stem}*"),
        (None, Some(stem)) => format!("{stem}\\*"),
        (None, None) => name.clone(),
    };
    let mut chars = name.chars();
    let bare = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && name.contains(|c: char| c.is_ascii_digit() || c == '-')
        && !KEYWORDS_WITH_DIGIT_OR_DASH.contains(&name.as_str());
    if bare { name } else { format!("\"{pattern}\"") }
}

/// nft's keywords (1.0.6: its parser's token strings) that have a digit or a dash and fit an
/// interface name (15 bytes): a name of that shape nft may not read as a name when bare.
const KEYWORDS_WITH_DIGIT_OR_DASH: [&str; 39] = [
    "a-rwnd",
    "asconf-ack",
    "auto-merge",
    "cgroupv2",
    "cookie-ack",
    "cookie-echo",
    "cum-tsn-ack",
    "forward-tsn",
    "frag-off",
    "fully-random",
    "gc-interval",
    "heartbeat-ack",
    "icmpv6",
    "init-ack",
    "init-tag",
    "initial-tsn",
    "ip6",
    "l3proto",
    "last-entry",
    "lowest-tsn",
    "max-delay",
    "md5sig",
    "more-fragments",
    "new-cum-tsn",
    "num-dup-tsns",
    "param-problem",
    "proto-dst",
    "proto-src",
    "queue-threshold",
    "reserved2",
    "rt0",
    "rt2",
    "sack-permitted",
    "sack0",
    "sack1",
    "sack2",
    "sack3",
    "seg-left",
    "shutdown-ack",
];

/// A uid or gid, or a user or group name (nft resolves names when it parses).
fn owner(o: &Owner) -> String {
    match o {
        Owner::Id(n) => n.to_string(),
        Owner::Name(n) => word(n.clone()),
    }
}

/// The proxy's owners: `skuid` for each uid, then `skgid` for each gid (Istio's two loops).
fn proxy_owners(facts: &HostFacts) -> impl Iterator<Item = (&'static str, String)> {
    let uids = facts.proxy_uids.iter().map(|o| ("skuid", owner(o)));
    uids.chain(facts.proxy_gids.iter().map(|o| ("skgid", owner(o))))
}

const LOOPBACK_V6: &str = "::1/128";

/// Collects rules in build order; one method per Istio builder call.
struct Builder {
    ipv6: bool,
    rules: Vec<Rule>,
}

impl Builder {
    fn push(&mut self, table: Table, chain: &'static str, index: Option<u32>, expr: String) {
        self.rules.push(Rule {
            table,
            chain,
            index,
            expr,
        });
    }

    /// Istio's `AppendRule`.
    fn append(&mut self, table: Table, chain: &'static str, expr: String) {
        self.push(table, chain, None, expr);
    }

    /// Istio's `AppendV6RuleIfSupported`: only when IPv6 is on.
    fn append_v6(&mut self, table: Table, chain: &'static str, expr: String) {
        if self.ipv6 {
            self.append(table, chain, expr);
        }
    }

    /// Istio's `InsertRule` (0-based index).
    fn insert(&mut self, table: Table, chain: &'static str, index: u32, expr: String) {
        self.push(table, chain, Some(index), expr);
    }

    /// Istio's `InsertV6RuleIfSupported`.
    fn insert_v6(&mut self, table: Table, chain: &'static str, index: u32, expr: String) {
        if self.ipv6 {
            self.insert(table, chain, index, expr);
        }
    }
}

/// What the phases work from, worked out once.
struct Ctx<'a> {
    cfg: &'a Config,
    facts: &'a HostFacts,
    tproxy: bool,
    /// The host loopback CIDR (ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR).
    lo4: String,
    tunnel: String,
    redirect_dns: bool,
    include_has_loopback: bool,
}

impl Ctx<'_> {
    /// The values of a list as the rules match them: one rule per item, as Istio writes
    /// them, or with `--exclusion-sets` one anonymous set for the whole list
    /// ([`set`]). Empty lists write no rule either way.
    fn each(&self, items: Vec<String>) -> Vec<String> {
        if self.cfg.exclusion_sets && !items.is_empty() {
            vec![set(items)]
        } else {
            items
        }
    }

    /// Ports and ranges, for [`Ctx::each`]. In set form they are merged first: an interval
    /// set's elements may not overlap (nft refuses them without `auto-merge`, which an
    /// anonymous set cannot carry).
    fn ports(&self, ports: &[PortSpec]) -> Vec<String> {
        if !self.cfg.exclusion_sets {
            return ports.iter().map(port).collect();
        }
        let merged = merge_ranges(ports.iter().map(|p| match *p {
            PortSpec::One(p) => (u32::from(p.get()), u32::from(p.get())),
            PortSpec::Range(a, b) => (u32::from(a.get()), u32::from(b.get())),
        }));
        let text = merged.into_iter().map(|(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        });
        self.each(text.collect())
    }

    /// CIDRs, for [`Ctx::each`]. In set form, the fewest prefixes that cover the same
    /// addresses ([`IpNet::aggregate`]): no two overlap, as an interval set needs.
    fn nets<N: fmt::Display + Clone>(
        &self,
        nets: &[N],
        aggregate: fn(&[N]) -> Vec<N>,
    ) -> Vec<String> {
        if !self.cfg.exclusion_sets {
            return nets.iter().map(ToString::to_string).collect();
        }
        self.each(aggregate(nets).iter().map(ToString::to_string).collect())
    }

    /// Owners (uids, gids or names), for [`Ctx::each`]; a set holds each once.
    fn owners(&self, owners: &[Owner]) -> Vec<String> {
        let mut seen = Vec::new();
        for o in owners.iter().map(owner) {
            if !(self.cfg.exclusion_sets && seen.contains(&o)) {
                seen.push(o);
            }
        }
        self.each(seen)
    }
}

/// nft's anonymous set of `items`; a single item stands alone (nft lists a one-element set
/// as the element, so the rule reads back as written).
fn set(items: Vec<String>) -> String {
    if items.len() == 1 {
        return items.into_iter().next().expect("one item");
    }
    format!("{{ {} }}", items.join(", "))
}

/// Inclusive ranges merged: sorted, and overlapping or adjacent ones joined.
pub(crate) fn merge_ranges(ranges: impl Iterator<Item = (u32, u32)>) -> Vec<(u32, u32)> {
    let mut v: Vec<(u32, u32)> = ranges.collect();
    v.sort_unstable();
    let mut out: Vec<(u32, u32)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

fn aggregate4(nets: &[Ipv4Net]) -> Vec<Ipv4Net> {
    Ipv4Net::aggregate(&nets.to_vec())
}

fn aggregate6(nets: &[Ipv6Net]) -> Vec<Ipv6Net> {
    Ipv6Net::aggregate(&nets.to_vec())
}

/// Builds Istio's nftables ruleset for `cfg` on a host with `facts`, phase by phase as
/// `run.go`'s `Run` does.
pub fn build(cfg: &Config, facts: &HostFacts) -> Ruleset {
    let mut b = Builder {
        ipv6: facts.ipv6,
        rules: Vec::new(),
    };
    let redirect_dns = cfg.dns_capture_on(facts);
    if cfg.redirect_dns && !redirect_dns {
        tracing::warn!(
            "--redirect-dns is set, but --capture-all-dns is not and no DNS servers were found; DNS capture disabled"
        );
    }
    let x = Ctx {
        cfg,
        facts,
        tproxy: cfg.mode == Mode::Tproxy,
        lo4: cfg.host_loopback_cidr.to_string(),
        tunnel: cfg.inbound_tunnel_port.to_string(),
        redirect_dns,
        include_has_loopback: cfg.include_has_loopback(),
    };

    exclude_interfaces(&mut b, &x);
    kube_virt_interfaces_return(&mut b, &x);
    if cfg.drop_invalid {
        drop_invalid(&mut b);
    }
    proxy_chains(&mut b, &x);
    if cfg.inbound_ports != InboundPorts::None {
        inbound(&mut b, &x);
    }
    outbound_entry(&mut b, &x);
    proxy_traffic(&mut b, &x);
    owner_groups(&mut b, &x);
    if x.redirect_dns {
        dns(&mut b, &x);
    }
    outbound_captures(&mut b, &x);
    if x.tproxy {
        tproxy_marks(&mut b, &x);
    }
    Ruleset {
        rules: b.rules,
        ip: ip_commands(cfg, facts),
    }
}

/// `shortCircuitExcludeInterfaces`: excluded interfaces are never captured (nat, and with
/// TPROXY mangle too).
fn exclude_interfaces(b: &mut Builder, x: &Ctx) {
    let tables: &[Table] = if x.tproxy {
        &[Table::Nat, Table::Mangle]
    } else {
        &[Table::Nat]
    };
    for &table in tables {
        for i in x.cfg.exclude_interfaces.iter().map(iface) {
            b.append(table, PREROUTING, format!("iifname {i} counter return"));
            b.append(table, OUTPUT, format!("oifname {i} counter return"));
        }
    }
}

/// `shortCircuitKubeInternalInterface`: virtual interfaces are not captured as inbound.
fn kube_virt_interfaces_return(b: &mut Builder, x: &Ctx) {
    for i in x.cfg.kube_virt_interfaces.iter().map(iface) {
        b.insert(Nat, PREROUTING, 0, format!("iifname {i} counter return"));
    }
}

/// `--drop-invalid`: drop INVALID packets rather than have them reset the connection.
fn drop_invalid(b: &mut Builder) {
    b.append(
        Mangle,
        PREROUTING,
        format!("meta l4proto tcp ct state invalid counter jump {DROP}"),
    );
    b.append(Mangle, DROP, "counter drop".into());
}

/// The tunnel port is never captured; the redirect chains to the proxy's two ports.
fn proxy_chains(b: &mut Builder, x: &Ctx) {
    let (tunnel, cfg) = (&x.tunnel, x.cfg);
    b.append(
        Nat,
        INBOUND,
        format!("meta l4proto tcp tcp dport {tunnel} counter return"),
    );
    b.append(
        Nat,
        REDIRECT,
        format!("meta l4proto tcp counter redirect to :{}", cfg.proxy_port),
    );
    b.append(
        Nat,
        IN_REDIRECT,
        format!(
            "meta l4proto tcp counter redirect to :{}",
            cfg.inbound_capture_port
        ),
    );
}

/// `handleInboundPortsInclude`: inbound TCP to the proxy, by REDIRECT (nat) or TPROXY
/// (mangle, `handleInboundTProxyMode`).
fn inbound(b: &mut Builder, x: &Ctx) {
    let cfg = x.cfg;
    let table = if x.tproxy {
        let (mark, to) = (cfg.tproxy_mark, cfg.inbound_capture_port);
        b.append(Mangle, DIVERT, format!("counter meta mark set {mark}"));
        b.append(Mangle, DIVERT, "counter accept".into());
        b.append(
            Mangle,
            TPROXY,
            format!(
                "meta l4proto tcp ip daddr != {} tproxy ip to :{to} meta mark set {mark} counter accept",
                x.lo4
            ),
        );
        b.append_v6(
            Mangle,
            TPROXY,
            format!(
                "meta l4proto tcp ip6 daddr != {LOOPBACK_V6} tproxy ip6 to :{to} meta mark set {mark} counter accept"
            ),
        );
        Mangle
    } else {
        Nat
    };
    b.append(
        table,
        PREROUTING,
        format!("meta l4proto tcp counter jump {INBOUND}"),
    );
    match &cfg.inbound_ports {
        InboundPorts::All => {
            for p in x.ports(&cfg.inbound_ports_exclude) {
                b.append(
                    table,
                    INBOUND,
                    format!("meta l4proto tcp tcp dport {p} counter return"),
                );
            }
            to_proxy(b, x, "");
        }
        InboundPorts::Only(ports) => {
            for p in x.ports(ports) {
                to_proxy(b, x, &format!(" tcp dport {p}"));
            }
        }
        InboundPorts::None => {}
    }
}

/// Sends inbound TCP (matching `dport`, empty for every port) to the proxy.
fn to_proxy(b: &mut Builder, x: &Ctx, dport: &str) {
    if x.tproxy {
        // An established connection's packets are routed to lo; a new one goes to TPROXY.
        b.append(
            Mangle,
            INBOUND,
            format!("meta l4proto tcp ct state related,established{dport} counter jump {DIVERT}"),
        );
        b.append(
            Mangle,
            INBOUND,
            format!("meta l4proto tcp{dport} counter jump {TPROXY}"),
        );
    } else {
        b.append(
            Nat,
            INBOUND,
            format!("meta l4proto tcp{dport} counter jump {IN_REDIRECT}"),
        );
    }
}

/// Outbound entry, excluded ports (TCP then UDP, per port) and the inbound passthrough
/// source (127.0.0.6 / ::6), which is never captured.
fn outbound_entry(b: &mut Builder, x: &Ctx) {
    b.append(Nat, OUTPUT, format!("counter jump {OUTPUT_ISTIO}"));
    for p in x.ports(&x.cfg.outbound_ports_exclude) {
        b.append(Nat, OUTPUT_ISTIO, format!("tcp dport {p} counter return"));
        b.append(Nat, OUTPUT_ISTIO, format!("udp dport {p} counter return"));
    }
    b.append(
        Nat,
        OUTPUT_ISTIO,
        "oifname lo ip saddr 127.0.0.6/32 counter return".into(),
    );
    b.append_v6(
        Nat,
        OUTPUT_ISTIO,
        "oifname lo ip6 saddr ::6/128 counter return".into(),
    );
}

/// Per proxy uid, then per proxy gid: the app calling itself through a VIP goes via the
/// inbound side; the app calling itself over lo is not captured (unless loopback is
/// explicitly included); the proxy's own traffic is never captured.
fn proxy_traffic(b: &mut Builder, x: &Ctx) {
    let tunnel = &x.tunnel;
    for (kind, o) in proxy_owners(x.facts) {
        // DNS to the agent skips the inbound side; only the uid rules say so, as in Istio.
        let dports = if x.redirect_dns && kind == "skuid" {
            format!("{{ 53, {tunnel} }}")
        } else {
            tunnel.clone()
        };
        let via_inbound = |daddr: &str, lo: &str| {
            format!(
                "oifname lo meta l4proto tcp {daddr} != {lo} tcp dport != {dports} {kind} {o} counter jump {IN_REDIRECT}"
            )
        };
        b.append(Nat, OUTPUT_ISTIO, via_inbound("ip daddr", &x.lo4));
        b.append_v6(Nat, OUTPUT_ISTIO, via_inbound("ip6 daddr", LOOPBACK_V6));
        if !x.include_has_loopback {
            // With DNS capture, TCP to a DNS server on localhost is still captured.
            let not_dns = if x.redirect_dns {
                " meta l4proto tcp tcp dport != 53"
            } else {
                ""
            };
            b.append(
                Nat,
                OUTPUT_ISTIO,
                format!("oifname lo{not_dns} {kind} != {o} counter return"),
            );
        }
        b.append(Nat, OUTPUT_ISTIO, format!("{kind} {o} counter return"));
    }
}

/// `handleCaptureByOwnerGroup`: which groups' outbound traffic is captured.
fn owner_groups(b: &mut Builder, x: &Ctx) {
    match &x.cfg.owner_groups {
        OwnerGroups::AllExcept(groups) => {
            for g in x.owners(groups) {
                b.append(Nat, OUTPUT_ISTIO, format!("skgid {g} counter return"));
            }
        }
        OwnerGroups::Only(groups) => {
            let none_of: String = x
                .owners(groups)
                .iter()
                .map(|g| format!("skgid != {g} "))
                .collect();
            b.append(Nat, OUTPUT_ISTIO, format!("{none_of}counter return"));
        }
    }
}

/// `SetupDNSRedir`: DNS to the agent's listener (nat), then `addDNSConntrackZones` (raw).
fn dns(b: &mut Builder, x: &Ctx) {
    let cfg = x.cfg;
    let all = cfg.capture_all_dns;
    let v4: Vec<String> = x
        .facts
        .dns_servers_v4
        .iter()
        .map(|s| format!("{}/32", s.text))
        .collect();
    // Without IPv6 no IPv6 server gets a rule; counting them anyway (as Istio does) would
    // write jumps to chains that get no rules, which nft refuses.
    let v6: Vec<String> = x
        .facts
        .dns_servers_v6
        .iter()
        .filter(|_| b.ipv6)
        .map(|s| format!("{}/128", s.text))
        .collect();
    let to = format!("counter redirect to :{DNS_PROXY_PORT}");

    b.append(Raw, OUTPUT, format!("counter jump {OUTPUT_DNS}"));
    if all || !v4.is_empty() || !v6.is_empty() {
        b.append(Nat, OUTPUT_ISTIO, format!("counter jump {OUTPUT_DNS}"));
    }
    // TCP, then UDP: to any address (capture-all), or to each server.
    for (proto, any_addr) in [("tcp", "meta l4proto tcp "), ("udp", "")] {
        if all {
            b.append(Nat, OUTPUT_DNS, format!("{any_addr}{proto} dport 53 {to}"));
            continue;
        }
        for s in &v4 {
            b.append(
                Nat,
                OUTPUT_DNS,
                format!("ip daddr {s} {proto} dport 53 {to}"),
            );
        }
        for s in &v6 {
            b.append_v6(
                Nat,
                OUTPUT_DNS,
                format!("ip6 daddr {s} {proto} dport 53 {to}"),
            );
        }
    }

    // Conntrack zones: proxy <-> upstream servers in zone 1, app <-> proxy in zone 2.
    for (kind, o) in proxy_owners(x.facts) {
        b.append(
            Raw,
            OUTPUT_DNS,
            format!("udp dport 53 meta {kind} {o} counter ct zone set 1"),
        );
        b.append(
            Raw,
            OUTPUT_DNS,
            format!("udp sport {DNS_PROXY_PORT} meta {kind} {o} counter ct zone set 2"),
        );
    }
    if all {
        b.append(Raw, PREROUTING, format!("counter jump {INBOUND}"));
        b.append(Raw, OUTPUT_DNS, "udp dport 53 counter ct zone set 2".into());
        b.append(Raw, INBOUND, "udp sport 53 counter ct zone set 1".into());
        return;
    }
    if !v4.is_empty() || !v6.is_empty() {
        b.append(Raw, PREROUTING, format!("counter jump {INBOUND}"));
    }
    let zone2 = |daddr: &str, s: &str| format!("udp dport 53 {daddr} {s} counter ct zone set 2");
    let zone1 = |saddr: &str, s: &str| format!("udp sport 53 {saddr} {s} counter ct zone set 1");
    for s in &v4 {
        b.append(Raw, OUTPUT_DNS, zone2("ip daddr", s));
        b.append(Raw, INBOUND, zone1("ip saddr", s));
    }
    for s in &v6 {
        b.append_v6(Raw, OUTPUT_DNS, zone2("ip6 daddr", s));
        b.append_v6(Raw, INBOUND, zone1("ip6 saddr", s));
    }
}

/// Localhost and excluded CIDRs are not captured; included ports and CIDRs are
/// (`handleOutboundPortsInclude`, `handleOutboundIncludeRules`), and so is traffic arriving
/// from virtual interfaces for them.
fn outbound_captures(b: &mut Builder, x: &Ctx) {
    let cfg = x.cfg;
    let virt: Vec<String> = cfg.kube_virt_interfaces.iter().map(iface).collect();
    b.append(
        Nat,
        OUTPUT_ISTIO,
        format!("ip daddr {} counter return", x.lo4),
    );
    b.append_v6(
        Nat,
        OUTPUT_ISTIO,
        format!("ip6 daddr {LOOPBACK_V6} counter return"),
    );
    for n in x.nets(&cfg.outbound_exclude.v4, aggregate4) {
        b.append(Nat, OUTPUT_ISTIO, format!("ip daddr {n} counter return"));
    }
    for n in x.nets(&cfg.outbound_exclude.v6, aggregate6) {
        b.append_v6(Nat, OUTPUT_ISTIO, format!("ip6 daddr {n} counter return"));
    }
    for p in x.ports(&cfg.outbound_ports_include) {
        b.append(
            Nat,
            OUTPUT_ISTIO,
            format!("tcp dport {p} counter jump {REDIRECT}"),
        );
    }
    let redirect = format!("counter jump {REDIRECT}");
    match &cfg.outbound_include {
        // One inet rule serves both families.
        OutboundCidrs::All => {
            b.append(Nat, OUTPUT_ISTIO, redirect.clone());
            for i in &virt {
                b.insert(Nat, PREROUTING, 0, format!("iifname {i} {redirect}"));
            }
        }
        OutboundCidrs::Only(cidrs) => {
            for n in x.nets(&cidrs.v4, aggregate4) {
                for i in &virt {
                    b.insert(
                        Nat,
                        PREROUTING,
                        0,
                        format!("iifname {i} ip daddr {n} {redirect}"),
                    );
                }
                b.append(Nat, OUTPUT_ISTIO, format!("ip daddr {n} {redirect}"));
            }
            for n in x.nets(&cidrs.v6, aggregate6) {
                for i in &virt {
                    b.insert_v6(
                        Nat,
                        PREROUTING,
                        0,
                        format!("iifname {i} ip6 daddr {n} {redirect}"),
                    );
                }
                b.append_v6(Nat, OUTPUT_ISTIO, format!("ip6 daddr {n} {redirect}"));
            }
        }
    }
}

/// TPROXY's marks (whatever the inbound ports): keep Envoy's original-src mark on the
/// connection, mark the proxy's outbound-to-inbound traffic over lo, restore the mark on the
/// app's replies, and keep marked and local traffic out of the inbound capture.
fn tproxy_marks(b: &mut Builder, x: &Ctx) {
    let mark = x.cfg.tproxy_mark;
    let lo4 = &x.lo4;
    b.append(
        Mangle,
        PREROUTING,
        format!("meta l4proto tcp mark {mark} counter ct mark set mark"),
    );
    b.append(
        Mangle,
        OUTPUT,
        format!("oifname lo meta l4proto tcp mark {mark} counter return"),
    );
    for (kind, o) in proxy_owners(x.facts) {
        let set = format!("{kind} {o} counter meta mark set {OUTBOUND_MARK}");
        b.append(
            Mangle,
            OUTPUT,
            format!("oifname lo meta l4proto tcp ip daddr != {lo4} {set}"),
        );
        b.append_v6(
            Mangle,
            OUTPUT,
            format!("oifname lo meta l4proto tcp ip6 daddr != {LOOPBACK_V6} {set}"),
        );
    }
    b.append(
        Mangle,
        OUTPUT,
        format!("meta l4proto tcp ct mark {mark} counter meta mark set ct mark"),
    );
    b.insert(
        Mangle,
        INBOUND,
        0,
        format!("meta l4proto tcp mark {mark} counter return"),
    );
    b.insert(
        Mangle,
        INBOUND,
        1,
        "iifname lo meta l4proto tcp ip saddr 127.0.0.6/32 counter return".into(),
    );
    b.insert_v6(
        Mangle,
        INBOUND,
        1,
        "iifname lo meta l4proto tcp ip6 saddr ::6/128 counter return".into(),
    );
    b.insert(
        Mangle,
        INBOUND,
        2,
        format!("iifname lo meta l4proto tcp mark != {OUTBOUND_MARK} counter return"),
    );
}

/// Heredoc marker; transaction lines never equal it (they start with `add`, `flush` or
/// `insert`).
const EOF_MARK: &str = "EOF";

/// The `--dry-run --native-nftables` output: a POSIX sh script, like the iptables backend's,
/// that feeds the whole transaction to one `nft -f -` and then runs the `ip` commands.
pub fn script(cfg: &Config, facts: &HostFacts, ruleset: &Ruleset) -> String {
    let mut s = String::from("#!/bin/sh\n");
    s.push_str(&format!(
        "# Generated by istio-iptables {} (--dry-run --native-nftables): the nftables \
         transaction Istio's capture applies.\n",
        env!("CARGO_PKG_VERSION")
    ));
    s.push_str(
        "# Run as root inside the target network namespace. It expects nft (1.0.1 or later) and\n\
         # iproute2's ip (4.12 or later) for the ip steps. Safe to run again: the transaction\n\
         # flushes our tables and writes them anew, and each ip step runs only when what it\n\
         # adds is missing.\n",
    );
    s.push_str("# Effective configuration:\n");
    for (k, v) in cfg.summary(facts) {
        s.push_str(&format!("#   {k}={}\n", v.replace('\n', " ")));
    }
    s.push_str("set -e\n");
    let transaction = render(&ruleset.transaction());
    if !transaction.is_empty() {
        s.push_str(&format!(
            "nft -f - <<'{EOF_MARK}'\n{transaction}{EOF_MARK}\n"
        ));
    }
    for cmd in &ruleset.ip {
        s.push_str(&crate::routes::script_line(cmd));
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{SEED, build as config};

    fn text(argv: &[&str], env: &[(&str, &str)]) -> String {
        let (c, f) = config(argv, env).unwrap();
        render(&build(&c, &f).transaction())
    }

    fn rule(chain: &'static str, index: Option<u32>, expr: &str) -> Rule {
        Rule {
            table: Table::Nat,
            chain,
            index,
            expr: expr.into(),
        }
    }

    #[test]
    fn insert_is_an_append_until_the_chain_reaches_the_index() {
        let rs = Ruleset {
            rules: vec![
                rule(chain::PREROUTING, Some(0), "a"),
                rule(chain::PREROUTING, Some(0), "b"),
                rule(chain::PREROUTING, Some(5), "c"),
                rule(chain::PREROUTING, Some(2), "d"),
                rule(chain::OUTPUT, Some(0), "e"),
            ],
            ip: vec![],
        };
        let lines: Vec<String> = rs.transaction().iter().map(|o| o.to_string()).collect();
        assert_eq!(
            lines[lines.len() - 5..],
            [
                "add rule inet istio-proxy-nat prerouting a",
                "insert rule inet istio-proxy-nat prerouting index 0 b",
                "add rule inet istio-proxy-nat prerouting c",
                "insert rule inet istio-proxy-nat prerouting index 2 d",
                "add rule inet istio-proxy-nat output e",
            ]
        );
    }

    #[test]
    fn only_tables_and_chains_with_rules_are_written() {
        let t = text(&[], &[]);
        assert!(t.starts_with(
            "add table inet istio-proxy-nat\nflush table inet istio-proxy-nat\n\
             add chain inet istio-proxy-nat output { type nat hook output priority -100 ; }\n"
        ));
        assert!(!t.contains(" prerouting"), "{t}");
        assert!(!t.contains("istio-proxy-nat istio-output-dns"), "{t}");
        assert!(!t.contains("jump istio-inbound"), "{t}");
        assert!(!t.contains("istio-proxy-mangle") && !t.contains("istio-proxy-raw"));
        let t = text(&["--drop-invalid"], &[]);
        assert!(t.contains(
            "add table inet istio-proxy-mangle\nflush table inet istio-proxy-mangle\n\
             add chain inet istio-proxy-mangle prerouting { type filter hook prerouting priority -150 ; }\n\
             add chain inet istio-proxy-mangle istio-drop\n"
        ), "{t}");
    }

    #[test]
    fn seed_command_captures_all_inbound_and_outbound() {
        let t = text(SEED, &[]);
        assert!(t.contains(
            "add rule inet istio-proxy-nat istio-inbound meta l4proto tcp tcp dport 15090 counter return\n\
             add rule inet istio-proxy-nat istio-inbound meta l4proto tcp tcp dport 15020 counter return\n\
             add rule inet istio-proxy-nat istio-inbound meta l4proto tcp counter jump istio-in-redirect\n"
        ), "{t}");
        assert!(
            t.ends_with("add rule inet istio-proxy-nat istio-output counter jump istio-redirect\n")
        );
        assert_eq!(
            t.matches("jump istio-redirect").count(),
            1,
            "one inet rule: {t}"
        );
    }

    #[test]
    fn ipv6_rules_only_with_ipv6() {
        let v6 = [("ENABLE_INBOUND_IPV6", "true")];
        let argv = [
            "-i",
            "10.0.0.0/8,fd00::/8",
            "-x",
            "fd01::/16",
            "-m",
            "TPROXY",
            "-b",
            "80",
        ];
        let off = text(&argv, &[]);
        assert!(!off.contains("ip6 "), "{off}");
        let on = text(&argv, &v6);
        for want in [
            "istio-output ip6 daddr fd01::/16 counter return\n",
            "istio-output ip6 daddr fd00::/8 counter jump istio-redirect\n",
            "istio-tproxy meta l4proto tcp ip6 daddr != ::1/128 tproxy ip6 to :15006 meta mark set 1337 counter accept\n",
            "insert rule inet istio-proxy-mangle istio-inbound index 1 iifname lo meta l4proto tcp ip6 saddr ::6/128 counter return\n",
        ] {
            assert!(on.contains(want), "{want} missing from {on}");
        }
    }

    #[test]
    fn port_ranges_use_nft_syntax() {
        let t = text(
            &[
                "-b",
                "*",
                "-d",
                "8000:8010",
                "-o",
                "9000:9001",
                "-q",
                "7000:7001",
            ],
            &[],
        );
        assert!(t.contains("tcp dport 8000-8010 counter return"), "{t}");
        assert!(t.contains("udp dport 9000-9001 counter return"), "{t}");
        assert!(
            t.contains("tcp dport 7000-7001 counter jump istio-redirect"),
            "{t}"
        );
        assert!(!t.contains("8000:8010"), "{t}");
    }

    #[test]
    fn names_nft_cannot_read_bare_are_quoted() {
        let t = text(
            &[
                // Names are resolved where the script runs: only a dry run takes unknown ones.
                "--dry-run",
                "-c",
                "eth0,not-istio-nic,eth+,0a",
                "-u",
                "istio-proxy,1x",
                "-g",
                "5",
            ],
            &[("ISTIO_OUTBOUND_OWNER_GROUPS", "java,2,a$")],
        );
        for want in [
            "prerouting iifname eth0 counter return\n",
            "prerouting iifname not-istio-nic counter return\n",
            "prerouting iifname \"eth*\" counter return\n",
            "output oifname \"0a\" counter return\n",
            "istio-output skuid istio-proxy counter return\n",
            "istio-output skuid \"1x\" counter return\n",
            "istio-output skgid 5 counter return\n",
            "istio-output skgid != java skgid != 2 skgid != \"a$\" counter return\n",
        ] {
            assert!(t.contains(want), "{want} missing from {t}");
        }
    }

    #[test]
    fn interface_names_mean_what_they_mean_to_iptables() {
        let t = text(
            &[
                "--native-nftables",
                "-c",
                "bridge,inet,netdev,tcp,udp,lo,eth*,*,a*b,*+,ip6,rt0,veth-1,eth0.100",
                "-k",
                "tproxy",
            ],
            &[],
        );
        for want in [
            "prerouting iifname \"bridge\" counter return\n",
            "prerouting iifname \"inet\" counter return\n",
            "prerouting iifname \"netdev\" counter return\n",
            "prerouting iifname \"tcp\" counter return\n",
            "output oifname \"udp\" counter return\n",
            "output oifname \"lo\" counter return\n",
            "index 0 iifname \"tproxy\" counter return\n",
            // A literal `*` at the end is escaped; elsewhere it is literal in nft too.
            "prerouting iifname \"eth\\*\" counter return\n",
            "prerouting iifname \"\\*\" counter return\n",
            "prerouting iifname \"a*b\" counter return\n",
            // iptables' `*+`: names starting with `*`.
            "prerouting iifname \"**\" counter return\n",
            "prerouting iifname \"ip6\" counter return\n",
            "prerouting iifname \"rt0\" counter return\n",
            "prerouting iifname veth-1 counter return\n",
            "prerouting iifname eth0.100 counter return\n",
        ] {
            assert!(t.contains(want), "{want} missing from {t}");
        }
    }

    /// Every `jump CHAIN` goes to a chain the transaction declares in that table.
    fn assert_jumps_declared(t: &str) {
        for l in t.lines().filter(|l| l.contains(" jump ")) {
            let table = l.split(' ').nth(3).unwrap();
            let target = l.rsplit(' ').next().unwrap();
            let decl = format!("add chain inet {table} {target}\n");
            assert!(t.contains(&decl), "{l}: no {decl:?} in\n{t}");
        }
    }

    #[test]
    fn every_jump_has_its_chain() {
        let v6 = [("ENABLE_INBOUND_IPV6", "true")];
        for (argv, env) in [
            (SEED, &[][..]),
            (&["-m", "TPROXY", "-b", "*", "--drop-invalid"][..], &v6[..]),
            (
                &["-m", "TPROXY", "-k", "eth1", "-i", "10.0.0.0/8"][..],
                &[][..],
            ),
            (&["--redirect-dns"][..], &v6[..]),
            (&["--redirect-dns", "--capture-all-dns"][..], &[][..]),
        ] {
            assert_jumps_declared(&text(argv, env));
        }
    }

    #[test]
    fn without_ipv6_only_ipv4_dns_servers_get_rules_and_jumps() {
        let (c, mut f) = config(&["--redirect-dns"], &[]).unwrap();
        assert!(!f.ipv6);
        let both = render(&build(&c, &f).transaction());
        assert!(
            both.contains("ip daddr 10.96.0.10/32 tcp dport 53"),
            "{both}"
        );
        assert!(!both.contains("fd00::10"), "{both}");
        f.dns_servers_v4.clear();
        let t = render(&build(&c, &f).transaction());
        assert_jumps_declared(&t);
        assert!(!t.contains("istio-proxy-nat istio-output-dns"), "{t}");
        assert!(!t.contains("jump istio-inbound"), "{t}");
        f.ipv6 = true;
        let t = render(&build(&c, &f).transaction());
        assert!(
            t.contains("add rule inet istio-proxy-raw prerouting counter jump istio-inbound\n")
        );
        assert!(t.contains("ip6 daddr fd00::10/128 udp dport 53"), "{t}");
    }

    #[test]
    fn capture_all_dns_needs_no_servers() {
        let t = text(&["--redirect-dns", "--capture-all-dns"], &[]);
        for want in [
            "add rule inet istio-proxy-nat istio-output-dns meta l4proto tcp tcp dport 53 counter redirect to :15053\n\
             add rule inet istio-proxy-nat istio-output-dns udp dport 53 counter redirect to :15053\n",
            "add rule inet istio-proxy-raw prerouting counter jump istio-inbound\n\
             add rule inet istio-proxy-raw istio-output-dns udp dport 53 counter ct zone set 2\n\
             add rule inet istio-proxy-raw istio-inbound udp sport 53 counter ct zone set 1\n",
            "tcp dport != { 53, 15008 } skuid 1337 counter jump istio-in-redirect\n",
        ] {
            assert!(t.contains(want), "{want} missing from {t}");
        }
        assert!(!t.contains("ip daddr 10.96.0.10"), "{t}");
    }

    #[test]
    fn tproxy_marks_even_without_inbound_ports_and_routes_only_with_them() {
        let (c, f) = config(&["-m", "TPROXY"], &[]).unwrap();
        let rs = build(&c, &f);
        let t = render(&rs.transaction());
        assert!(t.contains("add rule inet istio-proxy-mangle istio-inbound meta l4proto tcp mark 1337 counter return\n"), "{t}");
        assert!(rs.ip.is_empty());
        let (c, f) = config(&["-m", "TPROXY", "-b", "*"], &[]).unwrap();
        assert_eq!(build(&c, &f).ip, crate::routes::ip_commands(&c, &f));
        assert_eq!(build(&c, &f).ip.len(), 2);
    }

    #[test]
    fn script_feeds_one_transaction_to_nft_then_runs_ip() {
        let (c, f) = config(
            &["--native-nftables", "--dry-run", "-m", "TPROXY", "-b", "80"],
            &[("ENABLE_INBOUND_IPV6", "true")],
        )
        .unwrap();
        let rs = build(&c, &f);
        let s = script(&c, &f, &rs);
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(s.contains("#   NATIVE_NFTABLES=true\n"));
        let body = format!(
            "\nset -e\nnft -f - <<'EOF'\n{}EOF\n\
             ip -6 addr show dev lo | grep -q 'inet6 ::6/128 ' || ip -6 addr add ::6/128 dev lo\n",
            render(&rs.transaction())
        );
        assert!(s.contains(&body), "{s}");
        assert_eq!(s.matches("nft -f -").count(), 1);
        assert!(s.ends_with(
            "ip -6 rule show fwmark 1337 lookup 133 | grep -q . || ip -6 rule add fwmark 1337 lookup 133\n"
        ));
        assert!(!s.contains("iptables-restore") && !s.contains("istio_undo"));
    }
}
