//! Other tools' nftables tables that take packets before our capture can (verify): what both
//! backends share. iptables' tables (nat at -100, mangle -150, raw -300) and our `inet
//! istio-proxy-*` tables are attached to netfilter's hooks at a priority, and so is every
//! other nftables table's base chain; at one hook the chains run in priority order.
//!
//! nft's semantics decide what counts: `accept` ends one base chain and the next still runs,
//! so an earlier `accept` (or `return`) takes nothing from us; a `drop`, `reject` or `queue`
//! does; a nat chain's `redirect` or `dnat` does for a nat capture (NAT is decided once per
//! connection, by the first nat chain that NATs); a `notrack` before conntrack (priority
//! below -200) does too (untracked packets skip nat); a `tproxy` of its own does for TPROXY.
//! A `jump` or `goto` to another chain "may decide" when that chain (looked at one level, not
//! walked) holds any of those.
//!
//! Pure, over [`ForeignTable`]s, except [`read`], which gathers them: the structure over
//! netlink (hooks, priorities, policies) and the rules, of the candidate tables only, from
//! `nft list table`.

use std::collections::BTreeMap;

use crate::model::Finding;
use crate::system::Env;
use crate::system::nftprobe::{NfFamily, NfTables};

/// `NF_INET_PRE_ROUTING`.
pub const HOOK_PREROUTING: u32 = 0;
/// `NF_INET_LOCAL_OUT`.
pub const HOOK_OUTPUT: u32 = 3;
/// Conntrack's priority: a `notrack` takes effect only before it.
const CONNTRACK: i32 = -200;

/// A hook's name, as nft writes it.
pub fn hook_name(hook: u32) -> &'static str {
    match hook {
        0 => "prerouting",
        1 => "input",
        2 => "forward",
        3 => "output",
        4 => "postrouting",
        _ => "?",
    }
}

/// What a capture takes: TCP, and DNS (UDP and TCP to port 53) where the config captures it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Packets {
    pub tcp: bool,
    pub dns: bool,
}

/// How our capture at a hook works, which says what decides before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// REDIRECT in a nat chain.
    Nat,
    /// TPROXY in a mangle (filter-type) chain.
    Tproxy,
    /// TPROXY mode's marks on the way out (only a drop takes from them).
    Marks,
}

/// One of our capture chains, as a foreign chain at the same hook is judged against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    pub hook: u32,
    pub priority: i32,
    pub kind: Kind,
    pub packets: Packets,
    /// The nft families whose chains see these packets: `ip` and `inet` for IPv4.
    pub families: &'static [&'static str],
    /// Our chain, as the effect names it: `IPv4 iptables nat OUTPUT`.
    pub ours: String,
    /// What is lost for TCP: `outbound TCP is not captured`.
    pub lost: String,
}

/// Where a base chain is attached, as netlink shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    pub hook: u32,
    /// `filter`, `nat`, `route`.
    pub kind: String,
    pub priority: i32,
    /// `policy drop`.
    pub drops: bool,
}

/// One chain of a foreign table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignChain {
    pub name: String,
    pub base: Option<Base>,
    /// How many rules netlink counted.
    pub count: usize,
    /// Its rules as `nft list` prints them; `None`: not read (no `nft`).
    pub rules: Option<Vec<String>>,
}

/// One nftables table that is not ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignTable {
    /// `ip`, `ip6`, `inet`.
    pub family: String,
    pub name: String,
    pub chains: Vec<ForeignChain>,
}

impl ForeignTable {
    fn chain(&self, name: &str) -> Option<&ForeignChain> {
        self.chains.iter().find(|c| c.name == name)
    }
}

/// What a rule does, by its first verdict or deciding statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    None,
    Accept,
    Return,
    Drop,
    Reject,
    Queue,
    /// `redirect`, `dnat`.
    Nat(String),
    Tproxy,
    Notrack,
    Jump(String),
    Goto(String),
    /// `snat`, `masquerade`, `continue`: nothing for us.
    Other,
}

/// One nft rule read for what it matches and does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftRule {
    /// It can match TCP / UDP.
    pub tcp: bool,
    pub udp: bool,
    /// A UDP packet to port 53 passes its port matches.
    pub udp53: bool,
    /// Its matches beyond the protocol (`ip daddr 10.0.0.0/8`), as written; empty: none.
    pub matches: String,
    pub verdict: Verdict,
}

/// The words of a rule: quoted strings kept as one word (`"a b"`), counters' values gone.
fn words(rule: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in rule.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    // `counter packets 3 bytes 180` is `counter`.
    let mut i = 0;
    while i < out.len() {
        if out[i] == "counter" && out.get(i + 1).is_some_and(|w| w == "packets") {
            out.drain(i + 1..(i + 5).min(out.len()));
        }
        i += 1;
    }
    out
}

/// A rule as reported: as nft lists it, counters' values dropped.
pub fn rule_text(rule: &str) -> String {
    words(rule).join(" ")
}

/// Words that begin a statement (the end of the matches).
const STATEMENTS: &[&str] = &[
    "counter",
    "log",
    "comment",
    "accept",
    "drop",
    "reject",
    "queue",
    "return",
    "continue",
    "jump",
    "goto",
    "redirect",
    "dnat",
    "snat",
    "masquerade",
    "tproxy",
    "notrack",
    "nftrace",
];

/// The values of a match at `i` (`tcp`, `!= tcp`, `{ tcp, udp }`): (negated, values, next).
fn values(w: &[String], mut i: usize) -> (bool, Vec<String>, usize) {
    let mut negated = false;
    match w.get(i).map(String::as_str) {
        Some("!=") => {
            negated = true;
            i += 1;
        }
        Some("==") => i += 1,
        _ => {}
    }
    let mut vals = Vec::new();
    if w.get(i).is_some_and(|x| x == "{") {
        i += 1;
        while let Some(x) = w.get(i) {
            i += 1;
            if x == "}" {
                break;
            }
            let v = x.trim_end_matches(',');
            if !v.is_empty() {
                vals.push(v.to_string());
            }
        }
    } else if let Some(x) = w.get(i) {
        vals.extend(x.split(',').filter(|v| !v.is_empty()).map(str::to_string));
        i += 1;
    }
    (negated, vals, i)
}

/// Whether a port value (`53`, `50-60`, `domain`) takes port 53.
fn has_53(vals: &[String]) -> bool {
    vals.iter().any(|v| match v.split_once('-') {
        Some((a, b)) => {
            a.parse::<u16>().is_ok_and(|a| a <= 53) && b.parse::<u16>().is_ok_and(|b| b >= 53)
        }
        None => v == "53" || v == "domain",
    })
}

/// Reads what one rule (as `nft list` prints it) matches and does.
pub fn analyze(rule: &str) -> NftRule {
    let w = words(rule);
    let end = w
        .iter()
        .enumerate()
        .position(|(i, x)| {
            // A statement, or a `KEY set VALUE` / `meta KEY set VALUE` one.
            STATEMENTS.contains(&x.as_str())
                || w.get(i + 1).is_some_and(|n| n == "set")
                || (matches!(x.as_str(), "meta" | "ct") && w.get(i + 2).is_some_and(|n| n == "set"))
        })
        .unwrap_or(w.len());
    let m = &w[..end];
    let (mut tcp, mut udp, mut udp53) = (true, true, true);
    // The words of the matches that only name the protocol, left out of `matches`.
    let mut protocol_only: Vec<bool> = vec![false; m.len()];
    let mut i = 0;
    while i < m.len() {
        let x = m[i].as_str();
        let proto_key = x == "l4proto"
            || (x == "protocol" && i > 0 && m[i - 1] == "ip")
            || (x == "nexthdr" && i > 0 && m[i - 1] == "ip6");
        if proto_key {
            let (neg, vals, next) = values(m, i + 1);
            let has = |names: &[&str]| vals.iter().any(|v| names.contains(&v.as_str()));
            let (t, u) = (has(&["tcp", "6"]), has(&["udp", "17"]));
            tcp &= t != neg;
            udp &= u != neg;
            let from = if i > 0 && matches!(m[i - 1].as_str(), "meta" | "ip" | "ip6") {
                i - 1
            } else {
                i
            };
            protocol_only[from..next].iter_mut().for_each(|p| *p = true);
            i = next;
            continue;
        }
        let header = |name: &str| x == name && m.get(i + 1).is_some_and(|f| f != "{");
        if header("tcp") {
            udp = false;
        } else if header("udp") || header("th") {
            if x == "udp" {
                tcp = false;
            }
            if m.get(i + 1).is_some_and(|f| f == "dport") {
                let (neg, vals, _) = values(m, i + 2);
                udp53 &= has_53(&vals) != neg;
            }
        } else if ["sctp", "dccp", "udplite", "icmp", "icmpv6", "igmp"]
            .iter()
            .any(|p| header(p))
        {
            tcp = false;
            udp = false;
        }
        i += 1;
    }
    let matches: Vec<&str> = m
        .iter()
        .zip(&protocol_only)
        .filter(|(_, p)| !**p)
        .map(|(x, _)| x.as_str())
        .collect();
    let verdict = w[end..]
        .iter()
        .enumerate()
        .find_map(|(j, x)| {
            let arg = || w.get(end + j + 1).cloned().unwrap_or_default();
            Some(match x.as_str() {
                "accept" => Verdict::Accept,
                "return" => Verdict::Return,
                "drop" => Verdict::Drop,
                "reject" => Verdict::Reject,
                "queue" => Verdict::Queue,
                "redirect" | "dnat" => Verdict::Nat(x.clone()),
                "tproxy" => Verdict::Tproxy,
                "notrack" => Verdict::Notrack,
                "jump" => Verdict::Jump(arg().trim_matches('"').to_string()),
                "goto" => Verdict::Goto(arg().trim_matches('"').to_string()),
                "snat" | "masquerade" | "continue" => Verdict::Other,
                _ => return None,
            })
        })
        .unwrap_or(Verdict::None);
    NftRule {
        tcp,
        udp,
        udp53,
        matches: matches.join(" "),
        verdict,
    }
}

/// The packets a rule takes of what `packets` captures, for an effect: `TCP`, `DNS over
/// UDP`, with `for packets matching `...`, ` in front when its other matches narrow it;
/// `None` when it cannot match any. Also (tcp, dns): which of the two.
pub fn subject(
    packets: Packets,
    tcp: bool,
    udp_dns: bool,
    matches: &str,
) -> Option<(String, bool, bool)> {
    let t = packets.tcp && tcp;
    let u = packets.dns && udp_dns;
    let what = match (t, u) {
        (true, false) => "TCP",
        (false, true) => "DNS over UDP",
        (true, true) => "TCP and DNS over UDP",
        (false, false) => return None,
    };
    let who = if matches.is_empty() {
        what.to_string()
    } else {
        format!("for packets matching `{matches}`, {what}")
    };
    Some((who, t, u))
}

/// What is lost: `lost` (TCP's) and DNS's, by which of them a rule takes.
pub fn lost(lost: &str, tcp: bool, dns: bool) -> String {
    match (tcp, dns) {
        (true, true) => format!("{lost}, and neither is DNS"),
        (false, true) => "DNS is not captured".into(),
        _ => lost.to_string(),
    }
}

/// What a verdict that ends the packet's way does to a capture of `kind` from a base chain
/// of `base` (before it), and a note on why; `None` when it leaves the packet to the chains
/// after it.
fn direct(verdict: &Verdict, base: &Base, kind: Kind) -> Option<(String, &'static str)> {
    Some(match verdict {
        Verdict::Drop => ("is dropped".into(), ""),
        Verdict::Reject => ("is rejected".into(), ""),
        Verdict::Queue => ("is queued to userspace".into(), ""),
        Verdict::Nat(how) if kind == Kind::Nat && base.kind == "nat" => (
            format!("is NATed by its `{how}`"),
            ", and NAT is decided once per connection, by the first nat chain that NATs",
        ),
        Verdict::Tproxy if kind == Kind::Tproxy => ("is taken by its own `tproxy`".into(), ""),
        Verdict::Notrack if kind == Kind::Nat && base.priority < CONNTRACK => (
            "is untracked (`notrack` before conntrack)".into(),
            ", and untracked packets skip nat",
        ),
        _ => return None,
    })
}

/// What a rule's verdict does (see [`direct`]); a jump or goto "may decide" when the chain
/// it reaches (in `table`, looked at one level) holds a deciding verdict or jumps further, or
/// was not read.
fn decides(
    verdict: &Verdict,
    base: &Base,
    kind: Kind,
    table: &ForeignTable,
) -> Option<(String, &'static str)> {
    match verdict {
        Verdict::Jump(to) | Verdict::Goto(to) => {
            let deciding = match table.chain(to).and_then(|c| c.rules.as_ref()) {
                None => true,
                Some(rules) => rules.iter().any(|r| {
                    let v = analyze(r).verdict;
                    matches!(v, Verdict::Jump(_) | Verdict::Goto(_))
                        || direct(&v, base, kind).is_some()
                }),
            };
            deciding.then(|| (format!("may be decided in chain {to}"), ""))
        }
        v => direct(v, base, kind),
    }
}

/// The chain as an effect names it: `type nat hook output priority -150`.
fn chain_info(base: &Base) -> String {
    format!(
        "type {} hook {} priority {}",
        base.kind,
        hook_name(base.hook),
        base.priority
    )
}

/// The foreign base chains' rules that decide, or may decide, what `captures` take before
/// they can: at the same hook, in a family that sees the packets, at an earlier priority (the
/// same priority: "perhaps", the order the chains were added decides).
pub fn judge(tables: &[ForeignTable], captures: &[Capture]) -> Vec<Finding> {
    let mut out: Vec<Finding> = Vec::new();
    let mut push = |f: Finding| {
        if !out.iter().any(|o| o.place == f.place && o.rule == f.rule) {
            out.push(f);
        }
    };
    for t in tables {
        for c in &t.chains {
            let Some(base) = &c.base else { continue };
            let place = format!("nft table {} {} chain {}", t.family, t.name, c.name);
            for cap in captures.iter().filter(|cap| {
                cap.hook == base.hook
                    && cap.families.contains(&t.family.as_str())
                    && base.priority <= cap.priority
            }) {
                let when = if base.priority < cap.priority {
                    format!("before ours ({}, priority {})", cap.ours, cap.priority)
                } else {
                    format!(
                        "perhaps before ours ({}, the same priority {}: the order the chains \
                         were added decides)",
                        cap.ours, cap.priority
                    )
                };
                let info = chain_info(base);
                match &c.rules {
                    None if c.count > 0 || base.drops => push(Finding {
                        place: place.clone(),
                        rule: format!("{} rule(s), not read (nft is not installed)", c.count),
                        effect: format!(
                            "this chain ({info}) runs {when} and may decide the packets it \
                             captures: {}",
                            cap.lost
                        ),
                    }),
                    None => {}
                    Some(rules) => {
                        for r in rules {
                            let a = analyze(r);
                            let Some((who, tcp, dns)) =
                                subject(cap.packets, a.tcp, a.udp && a.udp53, &a.matches)
                            else {
                                continue;
                            };
                            let Some((does, note)) = decides(&a.verdict, base, cap.kind, t) else {
                                continue;
                            };
                            push(Finding {
                                place: place.clone(),
                                rule: rule_text(r),
                                effect: format!(
                                    "{who} {does} in this chain ({info}), {when}{note}: {}",
                                    lost(&cap.lost, tcp, dns)
                                ),
                            });
                        }
                    }
                }
                if base.drops {
                    push(Finding {
                        place: place.clone(),
                        rule: "policy drop".into(),
                        effect: format!(
                            "what this chain ({info}) does not accept is dropped, {when}: \
                             unless its rules accept them, {}",
                            lost(&cap.lost, cap.packets.tcp, cap.packets.dns)
                        ),
                    });
                }
            }
        }
    }
    out
}

/// The rules of one of our chains in a table iptables-nft cannot show (written with nft),
/// as `nft list` prints them: those before the first jump to one of our `ISTIO_*` chains that
/// end the chain for what we capture (nft semantics inside one chain: `accept`, `return`,
/// `drop`, `reject`, `queue`, a NAT or `tproxy` of its own; a jump elsewhere "may"). Rules
/// `ours` recognises are skipped.
pub fn before_our_jump(
    place: &str,
    rules: &[String],
    packets: Packets,
    lost_tcp: &str,
    ours: &dyn Fn(&str) -> bool,
) -> Vec<Finding> {
    let jumps_in = |r: &str| {
        matches!(analyze(r).verdict, Verdict::Jump(ref c) | Verdict::Goto(ref c)
            if c.starts_with(crate::model::chain::PREFIX))
    };
    let Some(first) = rules.iter().position(|r| jumps_in(r)) else {
        return Vec::new();
    };
    let anchor = match analyze(&rules[first]).verdict {
        Verdict::Jump(c) | Verdict::Goto(c) => c,
        _ => unreachable!("a jump"),
    };
    let mut out = Vec::new();
    for r in &rules[..first] {
        if ours(r) {
            continue;
        }
        let a = analyze(r);
        let Some((who, tcp, dns)) = subject(packets, a.tcp, a.udp && a.udp53, &a.matches) else {
            continue;
        };
        let does = match &a.verdict {
            Verdict::Accept => "is accepted",
            Verdict::Return => "leaves the chain",
            Verdict::Drop => "is dropped",
            Verdict::Reject => "is rejected",
            Verdict::Queue => "is queued to userspace",
            Verdict::Nat(_) => "is NATed by this rule",
            Verdict::Tproxy => "is taken by this rule's `tproxy`",
            Verdict::Jump(_) | Verdict::Goto(_) => "may be decided in another chain",
            _ => continue,
        };
        out.push(Finding {
            place: place.to_string(),
            rule: rule_text(r),
            effect: format!(
                "{who} {does} before the jump to {anchor}: {}",
                lost(lost_tcp, tcp, dns)
            ),
        });
    }
    out
}

/// The rules of each chain in `nft list table` output, in order.
pub fn parse_listing(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut depth = 0i32;
    let mut chain: Option<String> = None;
    for raw in text.lines() {
        let line = raw.trim();
        let mut balance = 0;
        let mut quoted = false;
        for c in line.chars() {
            match c {
                '"' => quoted = !quoted,
                '{' if !quoted => balance += 1,
                '}' if !quoted => balance -= 1,
                _ => {}
            }
        }
        if depth == 1 && balance == 1 {
            chain = line
                .strip_prefix("chain ")
                .and_then(|r| r.strip_suffix('{'))
                .map(|n| n.trim().trim_matches('"').to_string());
            if let Some(c) = &chain {
                out.entry(c.clone()).or_default();
            }
        } else if depth == 2
            && balance == 0
            && !line.is_empty()
            && !line.starts_with("type ")
            && !line.starts_with("policy ")
            && !line.starts_with("comment ")
            && let Some(c) = &chain
        {
            out.entry(c.clone()).or_default().push(line.to_string());
        }
        depth += balance;
        if depth <= 1 {
            chain = None;
        }
    }
    out
}

/// The tables of `st` (of `family`) with a base chain at one of `hooks` that `skip` does not
/// leave out, dormant tables aside (their chains are not attached); their rules not read yet.
pub fn candidates(
    family: NfFamily,
    st: &NfTables,
    hooks: &[u32],
    skip: &dyn Fn(NfFamily, &str, &str) -> bool,
) -> Vec<ForeignTable> {
    st.tables
        .iter()
        .filter(|t| !t.is_dormant())
        .filter(|t| {
            t.chains.iter().any(|c| {
                c.base.as_ref().is_some_and(|b| hooks.contains(&b.hook))
                    && !skip(family, &t.name, &c.name)
            })
        })
        .map(|t| ForeignTable {
            family: family.name().to_string(),
            name: t.name.clone(),
            chains: t
                .chains
                .iter()
                .filter(|c| !skip(family, &t.name, &c.name))
                .map(|c| ForeignChain {
                    name: c.name.clone(),
                    base: c.base.as_ref().map(|b| Base {
                        hook: b.hook,
                        kind: b.kind.clone(),
                        priority: b.priority,
                        drops: b.policy == Some(0),
                    }),
                    count: c.rules.unwrap_or(0),
                    rules: None,
                })
                .collect(),
        })
        .collect()
}

/// Reads the foreign tables of `families` that have a base chain at one of `hooks`: the
/// structure over netlink, then each candidate's rules with `nft list table` (when `nft` is
/// installed; a table it cannot list keeps its rules unread). Nothing when netlink cannot
/// tell.
pub fn read(
    env: &mut Env<'_>,
    families: &[NfFamily],
    hooks: &[u32],
    skip: &dyn Fn(NfFamily, &str, &str) -> bool,
) -> Vec<ForeignTable> {
    let nft = env.probe.in_path("nft");
    let mut out = Vec::new();
    for &family in families {
        let Some(st) = env.probe.nft_structure(family) else {
            continue;
        };
        for mut t in candidates(family, &st, hooks, skip) {
            if nft {
                let args = ["list", "table", family.name(), &t.name].map(String::from);
                match env.runner.run("nft", &args, None) {
                    Ok(text) => {
                        let rules = parse_listing(&text);
                        for c in &mut t.chains {
                            c.rules = Some(rules.get(&c.name).cloned().unwrap_or_default());
                        }
                    }
                    Err(e) => tracing::debug!("nft list table {} {}: {e}", t.family, t.name),
                }
            }
            out.push(t);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nat_output() -> Capture {
        Capture {
            hook: HOOK_OUTPUT,
            priority: -100,
            kind: Kind::Nat,
            packets: Packets {
                tcp: true,
                dns: false,
            },
            families: &["ip", "inet"],
            ours: "IPv4 iptables nat OUTPUT".into(),
            lost: "outbound TCP is not captured".into(),
        }
    }

    /// (name, (hook, type, priority) of a base chain, rules).
    type TestChain<'a> = (&'a str, Option<(u32, &'a str, i32)>, Vec<&'a str>);

    fn table(family: &str, chains: Vec<TestChain<'_>>) -> ForeignTable {
        ForeignTable {
            family: family.into(),
            name: "foo".into(),
            chains: chains
                .into_iter()
                .map(|(name, base, rules)| ForeignChain {
                    name: name.into(),
                    base: base.map(|(hook, kind, priority)| Base {
                        hook,
                        kind: kind.into(),
                        priority,
                        drops: false,
                    }),
                    count: rules.len(),
                    rules: Some(rules.into_iter().map(String::from).collect()),
                })
                .collect(),
        }
    }

    #[test]
    fn reads_protocols_ports_matches_and_verdicts() {
        let a = analyze("meta l4proto tcp counter packets 3 bytes 180 return");
        assert_eq!((a.tcp, a.udp, a.matches.as_str()), (true, false, ""));
        assert_eq!(a.verdict, Verdict::Return);
        let a = analyze("ip daddr 10.0.0.0/8 tcp dport 80 redirect to :9999");
        assert_eq!((a.tcp, a.udp), (true, false));
        assert_eq!(a.matches, "ip daddr 10.0.0.0/8 tcp dport 80");
        assert_eq!(a.verdict, Verdict::Nat("redirect".into()));
        let a = analyze("udp dport 5353 drop");
        assert_eq!((a.tcp, a.udp, a.udp53), (false, true, false));
        let a = analyze("meta l4proto { tcp, udp } th dport 53 dnat to 10.0.0.1");
        assert_eq!((a.tcp, a.udp, a.udp53), (true, true, true));
        let a = analyze("meta l4proto != tcp notrack");
        assert_eq!((a.tcp, a.udp, a.verdict), (false, true, Verdict::Notrack));
        let a = analyze("icmp type echo-request drop");
        assert!(!a.tcp && !a.udp);
        let a = analyze("ct state established,related accept");
        assert_eq!((a.tcp, a.verdict), (true, Verdict::Accept));
        let a = analyze("log prefix \"drop this\" jump other");
        assert_eq!(a.verdict, Verdict::Jump("other".into()));
        let a = analyze("meta mark set 0x1 counter");
        assert_eq!((a.matches.as_str(), a.verdict), ("", Verdict::None));
        assert_eq!(
            rule_text("tcp dport 80 counter packets 0 bytes 0 accept"),
            "tcp dport 80 counter accept"
        );
    }

    #[test]
    fn an_earlier_nat_chain_that_redirects_takes_the_connection() {
        let t = table(
            "ip",
            vec![(
                "out",
                Some((HOOK_OUTPUT, "nat", -150)),
                vec![
                    "tcp dport 80 redirect to :9999",
                    "meta l4proto tcp accept",
                    "udp dport 53 redirect to :5353",
                ],
            )],
        );
        let f = judge(&[t], &[nat_output()]);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].place, "nft table ip foo chain out");
        assert_eq!(f[0].rule, "tcp dport 80 redirect to :9999");
        assert_eq!(
            f[0].effect,
            "for packets matching `tcp dport 80`, TCP is NATed by its `redirect` in this chain \
             (type nat hook output priority -150), before ours (IPv4 iptables nat OUTPUT, \
             priority -100), and NAT is decided once per connection, by the first nat chain \
             that NATs: outbound TCP is not captured"
        );
        // With DNS captured, the UDP one too.
        let mut dns = nat_output();
        dns.packets.dns = true;
        let t = table(
            "inet",
            vec![(
                "out",
                Some((HOOK_OUTPUT, "nat", -150)),
                vec!["udp dport 53 redirect to :5353"],
            )],
        );
        let f = judge(&[t], &[dns]);
        assert!(
            f[0].effect
                .starts_with("for packets matching `udp dport 53`, DNS over UDP")
        );
        assert!(f[0].effect.ends_with(": DNS is not captured"), "{f:?}");
    }

    #[test]
    fn an_earlier_accept_a_later_chain_another_hook_or_family_take_nothing() {
        let t = table(
            "ip",
            vec![
                (
                    "early",
                    Some((HOOK_OUTPUT, "filter", -400)),
                    vec!["meta l4proto tcp accept", "return"],
                ),
                (
                    "late",
                    Some((HOOK_OUTPUT, "nat", -50)),
                    vec!["meta l4proto tcp redirect to :1"],
                ),
                (
                    "input",
                    Some((HOOK_PREROUTING, "filter", -400)),
                    vec!["drop"],
                ),
            ],
        );
        assert!(judge(std::slice::from_ref(&t), &[nat_output()]).is_empty());
        let mut v6 = t;
        v6.family = "ip6".into();
        v6.chains[0].rules = Some(vec!["drop".into()]);
        assert!(judge(&[v6], &[nat_output()]).is_empty());
    }

    #[test]
    fn drops_notrack_before_conntrack_and_jumps() {
        let t = table(
            "inet",
            vec![
                (
                    "raw",
                    Some((HOOK_OUTPUT, "filter", -300)),
                    vec![
                        "meta l4proto tcp notrack",
                        "ip daddr 192.0.2.1 drop",
                        "jump quiet",
                        "jump loud",
                    ],
                ),
                (
                    // After conntrack: a notrack does nothing there.
                    "late",
                    Some((HOOK_OUTPUT, "filter", -150)),
                    vec!["meta l4proto tcp notrack"],
                ),
                ("quiet", None, vec!["counter", "accept"]),
                ("loud", None, vec!["tcp dport 22 drop"]),
            ],
        );
        let f = judge(&[t], &[nat_output()]);
        let rules: Vec<&str> = f.iter().map(|f| f.rule.as_str()).collect();
        assert_eq!(
            rules,
            [
                "meta l4proto tcp notrack",
                "ip daddr 192.0.2.1 drop",
                "jump loud"
            ]
        );
        assert!(
            f[0].effect
                .starts_with("TCP is untracked (`notrack` before conntrack) in this chain")
        );
        assert!(
            f[0].effect
                .contains(", and untracked packets skip nat: outbound TCP")
        );
        assert!(
            f[1].effect
                .starts_with("for packets matching `ip daddr 192.0.2.1`, TCP is dropped")
        );
        assert!(f[2].effect.starts_with("TCP may be decided in chain loud"));
    }

    #[test]
    fn the_same_priority_is_perhaps_and_policy_drop_and_unread_rules_may() {
        let mut t = table(
            "ip",
            vec![(
                "OUTPUT",
                Some((HOOK_OUTPUT, "nat", -100)),
                vec!["meta l4proto tcp redirect to :9999"],
            )],
        );
        let f = judge(&[t.clone()], &[nat_output()]);
        assert!(f[0].effect.contains("perhaps before ours"), "{f:?}");
        t.chains[0].base.as_mut().unwrap().priority = -400;
        t.chains[0].base.as_mut().unwrap().drops = true;
        t.chains[0].rules = None;
        let f = judge(&[t], &[nat_output()]);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].rule, "1 rule(s), not read (nft is not installed)");
        assert_eq!(f[1].rule, "policy drop");
    }

    #[test]
    fn tproxy_captures_are_taken_by_another_tproxy_not_by_nat() {
        let cap = Capture {
            hook: HOOK_PREROUTING,
            priority: -150,
            kind: Kind::Tproxy,
            packets: Packets {
                tcp: true,
                dns: false,
            },
            families: &["ip", "inet"],
            ours: "inet istio-proxy-mangle prerouting".into(),
            lost: "inbound TCP is not captured".into(),
        };
        let t = table(
            "ip",
            vec![(
                "pre",
                Some((HOOK_PREROUTING, "filter", -200)),
                vec![
                    "meta l4proto tcp tproxy to :9999",
                    "meta l4proto tcp notrack",
                ],
            )],
        );
        let f = judge(&[t], &[cap]);
        assert_eq!(f.len(), 1);
        assert!(f[0].effect.contains("is taken by its own `tproxy`"));
    }

    #[test]
    fn before_our_jump_in_a_table_iptables_cannot_show() {
        let rules: Vec<String> = [
            "oifname \"eth9\" counter packets 0 bytes 0 return",
            "meta l4proto tcp ct state new log prefix \"x\" return",
            "ip daddr 10.0.0.0/8 accept",
            "udp dport 53 return",
            "counter packets 0 bytes 0 jump ISTIO_OUTPUT",
            "meta l4proto tcp drop",
        ]
        .map(String::from)
        .to_vec();
        let ours = |r: &str| rule_text(r) == "oifname \"eth9\" counter return";
        let f = before_our_jump(
            "IPv4 iptables-nft nat OUTPUT",
            &rules,
            Packets {
                tcp: true,
                dns: false,
            },
            "outbound TCP is not captured",
            &ours,
        );
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(
            f[0].effect,
            "for packets matching `ct state new`, TCP leaves the chain before the jump to \
             ISTIO_OUTPUT: outbound TCP is not captured"
        );
        assert!(
            f[1].effect
                .starts_with("for packets matching `ip daddr 10.0.0.0/8`, TCP is accepted")
        );
    }

    #[test]
    fn listings_and_netlink_structure_give_the_candidates() {
        let text = "table ip foo {\n\tset s {\n\t\ttype ipv4_addr\n\t}\n\n\tchain out {\n\t\ttype nat hook output priority mangle; policy accept;\n\t\ttcp dport 80 redirect to :9999\n\t\tip daddr @s drop\n\t}\n\n\tchain other {\n\t}\n}\n";
        let rules = parse_listing(text);
        assert_eq!(
            rules["out"],
            ["tcp dport 80 redirect to :9999", "ip daddr @s drop"]
        );
        assert!(rules["other"].is_empty());
        assert!(!rules.contains_key("s"));

        use crate::system::nftprobe::{BaseChain, NfChain, NfTable, TABLE_F_DORMANT};
        let chain = |name: &str, hook: Option<u32>| NfChain {
            name: name.into(),
            base: hook.map(|hook| BaseChain {
                hook,
                kind: "filter".into(),
                priority: -300,
                policy: Some(1),
            }),
            rules: Some(1),
        };
        let st = NfTables {
            tables: vec![
                NfTable {
                    name: "nat".into(),
                    flags: 0,
                    owner: None,
                    chains: vec![chain("OUTPUT", Some(HOOK_OUTPUT))],
                },
                NfTable {
                    name: "foo".into(),
                    flags: 0,
                    owner: None,
                    chains: vec![chain("out", Some(HOOK_OUTPUT)), chain("sub", None)],
                },
                NfTable {
                    name: "sleepy".into(),
                    flags: TABLE_F_DORMANT,
                    owner: None,
                    chains: vec![chain("out", Some(HOOK_OUTPUT))],
                },
                NfTable {
                    name: "fwd".into(),
                    flags: 0,
                    owner: None,
                    chains: vec![chain("fwd", Some(2))],
                },
            ],
        };
        let skip = |_: NfFamily, t: &str, c: &str| t == "nat" && c == "OUTPUT";
        let c = candidates(NfFamily::Ip, &st, &[HOOK_PREROUTING, HOOK_OUTPUT], &skip);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].name, "foo");
        assert_eq!(c[0].chains.len(), 2);
        assert_eq!(c[0].chains[0].base.as_ref().unwrap().priority, -300);
    }
}
