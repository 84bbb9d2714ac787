//! What takes the packet before our rules can (verify), in one family's iptables tables as
//! iptables-save shows them: foreign rules ahead of our jumps that end the chain for what we
//! capture, and rules in the tables that run before nat on the same hook (raw at -300, mangle
//! at -150) that drop the packet or untrack it (untracked packets skip nat entirely).
//!
//! - **In the chain of our jump** (nat OUTPUT and PREROUTING, mangle PREROUTING and OUTPUT in
//!   TPROXY mode): a foreign rule before our first jump (or, in mangle OUTPUT, our first mark
//!   rule) that can match what we capture (TCP; with DNS capture, UDP to port 53 too) and
//!   whose target ends the chain for it: ACCEPT, RETURN (a built-in chain's policy), DROP,
//!   REJECT, a REDIRECT, DNAT or TPROXY of its own, a queue. A jump to a foreign chain "may
//!   decide" when that chain (looked at one level, not walked) holds such a target.
//! - **In an earlier table** at the hook of a nat capture: DROP, `CT --notrack` / `NOTRACK`
//!   (raw), a TPROXY of its own (mangle PREROUTING); an ACCEPT there ends only that table.
//!
//! Rules that are exactly what the config writes (the canonical text of [`canonical`]: an
//! excluded interface's `-o eth9 -j RETURN`, TPROXY's mark rules) are ours, not foreign.
//! Matches narrower than the protocol (`-d 10.0.0.0/8`, `! --dport 80`) still decide for
//! some packets: the effect says "for packets matching ...". Pure: over the parsed save.

use std::collections::{BTreeMap, BTreeSet};

use crate::backend::foreign::{
    self, Capture, HOOK_OUTPUT, HOOK_PREROUTING, Kind, Packets, before_our_jump, subject,
};
use crate::backend::iptables::save::{SaveState, TableState, canonical};
use crate::model::{Family, Finding, OwnerResolver, Rule, RuleSpec, Table, Token, chain};

/// Our chains whose jump captures traffic (ISTIO_DROP, drop-invalid's, does not).
const CAPTURING: &[&str] = &[
    chain::OUTPUT,
    chain::INBOUND,
    chain::REDIRECT,
    chain::IN_REDIRECT,
];

/// Targets that do not end a chain: the packet goes on to the next rule.
const GOES_ON: &[&str] = &[
    "LOG",
    "NFLOG",
    "ULOG",
    "MARK",
    "CONNMARK",
    "CT",
    "TRACE",
    "CLASSIFY",
    "DSCP",
    "TOS",
    "TTL",
    "HL",
    "TCPMSS",
    "TCPOPTSTRIP",
    "AUDIT",
    "CHECKSUM",
    "SET",
    "IDLETIMER",
    "LED",
    "SECMARK",
    "CONNSECMARK",
    "NETMAP",
    "SNAT",
    "MASQUERADE",
    "ECN",
    "RATEEST",
    "SYNPROXY",
];

/// Connection states the nat table never sees (it sees a connection's first packet).
const NOT_IN_NAT: &[&str] = &["ESTABLISHED", "INVALID", "UNTRACKED"];

/// The nat priority, where our REDIRECT capture is.
const NAT_PRIORITY: i32 = -100;
/// The mangle priority (TPROXY).
const MANGLE_PRIORITY: i32 = -150;

/// What the config captures in one family, read from its rules.
struct Captured {
    /// DNS capture (nat ISTIO_OUTPUT jumps to ISTIO_OUTPUT_DNS).
    dns: bool,
    /// (table, built-in chain) holding a jump of ours into a capturing chain, or (mangle
    /// OUTPUT) TPROXY's mark rules.
    chains: BTreeSet<(Table, &'static str)>,
}

fn jumps_to_ours(args: &[Token]) -> Option<String> {
    RuleSpec::parse(args)
        .target_name()
        .filter(|t| t.starts_with(chain::PREFIX))
        .map(str::to_string)
}

impl Captured {
    fn of(wanted: &[Rule]) -> Captured {
        let dns = wanted
            .iter()
            .any(|r| r.table == Table::Nat && r.target().as_deref() == Some(chain::OUTPUT_DNS));
        let mut chains = BTreeSet::new();
        for r in wanted {
            let builtin = matches!(r.chain, "PREROUTING" | "OUTPUT");
            if !builtin {
                continue;
            }
            let capturing = jumps_to_ours(&r.args).is_some_and(|t| CAPTURING.contains(&t.as_str()));
            let marks = r.table == Table::Mangle && r.chain == "OUTPUT";
            if (capturing && matches!(r.table, Table::Nat | Table::Mangle)) || marks {
                chains.insert((r.table, r.chain));
            }
        }
        Captured { dns, chains }
    }

    fn packets(&self, chain: &str) -> Packets {
        Packets {
            tcp: true,
            dns: self.dns && chain == "OUTPUT",
        }
    }

    /// Whether the inbound capture is TPROXY's (mangle), not nat's.
    fn tproxy(&self) -> bool {
        self.chains.contains(&(Table::Mangle, "PREROUTING"))
    }
}

/// What is lost when a foreign rule takes TCP before our rule `anchor` in `table`/`chain`.
fn lost(table: Table, chain: &str, anchor: &str) -> String {
    match (table, chain, anchor) {
        (_, "OUTPUT", chain::OUTPUT) => "outbound TCP is not captured".into(),
        (_, "PREROUTING", chain::REDIRECT) => {
            "outbound TCP from the virtual interfaces (-k) is not captured".into()
        }
        (Table::Mangle, "OUTPUT", _) => "TPROXY's marks are not set or restored on outbound TCP \
                                          (the proxy's replies to captured inbound connections \
                                          are not routed back to it)"
            .into(),
        (_, "PREROUTING", _) => "inbound TCP is not captured".into(),
        _ => "TCP is not captured".into(),
    }
}

/// A rule's tokens as iptables-save prints them (quoted where a token has spaces).
fn rule_text(chain: &str, toks: &[Token]) -> String {
    let mut s = format!("-A {chain}");
    for t in toks {
        if t.is_empty() || t.contains(char::is_whitespace) {
            s.push_str(&format!(" \"{t}\""));
        } else {
            s.push(' ');
            s.push_str(t);
        }
    }
    s
}

/// Whether a port value (`53`, `50:60`, a multiport list) takes port 53.
fn has_53(value: &str) -> bool {
    value.split(',').any(|v| match v.split_once(':') {
        Some((a, b)) => {
            a.parse::<u16>().map_or(true, |a| a <= 53) && b.parse::<u16>().map_or(true, |b| b >= 53)
        }
        None => v == "53" || v == "domain",
    })
}

/// What a foreign rule can match of TCP and of UDP to port 53: (tcp, udp53, its matches
/// beyond the protocol as text), or `None` when it matches neither (another protocol, or in
/// nat a state nat never sees).
fn reach(spec: &RuleSpec, table: Table) -> Option<(bool, bool, String)> {
    let (mut tcp, mut udp) = (true, true);
    let mut text: Vec<String> = Vec::new();
    let mut module = String::new();
    for m in &spec.matches {
        let flag: &str = &m.flag;
        let value = m.value();
        match flag {
            "-p" | "--protocol" => {
                let p = value.to_ascii_lowercase();
                let (t, u) = match p.as_str() {
                    "tcp" | "6" => (true, false),
                    "udp" | "17" => (false, true),
                    "all" | "0" => (true, true),
                    _ => (false, false),
                };
                tcp &= t != m.negated;
                udp &= u != m.negated;
                continue;
            }
            "-m" | "--match" => {
                module = value.to_string();
                // Implied by the protocol, or no match at all.
                if matches!(value, "tcp" | "udp" | "comment") {
                    continue;
                }
            }
            "--comment" if module == "comment" => continue,
            "--dport" | "--destination-port" | "--dports" | "--destination-ports" | "--ports" => {
                udp &= has_53(value) != m.negated;
            }
            "--ctstate" | "--state"
                if matches!(module.as_str(), "conntrack" | "state")
                    && table == Table::Nat
                    && !m.negated
                    && value.split(',').all(|s| NOT_IN_NAT.contains(&s)) =>
            {
                return None;
            }
            _ => {}
        }
        let bang = if m.negated { "! " } else { "" };
        text.push(
            format!("{bang}{flag} {}", m.values.join(" "))
                .trim_end()
                .to_string(),
        );
    }
    (tcp || udp).then(|| (tcp, udp, text.join(" ")))
}

/// The canonical texts of the config's rules, per (table, chain).
fn wanted_texts(
    wanted: &[Rule],
    resolver: &dyn OwnerResolver,
) -> BTreeMap<(Table, &'static str), BTreeSet<String>> {
    let mut out: BTreeMap<(Table, &'static str), BTreeSet<String>> = BTreeMap::new();
    for r in wanted {
        out.entry((r.table, r.chain))
            .or_default()
            .insert(canonical(&r.args, resolver));
    }
    out
}

/// A family's iptables flavour as a place names it: `IPv4 iptables-nft`.
pub fn label(family: Family, flavor: Option<&str>) -> String {
    let base = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    match flavor {
        Some(f) => format!("{family} {base}-{f}"),
        None => format!("{family} {base}"),
    }
}

/// The foreign rules of one family's `save` that decide, or may decide, what `wanted` (the
/// config's rules of that family) captures before our rules can. `place` names the family and
/// flavour ([`label`]).
pub fn findings(
    place: &str,
    save: &SaveState,
    wanted: &[Rule],
    resolver: &dyn OwnerResolver,
) -> Vec<Finding> {
    let captured = Captured::of(wanted);
    let texts = wanted_texts(wanted, resolver);
    let mut out: Vec<Finding> = Vec::new();
    let mut push = |f: Finding| {
        if !out.iter().any(|o| o.place == f.place && o.rule == f.rule) {
            out.push(f);
        }
    };
    // In the chain of our jump.
    for &(table, chain) in &captured.chains {
        let Some(ts) = save.table(table) else {
            continue;
        };
        let ours = texts.get(&(table, chain));
        for f in in_chain(
            place,
            ts,
            table,
            chain,
            captured.packets(chain),
            ours,
            resolver,
        ) {
            push(f);
        }
    }
    // In the tables before nat at the hook of a nat capture, and before mangle at TPROXY's.
    let nat_at = |c: &str| captured.chains.contains(&(Table::Nat, c));
    for chain in ["OUTPUT", "PREROUTING"] {
        let earlier: &[Table] = if nat_at(chain) {
            &[Table::Raw, Table::Mangle]
        } else if chain == "PREROUTING" && captured.tproxy() {
            &[Table::Raw]
        } else {
            &[]
        };
        let (capture, lost) = if nat_at(chain) {
            let anchor = if chain == "OUTPUT" {
                chain::OUTPUT
            } else {
                chain::INBOUND
            };
            (format!("nat {chain}"), lost(Table::Nat, chain, anchor))
        } else {
            (
                format!("mangle {chain}"),
                "inbound TCP is not captured".to_string(),
            )
        };
        for &table in earlier {
            let Some(ts) = save.table(table) else {
                continue;
            };
            let ours = texts.get(&(table, chain));
            for f in earlier_table(
                place,
                ts,
                table,
                chain,
                captured.packets(chain),
                nat_at(chain),
                ours,
                (&capture, &lost),
                resolver,
            ) {
                push(f);
            }
        }
    }
    // Tables iptables-nft-save could not show.
    for name in &save.incompatible {
        let Some(table) = Table::from_name(name) else {
            continue;
        };
        let relevant = wanted.iter().any(|r| r.table == table)
            || (table != Table::Filter && !captured.chains.is_empty());
        if relevant {
            push(Finding {
                place: format!("{place} {name}"),
                rule: format!("# Table `{name}' is incompatible, use 'nft' tool."),
                effect: format!(
                    "iptables-nft-save cannot show this table (a rule in it was written with \
                     nft and has no iptables form): its rules are not checked here and may take \
                     packets before our rules; see `nft list table {} {name}`",
                    if place.starts_with("IPv6") {
                        "ip6"
                    } else {
                        "ip"
                    }
                ),
            });
        }
    }
    out
}

/// The foreign rules of `table`/`chain` before our rule each precedes (see the module doc).
fn in_chain(
    place: &str,
    ts: &TableState,
    table: Table,
    chain: &str,
    packets: Packets,
    ours: Option<&BTreeSet<String>>,
    resolver: &dyn OwnerResolver,
) -> Vec<Finding> {
    let rules: Vec<&[Token]> = ts.chain_rules(chain).collect();
    // Per rule: ours (None) or foreign; and for ours, whether it is an anchor.
    let mut anchor_after: Vec<Option<String>> = vec![None; rules.len()];
    let mut is_ours = vec![false; rules.len()];
    let mut next: Option<String> = None;
    for (i, toks) in rules.iter().enumerate().rev() {
        let spec = RuleSpec::parse(toks);
        let target = spec.target_name().unwrap_or("").to_string();
        let jump = jumps_to_ours(toks);
        let by_shape = ours.is_some_and(|o| o.contains(&canonical(toks, resolver)));
        is_ours[i] = jump.is_some() || by_shape;
        let anchor = match &jump {
            Some(t) if CAPTURING.contains(&t.as_str()) => Some(t.clone()),
            // TPROXY's marks in mangle OUTPUT: ours, and what a foreign rule must not skip.
            _ if by_shape && table == Table::Mangle && chain == "OUTPUT" && target != "RETURN" => {
                Some(format!("-j {target}"))
            }
            _ => None,
        };
        anchor_after[i] = next.clone();
        if anchor.is_some() {
            next = anchor;
        }
    }
    let mut out = Vec::new();
    for (i, toks) in rules.iter().enumerate() {
        let Some(anchor) = &anchor_after[i] else {
            continue;
        };
        if is_ours[i] {
            continue;
        }
        let spec = RuleSpec::parse(toks);
        let Some((tcp, udp53, matches)) = reach(&spec, table) else {
            continue;
        };
        let Some((who, t, d)) = subject(packets, tcp, udp53, &matches) else {
            continue;
        };
        let Some(does) = ends_chain(&spec, chain, ts) else {
            continue;
        };
        let before = if anchor.starts_with(chain::PREFIX) {
            format!("the jump to {anchor}")
        } else {
            format!("our `{anchor}`")
        };
        out.push(Finding {
            place: format!("{place} {table} {chain}"),
            rule: rule_text(chain, toks),
            effect: format!(
                "{who} {does} before {before}: {}",
                foreign::lost(&lost(table, chain, anchor), t, d)
            ),
        });
    }
    out
}

/// What a foreign rule's target does in a built-in `chain`, as words: ends it for the packet
/// (`leaves OUTPUT`, `is accepted in OUTPUT`...), or may (a jump to a foreign chain that holds
/// an ending target); `None` when the packet goes on.
fn ends_chain(spec: &RuleSpec, chain: &str, ts: &TableState) -> Option<String> {
    let target = spec.target.as_ref()?;
    let name = target.name.as_deref()?;
    Some(match name {
        "ACCEPT" => format!("is accepted in {chain}"),
        "RETURN" => format!("leaves {chain}"),
        "DROP" => "is dropped".into(),
        "REJECT" => "is rejected".into(),
        "REDIRECT" | "DNAT" => format!("is NATed by this rule's {name}"),
        "TPROXY" => "is taken by this rule's TPROXY".into(),
        "NFQUEUE" | "QUEUE" => "is queued to userspace".into(),
        n if GOES_ON.contains(&n) => return None,
        n if ts.user_chains.iter().any(|c| c == n) => {
            let deciding = ts.chain_rules(n).any(|r| {
                RuleSpec::parse(r)
                    .target_name()
                    .is_some_and(|t| t != "RETURN" && !GOES_ON.contains(&t))
            });
            if !deciding {
                return None;
            }
            let how = if target.goto { "goto" } else { "jump" };
            format!("may be decided in chain {n} (a {how} to it)")
        }
        n => format!("may be decided by its -j {n}"),
    })
}

/// The rules of an earlier table at a nat (or TPROXY) capture's hook that drop or untrack
/// what it captures, wherever they are in the chain.
#[allow(clippy::too_many_arguments)]
fn earlier_table(
    place: &str,
    ts: &TableState,
    table: Table,
    chain: &str,
    packets: Packets,
    nat: bool,
    ours: Option<&BTreeSet<String>>,
    (capture, lost): (&str, &str),
    resolver: &dyn OwnerResolver,
) -> Vec<Finding> {
    let priority = match table {
        Table::Raw => -300,
        _ => MANGLE_PRIORITY,
    };
    const UNTRACKED: (&str, &str) = ("is untracked", ", and untracked packets skip nat");
    // (what it does, a note after the capture's name).
    let deciding = |spec: &RuleSpec| -> Option<(&'static str, &'static str)> {
        let t = spec.target.as_ref()?;
        match t.name.as_deref()? {
            "DROP" => Some(("is dropped", "")),
            "NOTRACK" if nat => Some(UNTRACKED),
            "CT" if nat && t.options.iter().any(|o| o == "--notrack") => Some(UNTRACKED),
            "TPROXY" if nat && table == Table::Mangle && chain == "PREROUTING" => {
                Some(("is taken by this rule's TPROXY", ""))
            }
            _ => None,
        }
    };
    let mut out = Vec::new();
    for toks in ts.chain_rules(chain) {
        if jumps_to_ours(toks).is_some()
            || ours.is_some_and(|o| o.contains(&canonical(toks, resolver)))
        {
            continue;
        }
        let spec = RuleSpec::parse(toks);
        let Some((tcp, udp53, matches)) = reach(&spec, table) else {
            continue;
        };
        let Some((who, t, d)) = subject(packets, tcp, udp53, &matches) else {
            continue;
        };
        let (does, note) = match deciding(&spec) {
            Some((d, note)) => (d.to_string(), note),
            None => {
                // A foreign chain, looked at one level.
                let Some(n) = spec
                    .target_name()
                    .filter(|n| ts.user_chains.iter().any(|c| c == n))
                else {
                    continue;
                };
                let may = ts.chain_rules(n).any(|r| {
                    let s = RuleSpec::parse(r);
                    deciding(&s).is_some()
                        || s.target_name()
                            .is_some_and(|t| ts.user_chains.iter().any(|c| c == t))
                });
                if !may {
                    continue;
                }
                (format!("may be decided in chain {n}"), "")
            }
        };
        out.push(Finding {
            place: format!("{place} {table} {chain}"),
            rule: rule_text(chain, toks),
            effect: format!(
                "{who} {does} in {table} {chain} (priority {priority}), before {capture}{note}: {}",
                foreign::lost(lost, t, d)
            ),
        });
    }
    out
}

/// Our capture chains in one family, for other nftables tables' base chains to be judged
/// against ([`foreign::judge`]); `place` as for [`findings`].
pub fn captures(family: Family, place: &str, wanted: &[Rule]) -> Vec<Capture> {
    let captured = Captured::of(wanted);
    let families: &'static [&'static str] = match family {
        Family::V4 => &["ip", "inet"],
        Family::V6 => &["ip6", "inet"],
    };
    let mut out = Vec::new();
    for (table, chain, kind, priority, anchor) in [
        (Table::Nat, "OUTPUT", Kind::Nat, NAT_PRIORITY, chain::OUTPUT),
        (
            Table::Nat,
            "PREROUTING",
            Kind::Nat,
            NAT_PRIORITY,
            chain::INBOUND,
        ),
        (
            Table::Mangle,
            "PREROUTING",
            Kind::Tproxy,
            MANGLE_PRIORITY,
            chain::INBOUND,
        ),
        (Table::Mangle, "OUTPUT", Kind::Marks, MANGLE_PRIORITY, ""),
    ] {
        if !captured.chains.contains(&(table, chain)) {
            continue;
        }
        out.push(Capture {
            hook: if chain == "OUTPUT" {
                HOOK_OUTPUT
            } else {
                HOOK_PREROUTING
            },
            priority,
            kind,
            packets: captured.packets(chain),
            families,
            ours: format!("{place} {table} {chain}"),
            lost: lost(table, chain, anchor),
        });
    }
    out
}

/// Whether an iptables-nft table's chain is iptables' own, judged from the save rather than
/// as another tool's nftables table: a built-in chain of a table the save showed.
pub fn shown_by_save(save: &SaveState, table: &str, chain: &str) -> bool {
    save.tables
        .get(table)
        .is_some_and(|t| t.builtin.iter().any(|(c, _)| c == chain))
}

/// The rules of one of our chains in a table iptables-nft-save could not show, as `nft list
/// table` lists them (`listing`: rules per chain): those before our jump that end the chain
/// for what the config captures ([`before_our_jump`]).
pub fn incompatible(
    place: &str,
    table: Table,
    listing: &BTreeMap<String, Vec<String>>,
    wanted: &[Rule],
) -> Vec<Finding> {
    let captured = Captured::of(wanted);
    let mut out = Vec::new();
    for &(t, chain) in &captured.chains {
        if t != table {
            continue;
        }
        let Some(rules) = listing.get(chain) else {
            continue;
        };
        // The config's interface RETURNs, as iptables-nft writes them in nft's words.
        let returns: BTreeSet<String> = wanted
            .iter()
            .filter(|r| r.table == table && r.chain == chain)
            .filter_map(|r| match r.args.as_slice() {
                [flag, iface, j, ret] if j == "-j" && ret == "RETURN" => {
                    let key = match &**flag {
                        "-i" => "iifname",
                        "-o" => "oifname",
                        _ => return None,
                    };
                    Some(format!("{key} {} return", iface.replace('+', "*")))
                }
                _ => None,
            })
            .collect();
        let ours = |r: &str| {
            let plain: Vec<String> = foreign::rule_text(r)
                .split_whitespace()
                .filter(|w| *w != "counter")
                .map(|w| w.trim_matches('"').to_string())
                .collect();
            returns.contains(&plain.join(" "))
        };
        let anchor = if chain == "OUTPUT" {
            chain::OUTPUT
        } else {
            chain::INBOUND
        };
        out.extend(before_our_jump(
            &format!("{place} {table} {chain}"),
            rules,
            captured.packets(chain),
            &lost(table, chain, anchor),
            &ours,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::iptables::build;
    use crate::backend::iptables::save::parse_save;
    use crate::config::tests::{SEED, build as config};
    use crate::model::NoResolver;

    const PLACE: &str = "IPv4 iptables-nft";

    /// The config's IPv4 rules for `extra` flags on top of Istio's seed command.
    fn wanted(extra: &[&str]) -> Vec<Rule> {
        let mut args = SEED.to_vec();
        let mut it = extra.iter();
        while let Some(&a) = it.next() {
            match args.iter().position(|x| *x == a) {
                // A flag the seed has: its value replaced (`-m TPROXY`).
                Some(i) if a == "-m" => args[i + 1] = it.next().unwrap(),
                _ => args.push(a),
            }
        }
        let (cfg, facts) = config(&args, &[]).unwrap();
        build::build(&cfg, &facts).v4
    }

    /// What iptables-save prints for `wanted` applied in a fresh namespace, with `before`
    /// rules (`TABLE CHAIN SPEC`) inserted at the head of their chain and `after` appended.
    fn save(wanted: &[Rule], before: &[&str], after: &[&str]) -> SaveState {
        let mut by_table: BTreeMap<&str, (Vec<String>, Vec<String>)> = BTreeMap::new();
        let chains = |t: &str| -> &[&str] {
            match t {
                "nat" => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
                "raw" => &["PREROUTING", "OUTPUT"],
                _ => &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"],
            }
        };
        let mut rules: BTreeMap<(&str, String), Vec<String>> = BTreeMap::new();
        let mut user: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for r in wanted {
            let t = r.table.name();
            if r.chain.starts_with(chain::PREFIX) {
                user.entry(t).or_default().insert(r.chain.to_string());
            }
            let list = rules.entry((t, r.chain.to_string())).or_default();
            r.position.place(list, r.spec());
        }
        let reversed: Vec<&str> = before.iter().rev().copied().collect();
        for (list, head) in [(&reversed[..], true), (after, false)] {
            for line in list {
                let mut it = line.splitn(3, ' ');
                let (t, c, spec) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
                let t: &str = Table::from_name(t).unwrap().name();
                if !chains(t).contains(&c) {
                    user.entry(t).or_default().insert(c.to_string());
                }
                let v = rules.entry((t, c.to_string())).or_default();
                if head {
                    v.insert(0, spec.to_string());
                } else {
                    v.push(spec.to_string());
                }
            }
        }
        for (t, _) in rules.keys() {
            by_table.entry(t).or_default();
        }
        let mut text = String::new();
        for t in by_table.keys() {
            text.push_str(&format!("*{t}\n"));
            for c in chains(t) {
                text.push_str(&format!(":{c} ACCEPT [0:0]\n"));
            }
            for c in user.get(t).into_iter().flatten() {
                text.push_str(&format!(":{c} - [0:0]\n"));
            }
            for ((tt, c), specs) in &rules {
                if tt == t {
                    for s in specs {
                        text.push_str(&format!("-A {c} {s}\n"));
                    }
                }
            }
            text.push_str("COMMIT\n");
        }
        parse_save(&text).unwrap()
    }

    fn check(extra: &[&str], before: &[&str], after: &[&str]) -> Vec<Finding> {
        let w = wanted(extra);
        findings(PLACE, &save(&w, before, after), &w, &NoResolver)
    }

    #[test]
    fn our_own_rules_alone_decide_nothing() {
        for extra in [
            &[][..],
            &["-m", "TPROXY"],
            &["-c", "eth9", "-m", "TPROXY"],
            &["-k", "virt0"],
            &["--redirect-dns", "--capture-all-dns"][..],
            &["--drop-invalid"],
        ] {
            assert_eq!(check(extra, &[], &[]), [], "{extra:?}");
        }
    }

    #[test]
    fn a_foreign_return_before_our_output_jump() {
        let f = check(
            &[],
            &["nat OUTPUT -p tcp -m comment --comment \"not ours\" -j RETURN"],
            &[],
        );
        assert_eq!(
            f[0].rule,
            "-A OUTPUT -p tcp -m comment --comment \"not ours\" -j RETURN"
        );
        assert!(
            f[0].effect.starts_with("TCP leaves OUTPUT"),
            "a comment matches all: {f:?}"
        );
        let f = check(&[], &["nat OUTPUT -p tcp -j RETURN"], &[]);
        assert_eq!(
            f,
            [Finding {
                place: "IPv4 iptables-nft nat OUTPUT".into(),
                rule: "-A OUTPUT -p tcp -j RETURN".into(),
                effect: "TCP leaves OUTPUT before the jump to ISTIO_OUTPUT: outbound TCP is not \
                         captured"
                    .into(),
            }]
        );
        // Inbound: the same in PREROUTING.
        let f = check(&[], &["nat PREROUTING -j RETURN"], &[]);
        assert_eq!(
            f[0].effect,
            "TCP leaves PREROUTING before the jump to ISTIO_INBOUND: inbound TCP is not captured"
        );
    }

    #[test]
    fn after_our_jump_nothing_is_taken() {
        assert_eq!(
            check(
                &[],
                &[],
                &["nat OUTPUT -p tcp -j ACCEPT", "nat PREROUTING -j DROP"]
            ),
            []
        );
    }

    #[test]
    fn specific_and_negated_matches_decide_for_some_packets() {
        let f = check(
            &[],
            &[
                "nat OUTPUT -d 10.0.0.0/8 -j RETURN",
                "nat OUTPUT -p tcp -m tcp ! --dport 80 -j ACCEPT",
                "nat OUTPUT -p icmp -j RETURN",
                "nat OUTPUT ! -p tcp -j RETURN",
            ],
            &[],
        );
        let effects: Vec<&str> = f.iter().map(|f| f.effect.as_str()).collect();
        assert_eq!(
            effects,
            [
                "for packets matching `-d 10.0.0.0/8`, TCP leaves OUTPUT before the jump to \
                 ISTIO_OUTPUT: outbound TCP is not captured",
                "for packets matching `! --dport 80`, TCP is accepted in OUTPUT before the jump \
                 to ISTIO_OUTPUT: outbound TCP is not captured",
            ]
        );
        assert_eq!(f[1].rule, "-A OUTPUT -p tcp -m tcp ! --dport 80 -j ACCEPT");
    }

    #[test]
    fn udp_counts_only_when_dns_is_captured() {
        let rule = &["nat OUTPUT -p udp -j RETURN"][..];
        assert_eq!(check(&[], rule, &[]), []);
        let f = check(&["--redirect-dns", "--capture-all-dns"][..], rule, &[]);
        assert_eq!(
            f[0].effect,
            "DNS over UDP leaves OUTPUT before the jump to ISTIO_OUTPUT: DNS is not captured"
        );
        // Another UDP port: not DNS.
        let other = &["nat OUTPUT -p udp --dport 123 -j RETURN"][..];
        assert_eq!(
            check(&["--redirect-dns", "--capture-all-dns"][..], other, &[]),
            []
        );
        // All protocols: both.
        let f = check(
            &["--redirect-dns", "--capture-all-dns"][..],
            &["nat OUTPUT -j ACCEPT"],
            &[],
        );
        assert!(
            f[0].effect
                .ends_with("outbound TCP is not captured, and neither is DNS"),
            "{f:?}"
        );
    }

    #[test]
    fn nat_never_sees_established_packets() {
        let f = check(
            &[],
            &["nat OUTPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"],
            &[],
        );
        assert_eq!(
            f.len(),
            1,
            "RELATED connections' first packets do go through nat"
        );
        assert_eq!(
            check(
                &[],
                &["nat OUTPUT -m state --state ESTABLISHED -j ACCEPT"],
                &[]
            ),
            []
        );
    }

    #[test]
    fn tproxy_mangle_accept_and_marks() {
        let tproxy = &["-m", "TPROXY"][..];
        let f = check(tproxy, &["mangle PREROUTING -p tcp -j ACCEPT"], &[]);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].place, "IPv4 iptables-nft mangle PREROUTING");
        assert_eq!(
            f[0].effect,
            "TCP is accepted in PREROUTING before the jump to ISTIO_INBOUND: inbound TCP is not \
             captured"
        );
        let f = check(tproxy, &["mangle OUTPUT -j ACCEPT"], &[]);
        assert_eq!(f.len(), 1);
        assert!(f[0].effect.contains("before our `-j MARK`"), "{f:?}");
        // Without TPROXY, a mangle ACCEPT ends only mangle: nat still captures.
        assert_eq!(check(&[], &["mangle PREROUTING -p tcp -j ACCEPT"], &[]), []);
    }

    #[test]
    fn our_look_alike_rules_are_ours() {
        // `-c eth9` writes `-o eth9 -j RETURN` into nat OUTPUT (and the mark rules of TPROXY
        // into mangle): exactly those are not foreign.
        let f = check(&["-c", "eth9"], &[], &[]);
        assert_eq!(f, []);
        // Another interface's is.
        let f = check(&["-c", "eth9"], &["nat OUTPUT -o eth8 -j RETURN"], &[]);
        assert_eq!(f.len(), 1);
        assert!(
            f[0].effect
                .starts_with("for packets matching `-o eth8`, TCP leaves OUTPUT")
        );
    }

    #[test]
    fn raw_notrack_and_earlier_drops() {
        for rule in [
            "raw OUTPUT -p tcp -j CT --notrack",
            "raw OUTPUT -p tcp -j NOTRACK",
        ] {
            // Wherever it is in raw: CT is no verdict, the packet goes on untracked.
            let f = check(&["--redirect-dns", "--capture-all-dns"][..], &[], &[rule]);
            assert_eq!(f.len(), 1, "{rule}: {f:?}");
            assert_eq!(f[0].place, "IPv4 iptables-nft raw OUTPUT");
            assert_eq!(
                f[0].effect,
                "TCP is untracked in raw OUTPUT (priority -300), before nat OUTPUT, and untracked \
                 packets skip nat: outbound TCP is not captured"
            );
        }
        let f = check(&[], &["raw PREROUTING -j CT --notrack"], &[]);
        assert!(f[0].effect.ends_with(
            "before nat PREROUTING, and untracked packets skip nat: inbound TCP is not captured"
        ));
        // TPROXY's inbound does not go through nat: a notrack does not take it.
        assert_eq!(
            check(&["-m", "TPROXY"], &["raw PREROUTING -j CT --notrack"], &[]),
            []
        );
        // A CT zone is no notrack; an ACCEPT in raw ends only raw.
        assert_eq!(
            check(
                &[],
                &["raw OUTPUT -p tcp -j CT --zone 5", "raw OUTPUT -j ACCEPT"],
                &[]
            ),
            []
        );
        let f = check(&[], &["mangle OUTPUT -d 192.0.2.0/24 -j DROP"], &[]);
        assert!(f[0].effect.starts_with(
            "for packets matching `-d 192.0.2.0/24`, TCP is dropped in mangle OUTPUT (priority -150)"
        ));
    }

    #[test]
    fn jumps_to_foreign_chains_may_decide() {
        let f = check(
            &[],
            &[
                "nat OUTPUT -p tcp -j KUBE-QUIET",
                "nat OUTPUT -p tcp -j KUBE-LOUD",
                "nat KUBE-QUIET -j MARK --set-xmark 0x1/0x1",
                "nat KUBE-LOUD -d 10.96.0.1/32 -j DNAT --to-destination 10.0.0.1",
                "raw OUTPUT -j RAWCHAIN",
                "raw RAWCHAIN -p tcp -j CT --notrack",
            ],
            &[],
        );
        let rules: Vec<&str> = f.iter().map(|f| f.rule.as_str()).collect();
        assert_eq!(
            rules,
            ["-A OUTPUT -p tcp -j KUBE-LOUD", "-A OUTPUT -j RAWCHAIN"]
        );
        assert_eq!(
            f[0].effect,
            "TCP may be decided in chain KUBE-LOUD (a jump to it) before the jump to \
             ISTIO_OUTPUT: outbound TCP is not captured"
        );
        assert!(
            f[1].effect
                .starts_with("TCP may be decided in chain RAWCHAIN in raw OUTPUT")
        );
    }

    #[test]
    fn an_incompatible_table_is_named() {
        let w = wanted(&[]);
        let mut st = save(&w, &[], &[]);
        st.tables.remove("nat");
        st.incompatible.push("nat".into());
        let f = findings(PLACE, &st, &w, &NoResolver);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].place, "IPv4 iptables-nft nat");
        assert_eq!(f[0].rule, "# Table `nat' is incompatible, use 'nft' tool.");
        assert!(f[0].effect.ends_with("see `nft list table ip nat`"));

        let listing: BTreeMap<String, Vec<String>> = [(
            "OUTPUT".to_string(),
            vec![
                "oifname \"eth9\" counter packets 0 bytes 0 return".to_string(),
                "meta l4proto tcp ct state new log prefix \"x\" return".to_string(),
                "counter packets 0 bytes 0 jump ISTIO_OUTPUT".to_string(),
            ],
        )]
        .into();
        let w = wanted(&["-c", "eth9"]);
        let f = incompatible(PLACE, Table::Nat, &listing, &w);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].place, "IPv4 iptables-nft nat OUTPUT");
        assert_eq!(
            f[0].rule,
            "meta l4proto tcp ct state new log prefix \"x\" return"
        );
    }

    #[test]
    fn captures_for_other_nft_tables() {
        let c = captures(Family::V4, PLACE, &wanted(&[]));
        let names: Vec<&str> = c.iter().map(|c| c.ours.as_str()).collect();
        assert_eq!(
            names,
            [
                "IPv4 iptables-nft nat OUTPUT",
                "IPv4 iptables-nft nat PREROUTING"
            ]
        );
        assert_eq!(c[0].priority, -100);
        let c = captures(Family::V6, "IPv6 ip6tables-nft", &wanted(&["-m", "TPROXY"]));
        let kinds: Vec<Kind> = c.iter().map(|c| c.kind).collect();
        assert_eq!(kinds, [Kind::Nat, Kind::Tproxy, Kind::Marks]);
        assert_eq!(c[0].families, ["ip6", "inet"]);
        assert!(shown_by_save(
            &save(&wanted(&[]), &[], &[]),
            "nat",
            "OUTPUT"
        ));
    }
}
