//! How `explain` and `verify` print their results: text for people, JSON for tools.

use std::fmt::Write as _;
use std::net::SocketAddr;

use super::interp::{Outcome, Packet, Verdict};
use super::{Direction, ExplainRequest, Format, Report};
use crate::config::Config;
use crate::model::{self, Family};

/// Minimal JSON string escaping.
fn js(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn opt_num(n: Option<u32>) -> String {
    n.map(|n| n.to_string()).unwrap_or_else(|| "null".into())
}

pub(super) fn verdict_word(o: &Outcome) -> (&'static str, Option<u32>, Option<u32>) {
    let mark = (o.mark != 0).then_some(o.mark);
    match o.verdict {
        Verdict::Redirect { port } => ("redirect", Some(u32::from(port)), mark),
        Verdict::Tproxy { port, mark } => ("tproxy", Some(u32::from(port)), Some(mark)),
        Verdict::Drop => ("drop", None, mark),
        Verdict::NotCaptured => ("not-captured", None, mark),
    }
}

pub(super) fn render_json(o: &Outcome) -> String {
    let (verdict, port, mark) = verdict_word(o);
    let walk: Vec<String> = o
        .walk
        .iter()
        .map(|s| {
            format!(
                "{{\"table\":{},\"chain\":{},\"rule\":{},\"text\":{},\"matched\":{}}}",
                js(s.table.name()),
                js(&s.chain),
                s.rule,
                js(&s.text),
                s.matched
            )
        })
        .collect();
    format!(
        "{{\"verdict\":{},\"port\":{},\"mark\":{},\"zone\":{},\"walk\":[{}]}}\n",
        js(verdict),
        opt_num(port),
        opt_num(mark),
        opt_num(o.zone.map(u32::from)),
        walk.join(",")
    )
}

pub(super) fn render_text(
    args: &ExplainRequest,
    cfg: &Config,
    p: &Packet,
    o: &Outcome,
    source: &str,
    family: Family,
    v6_off: bool,
) -> String {
    let mut s = String::new();
    let dir = match args.direction {
        Direction::Inbound => "inbound",
        Direction::Outbound => "outbound",
    };
    let who = match (p.uid, p.gid) {
        (Some(u), Some(g)) => format!(", uid {u}, gid {g}"),
        _ => String::new(),
    };
    let iface = match (&p.in_iface, &p.out_iface) {
        (Some(i), _) => format!(", in {i}"),
        (_, Some(o)) => format!(", out {o}"),
        _ => String::new(),
    };
    let _ = writeln!(
        s,
        "{family} {dir} {} {} -> {}{who}{iface}; {source}",
        p.proto.name(),
        SocketAddr::new(p.src, p.sport),
        SocketAddr::new(p.dst, p.dport)
    );
    if v6_off {
        let _ = writeln!(
            s,
            "  (IPv6 is off for this config: no ip6tables rules are generated)"
        );
    }
    for st in &o.walk {
        let _ = writeln!(
            s,
            "  {:<5} {}/{} #{}: {}",
            if st.matched { "MATCH" } else { "-" },
            st.table,
            st.chain,
            st.rule,
            st.text
        );
    }
    let dst = SocketAddr::new(p.dst, p.dport);
    let verdict = match o.verdict {
        Verdict::Redirect { port } if port == cfg.proxy_port.get() => {
            format!("redirected to the outbound port {port} (original destination {dst} kept)")
        }
        Verdict::Redirect { port } if port == cfg.inbound_capture_port.get() => {
            format!("redirected to the inbound port {port} (original destination {dst} kept)")
        }
        Verdict::Redirect { port } if port == model::DNS_PROXY_PORT => {
            format!("redirected to the DNS proxy on {port} (original destination {dst} kept)")
        }
        Verdict::Redirect { port } => {
            format!("redirected to port {port} (original destination {dst} kept)")
        }
        Verdict::Tproxy { port, mark } => {
            format!(
                "TPROXY to the inbound port {port} with mark {mark} (the proxy sees {dst} as its local address)"
            )
        }
        Verdict::Drop => "dropped".into(),
        Verdict::NotCaptured => "not captured: it goes where it was sent".into(),
    };
    let _ = writeln!(s, "verdict: {verdict}");
    if let Some(z) = o.zone {
        let _ = writeln!(s, "conntrack zone {z} set");
    }
    s
}

/// Renders a verify report.
pub fn render_report(r: &Report, output: Format) -> String {
    match output {
        Format::Json => {
            let diffs: Vec<String> = r
                .diffs
                .iter()
                .map(|(f, d)| {
                    let list = |v: &[String]| v.iter().map(|x| js(x)).collect::<Vec<_>>().join(",");
                    format!(
                        "{{\"family\":{},\"table\":{},\"chain\":{},\"missing\":[{}],\"extra\":[{}],\"out_of_order\":{}}}",
                        js(match f {
                            Family::V4 => "ipv4",
                            Family::V6 => "ipv6",
                        }),
                        js(d.table.name()),
                        js(&d.chain),
                        list(&d.missing),
                        list(&d.extra),
                        d.out_of_order
                    )
                })
                .collect();
            let routes: Vec<String> = r.routes_missing.iter().map(|x| js(x)).collect();
            // Only present when there are some (older readers see the same object as before).
            let extra = if r.routes_extra.is_empty() {
                String::new()
            } else {
                let v: Vec<String> = r.routes_extra.iter().map(|x| js(x)).collect();
                format!(",\"routes_extra\":[{}]", v.join(","))
            };
            format!(
                "{{\"match\":{},\"differences\":[{}],\"routes_missing\":[{}]{extra}}}\n",
                !r.drift(),
                diffs.join(","),
                routes.join(",")
            )
        }
        Format::Text => {
            let mut s = String::new();
            if !r.drift() {
                s.push_str("OK: the live rules match the config\n");
                return s;
            }
            s.push_str("DRIFT: the live rules differ from the config\n");
            for (f, d) in &r.diffs {
                let _ = writeln!(s, "{f} {}/{}:", d.table, d.chain);
                for m in &d.missing {
                    let _ = writeln!(s, "  missing:  {m}");
                }
                for e in &d.extra {
                    let _ = writeln!(s, "  extra:    {e}");
                }
                if d.out_of_order {
                    let _ = writeln!(
                        s,
                        "  out of order: the same rules are there, in another order"
                    );
                }
            }
            for m in &r.routes_missing {
                let _ = writeln!(s, "routes: missing `{m}`");
            }
            for m in &r.routes_extra {
                let _ = writeln!(s, "routes: not wanted, left by an earlier run `{m}`");
            }
            s
        }
    }
}
