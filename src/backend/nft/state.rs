//! What our native nftables tables hold, in a form that compares: the live tables, read from
//! `nft list ruleset inet`, and the tables a [`Ruleset`] asks for. nft lists a rule in its
//! own words (`meta skuid 1337 counter packets 3 bytes 180 return` for Istio's
//! `skuid 1337 counter return`), so both sides are brought to one canonical text per rule:
//! counters' values dropped, the optional `meta` keyword dropped, numbers in decimal,
//! addresses without a full-length prefix, owner names as ids, `ct state` lists sorted, sets
//! merged as the kernel merges them (the fewest prefixes, the fewest ranges; one element
//! without braces), quotes removed, and a `meta l4proto tcp` that a later `tcp dport` implies (nft
//! drops it) dropped. A listing this cannot read is never guessed at: its lines are kept as
//! they are, which compares unequal, and the caller rewrites the table.
//!
//! Only our three tables (`inet istio-proxy-nat`, `-mangle`, `-raw`) are kept; every other
//! table of the listing is skipped whole.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::backend::nft::build::{FAMILY, Op, Ruleset, Table};
use crate::model::OwnerResolver;

/// A base chain's attachment, as listed: `type nat hook output priority -100; policy accept;`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub kind: String,
    pub hook: String,
    pub priority: i32,
    pub policy: String,
}

/// One chain: its attachment (`None`: a regular chain) and its rules, canonical, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub hook: Option<Hook>,
    pub rules: Vec<String>,
}

/// One of our tables: its chains in listing order, and any line that is neither a chain nor
/// a rule (a set, a flag, a comment: we never write those), as listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableState {
    pub chains: Vec<Chain>,
    pub other: Vec<String>,
}

impl TableState {
    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| c.name == name)
    }

    /// How many rules the table holds.
    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(|c| c.rules.len()).sum()
    }
}

/// Our tables that exist, by table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftState {
    pub tables: BTreeMap<Table, TableState>,
}

/// The live state, with each table's listing text (valid `nft -f` input: how a rollback
/// puts the table back as it was) and the order nft lists them in (the order they were
/// created in).
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub state: NftState,
    pub text: BTreeMap<Table, String>,
    pub order: Vec<Table>,
}

/// A listing we could not follow (unbalanced braces: not `nft list` output).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read nft's listing at line {line}: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

/// `{` minus `}` on a line, outside quotes.
fn brace_balance(line: &str) -> i32 {
    let mut n = 0;
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            '{' if !quoted => n += 1,
            '}' if !quoted => n -= 1,
            _ => {}
        }
    }
    n
}

/// nft's named priorities of the ip, ip6 and inet families.
fn priority(text: &str) -> Option<i32> {
    let toks: Vec<&str> = text.split_whitespace().collect();
    let named = |n: &str| -> Option<i32> {
        Some(match n {
            "raw" => -300,
            "mangle" => -150,
            "dstnat" => -100,
            "filter" => 0,
            "security" => 50,
            "srcnat" => 100,
            other => other.parse().ok()?,
        })
    };
    match toks.as_slice() {
        [p] => named(p),
        [p, "+", n] => Some(named(p)? + n.parse::<i32>().ok()?),
        [p, "-", n] => Some(named(p)? - n.parse::<i32>().ok()?),
        _ => None,
    }
}

/// Reads `type K hook H priority P; policy X;`; `None` for any other shape.
fn parse_hook(line: &str) -> Option<Hook> {
    let mut kind = None;
    let mut hook = None;
    let mut prio = None;
    let mut policy = "accept".to_string();
    for part in line.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some(p) = part.strip_prefix("policy ") {
            policy = p.trim().to_string();
            continue;
        }
        let (head, rest) = part.split_once(" priority ")?;
        let toks: Vec<&str> = head.split_whitespace().collect();
        match toks.as_slice() {
            ["type", k, "hook", h] => {
                kind = Some(k.to_string());
                hook = Some(h.to_string());
            }
            _ => return None,
        }
        prio = priority(rest);
    }
    Some(Hook {
        kind: kind?,
        hook: hook?,
        priority: prio?,
        policy,
    })
}

/// Reads `nft list ruleset` (or `nft list table`) output; keeps our tables.
pub fn parse_listing(text: &str, resolver: &dyn OwnerResolver) -> Result<Live, ParseError> {
    let mut live = Live::default();
    // (table, its text so far) while inside one of ours.
    let mut table: Option<(Table, TableState, String)> = None;
    let mut depth = 0i32;
    // Depth at which the current chain's body is, and the chain.
    let mut chain: Option<Chain> = None;
    // Inside a block of the table that is not a chain (a set...), to its end.
    let mut other_until: Option<i32> = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let balance = brace_balance(line);
        let err = |reason: &str| ParseError {
            line: n + 1,
            reason: reason.to_string(),
        };
        if depth == 0 {
            if line.is_empty() {
                continue;
            }
            let toks: Vec<&str> = line.split_whitespace().collect();
            if let ["table", family, name, "{"] = toks.as_slice()
                && *family == FAMILY
                && let Some(t) = Table::from_name(name)
            {
                table = Some((t, TableState::default(), format!("{raw}\n")));
            }
            depth += balance;
            if depth < 0 {
                return Err(err("a `}` closes nothing"));
            }
            continue;
        }
        let Some((_, state, body)) = table.as_mut() else {
            depth += balance;
            if depth < 0 {
                return Err(err("a `}` closes nothing"));
            }
            continue;
        };
        body.push_str(raw);
        body.push('\n');
        let before = depth;
        depth += balance;
        if depth < 0 {
            return Err(err("a `}` closes nothing"));
        }
        if let Some(end) = other_until {
            state.other.push(line.to_string());
            if depth <= end {
                other_until = None;
            }
        } else if before == 1 {
            if line.is_empty() || line == "}" {
                // The table's end, or the blank line between chains.
            } else if let (Some(name), true) = (
                line.strip_prefix("chain ")
                    .and_then(|r| r.strip_suffix('{'))
                    .map(str::trim),
                balance == 1,
            ) {
                chain = Some(Chain {
                    name: name.trim_matches('"').to_string(),
                    hook: None,
                    rules: Vec::new(),
                });
            } else {
                state.other.push(line.to_string());
                if depth > 1 {
                    other_until = Some(1);
                }
            }
        } else if before == 2 && depth == 1 {
            // A chain's `}`.
            state.chains.extend(chain.take());
        } else if let Some(c) = chain.as_mut() {
            if line.is_empty() {
            } else if line.starts_with("type ") && c.hook.is_none() && c.rules.is_empty() {
                match parse_hook(line) {
                    Some(h) => c.hook = Some(h),
                    None => state.other.push(line.to_string()),
                }
            } else if depth == 2 && before == 2 {
                c.rules.push(canonical(line, resolver));
            } else {
                // A multi-line construct inside a chain: not ours.
                state.other.push(line.to_string());
            }
        }
        if depth == 0 {
            let (t, state, body) = table.take().expect("inside a table");
            live.state.tables.insert(t, state);
            live.text.insert(t, body);
            live.order.push(t);
        }
    }
    if depth != 0 {
        return Err(ParseError {
            line: text.lines().count(),
            reason: "the listing ends inside a block".into(),
        });
    }
    Ok(live)
}

/// The tables `ruleset` leaves in an empty namespace: its transaction played out (an
/// `insert rule ... index N` lands at position N).
pub fn desired(ruleset: &Ruleset, resolver: &dyn OwnerResolver) -> NftState {
    let mut st = NftState::default();
    for op in ruleset.transaction() {
        match op {
            Op::AddTable(t) => {
                st.tables.entry(t).or_default();
            }
            Op::FlushTable(t) => {
                for c in &mut st.tables.entry(t).or_default().chains {
                    c.rules.clear();
                }
            }
            Op::AddChain(t, c) => {
                let table = st.tables.entry(t).or_default();
                if table.chain(c.name).is_none() {
                    table.chains.push(Chain {
                        name: c.name.to_string(),
                        hook: c.hook.map(|h| Hook {
                            kind: h.kind.to_string(),
                            hook: h.hook.to_string(),
                            priority: h.priority,
                            policy: "accept".into(),
                        }),
                        rules: Vec::new(),
                    });
                }
            }
            Op::Rule {
                table,
                chain,
                index,
                expr,
            } => {
                let t = st.tables.entry(table).or_default();
                let Some(c) = t.chains.iter_mut().find(|c| c.name == chain) else {
                    continue;
                };
                let rule = canonical(&expr, resolver);
                match index {
                    Some(i) if (i as usize) <= c.rules.len() => c.rules.insert(i as usize, rule),
                    _ => c.rules.push(rule),
                }
            }
        }
    }
    st
}

/// Splits a rule into words: a quoted string is one word (without its quotes), a `{ ... }`
/// set is one word (`{a,b}`, elements canonical and sorted).
fn words(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = expr.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' {
            chars.next();
            let mut w = String::new();
            for c in chars.by_ref() {
                if c == '"' {
                    break;
                }
                w.push(c);
            }
            out.push(w);
        } else if c == '{' {
            chars.next();
            let mut inner = String::new();
            for c in chars.by_ref() {
                if c == '}' {
                    break;
                }
                inner.push(c);
            }
            let mut elems: Vec<String> = inner
                .split(',')
                .map(|e| value(e.trim()))
                .filter(|e| !e.is_empty())
                .collect();
            elems.sort_by_key(|e| sort_key(e));
            out.push(format!("{{{}}}", elems.join(",")));
        } else {
            let mut w = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || c == '{' || c == '"' {
                    break;
                }
                w.push(c);
                chars.next();
            }
            out.push(w);
        }
    }
    out
}

/// Orders set elements by number (the start of a range) where they are numbers.
fn sort_key(e: &str) -> (u64, String) {
    let head = e.split('-').next().unwrap_or(e);
    (head.parse().unwrap_or(u64::MAX), e.to_string())
}

/// One value in canonical form: hex numbers in decimal, addresses without a full-length
/// prefix and in their standard text.
fn value(w: &str) -> String {
    if let Some(hex) = w.strip_prefix("0x")
        && let Ok(n) = u64::from_str_radix(hex, 16)
    {
        return n.to_string();
    }
    if let Ok(a) = w.parse::<IpAddr>() {
        return a.to_string();
    }
    if let Ok(net) = w.parse::<IpNet>() {
        if net.prefix_len() == net.max_prefix_len() {
            return net.addr().to_string();
        }
        return net.to_string();
    }
    w.to_string()
}

/// A set's elements in one form whatever wrote them: nft lists an interval set's elements as
/// the kernel holds them (adjacent prefixes joined into a range `a-b`, overlapping ones
/// merged), so addresses become the fewest prefixes that cover them and numbers the fewest
/// ranges (`80-81`); a set of one element is that element (nft lists `{ x }` as `x`).
fn normal_set(elems: Vec<String>) -> String {
    let out = addresses(&elems)
        .or_else(|| numbers(&elems))
        .unwrap_or(elems);
    match out.as_slice() {
        [one] => one.clone(),
        _ => format!("{{{}}}", out.join(",")),
    }
}

/// Address elements (addresses, prefixes, `a-b` ranges) as the fewest prefixes, if all are.
fn addresses(elems: &[String]) -> Option<Vec<String>> {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for e in elems {
        let (lo, hi) = match e.split_once('-') {
            Some((a, b)) => (a.parse::<IpAddr>().ok()?, b.parse::<IpAddr>().ok()?),
            None => {
                let net = e
                    .parse::<IpNet>()
                    .ok()
                    .or_else(|| e.parse::<IpAddr>().ok().map(IpNet::from))?;
                (net.network(), net.broadcast())
            }
        };
        match (lo, hi) {
            (IpAddr::V4(a), IpAddr::V4(b)) if a <= b => {
                v4.extend(ipnet::Ipv4Subnets::new(a, b, 0).map(IpNet::V4));
            }
            (IpAddr::V6(a), IpAddr::V6(b)) if a <= b => {
                v6.extend(ipnet::Ipv6Subnets::new(a, b, 0).map(IpNet::V6));
            }
            _ => return None,
        }
    }
    v4.extend(v6);
    Some(
        IpNet::aggregate(&v4)
            .iter()
            .map(|n| value(&n.to_string()))
            .collect(),
    )
}

/// Number elements (`80`, `90-100`) as the fewest ranges, if all are.
fn numbers(elems: &[String]) -> Option<Vec<String>> {
    let ranges = elems.iter().map(|e| {
        let (a, b) = e.split_once('-').unwrap_or((e, e));
        Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?))
    });
    let ranges: Option<Vec<(u32, u32)>> = ranges.collect();
    let merged = crate::backend::nft::build::merge_ranges(ranges?.into_iter());
    Some(
        merged
            .into_iter()
            .map(|(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect(),
    )
}

/// A rule's canonical text (see the module documentation).
pub fn canonical(expr: &str, resolver: &dyn OwnerResolver) -> String {
    let mut w = words(expr);
    // Counters' values.
    let mut i = 0;
    while i < w.len() {
        if w[i] == "counter" && w.get(i + 1).is_some_and(|x| x == "packets") && i + 4 < w.len() {
            w.drain(i + 1..i + 5);
        }
        i += 1;
    }
    w.retain(|x| x != "meta");
    for i in 0..w.len() {
        let prev = if i > 0 { w[i - 1].as_str() } else { "" };
        let prev2 = if i > 1 { w[i - 2].as_str() } else { "" };
        let owner = |p: &str| p == "skuid" || p == "skgid";
        let name = w[i] != "!=" && !w[i].starts_with('{') && w[i].parse::<u32>().is_err();
        let new = if name && (owner(prev) || (prev == "!=" && owner(prev2))) {
            let kind = if prev == "skuid" || prev2 == "skuid" {
                resolver.uid(&w[i])
            } else {
                resolver.gid(&w[i])
            };
            kind.map(|n| n.to_string()).unwrap_or_else(|| value(&w[i]))
        } else if prev == "l4proto" || (prev == "!=" && prev2 == "l4proto") {
            // nft names a protocol from /etc/protocols: without that file (an image
            // without netbase) it prints the number.
            match w[i].as_str() {
                "6" => "tcp".to_string(),
                "17" => "udp".to_string(),
                other => other.to_string(),
            }
        } else if prev == "state" && prev2 == "ct" {
            let mut s: Vec<&str> = w[i].split(',').collect();
            s.sort_unstable();
            s.join(",")
        } else if let Some(inner) = w[i].strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
            let elems = inner.split(',').map(|e| {
                let id = if prev == "skuid" || prev2 == "skuid" {
                    resolver.uid(e)
                } else {
                    resolver.gid(e)
                };
                match id {
                    Some(n) if owner(prev) || (prev == "!=" && owner(prev2)) => n.to_string(),
                    _ => e.to_string(),
                }
            });
            normal_set(elems.collect())
        } else {
            value(&w[i])
        };
        w[i] = new;
    }
    // `l4proto tcp` that a later `tcp dport|sport` implies.
    if let Some(i) = w.iter().position(|x| x == "l4proto")
        && let Some(proto) = w.get(i + 1).cloned()
        && w[i + 2..]
            .windows(2)
            .any(|p| p[0] == proto && (p[1] == "dport" || p[1] == "sport"))
    {
        w.drain(i..i + 2);
    }
    w.join(" ")
}

impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chain {}", self.name)?;
        if let Some(h) = &self.hook {
            write!(
                f,
                " {{ type {} hook {} priority {}; policy {}; }}",
                h.kind, h.hook, h.priority, h.policy
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::nft::build::{build, render};
    use crate::config::tests::build as config;
    use crate::model::NoResolver;

    struct Names;
    impl OwnerResolver for Names {
        fn uid(&self, name: &str) -> Option<u32> {
            match name {
                "istio-proxy" => Some(1337),
                n => n.parse().ok(),
            }
        }
        fn gid(&self, name: &str) -> Option<u32> {
            match name {
                "java" => Some(2000),
                n => n.parse().ok(),
            }
        }
    }

    #[test]
    fn istio_text_and_nft_listing_compare_equal() {
        for (ours, listed) in [
            // Listed where nft has no /etc/protocols (an image without netbase).
            (
                "meta l4proto tcp counter redirect to :15001",
                "meta l4proto 6 counter packets 0 bytes 0 redirect to :15001",
            ),
            (
                "meta l4proto tcp ip6 daddr != ::1/128 tproxy ip6 to :15006 meta mark set 1337 counter accept",
                "meta l4proto 6 ip6 daddr != ::1 tproxy ip6 to :15006 meta mark set 0x00000539 counter packets 0 bytes 0 accept",
            ),
            (
                "meta l4proto tcp tcp dport 15008 counter return",
                "tcp dport 15008 counter packets 0 bytes 0 return",
            ),
            (
                "oifname lo meta l4proto tcp ip daddr != 127.0.0.1/32 tcp dport != { 15008, 53 } skuid istio-proxy counter jump istio-in-redirect",
                "oifname \"lo\" ip daddr != 127.0.0.1 tcp dport != { 53, 15008 } meta skuid 1337 counter packets 12 bytes 720 jump istio-in-redirect",
            ),
            (
                "meta l4proto tcp ct state related,established counter jump istio-divert",
                "meta l4proto tcp ct state established,related counter packets 0 bytes 0 jump istio-divert",
            ),
            (
                "meta l4proto tcp ip6 daddr != ::1/128 tproxy ip6 to :15006 meta mark set 1337 counter accept",
                "meta l4proto tcp ip6 daddr != ::1 tproxy ip6 to :15006 meta mark set 0x00000539 counter packets 0 bytes 0 accept",
            ),
            (
                "meta l4proto tcp mark 1337 counter ct mark set mark",
                "meta l4proto tcp meta mark 0x00000539 counter packets 0 bytes 0 ct mark set meta mark",
            ),
            // --exclusion-sets: nft lists adjacent prefixes as one range, a set merged to one
            // element in braces, group names as ids.
            (
                "ip daddr { 10.0.1.0/24, 10.0.2.0/24, 1.2.3.4/32, 192.168.0.0/16 } counter return",
                "ip daddr { 1.2.3.4, 10.0.1.0-10.0.2.255, 192.168.0.0/16 } counter packets 0 bytes 0 return",
            ),
            (
                "ip daddr { 10.0.0.0/8 } counter return",
                "ip daddr 10.0.0.0/8 counter packets 0 bytes 0 return",
            ),
            (
                "tcp dport { 80, 81, 90-100, 200 } counter return",
                "tcp dport { 80-81, 90-100, 200 } counter packets 0 bytes 0 return",
            ),
            (
                "ip6 daddr { fd00::/8, fe80::1/128 } counter return",
                "ip6 daddr { fd00::/8, fe80::1 } counter packets 0 bytes 0 return",
            ),
            (
                "skgid != { java, 2 } counter return",
                "meta skgid != { 2, 2000 } counter packets 0 bytes 0 return",
            ),
            (
                "skgid != java skgid != 2 counter return",
                "meta skgid != 2000 meta skgid != 2 counter packets 0 bytes 0 return",
            ),
            (
                "iifname \"eth*\" counter return",
                "iifname \"eth*\" counter packets 0 bytes 0 return",
            ),
            (
                "ip6 daddr fd00:0:0::/64 counter return",
                "ip6 daddr fd00::/64 counter packets 0 bytes 0 return",
            ),
        ] {
            assert_eq!(canonical(ours, &Names), canonical(listed, &Names), "{ours}");
        }
        for (a, b) in [
            ("tcp dport 80 counter return", "tcp dport 81 counter return"),
            ("skuid 1337 counter return", "skuid != 1337 counter return"),
            (
                "meta l4proto tcp counter redirect to :15001",
                "counter redirect to :15001",
            ),
        ] {
            assert_ne!(canonical(a, &NoResolver), canonical(b, &NoResolver));
        }
    }

    const LISTING: &str = "table inet other {\n\tchain x {\n\t\ttcp dport { 1, 2 } accept\n\t}\n}\n\
table inet istio-proxy-nat {\n\
\tchain output {\n\
\t\ttype nat hook output priority -100; policy accept;\n\
\t\tcounter packets 4 bytes 240 jump istio-output\n\
\t}\n\
\n\
\tchain istio-output {\n\
\t\tmeta skuid 1337 counter packets 0 bytes 0 return\n\
\t}\n\
}\n\
table inet istio-proxy-mangle {\n\
\tset s {\n\
\t\ttype ipv4_addr\n\
\t}\n\
\n\
\tchain prerouting {\n\
\t\ttype filter hook prerouting priority mangle; policy accept;\n\
\t}\n\
}\n";

    #[test]
    fn listing_keeps_our_tables_with_their_text() {
        let live = parse_listing(LISTING, &NoResolver).unwrap();
        assert_eq!(
            live.state.tables.keys().copied().collect::<Vec<_>>(),
            [Table::Nat, Table::Mangle]
        );
        let nat = &live.state.tables[&Table::Nat];
        assert_eq!(nat.chains.len(), 2);
        assert_eq!(
            nat.chains[0].hook,
            Some(Hook {
                kind: "nat".into(),
                hook: "output".into(),
                priority: -100,
                policy: "accept".into()
            })
        );
        assert_eq!(nat.chains[0].rules, ["counter jump istio-output"]);
        assert_eq!(nat.chains[1].rules, ["skuid 1337 counter return"]);
        assert!(nat.other.is_empty());
        let mangle = &live.state.tables[&Table::Mangle];
        assert_eq!(mangle.chains[0].hook.as_ref().unwrap().priority, -150);
        assert_eq!(mangle.other, ["set s {", "type ipv4_addr", "}"]);
        assert_eq!(live.order, [Table::Nat, Table::Mangle]);
        assert!(live.text[&Table::Nat].starts_with("table inet istio-proxy-nat {\n"));
        assert!(live.text[&Table::Nat].ends_with("\t}\n}\n"));
        assert!(parse_listing("table inet x {\n", &NoResolver).is_err());
        assert!(parse_listing("}\n", &NoResolver).is_err());
    }

    #[test]
    fn desired_plays_inserts_at_their_index() {
        let (c, f) = config(&["-k", "eth1,eth2", "-b", "*"], &[]).unwrap();
        let st = desired(&build(&c, &f), &NoResolver);
        let pre = st.tables[&Table::Nat].chain("prerouting").unwrap();
        // Two inserts at 0 after the jump: the second one first.
        assert_eq!(
            pre.rules[..3],
            [
                "iifname eth2 counter return",
                "iifname eth1 counter return",
                "l4proto tcp counter jump istio-inbound"
            ]
        );
    }

    /// Applies each config's transaction in a private namespace and reads it back: the
    /// listing must compare equal to what [`desired`] says, rule for rule.
    #[test]
    fn the_kernel_listing_equals_the_desired_state() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED nftstate::the_kernel_listing_equals_the_desired_state: needs root");
            return;
        }
        let v6 = [("ENABLE_INBOUND_IPV6", "true")];
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
        let cases: Vec<Case> = vec![
            (crate::config::tests::SEED, &[]),
            (
                &[
                    "-m",
                    "TPROXY",
                    "-b",
                    "*",
                    "-d",
                    "8000:8010",
                    "--drop-invalid",
                ],
                &v6,
            ),
            (
                &[
                    "-m",
                    "TPROXY",
                    "-b",
                    "80,443",
                    "-k",
                    "eth1",
                    "-i",
                    "10.0.0.0/8,fd00::/8",
                ],
                &v6,
            ),
            (
                &["--redirect-dns", "-c", "eth+,eth0", "-o", "53,9000:9001"],
                &v6,
            ),
            (
                &[
                    "--redirect-dns",
                    "--capture-all-dns",
                    "-g",
                    "1,2",
                    "-q",
                    "7000:7001",
                ],
                &[],
            ),
            (
                &["-x", "10.1.0.0/16,fd01::/16,192.168.0.1/32", "-u", "0"],
                &v6,
            ),
        ];
        for (argv, env) in cases {
            let (c, f) = config(argv, env).unwrap();
            let rs = build(&c, &f);
            let text = render(&rs.transaction());
            let listing = std::thread::spawn(move || {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
                let mut child = std::process::Command::new("nft")
                    .args(["-f", "-"])
                    .stdin(std::process::Stdio::piped())
                    .spawn()
                    .expect("nft");
                use std::io::Write as _;
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(text.as_bytes())
                    .unwrap();
                assert!(child.wait().unwrap().success(), "nft -f failed");
                let out = std::process::Command::new("nft")
                    .args(["list", "ruleset", "inet"])
                    .output()
                    .unwrap();
                String::from_utf8(out.stdout).unwrap()
            })
            .join()
            .unwrap();
            let live = parse_listing(&listing, &NoResolver).unwrap();
            assert_eq!(
                live.state,
                desired(&rs, &NoResolver),
                "{argv:?}: listing\n{listing}"
            );
        }
    }
}
