//! `verify`: the live state of every place against the config: the chosen backend's
//! rules, the other backend (which must hold nothing of ours), and the `ip` steps.

use std::fmt::Write as _;

use serde::Serialize;

use super::output::{Format, to_json};
use crate::backend::StepError;
use crate::backend::{Backend, Drift, Place, Scope};
use crate::cli::Exit;
use crate::config::{Config, HostFacts};
use crate::model::{Family, Finding};
use crate::routes::{self as ip, IpCommand};
use crate::system::Env;

/// `verify` could not look (not a drift: that is a result).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("reading the live rules: {0}")]
    Read(Box<dyn StepError>),
    #[error("checking the routes")]
    Route(#[source] ip::ReadError),
}

/// The result of `verify`.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The chosen backend's differences, place by place.
    pub drift: Vec<Drift>,
    /// Capture rules of the other backend in the namespace (ISTIO_* iptables rules with
    /// `--native-nftables`, our nftables tables without): a pod must never have both.
    pub other_backend: Vec<String>,
    /// `ip` commands whose effect is missing.
    pub routes_missing: Vec<String>,
    /// TPROXY routing an earlier run added that the config does not want (as the `ip`
    /// commands that added it).
    pub routes_extra: Vec<String>,
    /// Foreign state that takes packets before our rules can (a foreign RETURN ahead of our
    /// jump, an earlier nft chain that NATs, an `ip rule` ahead of ours): our rules are in
    /// place, but traffic is not captured. Not drift: its own exit code.
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn drift(&self) -> bool {
        !self.drift.is_empty()
            || !self.other_backend.is_empty()
            || !self.routes_missing.is_empty()
            || !self.routes_extra.is_empty()
    }

    /// Whether foreign state takes packets before our rules.
    pub fn shadowed(&self) -> bool {
        !self.findings.is_empty()
    }

    /// The exit code: drift wins over findings.
    pub fn exit(&self) -> Exit {
        if self.drift() {
            Exit::Drift
        } else if self.shadowed() {
            Exit::Shadowed
        } else {
            Exit::Success
        }
    }
}

/// Compares the live state with the config: `chosen`'s places, `other`'s state of ours, and
/// the `ip` steps.
pub fn verify<C: Backend, O: Backend>(
    chosen: &C,
    other: &O,
    cfg: &Config,
    facts: &HostFacts,
    env: &mut Env<'_>,
) -> Result<Report, VerifyError> {
    let rules = chosen.build(cfg, facts);
    let state = chosen
        .read(Scope::Config(&facts.families()), env)
        .map_err(|e| VerifyError::Read(Box::new(e)))?;
    report(chosen, other, cfg, &rules, &state, env)
}

/// The report of `state` (`chosen`'s places, as a read of the config's scope saw them)
/// against `rules`; `other`'s state of ours and the `ip` steps are read here.
pub fn report<C: Backend, O: Backend>(
    chosen: &C,
    other: &O,
    cfg: &Config,
    rules: &C::Rules,
    state: &C::State,
    env: &mut Env<'_>,
) -> Result<Report, VerifyError> {
    let mut report = Report {
        drift: chosen.drift(rules, state, env.resolver),
        other_backend: other
            .leftovers(env)
            .map_err(|e| VerifyError::Read(Box::new(e)))?,
        ..Report::default()
    };
    check_routes(
        chosen.routes(rules),
        ip::TproxyRouting::of(cfg),
        env,
        &mut report,
    )?;
    report.findings = findings(chosen, rules, state, env);
    Ok(report)
}

/// What takes packets before our rules: in the chosen backend's places, and in the policy
/// routing ahead of our TPROXY rules.
fn findings<C: Backend>(
    chosen: &C,
    rules: &C::Rules,
    state: &C::State,
    env: &mut Env<'_>,
) -> Vec<Finding> {
    let mut out = chosen.findings(rules, state, env);
    for family in [Family::V4, Family::V6] {
        if let Some(routing) = env.probe.routing(family) {
            out.extend(ip::shadow::findings(
                family,
                &routing.rules,
                chosen.routes(rules),
            ));
        }
    }
    out
}

/// The `ip` plumbing: missing steps, and TPROXY routing the config does not want (a rule of
/// our mark or table into an empty table included), read over netlink.
fn check_routes(
    wanted: &[IpCommand],
    configured: ip::TproxyRouting,
    env: &mut Env<'_>,
    report: &mut Report,
) -> Result<(), VerifyError> {
    for family in [Family::V4, Family::V6] {
        let routing = ip::routing(family, env.probe).map_err(VerifyError::Route)?;
        for cmd in ip::leftovers(family, &routing, wanted, configured) {
            report.routes_extra.push(cmd.to_string());
        }
    }
    // `::6` on lo is ours whoever added it (apply and cleanup remove it when unwanted).
    let v6 = IpCommand::AddInboundV6Address;
    if !wanted.contains(&v6) && ip::present(&v6, None, env.probe).map_err(VerifyError::Route)? {
        report.routes_extra.push(v6.to_string());
    }
    for cmd in wanted {
        if !ip::present(cmd, None, env.probe).map_err(VerifyError::Route)? {
            report.routes_missing.push(cmd.to_string());
        }
    }
    Ok(())
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
    /// Foreign state ahead of our rules; only present when there is some.
    #[serde(skip_serializing_if = "<[Finding]>::is_empty")]
    findings: &'a [Finding],
}

/// One chain's (or table's) difference, with its family: `ipv4`, `ipv6`, `inet`.
#[derive(Serialize)]
struct DiffJson<'a> {
    family: &'static str,
    /// The iptables programs of the place (`iptables-nft`); none for nftables.
    #[serde(skip_serializing_if = "Option::is_none")]
    backend: Option<String>,
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
            backend: d.place.backend(),
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
            findings: &r.findings,
        }),
        Format::Text => {
            let mut s = String::new();
            if !r.drift() {
                if r.shadowed() {
                    s.push_str(
                        "SHADOWED: our rules match the config, but foreign rules take packets \
                         before them\n",
                    );
                    write_findings(&mut s, &r.findings);
                    return s;
                }
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
                    match d.place {
                        Place::Iptables(family, _) => {
                            let nft_family = if family == Family::V4 { "ip" } else { "ip6" };
                            let _ = writeln!(
                                s,
                                "  {u}   (see `nft list table {nft_family} {}`)",
                                d.table
                            );
                        }
                        _ => {
                            let _ = writeln!(
                                s,
                                "  not read: {u}   (nft lists something this tool never writes: see `nft list table {} {}`)",
                                d.place.label(),
                                d.table
                            );
                        }
                    }
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
            if r.shadowed() {
                s.push_str("Foreign rules that take packets before ours:\n");
                write_findings(&mut s, &r.findings);
            }
            s
        }
    }
}

/// The findings, one block each: where, the rule, what it does.
fn write_findings(s: &mut String, findings: &[Finding]) {
    for f in findings {
        let _ = writeln!(s, "{}:", f.place);
        let _ = writeln!(s, "  rule:   {}", f.rule);
        let _ = writeln!(s, "  effect: {}", f.effect);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Place;
    use crate::backend::iptables::Iptables;
    use crate::backend::nft::Nftables;
    use crate::backend::nft::build as nft;
    use crate::backend::nft::state::{self as nftstate, NftState};
    use crate::config::tests::{SEED, build as config};
    use crate::model::NoResolver;
    use crate::system::exec::{ExecError, Runner};

    const IPTABLES: Iptables = Iptables {
        flavor: None,
        lock_wait_secs: 0,
    };

    #[test]
    fn report_renders_drift() {
        let r = Report {
            drift: vec![Drift {
                place: Place::Iptables(Family::V4, Some(crate::config::Flavor::Nft)),
                table: "nat".into(),
                chain: Some("ISTIO_OUTPUT".into()),
                missing: vec!["-A X".into()],
                extra: vec![],
                out_of_order: false,
                unread: vec![],
            }],
            ..Report::default()
        };
        assert!(render_report(&r, Format::Text).contains("missing:  -A X"));
        assert!(
            render_report(&r, Format::Json)
                .starts_with("{\"match\":false,\"differences\":[{\"family\":\"ipv4\"")
        );
        assert!(!render_report(&r, Format::Json).contains("routes_extra"));
        let extra = Report {
            routes_extra: vec!["ip -4 rule add fwmark 1400 lookup 140".into()],
            ..Report::default()
        };
        assert!(extra.drift());
        assert!(render_report(&extra, Format::Text).contains(
            "routes: not wanted, left by an earlier run `ip -4 rule add fwmark 1400 lookup 140`"
        ));
        assert!(
            render_report(&extra, Format::Json)
                .ends_with(",\"routes_extra\":[\"ip -4 rule add fwmark 1400 lookup 140\"]}\n")
        );
    }

    fn finding() -> Finding {
        Finding {
            place: "IPv4 iptables-nft nat OUTPUT".into(),
            rule: "-A OUTPUT -p tcp -j RETURN".into(),
            effect: "TCP leaves OUTPUT before the jump to ISTIO_OUTPUT: outbound TCP is not \
                     captured"
                .into(),
        }
    }

    #[test]
    fn findings_have_their_heading_json_and_exit_code() {
        let r = Report {
            findings: vec![finding()],
            ..Report::default()
        };
        assert!(!r.drift());
        assert_eq!(r.exit(), Exit::Shadowed);
        assert_eq!(
            render_report(&r, Format::Text),
            "SHADOWED: our rules match the config, but foreign rules take packets before them\n\
             IPv4 iptables-nft nat OUTPUT:\n\
             \x20 rule:   -A OUTPUT -p tcp -j RETURN\n\
             \x20 effect: TCP leaves OUTPUT before the jump to ISTIO_OUTPUT: outbound TCP is not captured\n"
        );
        assert_eq!(
            render_report(&r, Format::Json),
            "{\"match\":true,\"differences\":[],\"routes_missing\":[],\"findings\":[\
             {\"place\":\"IPv4 iptables-nft nat OUTPUT\",\"rule\":\"-A OUTPUT -p tcp -j RETURN\",\
             \"effect\":\"TCP leaves OUTPUT before the jump to ISTIO_OUTPUT: outbound TCP is not captured\"}]}\n"
        );
        // Drift wins; the findings are still shown, under their own heading.
        let both = Report {
            routes_missing: vec!["ip -4 rule add fwmark 1337 lookup 133".into()],
            ..r
        };
        assert_eq!(both.exit(), Exit::Drift);
        let text = render_report(&both, Format::Text);
        assert!(text.starts_with("DRIFT:"), "{text}");
        assert!(
            text.contains(
                "Foreign rules that take packets before ours:\nIPv4 iptables-nft nat OUTPUT:\n"
            ),
            "{text}"
        );
        assert_eq!(Report::default().exit(), Exit::Success);
        // Without findings the JSON is what it was.
        assert!(!render_report(&Report::default(), Format::Json).contains("findings"));
    }

    /// A machine with iptables-nft, answering `nft list ruleset inet` and the save
    /// programs from fixed text.
    struct Machine {
        nft: String,
        iptables_save: Result<String, ()>,
    }

    impl Runner for Machine {
        fn run(
            &mut self,
            program: &str,
            args: &[String],
            _: Option<&str>,
        ) -> Result<String, ExecError> {
            match program {
                "nft" => {
                    assert_eq!(args, ["list", "ruleset", "inet"]);
                    Ok(self.nft.clone())
                }
                "iptables-nft-save" => {
                    self.iptables_save
                        .clone()
                        .map_err(|()| ExecError::NotFound {
                            program: program.into(),
                        })
                }
                "ip6tables-nft-save" => Ok(String::new()),
                other => panic!("unexpected program {other}"),
            }
        }
    }

    use crate::system::host_view::NftOnly;

    /// `st` as `nft list ruleset` prints it.
    fn listing(st: &NftState) -> String {
        let mut s = String::new();
        for (t, ts) in &st.tables {
            s.push_str(&format!("table inet {} {{\n", t.name()));
            for c in &ts.chains {
                s.push_str(&format!("\tchain {} {{\n", c.name));
                if let Some(h) = &c.hook {
                    s.push_str(&format!(
                        "\t\ttype {} hook {} priority {}; policy {};\n",
                        h.kind, h.hook, h.priority, h.policy
                    ));
                }
                for r in &c.rules {
                    s.push_str(&format!("\t\t{r}\n"));
                }
                s.push_str("\t}\n");
            }
            s.push_str("}\n");
        }
        s
    }

    #[test]
    fn nft_verify_reads_the_listing_and_the_other_backend() {
        let mut args = vec!["verify", "--native-nftables"];
        args.extend_from_slice(SEED);
        let (cfg, facts) = config(&args, &[]).unwrap();
        let want = nftstate::desired(&nft::build(&cfg, &facts), &NoResolver);
        let mut m = Machine {
            nft: listing(&want),
            iptables_save: Ok(String::new()),
        };
        let r = verify(
            &Nftables,
            &IPTABLES,
            &cfg,
            &facts,
            &mut Env {
                runner: &mut m,
                probe: &NftOnly,
                nf: &mut crate::system::nftprobe::NoWrites,
                rtnl: &mut crate::system::rtnl_change::fake::Recorder::default(),
                resolver: &NoResolver,
            },
        )
        .unwrap();
        assert!(!r.drift(), "{r:?}");

        let mut live = want.clone();
        let gone = live.tables.get_mut(&nft::Table::Nat).unwrap().chains[1]
            .rules
            .remove(0);
        m.nft = listing(&live);
        m.iptables_save = Ok("*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n".into());
        let r = verify(
            &Nftables,
            &IPTABLES,
            &cfg,
            &facts,
            &mut Env {
                runner: &mut m,
                probe: &NftOnly,
                nf: &mut crate::system::nftprobe::NoWrites,
                rtnl: &mut crate::system::rtnl_change::fake::Recorder::default(),
                resolver: &NoResolver,
            },
        )
        .unwrap();
        assert_eq!(r.drift.len(), 1);
        assert_eq!(r.drift[0].missing, [gone]);
        assert_eq!(
            r.other_backend,
            ["IPv4 iptables table nat (iptables-nft-save): 1 ISTIO_* rule(s), chains ISTIO_OUTPUT"]
        );
        let text = render_report(&r, Format::Text);
        assert!(
            text.contains("other backend: IPv4 iptables table nat"),
            "{text}"
        );
        let json = render_report(&r, Format::Json);
        assert!(
            json.contains(",\"other_backend\":[\"IPv4 iptables table nat (iptables-nft-save): 1 ISTIO_* rule(s), chains ISTIO_OUTPUT\"],\"routes_missing\":[]}"),
            "{json}"
        );
    }

    #[test]
    fn nft_report_renders_tables_chains_and_unread_lines() {
        let r = Report {
            drift: vec![
                Drift {
                    place: Place::Nftables,
                    table: "istio-proxy-raw".into(),
                    chain: None,
                    missing: vec![],
                    extra: vec!["table inet istio-proxy-raw".into()],
                    out_of_order: false,
                    unread: vec!["flags dormant".into()],
                },
                Drift {
                    place: Place::Nftables,
                    table: "istio-proxy-nat".into(),
                    chain: Some("output".into()),
                    missing: vec![],
                    extra: vec![],
                    out_of_order: true,
                    unread: vec![],
                },
            ],
            ..Report::default()
        };
        assert!(r.drift());
        assert_eq!(
            render_report(&r, Format::Text),
            "DRIFT: the live rules differ from the config\n\
             inet istio-proxy-raw:\n\
             \x20 extra:    table inet istio-proxy-raw\n\
             \x20 not read: flags dormant   (nft lists something this tool never writes: see `nft list table inet istio-proxy-raw`)\n\
             inet istio-proxy-nat/output:\n\
             \x20 out of order: the same rules are there, in another order\n"
        );
        assert_eq!(
            render_report(&r, Format::Json),
            "{\"match\":false,\"differences\":[\
             {\"family\":\"inet\",\"table\":\"istio-proxy-raw\",\"chain\":null,\"missing\":[],\"extra\":[\"table inet istio-proxy-raw\"],\"out_of_order\":false,\"unread\":[\"flags dormant\"]},\
             {\"family\":\"inet\",\"table\":\"istio-proxy-nat\",\"chain\":\"output\",\"missing\":[],\"extra\":[],\"out_of_order\":true}],\
             \"routes_missing\":[]}\n"
        );
    }
}
