//! A small interpreter of exactly the iptables subset this tool emits: protocol, addresses
//! and `!`, interfaces (with `+`), ports and multiport, owner uid/gid, conntrack state, mark
//! and connmark, jumps/RETURN, REDIRECT, TPROXY, MARK, CONNMARK, ACCEPT, DROP, CT. It walks
//! one packet through the chains of the hooks it traverses and says where it ends up.
//! Anything outside that subset (an unknown match, target or option) is an error, never a
//! guess. Pure: rules in, verdict and walk out.

use std::collections::BTreeMap;

use crate::backend::iptables::save::SaveState;
use crate::backend::walk::{
    Flow, Hook, Outcome, Packet, Proto, Step, Unsupported, Verdict, addr_in, id_range,
    iface_matches, num, port_in,
};
use crate::model::OwnerResolver;
use crate::model::{Rule, RuleSpec, Table};

/// The rules of one family: table → chain → rules in order, each as (text, tokens after
/// `-A CHAIN`).
pub type Ruleset = BTreeMap<Table, BTreeMap<String, Vec<(String, Vec<String>)>>>;

struct Walker<'a> {
    rules: &'a Ruleset,
    resolver: &'a dyn OwnerResolver,
    pkt: Packet,
    walk: Vec<Step>,
    zone: Option<u16>,
}

/// `V[/M]` → (value, mask).
fn mark_mask(s: &str) -> Option<(u32, u32)> {
    match s.split_once('/') {
        Some((v, m)) => Some((num(v)?, num(m)?)),
        None => Some((num(s)?, u32::MAX)),
    }
}

/// Whether `port` is in `spec`: ports and ranges (`a<range>b`: `8000:8010` in iptables,
/// `8000-8010` in nft) separated by commas; `None` for a spec that is not that.
impl Walker<'_> {
    fn chain(&mut self, table: Table, chain: &str, depth: usize) -> Result<Flow, Unsupported> {
        let rules = match self.rules.get(&table).and_then(|t| t.get(chain)) {
            Some(r) => r.clone(),
            None => return Ok(Flow::Continue),
        };
        for (i, (text, toks)) in rules.iter().enumerate() {
            let err = |reason: String| Unsupported {
                table: table.name(),
                chain: chain.into(),
                rule: i + 1,
                text: text.clone(),
                reason,
            };
            let (matched, target) = self.eval(toks).map_err(err)?;
            self.walk.push(Step {
                table: table.name(),
                chain: chain.into(),
                rule: i + 1,
                text: text.clone(),
                matched,
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
                    .map(String::as_str)
            };
            match target.as_str() {
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
                        None => self.pkt.dport,
                    };
                    return Ok(Flow::Final(Verdict::Redirect { port }));
                }
                "TPROXY" => {
                    let port = opt("--on-port")
                        .and_then(|p| p.parse().ok())
                        .ok_or_else(|| err("TPROXY without --on-port".into()))?;
                    if let Some((v, m)) = opt("--tproxy-mark").and_then(mark_mask) {
                        self.pkt.mark = (self.pkt.mark & !m) ^ v;
                    }
                    return Ok(Flow::Final(Verdict::Tproxy {
                        port,
                        mark: self.pkt.mark,
                    }));
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
                    self.pkt.mark = (self.pkt.mark & !m) ^ v;
                }
                "CONNMARK" => {
                    if opts.iter().any(|o| o == "--save-mark") {
                        self.pkt.connmark = self.pkt.mark;
                    } else if opts.iter().any(|o| o == "--restore-mark") {
                        self.pkt.mark = self.pkt.connmark;
                    } else {
                        return Err(err("unsupported CONNMARK options".into()));
                    }
                }
                "CT" => {
                    let z = opt("--zone")
                        .and_then(|z| z.parse().ok())
                        .ok_or_else(|| err("CT without --zone".into()))?;
                    // xt_CT attaches a conntrack template once; later CT rules are ignored.
                    self.zone.get_or_insert(z);
                }
                user => {
                    if depth > 16 {
                        return Err(err("jumps nested too deep".into()));
                    }
                    if !self.rules.get(&table).is_some_and(|t| t.contains_key(user))
                        && !user.starts_with("ISTIO_")
                    {
                        return Err(err(format!("unknown target {user:?}")));
                    }
                    match self.chain(table, user, depth + 1)? {
                        Flow::Continue => {}
                        other => return Ok(other),
                    }
                }
            }
        }
        Ok(Flow::Continue)
    }

    /// Whether the rule's matches hold, and its target with options.
    #[allow(clippy::type_complexity)]
    fn eval(&self, toks: &[String]) -> Result<(bool, Option<(String, Vec<String>)>), String> {
        let p = &self.pkt;
        let spec = RuleSpec::parse(toks);
        let mut ok = true;
        let mut module = String::new();
        for m in &spec.matches {
            let neg = m.negated;
            let tok = m.flag.as_str();
            if tok.is_empty() {
                return Err("dangling `!`".into());
            }
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
                        | "connmark" | "comment" => {}
                        other => return Err(format!("unknown match {other:?}")),
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

/// Walks `pkt` through `hooks` (each a list of (table, built-in chain)), in order. A hook
/// after the first is only walked when `continue_after` says so for the verdict so far.
pub fn evaluate(
    rules: &Ruleset,
    resolver: &dyn OwnerResolver,
    pkt: Packet,
    hooks: &[Hook],
) -> Result<Outcome, Unsupported> {
    let mut w = Walker {
        rules,
        resolver,
        pkt,
        walk: Vec::new(),
        zone: None,
    };
    let mut verdict = Verdict::NotCaptured;
    'hooks: for (n, hook) in hooks.iter().enumerate() {
        if n > 0 {
            // The looped-back packet arrives on lo.
            w.pkt.in_iface = Some("lo".into());
            w.pkt.out_iface = None;
        }
        for &(table, chain) in hook.iter() {
            if n > 0 && table == Table::Nat {
                continue; // NAT is decided once per connection, at its first hook.
            }
            match w.chain(table, chain, 0)? {
                Flow::Continue | Flow::Accept => {}
                Flow::Final(v) => {
                    verdict = v;
                    break 'hooks;
                }
            }
        }
    }
    Ok(Outcome {
        verdict,
        walk: w.walk,
        mark: w.pkt.mark,
        zone: w.zone,
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::iptables::save::tokenize;
    use crate::backend::walk::{OUTPUT_HOOK, PREROUTING_HOOK};
    use crate::model::NoResolver;

    fn ruleset(lines: &[(&str, &str)]) -> Ruleset {
        let mut rs = Ruleset::new();
        for (table, line) in lines {
            let toks = tokenize(line);
            rs.entry(Table::from_name(table).expect("a table name"))
                .or_default()
                .entry(toks[1].clone())
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
            &[OUTPUT_HOOK],
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
            &[OUTPUT_HOOK],
        )
        .unwrap();
        assert_eq!(o.verdict, Verdict::NotCaptured);
        let o = evaluate(
            &seed(),
            &NoResolver,
            pkt("10.1.2.3", 5005, 0, "eth0"),
            &[OUTPUT_HOOK],
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
            &[OUTPUT_HOOK],
        )
        .unwrap();
        assert_eq!(o.verdict, Verdict::Redirect { port: 15006 });
        let mut p = pkt("10.0.0.5", 8080, 1337, "lo");
        p.src = "127.0.0.6".parse().unwrap();
        assert_eq!(
            evaluate(&seed(), &NoResolver, p, &[OUTPUT_HOOK])
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
        let o = evaluate(&rs, &NoResolver, p.clone(), &[PREROUTING_HOOK]).unwrap();
        assert_eq!(
            o.verdict,
            Verdict::Tproxy {
                port: 15006,
                mark: 1337
            }
        );
        p.ctstate = "ESTABLISHED".into();
        let o = evaluate(&rs, &NoResolver, p, &[PREROUTING_HOOK]).unwrap();
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
        let o = evaluate(&rs, &NoResolver, p, &[OUTPUT_HOOK]).unwrap();
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
            &[OUTPUT_HOOK],
        )
        .unwrap_err();
        assert!(e.reason.contains("statistic"), "{e}");
        let rs = ruleset(&[("nat", "-A OUTPUT -j LOG")]);
        assert!(
            evaluate(
                &rs,
                &NoResolver,
                pkt("10.1.2.3", 80, 0, "eth0"),
                &[OUTPUT_HOOK]
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
            evaluate(&rs, &NoResolver, p, &[PREROUTING_HOOK])
                .unwrap()
                .verdict,
            Verdict::Drop
        );
    }
}
