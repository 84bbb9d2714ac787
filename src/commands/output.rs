//! How `explain` and `verify` print their results: text for people, JSON for tools.

use std::fmt::Write as _;
use std::net::SocketAddr;

use serde::Serialize;

use super::explain::{Direction, ExplainRequest, Format};
use super::verify::Report;
use crate::backend::Drift;
use crate::backend::walk::{Outcome, Packet, Step, Verdict};
use crate::config::Config;
use crate::model::{self, Family};

pub(super) fn verdict_word(o: &Outcome) -> (&'static str, Option<u32>, Option<u32>) {
    let mark = (o.mark != 0).then_some(o.mark);
    match o.verdict {
        Verdict::Redirect { port } => ("redirect", Some(u32::from(port)), mark),
        Verdict::Tproxy { port, mark } => ("tproxy", Some(u32::from(port)), Some(mark)),
        Verdict::Drop => ("drop", None, mark),
        Verdict::NotCaptured => ("not-captured", None, mark),
    }
}

/// explain's JSON: the verdict, then every rule looked at.
#[derive(Serialize)]
struct ExplainJson<'a> {
    verdict: &'static str,
    port: Option<u32>,
    mark: Option<u32>,
    zone: Option<u16>,
    walk: &'a [Step],
}

pub(super) fn render_json(o: &Outcome) -> String {
    let (verdict, port, mark) = verdict_word(o);
    let json = ExplainJson {
        verdict,
        port,
        mark,
        zone: o.zone,
        walk: &o.walk,
    };
    to_json(&json)
}

/// One line of compact JSON.
fn to_json(value: &impl Serialize) -> String {
    let mut s = serde_json::to_string(value).expect("plain data serializes");
    s.push('\n');
    s
}

pub(super) fn render_text(
    args: &ExplainRequest,
    cfg: &Config,
    p: &Packet,
    o: &Outcome,
    source: &str,
    family: Family,
    note: Option<&str>,
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
    if let Some(note) = note {
        let _ = writeln!(s, "  ({note})");
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

/// verify's JSON.
#[derive(Serialize)]
struct ReportJson<'a> {
    #[serde(rename = "match")]
    matches: bool,
    differences: Vec<DiffJson<'a>>,
    /// Only present when there are some (older readers see the same object as before).
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    other_backend: &'a [String],
    routes_missing: &'a [String],
    /// Only present when there are some (older readers see the same object as before).
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    routes_extra: &'a [String],
}

/// One chain's (or table's) difference, with its family: `ipv4`, `ipv6`, `inet`.
#[derive(Serialize)]
struct DiffJson<'a> {
    family: &'static str,
    table: &'a str,
    chain: &'a Option<String>,
    missing: &'a [String],
    extra: &'a [String],
    out_of_order: bool,
    /// Only nftables has lines it cannot read.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    unread: &'a [String],
}

impl<'a> DiffJson<'a> {
    fn of(d: &'a Drift) -> DiffJson<'a> {
        DiffJson {
            family: d.place.json(),
            table: &d.table,
            chain: &d.chain,
            missing: &d.missing,
            extra: &d.extra,
            out_of_order: d.out_of_order,
            unread: &d.unread,
        }
    }
}

/// A chain's (or table's) missing and extra lines, and whether only the order differs.
fn write_rule_diff(s: &mut String, missing: &[String], extra: &[String], out_of_order: bool) {
    for m in missing {
        let _ = writeln!(s, "  missing:  {m}");
    }
    for e in extra {
        let _ = writeln!(s, "  extra:    {e}");
    }
    if out_of_order {
        let _ = writeln!(
            s,
            "  out of order: the same rules are there, in another order"
        );
    }
}

/// Renders a verify report.
pub fn render_report(r: &Report, output: Format) -> String {
    match output {
        Format::Json => to_json(&ReportJson {
            matches: !r.drift(),
            differences: r.drift.iter().map(DiffJson::of).collect(),
            other_backend: &r.other_backend,
            routes_missing: &r.routes_missing,
            routes_extra: &r.routes_extra,
        }),
        Format::Text => {
            let mut s = String::new();
            if !r.drift() {
                s.push_str("OK: the live rules match the config\n");
                return s;
            }
            s.push_str("DRIFT: the live rules differ from the config\n");
            for d in &r.drift {
                match &d.chain {
                    Some(c) => {
                        let _ = writeln!(s, "{} {}/{c}:", d.place.label(), d.table);
                    }
                    None => {
                        let _ = writeln!(s, "{} {}:", d.place.label(), d.table);
                    }
                }
                write_rule_diff(&mut s, &d.missing, &d.extra, d.out_of_order);
                for u in &d.unread {
                    let _ = writeln!(
                        s,
                        "  not read: {u}   (nft lists something this tool never writes: see `nft list table {} {}`)",
                        d.place.label(),
                        d.table
                    );
                }
            }
            for o in &r.other_backend {
                let _ = writeln!(s, "other backend: {o}");
            }
            if !r.other_backend.is_empty() {
                let _ = writeln!(
                    s,
                    "  (a pod must not have both iptables and nftables capture rules)"
                );
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
