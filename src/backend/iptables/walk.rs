//! A small interpreter of exactly the iptables subset this tool emits: protocol, addresses
//! and `!`, interfaces (with `+`), ports and multiport, owner uid/gid, conntrack state, mark
//! and connmark, jumps/RETURN, REDIRECT, TPROXY, MARK, CONNMARK, ACCEPT, DROP, CT; and, for
//! the foreign rules met in a live walk, `-m addrtype` (from the namespace's routing, see
//! [`Packet::dst_type`]). It walks one packet through the chains of the hooks it traverses
//! ([`IptablesChains`], walked by [`backend::walk::evaluate`](crate::backend::walk::evaluate)
//! with every other place's) and says where it ends up. Anything outside that subset (an
//! unknown match, target or option) stops the walk, never a guess; an unknown match in a
//! rule another of its matches already fails does not matter, as in the kernel. Pure: rules
//! in, verdict and walk out.

use std::collections::{BTreeMap, BTreeSet};

use crate::backend::iptables::commit::Place;
use crate::backend::iptables::save::SaveState;
use crate::backend::walk::{
    Base, Chains, Flow, Hook, Outcome, Packet, Proto, Source, Step, Stop, Unsupported, Verdict,
    Walk, addr_in, addr_type, evaluate as walk_all, id_range, iface_matches, num, port_in,
};
use crate::model::{Family, OwnerResolver, chain};
use crate::model::{Rule, RuleSpec, Table, Token};

/// The rules of one family: table → chain → rules in order, each as (text, tokens after
/// `-A CHAIN`).
pub type Ruleset = BTreeMap<Table, BTreeMap<String, Vec<(String, Vec<Token>)>>>;

/// The built-in chains of a hook, in the kernel's order: (table, chain, priority). The same
/// for legacy xtables and iptables-nft (`NF_IP_PRI_*`).
fn builtins(hook: Hook) -> &'static [(Table, &'static str, i32)] {
    match hook {
        Hook::Output => &[
            (Table::Raw, "OUTPUT", -300),
            (Table::Mangle, "OUTPUT", -150),
            (Table::Nat, "OUTPUT", -100),
            (Table::Filter, "OUTPUT", 0),
        ],
        Hook::Prerouting => &[
            (Table::Raw, "PREROUTING", -300),
            (Table::Mangle, "PREROUTING", -150),
            (Table::Nat, "PREROUTING", -100),
        ],
    }
}

/// One family's iptables rules (the config's, or one flavour's live ones) as the kernel
/// runs them.
pub struct IptablesChains<'a> {
    pub rules: Ruleset,
    /// Built-in chains whose policy is DROP.
    pub drop_policy: BTreeSet<(Table, String)>,
    pub resolver: &'a dyn OwnerResolver,
}

impl Chains for IptablesChains<'_> {
    fn bases(&self, hook: Hook) -> Vec<Base> {
        builtins(hook)
            .iter()
            .filter(|(t, c, _)| {
                self.rules.get(t).is_some_and(|t| t.contains_key(*c))
                    || self.drop_policy.contains(&(*t, c.to_string()))
            })
            .map(|&(table, chain, priority)| Base {
                priority,
                nat: table == Table::Nat,
                policy_drop: self.drop_policy.contains(&(table, chain.to_string())),
                table: table.name(),
                chain: chain.to_string(),
            })
            .collect()
    }

    fn run(&self, base: &Base, walk: &mut Walk) -> Result<Flow, Unsupported> {
        let table = Table::from_name(base.table).expect("a base chain of ours names its table");
        self.chain(walk, table, &base.chain, 0)
    }
}

/// `V[/M]` → (value, mask).
fn mark_mask(s: &str) -> Option<(u32, u32)> {
    match s.split_once('/') {
        Some((v, m)) => Some((num(v)?, num(m)?)),
        None => Some((num(s)?, u32::MAX)),
    }
}

/// The options that are not some module's: a rule's matches start with one of them or `-m`.
const TOP_LEVEL: [&str; 12] = [
    "-p",
    "--protocol",
    "-s",
    "--source",
    "-d",
    "--destination",
    "-i",
    "--in-interface",
    "-o",
    "--out-interface",
    "-m",
    "--match",
];

/// A rule's target with its options, when it has one.
type Target = Option<(Token, Vec<Token>)>;

impl IptablesChains<'_> {
    fn chain(
        &self,
        w: &mut Walk,
        table: Table,
        chain: &str,
        depth: usize,
    ) -> Result<Flow, Unsupported> {
        let Some(rules) = self.rules.get(&table).and_then(|t| t.get(chain)) else {
            return Ok(Flow::Continue);
        };
        for (i, (text, toks)) in rules.iter().enumerate() {
            let err = |reason: String| Unsupported {
                table: table.name(),
                chain: chain.into(),
                rule: i + 1,
                text: text.clone(),
                reason,
            };
            let (matched, target) = self.eval(&w.pkt, toks).map_err(err)?;
            w.steps.push(Step {
                table: table.name(),
                chain: chain.into(),
                rule: i + 1,
                text: text.clone(),
                matched,
                place: None,
            });
            if !matched {
                continue;
            }
            let Some((target, opts)) = target else {
                continue;
            };
            let opt = |name: &str| -> Option<&str> {
                opts.iter()
                    .position(|o| o == name)
                    .and_then(|p| opts.get(p + 1))
                    .map(|v| &**v)
            };
            match &*target {
                "RETURN" => return Ok(Flow::Continue),
                "ACCEPT" => return Ok(Flow::Accept),
                "DROP" => return Ok(Flow::Final(Verdict::Drop)),
                "REDIRECT" => {
                    let p = opt("--to-ports")
                        .or_else(|| opt("--to-port"))
                        .map(|p| p.split(['-', ':']).next().unwrap_or(p));
                    let port = match p {
                        Some(p) => p
                            .parse()
                            .map_err(|_| err(format!("bad REDIRECT port {p:?}")))?,
                        None => w.pkt.dport,
                    };
                    return Ok(Flow::Final(Verdict::Redirect { port }));
                }
                "TPROXY" => {
                    let port = opt("--on-port")
                        .and_then(|p| p.parse().ok())
                        .ok_or_else(|| err("TPROXY without --on-port".into()))?;
                    if let Some((v, m)) = opt("--tproxy-mark").and_then(mark_mask) {
                        w.pkt.mark = (w.pkt.mark & !m) ^ v;
                    }
                    // The socket is assigned and the packet accepted (xt_TPROXY's NF_ACCEPT):
                    // the next base chains still run.
                    w.tproxy = Some(port);
                    return Ok(Flow::Accept);
                }
                "MARK" => {
                    let (v, m) = if let Some(s) = opt("--set-xmark") {
                        mark_mask(s)
                    } else if let Some(s) = opt("--set-mark") {
                        mark_mask(s)
                    } else {
                        None
                    }
                    .ok_or_else(|| err("unsupported MARK options".into()))?;
                    w.pkt.mark = (w.pkt.mark & !m) ^ v;
                }
                "CONNMARK" => {
                    if opts.iter().any(|o| o == "--save-mark") {
                        w.pkt.connmark = w.pkt.mark;
                    } else if opts.iter().any(|o| o == "--restore-mark") {
                        w.pkt.mark = w.pkt.connmark;
                    } else {
                        return Err(err("unsupported CONNMARK options".into()));
                    }
                }
                "CT" => {
                    let z = opt("--zone")
                        .and_then(|z| z.parse().ok())
                        .ok_or_else(|| err("CT without --zone".into()))?;
                    // xt_CT attaches a conntrack template once; later CT rules are ignored.
                    w.zone.get_or_insert(z);
                }
                user => {
                    if depth > 16 {
                        return Err(err("jumps nested too deep".into()));
                    }
                    if !self.rules.get(&table).is_some_and(|t| t.contains_key(user))
                        && !user.starts_with(chain::PREFIX)
                    {
                        return Err(err(format!("unknown target {user:?}")));
                    }
                    match self.chain(w, table, user, depth + 1)? {
                        Flow::Continue => {}
                        other => return Ok(other),
                    }
                }
            }
        }
        Ok(Flow::Continue)
    }

    /// Whether the rule's matches hold for `p`, and its target with options. A match this
    /// does not know is an error unless another match of the rule fails.
    fn eval(&self, p: &Packet, toks: &[Token]) -> Result<(bool, Target), String> {
        let spec = RuleSpec::parse(toks);
        let mut ok = true;
        let mut module = String::new();
        // The first match not understood; its options are skipped to the next match.
        let mut unknown: Option<String> = None;
        let mut skipping = false;
        for m in &spec.matches {
            let neg = m.negated;
            let tok: &str = &m.flag;
            if tok.is_empty() {
                return Err("dangling `!`".into());
            }
            if skipping && !TOP_LEVEL.contains(&tok) {
                continue;
            }
            skipping = false;
            let val = m.value();
            let cond: Option<bool> = match tok {
                "-p" | "--protocol" => Some(match val {
                    "all" | "0" => true,
                    "tcp" | "6" => p.proto == Proto::Tcp,
                    "udp" | "17" => p.proto == Proto::Udp,
                    _ => false,
                }),
                "-s" | "--source" => {
                    Some(addr_in(val, p.src).ok_or(format!("bad address {val:?}"))?)
                }
                "-d" | "--destination" => {
                    Some(addr_in(val, p.dst).ok_or(format!("bad address {val:?}"))?)
                }
                "-i" | "--in-interface" => Some(iface_matches(val, p.in_iface.as_deref(), '+')),
                "-o" | "--out-interface" => Some(iface_matches(val, p.out_iface.as_deref(), '+')),
                "-m" | "--match" => {
                    match val {
                        "tcp" | "udp" | "multiport" | "owner" | "conntrack" | "mark"
                        | "connmark" | "comment" | "addrtype" => {}
                        other => {
                            unknown.get_or_insert_with(|| format!("unknown match {other:?}"));
                            skipping = true;
                        }
                    }
                    module = val.to_string();
                    continue;
                }
                "--dport" | "--destination-port" => {
                    Some(port_in(val, p.dport, ':').ok_or(format!("bad port {val:?}"))?)
                }
                "--sport" | "--source-port" => {
                    Some(port_in(val, p.sport, ':').ok_or(format!("bad port {val:?}"))?)
                }
                "--dports" | "--destination-ports" if module == "multiport" => {
                    Some(port_in(val, p.dport, ':').ok_or(format!("bad ports {val:?}"))?)
                }
                "--sports" | "--source-ports" if module == "multiport" => {
                    Some(port_in(val, p.sport, ':').ok_or(format!("bad ports {val:?}"))?)
                }
                "--ports" if module == "multiport" => Some(
                    port_in(val, p.dport, ':').ok_or(format!("bad ports {val:?}"))?
                        || port_in(val, p.sport, ':').unwrap_or(false),
                ),
                "--uid-owner" | "--gid-owner" if module == "owner" => {
                    let (who, (lo, hi)) = if tok == "--uid-owner" {
                        (p.uid, id_range(val, |n| self.resolver.uid(n))?)
                    } else {
                        (p.gid, id_range(val, |n| self.resolver.gid(n))?)
                    };
                    // No local socket (inbound): xt_owner matches only when negated.
                    Some(who.is_some_and(|id| lo <= id && id <= hi))
                }
                "--ctstate" if module == "conntrack" => {
                    Some(val.split(',').any(|s| s == p.ctstate))
                }
                "--mark" if module == "mark" || module == "connmark" => {
                    let (v, m) = mark_mask(val).ok_or(format!("bad mark {val:?}"))?;
                    let have = if module == "mark" { p.mark } else { p.connmark };
                    Some(have & m == v)
                }
                "--src-type" | "--dst-type" if module == "addrtype" => {
                    let mut want = 0;
                    for t in val.split(',') {
                        want |= addr_type(t).ok_or(format!("unknown address type {t:?}"))?;
                    }
                    let have = if tok == "--src-type" {
                        p.src_type
                    } else {
                        p.dst_type
                    };
                    let have = have.ok_or(
                        "-m addrtype needs the namespace's addresses and routes \
                         (explain --from-kernel reads them)",
                    )?;
                    Some(have.matches(want))
                }
                "--comment" if module == "comment" => None,
                other => return Err(format!("unknown option {other:?}")),
            };
            if let Some(c) = cond {
                ok &= c != neg;
            }
            // Each option this walker knows takes one value; a second is a word it does not.
            if let Some(extra) = m.values.get(1) {
                return Err(format!("unknown option {extra:?}"));
            }
        }
        if ok && let Some(reason) = unknown {
            return Err(reason);
        }
        match spec.target {
            Some(t) if t.goto => Err("goto is not supported".into()),
            Some(t) => {
                let name = t.name.ok_or("`-j` without a target")?;
                Ok((ok, Some((name, t.options))))
            }
            None => Ok((ok, None)),
        }
    }
}

/// Walks `pkt` through `hooks` and `rules` alone (one family's rules, in one place).
pub fn evaluate(
    rules: &Ruleset,
    resolver: &dyn OwnerResolver,
    pkt: Packet,
    hooks: &[Hook],
) -> Result<Outcome, Unsupported> {
    let source = Source {
        name: "iptables".into(),
        capture: true,
        note: None,
        chains: Box::new(IptablesChains {
            rules: rules.clone(),
            drop_policy: BTreeSet::new(),
            resolver,
        }),
    };
    let o = walk_all(&[source], pkt, hooks);
    match o.stopped {
        Some(Stop::Rule { rule, .. }) => Err(rule),
        _ => Ok(o),
    }
}

/// The config's rules of one family as chains in their final order.
pub fn ruleset_from_rules(rules: &[Rule]) -> Ruleset {
    let mut rs = Ruleset::new();
    for r in rules {
        let chain = rs
            .entry(r.table)
            .or_default()
            .entry(r.chain.to_string())
            .or_default();
        let item = (format!("-A {} {}", r.chain, r.spec()), r.args.clone());
        r.position.place(chain, item);
    }
    rs
}

/// Live rules as chains.
pub fn ruleset_from_state(st: &SaveState) -> Ruleset {
    let mut rs = Ruleset::new();
    // Only our tables: a hook walks nothing else.
    let ours = st
        .tables
        .iter()
        .filter_map(|(n, ts)| Some((Table::from_name(n)?, ts)));
    for (table, ts) in ours {
        // An empty chain is still a target (Docker's DOCKER before any container).
        for chain in &ts.user_chains {
            rs.entry(table)
                .or_default()
                .entry(chain.clone())
                .or_default();
        }
        for (chain, toks) in &ts.rules {
            rs.entry(table)
                .or_default()
                .entry(chain.clone())
                .or_default()
                .push((format!("-A {chain} {}", toks.join(" ")), toks.clone()));
        }
    }
    rs
}

/// The config's rules of `family`, to walk.
pub fn config_source<'a>(
    rules: &[Rule],
    family: Family,
    ipv6: bool,
    resolver: &'a dyn OwnerResolver,
) -> Source<'a> {
    Source {
        name: "rules from the config".into(),
        capture: true,
        note: (family == Family::V6 && !ipv6)
            .then_some("IPv6 is off for this config: no ip6tables rules are generated"),
        chains: Box::new(IptablesChains {
            rules: ruleset_from_rules(rules),
            drop_policy: BTreeSet::new(),
            resolver,
        }),
    }
}

/// The live rules of one flavour of one family (`iptables-nft, IPv4`), to walk; `None` when
/// it holds no rule and no DROP policy (nothing a packet would meet).
pub fn live_source<'a>(place: &Place, resolver: &'a dyn OwnerResolver) -> Option<Source<'a>> {
    let st = &place.before;
    let rules = ruleset_from_state(st);
    let drop_policy: BTreeSet<(Table, String)> = st
        .tables
        .iter()
        .filter_map(|(n, ts)| Some((Table::from_name(n)?, ts)))
        .flat_map(|(t, ts)| {
            ts.builtin
                .iter()
                .filter(|(_, policy)| policy == "DROP")
                .map(move |(c, _)| (t, c.clone()))
        })
        .collect();
    let ours = |s: &str| s.starts_with(chain::PREFIX);
    let capture = st.tables.values().any(|ts| {
        ts.user_chains.iter().any(|c| ours(c))
            || ts
                .rules
                .iter()
                .any(|(c, toks)| ours(c) || toks.iter().any(|t| ours(t)))
    });
    if rules.is_empty() && drop_policy.is_empty() && !capture {
        return None;
    }
    let program = &place.program;
    let flavour = match program.flavor {
        Some(f) => format!("iptables-{f}"),
        None => "iptables".to_string(),
    };
    Some(Source {
        name: format!("{flavour}, {}", program.family),
        capture,
        note: None,
        chains: Box::new(IptablesChains {
            rules,
            drop_policy,
            resolver,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::iptables::save::tokenize;
    use crate::backend::walk::AddrTypes;
    use crate::model::NoResolver;

    fn ruleset(lines: &[(&str, &str)]) -> Ruleset {
        let mut rs = Ruleset::new();
        for (table, line) in lines {
            let toks = tokenize(line);
            rs.entry(Table::from_name(table).expect("a table name"))
                .or_default()
                .entry(toks[1].to_string())
                .or_default()
                .push((line.to_string(), toks[2..].to_vec()));
        }
        rs
    }

    fn pkt(dst: &str, dport: u16, uid: u32, out: &str) -> Packet {
        Packet {
            proto: Proto::Tcp,
            src: "10.0.0.5".parse().unwrap(),
            sport: 40000,
            dst: dst.parse().unwrap(),
            dport,
            uid: Some(uid),
            gid: Some(uid),
            in_iface: None,
            out_iface: Some(out.into()),
            mark: 0,
            connmark: 0,
            ctstate: "NEW".into(),
            src_type: None,
            dst_type: None,
        }
    }

    fn seed() -> Ruleset {
        ruleset(&[
            (
                "nat",
                "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            ),
            (
                "nat",
                "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            ),
            ("nat", "-A OUTPUT -j ISTIO_OUTPUT"),
            ("nat", "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN"),
            (
                "nat",
                "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
            ),
            (
                "nat",
                "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
            ),
            ("nat", "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN"),
            ("nat", "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN"),
            (
                "nat",
                "-A ISTIO_OUTPUT -p tcp -m multiport --dports 3306,5000:5010 -j RETURN",
            ),
            ("nat", "-A ISTIO_OUTPUT -j ISTIO_REDIRECT"),
        ])
    }

    #[test]
    fn outbound_from_app_is_redirected_to_15001() {
        let o = evaluate(
            &seed(),
            &NoResolver,
            pkt("10.1.2.3", 80, 0, "eth0"),
            &[Hook::Output],
        )
        .unwrap();
        assert_eq!(o.verdict, Verdict::Redirect { port: 15001 });
        assert!(
            o.walk
                .iter()
                .any(|s| s.chain == "ISTIO_REDIRECT" && s.matched)
        );
    }

    #[test]
    fn proxy_traffic_and_excluded_ports_are_not_captured() {
        let o = evaluate(
            &seed(),
            &NoResolver,
            pkt("10.1.2.3", 80, 1337, "eth0"),
            &[Hook::Output],
        )
        .unwrap();
        assert_eq!(o.verdict, Verdict::NotCaptured);
        let o = evaluate(
            &seed(),
            &NoResolver,
            pkt("10.1.2.3", 5005, 0, "eth0"),
            &[Hook::Output],
        )
        .unwrap();
        assert_eq!(o.verdict, Verdict::NotCaptured);
    }

    #[test]
    fn proxy_to_own_pod_ip_goes_inbound() {
        let o = evaluate(
            &seed(),
            &NoResolver,
            pkt("10.0.0.5", 8080, 1337, "lo"),
            &[Hook::Output],
        )
        .unwrap();
        assert_eq!(o.verdict, Verdict::Redirect { port: 15006 });
        let mut p = pkt("10.0.0.5", 8080, 1337, "lo");
        p.src = "127.0.0.6".parse().unwrap();
        assert_eq!(
            evaluate(&seed(), &NoResolver, p, &[Hook::Output])
                .unwrap()
                .verdict,
            Verdict::NotCaptured
        );
    }

    #[test]
    fn tproxy_marks_and_kernel_syntax_is_understood() {
        let rs = ruleset(&[
            ("mangle", "-A PREROUTING -p tcp -j ISTIO_INBOUND"),
            (
                "mangle",
                "-A ISTIO_INBOUND -p tcp -m mark --mark 0x539 -j RETURN",
            ),
            (
                "mangle",
                "-A ISTIO_INBOUND -p tcp -m tcp --dport 8080 -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT",
            ),
            (
                "mangle",
                "-A ISTIO_INBOUND -p tcp -m tcp --dport 8080 -j ISTIO_TPROXY",
            ),
            (
                "mangle",
                "-A ISTIO_DIVERT -j MARK --set-xmark 0x539/0xffffffff",
            ),
            ("mangle", "-A ISTIO_DIVERT -j ACCEPT"),
            (
                "mangle",
                "-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff",
            ),
        ]);
        let mut p = pkt("10.0.0.5", 8080, 0, "eth0");
        p.uid = None;
        p.gid = None;
        p.out_iface = None;
        p.in_iface = Some("eth0".into());
        let o = evaluate(&rs, &NoResolver, p.clone(), &[Hook::Prerouting]).unwrap();
        assert_eq!(
            o.verdict,
            Verdict::Tproxy {
                port: 15006,
                mark: 1337
            }
        );
        p.ctstate = "ESTABLISHED".into();
        let o = evaluate(&rs, &NoResolver, p, &[Hook::Prerouting]).unwrap();
        assert_eq!(o.verdict, Verdict::NotCaptured);
        assert_eq!(o.mark, 1337);
    }

    #[test]
    fn dns_zone_and_udp_redirect() {
        let rs = ruleset(&[
            ("raw", "-A OUTPUT -j ISTIO_OUTPUT_DNS"),
            (
                "raw",
                "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.10/32 -j CT --zone 2",
            ),
            ("nat", "-A OUTPUT -j ISTIO_OUTPUT_DNS"),
            (
                "nat",
                "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.10/32 -j REDIRECT --to-port 15053",
            ),
        ]);
        let mut p = pkt("10.96.0.10", 53, 0, "eth0");
        p.proto = Proto::Udp;
        let o = evaluate(&rs, &NoResolver, p, &[Hook::Output]).unwrap();
        assert_eq!(o.verdict, Verdict::Redirect { port: 15053 });
        assert_eq!(o.zone, Some(2));
    }

    #[test]
    fn unknown_matches_are_reported_not_guessed() {
        let rs = ruleset(&[(
            "nat",
            "-A OUTPUT -m statistic --mode random --probability 0.5 -j DROP",
        )]);
        let e = evaluate(
            &rs,
            &NoResolver,
            pkt("10.1.2.3", 80, 0, "eth0"),
            &[Hook::Output],
        )
        .unwrap_err();
        assert!(e.reason.contains("statistic"), "{e}");
        let rs = ruleset(&[("nat", "-A OUTPUT -j LOG")]);
        assert!(
            evaluate(
                &rs,
                &NoResolver,
                pkt("10.1.2.3", 80, 0, "eth0"),
                &[Hook::Output]
            )
            .is_err()
        );
    }

    #[test]
    fn negated_owner_without_socket_matches() {
        let rs = ruleset(&[("nat", "-A PREROUTING -m owner ! --uid-owner 1 -j DROP")]);
        let mut p = pkt("10.0.0.5", 80, 0, "eth0");
        p.uid = None;
        assert_eq!(
            evaluate(&rs, &NoResolver, p, &[Hook::Prerouting])
                .unwrap()
                .verdict,
            Verdict::Drop
        );
    }

    /// Docker's rule: LOCAL destinations go to its chain (here: dropped, to see it), as the
    /// namespace's routing says; without that, the walk cannot tell.
    #[test]
    fn addrtype_is_evaluated_from_the_packets_address_types() {
        let rs = ruleset(&[
            (
                "nat",
                "-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DROP",
            ),
            (
                "nat",
                "-A OUTPUT -m addrtype ! --src-type LOCAL,BROADCAST -j DROP",
            ),
        ]);
        let local = AddrTypes {
            v6: false,
            mask: 1 << 2,
        };
        let unicast = AddrTypes {
            v6: false,
            mask: 1 << 1,
        };
        let mut p = pkt("10.0.0.5", 8080, 0, "lo");
        p.src_type = Some(local);
        p.dst_type = Some(local);
        let o = evaluate(&rs, &NoResolver, p.clone(), &[Hook::Output]).unwrap();
        assert_eq!(o.verdict, Verdict::Drop);
        p.dst_type = Some(unicast);
        let o = evaluate(&rs, &NoResolver, p.clone(), &[Hook::Output]).unwrap();
        assert_eq!(o.verdict, Verdict::NotCaptured, "{o:#?}");
        p.src_type = Some(unicast);
        let o = evaluate(&rs, &NoResolver, p.clone(), &[Hook::Output]).unwrap();
        assert_eq!(o.verdict, Verdict::Drop);
        p.dst_type = None;
        let e = evaluate(&rs, &NoResolver, p, &[Hook::Output]).unwrap_err();
        assert!(e.reason.contains("--from-kernel"), "{e}");
    }

    /// IPv6: a local unicast address is both UNICAST and LOCAL.
    #[test]
    fn ipv6_address_types_are_a_class_and_a_route() {
        let local_unicast = AddrTypes {
            v6: true,
            mask: (1 << 1) | (1 << 2),
        };
        let bit = |n: &str| addr_type(n).unwrap();
        assert!(local_unicast.matches(bit("LOCAL")));
        assert!(local_unicast.matches(bit("UNICAST")));
        assert!(local_unicast.matches(bit("UNICAST") | bit("LOCAL")));
        assert!(!local_unicast.matches(bit("MULTICAST") | bit("LOCAL")));
        let remote = AddrTypes {
            v6: true,
            mask: 1 << 1,
        };
        assert!(!remote.matches(bit("LOCAL")));
        assert!(remote.matches(bit("UNICAST")));
    }

    /// kube-proxy's random pick cannot be evaluated, but a rule whose protocol already fails
    /// does not match whatever its other matches say.
    #[test]
    fn an_unknown_match_matters_only_when_the_rest_of_the_rule_holds() {
        let rs = ruleset(&[
            (
                "nat",
                "-A OUTPUT -p udp -m statistic --mode random --probability 0.5 -m comment --comment x -j DROP",
            ),
            (
                "nat",
                "-A OUTPUT -p tcp -m statistic --mode random --probability 0.5 -j DROP",
            ),
        ]);
        let e = evaluate(
            &rs,
            &NoResolver,
            pkt("10.1.2.3", 80, 0, "eth0"),
            &[Hook::Output],
        )
        .unwrap_err();
        assert_eq!(e.rule, 2, "{e}");
        assert!(e.reason.contains("statistic"), "{e}");
        let o = walk_all(
            &[Source {
                name: "iptables-nft, IPv4".into(),
                capture: false,
                note: None,
                chains: Box::new(IptablesChains {
                    rules: rs,
                    drop_policy: BTreeSet::new(),
                    resolver: &NoResolver,
                }),
            }],
            pkt("10.1.2.3", 80, 0, "eth0"),
            &[Hook::Output],
        );
        assert_eq!(o.verdict, Verdict::Unknown);
        assert_eq!(
            o.walk.len(),
            1,
            "the rule before the one that stops the walk"
        );
        assert!(matches!(o.stopped, Some(Stop::Rule { place: None, .. })));
    }

    /// A DROP policy drops what falls off a built-in chain.
    #[test]
    fn a_drop_policy_drops() {
        let src = |drop: bool| Source {
            name: "iptables-legacy, IPv4".into(),
            capture: false,
            note: None,
            chains: Box::new(IptablesChains {
                rules: ruleset(&[("filter", "-A OUTPUT -p udp -j ACCEPT")]),
                drop_policy: if drop {
                    [(Table::Filter, "OUTPUT".to_string())].into()
                } else {
                    BTreeSet::new()
                },
                resolver: &NoResolver,
            }),
        };
        let p = pkt("10.1.2.3", 80, 0, "eth0");
        let o = walk_all(&[src(true)], p.clone(), &[Hook::Output]);
        assert_eq!(o.verdict, Verdict::Drop);
        let o = walk_all(&[src(false)], p, &[Hook::Output]);
        assert_eq!(o.verdict, Verdict::NotCaptured);
    }

    /// Two places at equal priority: when their order changes the verdict, the walk says
    /// it cannot tell; when it does not, it gives the verdict.
    #[test]
    fn equal_priorities_in_two_places_that_disagree_are_unknown() {
        let src = |name: &str, port: u16| {
            let line = format!("-A OUTPUT -p tcp -j REDIRECT --to-ports {port}");
            Source {
                name: name.into(),
                capture: true,
                note: None,
                chains: Box::new(IptablesChains {
                    rules: ruleset(&[("nat", &line)]),
                    drop_policy: BTreeSet::new(),
                    resolver: &NoResolver,
                }),
            }
        };
        let p = pkt("10.1.2.3", 80, 0, "eth0");
        let same = [
            src("iptables-legacy, IPv4", 15001),
            src("iptables-nft, IPv4", 15001),
        ];
        let o = walk_all(&same, p.clone(), &[Hook::Output]);
        assert_eq!(o.verdict, Verdict::Redirect { port: 15001 });
        assert_eq!(o.walk.len(), 1, "the first place decides: {o:#?}");
        assert_eq!(o.walk[0].place.as_deref(), Some("iptables-legacy, IPv4"));
        let differ = [
            src("iptables-legacy, IPv4", 15001),
            src("iptables-nft, IPv4", 15002),
        ];
        let o = walk_all(&differ, p, &[Hook::Output]);
        assert_eq!(o.verdict, Verdict::Unknown);
        let Some(Stop::Order(why)) = &o.stopped else {
            panic!("{o:#?}")
        };
        assert!(
            why.contains("redirect to 15001") && why.contains("redirect to 15002"),
            "{why}"
        );
    }
}
