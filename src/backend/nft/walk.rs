//! The nftables counterpart of [`interp`](crate::backend::iptables::walk): walks one packet through our
//! three `inet` tables as the kernel does, and says where it ends up. It reads the canonical
//! rule text of [`NftState`] (the config's rules through [`nftstate::desired`], or the live
//! ones through [`nftstate::parse_listing`]), and understands exactly what the nft builder
//! writes: `iifname`/`oifname` (with a trailing `*`), `ip`/`ip6` `saddr`/`daddr`,
//! `tcp`/`udp` `dport`/`sport` (sets `{a,b}`, ranges `a-b`), `l4proto`, `skuid`/`skgid`,
//! `mark`, `ct mark`, `ct state` (each with `!=`); `counter`, `accept`, `drop`, `return`,
//! `jump`, `goto`, `redirect to :P`, `tproxy ip|ip6 to :P`, `mark set`, `ct mark set mark`,
//! `mark set ct mark`, `ct zone set`. Anything else is an error, never a guess.
//!
//! The kernel's order: at each hook, every base chain of our tables in priority order (raw
//! -300, mangle -150, nat -100); `accept` ends one base chain, the next still runs; `drop`
//! and a nat statement end the packet's walk. nat chains see only a connection's first
//! packet, at its first hook. An expression of another family or protocol (`ip daddr` for
//! an IPv6 packet, `tcp dport` for UDP) does not match, negated or not; nor does one on
//! what the packet lacks (`skuid` without a local socket, `oifname` before routing).
//!
//! [`nftstate::desired`]: crate::backend::nft::state::desired
//! [`nftstate::parse_listing`]: crate::backend::nft::state::parse_listing

use std::borrow::Cow;

use crate::backend::nft::build::{FAMILY, Table};
use crate::backend::nft::state::NftState;
use crate::backend::walk::{
    Base, Chains, Flow, Hook, Outcome, Packet, Proto, Source, Step, Stop, Unsupported, Verdict,
    Walk, addr_in, evaluate as walk_all, id_range, iface_matches, num, port_in,
};
use crate::model::OwnerResolver;

/// What a match compares.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Test {
    /// `iifname` (`inbound`) or `oifname`.
    Iface { inbound: bool, names: Vec<String> },
    /// `ip`/`ip6` `saddr`/`daddr`.
    Addr {
        v6: bool,
        src: bool,
        nets: Vec<String>,
    },
    /// `tcp`/`udp` `sport`/`dport`: ports and `a-b` ranges.
    Port {
        proto: Proto,
        src: bool,
        ports: String,
    },
    /// `l4proto`: protocol names or numbers.
    L4proto(Vec<String>),
    /// `nfproto ipv4|ipv6`.
    Nfproto(Vec<String>),
    /// `skuid`/`skgid`: ids or names, or `a-b` ranges.
    Owner { gid: bool, ids: Vec<String> },
    /// `mark` or `ct mark`.
    Mark { ct: bool, values: Vec<String> },
    /// `ct state`.
    CtState(Vec<String>),
}

/// One part of a rule, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Match {
        test: Test,
        negated: bool,
    },
    Counter,
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
    /// `redirect [to :P]`.
    Redirect(Option<u16>),
    /// `tproxy ip|ip6 to :P`: `Some(true)` for ip6.
    Tproxy {
        v6: Option<bool>,
        port: u16,
    },
    SetMark(u32),
    /// `mark set ct mark`.
    MarkFromCt,
    /// `ct mark set mark`.
    CtMarkFromMark,
    SetCtMark(u32),
    CtZone(u16),
}

/// The elements of a value word: a `{a,b}` set's elements, or the word itself.
fn elements(w: &str) -> Vec<String> {
    match w.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
        Some(inner) => inner
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect(),
        None => vec![w.to_string()],
    }
}

/// A match's selector: how many words it takes, and the test of its value's elements.
type Selector = (usize, fn(&[String]) -> Test);

/// Reads a canonical rule into its parts.
fn parse(rule: &str) -> Result<Vec<Item>, String> {
    let w: Vec<&str> = rule.split_whitespace().collect();
    let mut items = Vec::new();
    let mut i = 0;
    let word = |i: usize| -> Result<&str, String> {
        w.get(i)
            .copied()
            .ok_or_else(|| format!("the rule ends after {:?}", w[i - 1]))
    };
    let number = |s: &str| -> Result<u32, String> { num(s).ok_or(format!("bad number {s:?}")) };
    let to_port = |s: &str| -> Result<u16, String> {
        s.strip_prefix(':')
            .unwrap_or(s)
            .parse()
            .map_err(|_| format!("bad port {s:?}"))
    };
    while i < w.len() {
        // A match: selector words, then `!=`/`==` maybe, then the value.
        let selector: Option<Selector> = match (w[i], w.get(i + 1).copied()) {
            ("iifname", _) => Some((1, |v| Test::Iface {
                inbound: true,
                names: v.to_vec(),
            })),
            ("oifname", _) => Some((1, |v| Test::Iface {
                inbound: false,
                names: v.to_vec(),
            })),
            ("ip", Some("saddr")) => Some((2, |v| Test::Addr {
                v6: false,
                src: true,
                nets: v.to_vec(),
            })),
            ("ip", Some("daddr")) => Some((2, |v| Test::Addr {
                v6: false,
                src: false,
                nets: v.to_vec(),
            })),
            ("ip6", Some("saddr")) => Some((2, |v| Test::Addr {
                v6: true,
                src: true,
                nets: v.to_vec(),
            })),
            ("ip6", Some("daddr")) => Some((2, |v| Test::Addr {
                v6: true,
                src: false,
                nets: v.to_vec(),
            })),
            ("tcp", Some("dport")) => Some((2, |v| Test::Port {
                proto: Proto::Tcp,
                src: false,
                ports: v.join(","),
            })),
            ("tcp", Some("sport")) => Some((2, |v| Test::Port {
                proto: Proto::Tcp,
                src: true,
                ports: v.join(","),
            })),
            ("udp", Some("dport")) => Some((2, |v| Test::Port {
                proto: Proto::Udp,
                src: false,
                ports: v.join(","),
            })),
            ("udp", Some("sport")) => Some((2, |v| Test::Port {
                proto: Proto::Udp,
                src: true,
                ports: v.join(","),
            })),
            ("l4proto", _) => Some((1, |v| Test::L4proto(v.to_vec()))),
            ("nfproto", _) => Some((1, |v| Test::Nfproto(v.to_vec()))),
            ("skuid", _) => Some((1, |v| Test::Owner {
                gid: false,
                ids: v.to_vec(),
            })),
            ("skgid", _) => Some((1, |v| Test::Owner {
                gid: true,
                ids: v.to_vec(),
            })),
            ("mark", Some(next)) if next != "set" => Some((1, |v| Test::Mark {
                ct: false,
                values: v.to_vec(),
            })),
            ("ct", Some("mark")) if w.get(i + 2) != Some(&"set") => Some((2, |v| Test::Mark {
                ct: true,
                values: v.to_vec(),
            })),
            ("ct", Some("state")) => Some((2, |v| {
                Test::CtState(
                    v.iter()
                        .flat_map(|s| s.split(','))
                        .map(String::from)
                        .collect(),
                )
            })),
            _ => None,
        };
        if let Some((len, make)) = selector {
            i += len;
            let negated = match word(i)? {
                "!=" => {
                    i += 1;
                    true
                }
                "==" => {
                    i += 1;
                    false
                }
                _ => false,
            };
            let value = word(i)?;
            items.push(Item::Match {
                test: make(&elements(value)),
                negated,
            });
            i += 1;
            continue;
        }
        let (item, len) = match (w[i], w.get(i + 1).copied(), w.get(i + 2).copied()) {
            ("counter", Some("packets"), _) => (Item::Counter, 5),
            ("counter", ..) => (Item::Counter, 1),
            ("accept", ..) => (Item::Accept, 1),
            ("drop", ..) => (Item::Drop, 1),
            ("return", ..) => (Item::Return, 1),
            ("jump", Some(c), _) => (Item::Jump(c.to_string()), 2),
            ("goto", Some(c), _) => (Item::Goto(c.to_string()), 2),
            ("redirect", Some("to"), Some(p)) => (Item::Redirect(Some(to_port(p)?)), 3),
            ("redirect", ..) => (Item::Redirect(None), 1),
            ("tproxy", Some(f @ ("ip" | "ip6")), Some("to")) => {
                let p = word(i + 3)?;
                if !p.starts_with(':') {
                    return Err(format!("tproxy to an address ({p:?})"));
                }
                let port = to_port(p)?;
                (
                    Item::Tproxy {
                        v6: Some(f == "ip6"),
                        port,
                    },
                    4,
                )
            }
            ("tproxy", Some("to"), Some(p)) if p.starts_with(':') => (
                Item::Tproxy {
                    v6: None,
                    port: to_port(p)?,
                },
                3,
            ),
            ("mark", Some("set"), Some("ct")) if w.get(i + 3) == Some(&"mark") => {
                (Item::MarkFromCt, 4)
            }
            ("mark", Some("set"), Some(v)) => (Item::SetMark(number(v)?), 3),
            ("ct", Some("mark"), Some("set")) => match word(i + 3)? {
                "mark" => (Item::CtMarkFromMark, 4),
                v => (Item::SetCtMark(number(v)?), 4),
            },
            ("ct", Some("zone"), Some("set")) => {
                let z = word(i + 3)?;
                let z = z.parse().map_err(|_| format!("bad zone {z:?}"))?;
                (Item::CtZone(z), 4)
            }
            (other, ..) => return Err(format!("unknown expression {other:?}")),
        };
        items.push(item);
        i += len;
    }
    Ok(items)
}

/// Our `inet` tables (the config's, or the live ones) as the kernel runs them.
pub struct NftChains<'a> {
    pub state: Cow<'a, NftState>,
    pub resolver: &'a dyn OwnerResolver,
}

impl Chains for NftChains<'_> {
    fn bases(&self, hook: Hook) -> Vec<Base> {
        self.state
            .tables
            .iter()
            .flat_map(|(t, ts)| ts.chains.iter().map(move |c| (*t, c)))
            .filter_map(|(t, c)| {
                let h = c.hook.as_ref().filter(|h| h.hook == hook.name())?;
                Some(Base {
                    priority: h.priority,
                    nat: h.kind == "nat",
                    policy_drop: h.policy == "drop",
                    table: t.name(),
                    chain: c.name.clone(),
                })
            })
            .collect()
    }

    fn run(&self, base: &Base, walk: &mut Walk) -> Result<Flow, Unsupported> {
        let table = Table::from_name(base.table).expect("a base chain of ours names its table");
        self.chain(walk, table, &base.chain, 0)
    }
}

impl NftChains<'_> {
    /// Whether `test` holds for the packet (`negated` applied); `Err` for a value it cannot
    /// read.
    fn test(&self, p: &Packet, test: &Test, negated: bool) -> Result<bool, String> {
        let holds = match test {
            Test::Iface { inbound, names } => {
                let dev = if *inbound { &p.in_iface } else { &p.out_iface };
                // No such device at this hook: the expression breaks the rule.
                if dev.is_none() {
                    return Ok(false);
                }
                // A trailing `\*` is the literal `*`, a trailing `*` a wildcard.
                names.iter().any(|n| match n.strip_suffix("\\*") {
                    Some(stem) => dev.as_deref() == Some(format!("{stem}*").as_str()),
                    None => iface_matches(n, dev.as_deref(), '*'),
                })
            }
            Test::Addr { v6, src, nets } => {
                if p.dst.is_ipv6() != *v6 {
                    return Ok(false);
                }
                let a = if *src { p.src } else { p.dst };
                let mut any = false;
                for n in nets {
                    any |= addr_in(n, a).ok_or(format!("bad address {n:?}"))?;
                }
                any
            }
            Test::Port { proto, src, ports } => {
                if p.proto != *proto {
                    return Ok(false);
                }
                let port = if *src { p.sport } else { p.dport };
                port_in(ports, port, '-').ok_or(format!("bad ports {ports:?}"))?
            }
            Test::L4proto(protos) => {
                let mut any = false;
                for x in protos {
                    any |= match x.as_str() {
                        "tcp" | "6" => p.proto == Proto::Tcp,
                        "udp" | "17" => p.proto == Proto::Udp,
                        "icmp" | "icmpv6" | "sctp" | "udplite" | "1" | "58" | "132" | "136" => {
                            false
                        }
                        other => return Err(format!("unknown protocol {other:?}")),
                    };
                }
                any
            }
            Test::Nfproto(fams) => {
                let mut any = false;
                for f in fams {
                    any |= match f.as_str() {
                        "ipv4" => p.dst.is_ipv4(),
                        "ipv6" => p.dst.is_ipv6(),
                        other => return Err(format!("unknown family {other:?}")),
                    };
                }
                any
            }
            Test::Owner { gid, ids } => {
                let who = if *gid { p.gid } else { p.uid };
                // No local socket: `meta skuid` breaks the rule, negated or not.
                let Some(id) = who else { return Ok(false) };
                let mut any = false;
                for v in ids {
                    let (lo, hi) = if *gid {
                        id_range(v, |n| self.resolver.gid(n))?
                    } else {
                        id_range(v, |n| self.resolver.uid(n))?
                    };
                    any |= lo <= id && id <= hi;
                }
                any
            }
            Test::Mark { ct, values } => {
                let have = if *ct { p.connmark } else { p.mark };
                let mut any = false;
                for v in values {
                    any |= num(v).ok_or(format!("bad mark {v:?}"))? == have;
                }
                any
            }
            Test::CtState(states) => {
                let mut any = false;
                for s in states {
                    match s.as_str() {
                        "new" | "established" | "related" | "invalid" | "untracked" => {}
                        other => return Err(format!("unknown ct state {other:?}")),
                    }
                    any |= p.ctstate.eq_ignore_ascii_case(s);
                }
                any
            }
        };
        Ok(holds != negated)
    }

    fn chain(
        &self,
        w: &mut Walk,
        table: Table,
        chain: &str,
        depth: usize,
    ) -> Result<Flow, Unsupported> {
        let Some(c) = self.state.tables.get(&table).and_then(|t| t.chain(chain)) else {
            return Ok(Flow::Continue);
        };
        for (i, text) in c.rules.iter().enumerate() {
            let err = |reason: String| Unsupported {
                table: table.name(),
                chain: chain.into(),
                rule: i + 1,
                text: text.clone(),
                reason,
            };
            let items = parse(text).map_err(err)?;
            // The statements reached: all of them when every match holds. Every match is
            // looked at, so that a value this cannot read is an error whatever the packet.
            let mut matched = true;
            let mut reached = Vec::new();
            for item in &items {
                match item {
                    Item::Match { test, negated } => {
                        matched &= self.test(&w.pkt, test, *negated).map_err(err)?;
                    }
                    stmt if matched => reached.push(stmt),
                    _ => {}
                }
            }
            w.steps.push(Step {
                table: table.name(),
                chain: chain.into(),
                rule: i + 1,
                text: text.clone(),
                matched,
                place: None,
            });
            for stmt in reached {
                match stmt {
                    Item::Match { .. } | Item::Counter => {}
                    Item::Accept => return Ok(Flow::Accept),
                    Item::Drop => return Ok(Flow::Final(Verdict::Drop)),
                    Item::Return => return Ok(Flow::Continue),
                    Item::Redirect(port) => {
                        let port = port.unwrap_or(w.pkt.dport);
                        return Ok(Flow::Final(Verdict::Redirect { port }));
                    }
                    Item::Tproxy { v6, port } => {
                        // Of the other family, nft's implied `nfproto` fails the rule.
                        if v6.is_some_and(|v6| v6 != w.pkt.dst.is_ipv6()) {
                            break;
                        }
                        w.tproxy = Some(*port);
                    }
                    Item::SetMark(m) => w.pkt.mark = *m,
                    Item::MarkFromCt => w.pkt.mark = w.pkt.connmark,
                    Item::CtMarkFromMark => w.pkt.connmark = w.pkt.mark,
                    Item::SetCtMark(m) => w.pkt.connmark = *m,
                    Item::CtZone(z) => {
                        // A template is attached once; a later `ct zone set` leaves it.
                        w.zone.get_or_insert(*z);
                    }
                    Item::Jump(to) | Item::Goto(to) => {
                        if depth > 16 {
                            return Err(err("jumps nested too deep".into()));
                        }
                        let exists = self
                            .state
                            .tables
                            .get(&table)
                            .is_some_and(|t| t.chain(to).is_some());
                        if !exists {
                            return Err(err(format!("jump to a chain that is not there: {to:?}")));
                        }
                        let flow = self.chain(w, table, to, depth + 1)?;
                        if matches!(stmt, Item::Goto(_)) {
                            return Ok(flow);
                        }
                        match flow {
                            Flow::Continue => {}
                            other => return Ok(other),
                        }
                    }
                }
            }
        }
        Ok(Flow::Continue)
    }
}

/// Walks `pkt` through `hooks` and `state` alone: at each hook, the base chains of our tables
/// in priority order. A hook after the first is the looped-back packet arriving on `lo` (no
/// socket, no output device, no NAT: that was decided at the first hook).
pub fn evaluate(
    state: &NftState,
    resolver: &dyn OwnerResolver,
    pkt: Packet,
    hooks: &[Hook],
) -> Result<Outcome, Unsupported> {
    let o = walk_all(
        &[source(Cow::Borrowed(state), "nftables", None, resolver)],
        pkt,
        hooks,
    );
    match o.stopped {
        Some(Stop::Rule { rule, .. }) => Err(rule),
        _ => Ok(o),
    }
}

/// Our tables in `state` (the config's or the live ones), to walk as `name`.
pub fn source<'a>(
    state: Cow<'a, NftState>,
    name: &str,
    note: Option<&'static str>,
    resolver: &'a dyn OwnerResolver,
) -> Source<'a> {
    Source {
        name: name.to_string(),
        capture: !state.tables.is_empty(),
        note,
        chains: Box::new(NftChains { state, resolver }),
    }
}

/// How explain names our live tables.
pub fn live_name() -> String {
    format!("native nftables ({FAMILY} istio-proxy-*)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::iptables::build as rules;
    use crate::backend::iptables::walk as interp;
    use crate::backend::iptables::walk::ruleset_from_rules;
    use crate::backend::nft::build as nft;
    use crate::backend::nft::state::{Chain, Hook, TableState, desired};
    use crate::cli::{Args, Command};
    use crate::commands::explain::{ExplainRequest, packet};
    use crate::config::tests::{SEED, build as config};
    use crate::model::Family;
    use crate::model::NoResolver;

    fn request(argv: &[&str]) -> ExplainRequest {
        let mut full = vec!["istio-iptables", "explain"];
        full.extend_from_slice(argv);
        match Args::parse_from(full).unwrap().command {
            Some(Command::Explain(a)) => ExplainRequest::from(&a),
            _ => panic!("not explain"),
        }
    }

    /// The packet of `pkt` walked through the config's nft rules; the iptables walk of the
    /// same packet must end the same way (only with the family's rules present: IPv6 on).
    fn walk(cfg: &[&str], env: &[(&str, &str)], pkt: &[&str]) -> Outcome {
        let (c, f) = config(cfg, env).unwrap();
        let (p, hooks) = packet(&request(pkt), f.ipv6).unwrap();
        let st = desired(&nft::build(&c, &f), &NoResolver);
        let o = evaluate(&st, &NoResolver, p.clone(), &hooks).unwrap();
        let family = if p.dst.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        };
        if family == Family::V4 || f.ipv6 {
            let plan = rules::build(&c, &f);
            let rs = ruleset_from_rules(plan.rules(family));
            let i = interp::evaluate(&rs, &NoResolver, p, &hooks).unwrap();
            assert_eq!(
                (&o.verdict, o.zone),
                (&i.verdict, i.zone),
                "nft and iptables disagree on {pkt:?} with {cfg:?}: nft {:#?}",
                o.walk
            );
        }
        o
    }

    const V6: &[(&str, &str)] = &[("ENABLE_INBOUND_IPV6", "true")];

    fn out<'a>(dst: &'a str, uid: &'a str) -> Vec<&'a str> {
        vec!["--direction", "outbound", "--dst", dst, "--uid", uid]
    }

    fn inb(dst: &str) -> Vec<&str> {
        vec!["--direction", "inbound", "--dst", dst]
    }

    #[test]
    fn seed_outbound_inbound_and_the_proxy() {
        for (env, dst, pod, own) in [
            (&[][..], "10.1.2.3:80", "10.0.0.5", "10.0.0.5:8080"),
            (V6, "[fd01::3]:80", "fd00::5", "[fd00::5]:8080"),
        ] {
            assert_eq!(
                walk(SEED, env, &out(dst, "0")).verdict,
                Verdict::Redirect { port: 15001 }
            );
            assert_eq!(
                walk(SEED, env, &out(dst, "1337")).verdict,
                Verdict::NotCaptured
            );
            let mut group = out(dst, "5000");
            group.extend(["--gid", "1337"]);
            assert_eq!(walk(SEED, env, &group).verdict, Verdict::NotCaptured);
            assert_eq!(
                walk(SEED, env, &inb(own)).verdict,
                Verdict::Redirect { port: 15006 }
            );
            let port = |p: &str| own.replace("8080", p);
            assert_eq!(
                walk(SEED, env, &inb(&port("15090"))).verdict,
                Verdict::NotCaptured
            );
            assert_eq!(
                walk(SEED, env, &inb(&port("15008"))).verdict,
                Verdict::NotCaptured
            );
            // The proxy calling its own pod IP goes to the inbound side; the app does not.
            let mut self_call = out(own, "1337");
            self_call.extend(["--pod-ip", pod]);
            assert_eq!(
                walk(SEED, env, &self_call).verdict,
                Verdict::Redirect { port: 15006 }
            );
            let mut app_self = out(own, "0");
            app_self.extend(["--pod-ip", pod]);
            assert_eq!(walk(SEED, env, &app_self).verdict, Verdict::NotCaptured);
        }
        assert_eq!(
            walk(SEED, &[], &out("127.0.0.1:8080", "0")).verdict,
            Verdict::NotCaptured
        );
        let mut passthrough = out("10.0.0.5:8080", "1337");
        passthrough.extend(["--pod-ip", "10.0.0.5", "--src", "127.0.0.6"]);
        assert_eq!(walk(SEED, &[], &passthrough).verdict, Verdict::NotCaptured);
    }

    #[test]
    fn the_walk_names_tables_and_canonical_rules() {
        let o = walk(SEED, &[], &out("10.1.2.3:80", "0"));
        let first = &o.walk[0];
        assert_eq!(
            (first.table, first.chain.as_str(), first.rule, first.matched),
            ("istio-proxy-nat", "output", 1, true)
        );
        assert_eq!(first.text, "counter jump istio-output");
        let last = o.walk.last().unwrap();
        assert_eq!(last.text, "l4proto tcp counter redirect to :15001");
    }

    #[test]
    fn tproxy_inbound_with_its_mark_and_established_connections() {
        let cfg = ["-m", "TPROXY", "-b", "*", "-d", "15090"];
        for (env, dst) in [(&[][..], "10.0.0.5:8080"), (V6, "[fd00::5]:8080")] {
            let o = walk(&cfg, env, &inb(dst));
            assert_eq!(
                o.verdict,
                Verdict::Tproxy {
                    port: 15006,
                    mark: 1337
                }
            );
            assert_eq!(
                walk(&cfg, env, &inb(&dst.replace("8080", "15090"))).verdict,
                Verdict::NotCaptured
            );
        }
        // An established connection's packets are marked (divert), not TPROXYed.
        let (c, f) = config(&cfg, &[]).unwrap();
        let (mut p, hooks) = packet(&request(&inb("10.0.0.5:8080")), f.ipv6).unwrap();
        p.ctstate = "ESTABLISHED".into();
        let st = desired(&nft::build(&c, &f), &NoResolver);
        let o = evaluate(&st, &NoResolver, p, &hooks).unwrap();
        assert_eq!(o.verdict, Verdict::NotCaptured);
        assert_eq!(o.mark, 1337);
    }

    #[test]
    fn dns_is_redirected_in_its_zone_and_the_proxys_is_not() {
        let cfg = ["-i", "*", "-b", "*", "--redirect-dns"];
        let mut udp = out("10.96.0.10:53", "0");
        udp.extend(["--proto", "udp"]);
        let o = walk(&cfg, &[], &udp);
        assert_eq!(o.verdict, Verdict::Redirect { port: 15053 });
        assert_eq!(o.zone, Some(2));
        let mut proxy = out("10.96.0.10:53", "1337");
        proxy.extend(["--proto", "udp"]);
        let o = walk(&cfg, &[], &proxy);
        assert_eq!(o.verdict, Verdict::NotCaptured);
        assert_eq!(o.zone, Some(1));
        // Not a resolv.conf server: not captured (UDP); TCP to it is captured as any TCP.
        let mut other = out("10.96.0.11:53", "0");
        other.extend(["--proto", "udp"]);
        assert_eq!(walk(&cfg, &[], &other).verdict, Verdict::NotCaptured);
        assert_eq!(
            walk(&cfg, V6, &out("[fd00::10]:53", "0")).verdict,
            Verdict::Redirect { port: 15053 }
        );
    }

    #[test]
    fn owner_groups_include_and_exclude() {
        let cfg = ["-i", "*"];
        let only = [("ISTIO_OUTBOUND_OWNER_GROUPS", "2000")];
        let mut member = out("10.1.2.3:80", "5000");
        member.extend(["--gid", "2000"]);
        let mut other = out("10.1.2.3:80", "5000");
        other.extend(["--gid", "3000"]);
        assert_eq!(
            walk(&cfg, &only, &member).verdict,
            Verdict::Redirect { port: 15001 }
        );
        assert_eq!(walk(&cfg, &only, &other).verdict, Verdict::NotCaptured);
        let except = [("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "2000")];
        assert_eq!(walk(&cfg, &except, &member).verdict, Verdict::NotCaptured);
        assert_eq!(
            walk(&cfg, &except, &other).verdict,
            Verdict::Redirect { port: 15001 }
        );
    }

    #[test]
    fn excluded_ports_cidrs_and_interfaces() {
        let cfg = [
            "-i",
            "10.0.0.0/8,fd01::/16",
            "-x",
            "10.1.0.0/16,fd01:1::/32",
            "-o",
            "3306,5000:5010",
            "-b",
            "*",
            "-d",
            "9000:9010",
            "-c",
            "eth1,veth+",
        ];
        let r = Verdict::Redirect { port: 15001 };
        for (dst, v) in [
            ("10.2.0.1:80", r.clone()),
            ("10.1.0.1:80", Verdict::NotCaptured),
            ("192.168.0.1:80", Verdict::NotCaptured),
            ("10.2.0.1:3306", Verdict::NotCaptured),
            ("10.2.0.1:5005", Verdict::NotCaptured),
            ("10.2.0.1:5011", r.clone()),
        ] {
            assert_eq!(walk(&cfg, &[], &out(dst, "0")).verdict, v, "{dst}");
        }
        for (dst, v) in [
            ("[fd01:2::1]:80", r.clone()),
            ("[fd01:1::1]:80", Verdict::NotCaptured),
            ("[fd02::1]:80", Verdict::NotCaptured),
        ] {
            assert_eq!(walk(&cfg, V6, &out(dst, "0")).verdict, v, "{dst}");
        }
        for (iface, v) in [
            ("eth0", Verdict::Redirect { port: 15006 }),
            ("eth1", Verdict::NotCaptured),
            ("veth7", Verdict::NotCaptured),
        ] {
            let mut p = inb("10.0.0.5:8080");
            p.extend(["--in-iface", iface]);
            assert_eq!(walk(&cfg, &[], &p).verdict, v, "{iface}");
        }
        assert_eq!(
            walk(&cfg, &[], &inb("10.0.0.5:9005")).verdict,
            Verdict::NotCaptured
        );
        let mut p = out("10.2.0.1:80", "0");
        p.extend(["--out-iface", "veth3"]);
        assert_eq!(walk(&cfg, &[], &p).verdict, Verdict::NotCaptured);
    }

    #[test]
    fn an_inet_rule_without_addresses_sees_ipv6_even_with_ipv6_off() {
        // No ip6 rule is written, but `counter jump istio-redirect` is not of one family.
        let o = walk(SEED, &[], &out("[fd01::3]:80", "0"));
        assert_eq!(o.verdict, Verdict::Redirect { port: 15001 });
    }

    fn state(rules: &[&str]) -> NftState {
        let mut t = TableState::default();
        t.chains.push(Chain {
            name: "output".into(),
            hook: Some(Hook {
                kind: "nat".into(),
                hook: "output".into(),
                priority: -100,
                policy: "accept".into(),
            }),
            rules: rules
                .iter()
                .map(|r| crate::backend::nft::state::canonical(r, &NoResolver))
                .collect(),
        });
        NftState {
            tables: [(Table::Nat, t)].into(),
        }
    }

    fn verdict_of(rules: &[&str], dst: &str) -> Result<Verdict, Unsupported> {
        let (p, _) = packet(&request(&out(dst, "0")), true).unwrap();
        evaluate(
            &state(rules),
            &NoResolver,
            p,
            &[crate::backend::walk::Hook::Output],
        )
        .map(|o| o.verdict)
    }

    #[test]
    fn family_and_protocol_expressions_fail_negated_or_not() {
        for rule in [
            "ip daddr != 10.9.9.9 drop",
            "udp dport != 53 drop",
            "iifname != eth0 drop",
        ] {
            assert_eq!(
                verdict_of(&[rule], "[fd00::1]:80").unwrap(),
                Verdict::NotCaptured,
                "{rule}"
            );
        }
        assert_eq!(
            verdict_of(
                &["ip6 daddr != fd00::2 tcp dport {79-81,443} drop"],
                "[fd00::1]:80"
            )
            .unwrap(),
            Verdict::Drop
        );
        assert_eq!(
            verdict_of(&["oifname \"eth*\" drop"], "[fd00::1]:80").unwrap(),
            Verdict::Drop
        );
        // The literal name `eth*`, not a wildcard.
        assert_eq!(
            verdict_of(&["oifname \"eth\\*\" drop"], "[fd00::1]:80").unwrap(),
            Verdict::NotCaptured
        );
    }

    #[test]
    fn unknown_expressions_are_errors_not_guesses() {
        for rule in [
            "meta random 1 drop",
            "log prefix x accept",
            "tcp dport http drop",
            "jump nowhere",
            "mark & 255 == 1 drop",
            "ip daddr 10.9.9.9 tcp dport http drop",
        ] {
            let e = verdict_of(&[rule], "10.1.2.3:80").unwrap_err();
            assert_eq!((e.table, e.rule), ("istio-proxy-nat", 1), "{rule}: {e}");
        }
    }

    struct Names;
    impl OwnerResolver for Names {
        fn uid(&self, name: &str) -> Option<u32> {
            (name == "istio-proxy").then_some(0)
        }
        fn gid(&self, _: &str) -> Option<u32> {
            None
        }
    }

    #[test]
    fn owners_by_name_and_by_range() {
        let (p, _) = packet(&request(&out("10.1.2.3:80", "0")), false).unwrap();
        for (rule, v) in [
            ("skuid istio-proxy drop", Verdict::Drop),
            ("skuid 1-2000 drop", Verdict::NotCaptured),
            ("skuid != 1-2000 drop", Verdict::Drop),
        ] {
            let o = evaluate(
                &state(&[rule]),
                &Names,
                p.clone(),
                &[crate::backend::walk::Hook::Output],
            )
            .unwrap();
            assert_eq!(o.verdict, v, "{rule}");
        }
        let e = evaluate(
            &state(&["skgid nobody-here drop"]),
            &Names,
            p,
            &[crate::backend::walk::Hook::Output],
        )
        .unwrap_err();
        assert!(e.reason.contains("nobody-here"), "{e}");
    }

    /// `--exclusion-sets` captures exactly what Istio's per-item rules capture: for random
    /// configs (every list the flag gathers, both modes, both families, virtual interfaces)
    /// and random packets, the walk through the set form ends where the walk through
    /// Istio's form ends (verdict and conntrack zone).
    mod exclusion_sets {
        use super::*;
        use proptest::prelude::*;

        /// Addresses and ports that overlap and touch, so that merging matters.
        const NETS4: &[&str] = &[
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.3/32",
            "10.1.2.2/31",
            "10.2.0.0/16",
            "10.3.0.0/16",
            "192.168.0.0/24",
            "192.168.1.0/24",
            "172.16.0.0/12",
            "0.0.0.0/1",
        ];
        const NETS6: &[&str] = &[
            "fd00::/8",
            "fd01::/16",
            "fd01::5/128",
            "fd02::/16",
            "fe80::/10",
        ];
        const PORTS: &[&str] = &[
            "80",
            "81",
            "8080",
            "8000:8010",
            "8005:8020",
            "53",
            "9000",
            "15020",
        ];
        const DSTS: &[&str] = &[
            "10.1.2.3",
            "10.1.2.2",
            "10.0.9.9",
            "10.2.0.1",
            "10.3.255.255",
            "10.4.0.0",
            "192.168.0.255",
            "192.168.1.0",
            "192.168.2.1",
            "172.20.0.1",
            "127.0.0.1",
            "8.8.8.8",
            "200.1.1.1",
            "fd01::5",
            "fd01::6",
            "fd00::1",
            "fd02::1",
            "fd03::1",
            "fe80::1",
            "::1",
            "2001:db8::1",
        ];
        const GROUPS: &[&str] = &["0", "5", "7", "1337", "42"];
        const DPORTS: &[u16] = &[
            80, 81, 82, 8000, 8007, 8015, 8021, 53, 9000, 15020, 15008, 443,
        ];

        fn pick(pool: &'static [&'static str]) -> impl Strategy<Value = String> {
            proptest::sample::subsequence(pool, 0..=pool.len())
                .prop_shuffle()
                .prop_map(|v| v.join(","))
        }

        #[derive(Debug, Clone)]
        struct Case {
            argv: Vec<String>,
            env: Vec<(&'static str, String)>,
            pkt: Vec<String>,
        }

        fn case() -> impl Strategy<Value = Case> {
            let lists = (
                (pick(NETS4), pick(NETS6), any::<bool>()),
                (pick(NETS4), pick(NETS6)),
                (pick(PORTS), any::<bool>(), pick(PORTS)),
                (pick(PORTS), pick(PORTS)),
            );
            let rest = (
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
                proptest::option::of((any::<bool>(), pick(GROUPS))),
            );
            let pkt = (
                any::<bool>(),
                proptest::sample::select(DSTS),
                proptest::sample::select(DPORTS),
                any::<bool>(),
                proptest::sample::select(&[0u32, 5, 7, 42, 1337][..]),
                proptest::sample::select(&["eth0", "eth1", "lo"][..]),
            );
            (lists, rest, pkt).prop_map(
                |(
                    ((i4, i6, all_out), (x4, x6), (b, all_in, d), (q, o)),
                    (tproxy, ipv6, virt, groups),
                    (inbound, dst, dport, udp, id, iface),
                )| {
                    let join = |a: &str, b: &str| {
                        [a, b]
                            .iter()
                            .filter(|s| !s.is_empty())
                            .copied()
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    let mut argv: Vec<String> = vec![
                        "-m".into(),
                        if tproxy { "TPROXY" } else { "REDIRECT" }.into(),
                        "-i".into(),
                        if all_out { "*".into() } else { join(&i4, &i6) },
                        "-x".into(),
                        join(&x4, &x6),
                        "-b".into(),
                        if all_in { "*".into() } else { b },
                        "-d".into(),
                        d,
                        "-q".into(),
                        q,
                        "-o".into(),
                        o,
                    ];
                    if virt {
                        argv.extend(["-k".into(), "eth1".into()]);
                    }
                    let mut env = Vec::new();
                    if ipv6 {
                        env.push(("ENABLE_INBOUND_IPV6", "true".to_string()));
                    }
                    if let Some((only, g)) = groups.filter(|(_, g)| !g.is_empty()) {
                        let var = if only {
                            "ISTIO_OUTBOUND_OWNER_GROUPS"
                        } else {
                            "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE"
                        };
                        env.push((var, g));
                    }
                    let dst = if dst.contains(':') {
                        format!("[{dst}]:{dport}")
                    } else {
                        format!("{dst}:{dport}")
                    };
                    let mut pkt: Vec<String> = vec![
                        "--direction".into(),
                        if inbound { "inbound" } else { "outbound" }.into(),
                        "--dst".into(),
                        dst,
                        "--proto".into(),
                        if udp { "udp" } else { "tcp" }.into(),
                    ];
                    if inbound {
                        pkt.extend(["--in-iface".into(), iface.into()]);
                    } else {
                        pkt.extend([
                            "--uid".into(),
                            id.to_string(),
                            "--gid".into(),
                            id.to_string(),
                        ]);
                    }
                    Case { argv, env, pkt }
                },
            )
        }

        /// Every generated config and packet is valid: no case is skipped.
        fn outcome(c: &Case, sets: bool) -> (Verdict, Option<u16>) {
            let mut argv: Vec<&str> = c.argv.iter().map(String::as_str).collect();
            if sets {
                argv.extend(["--native-nftables", "--exclusion-sets"]);
            }
            let env: Vec<(&str, &str)> = c.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let (cfg, facts) = config(&argv, &env).expect("a valid config");
            let pkt: Vec<&str> = c.pkt.iter().map(String::as_str).collect();
            let (p, hooks) = packet(&request(&pkt), facts.ipv6).expect("a valid packet");
            let st = desired(&nft::build(&cfg, &facts), &NoResolver);
            let o = evaluate(&st, &NoResolver, p, &hooks).expect("the walk reads every rule");
            (o.verdict, o.zone)
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
            #[test]
            fn the_set_form_captures_what_istios_form_captures(c in case()) {
                prop_assert_eq!(outcome(&c, false), outcome(&c, true), "{:?}", c);
            }
        }

        #[test]
        fn sets_are_written_and_read_back_merged() {
            let (c, f) = config(
                &[
                    "--native-nftables",
                    "--exclusion-sets",
                    "-x",
                    "10.1.2.2/31,10.1.2.3/32,10.1.0.0/16,192.168.0.0/24,192.168.1.0/24",
                    "-o",
                    "80,81,8000:8010,8005:8020",
                    "-b",
                    "*",
                    "-d",
                    "15020",
                ],
                &[],
            )
            .unwrap();
            let t = nft::render(&nft::build(&c, &f).transaction());
            for want in [
                "istio-output ip daddr { 10.1.0.0/16, 192.168.0.0/23 } counter return\n",
                "istio-output tcp dport { 80-81, 8000-8020 } counter return\n",
                "istio-output udp dport { 80-81, 8000-8020 } counter return\n",
                // One element: Istio's own rule.
                "istio-inbound meta l4proto tcp tcp dport 15020 counter return\n",
            ] {
                assert!(t.contains(want), "{want} missing from {t}");
            }
        }
    }
}
