//! `explain` and `verify` with `--native-nftables`, against the kernel's nftables.
//!
//! Root-only (ignored by default; `cargo test --test it inspect_nft:: -- --include-ignored`).
//! Each test builds a [`Topology`] and applies the nft rules of a config in its `pod`
//! namespace, with `ENABLE_INBOUND_IPV6` as the only env var, both ways a user can: the real
//! apply (`istio-iptables --native-nftables ARGS`) and the dry-run script run by `sh` (Istio's
//! transaction and the `ip` steps, nothing else).
//!
//! 1. **explain** (`explain_*`): for every row of the traffic tables of
//!    `tests/it/common/scenarios.rs` (seed over IPv4 and IPv6, CIDR include/exclude, `-o`, `-b`,
//!    TPROXY, DNS), four answers must agree: the iptables `explain` from the config, the nft
//!    one from the config, the nft one `--from-kernel` (inside the pod, reading `nft list
//!    ruleset inet`), and where `tests/it/traffic.rs` expects the connection to land (so that
//!    nothing passes because nothing is captured). No packet is sent: `tests/it/explain.rs`
//!    checks the iptables answers against real traffic.
//! 2. **verify** (`verify_*`): exit 0 right after either apply, for every config above; exit
//!    3, naming the table, chain and rule, after a rule is deleted by handle or an unwanted
//!    chain is added; exit 0 again once the rule is put back; and exit 3 when the other
//!    backend's capture rules are in the namespace (too), in both directions.

use crate::common;

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Output};

use common::{
    APP, BIN, CIDR_SCENARIOS, DEFAULT_TIMEOUT, DNS_SCENARIOS, Dest, INBOUND_PORT_INCLUDE_SCENARIOS,
    Lands, OUTBOUND_PORT_EXCLUDE_SCENARIOS, PROXY, SEED, SEED_SCENARIOS, Sender, TPROXY_SCENARIOS,
    TempDir, Topology, TrafficScenario, dns_flags, passthrough, proxy_flags, run_with_timeout, sa,
    sane_path, seed_with, shell_command, skip_unless_root,
};

/// A topology whose pod has a config's nft rules applied.
struct NftPod {
    t: Topology,
    _tmp: TempDir,
    /// The config flags (the same for the apply, explain and verify).
    args: Vec<String>,
    ipv6: bool,
}

/// How the nft rules get into the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Apply {
    /// `istio-iptables --native-nftables ARGS`, as an init container runs it.
    Real,
    /// `istio-iptables --dry-run --native-nftables ARGS`, run by `sh`: Istio's transaction
    /// and nothing else (no reconcile, no other backend removed).
    Script,
}

impl NftPod {
    /// A fresh topology `name` (and a resolv.conf naming the peer, for `--redirect-dns`: its
    /// path is passed to `args` as the `{resolv}` word), with `args` applied `how`.
    fn new(name: &str, args: &[&str], ipv6: bool, how: Apply) -> NftPod {
        let t = Topology::new(name);
        let tmp = TempDir::new("istio-iptables-inspect-nft");
        let resolv = tmp.path().join("resolv.conf");
        std::fs::write(
            &resolv,
            format!("nameserver {}\nnameserver {}\n", t.peer_v4, t.peer_v6),
        )
        .unwrap();
        let resolv = resolv.to_string_lossy().into_owned();
        let args = args
            .iter()
            .map(|a| {
                if *a == "{resolv}" {
                    resolv.clone()
                } else {
                    a.to_string()
                }
            })
            .collect();
        let pod = NftPod {
            t,
            _tmp: tmp,
            args,
            ipv6,
        };
        pod.apply(how);
        pod
    }

    /// Applies `self.args` with `--native-nftables`, `how`; panics if that fails.
    fn apply(&self, how: Apply) {
        let mut words = vec!["--native-nftables".to_string()];
        words.extend(self.args.iter().cloned());
        let out = match how {
            Apply::Real => self.bin(&words, true),
            Apply::Script => {
                let mut dry = vec![BIN.to_string(), "--dry-run".into()];
                dry.extend(words);
                self.sh(&tmp_script(
                    self,
                    &format!("{} 2>/dev/null", shell_command(&dry)),
                ))
            }
        };
        assert!(
            out.status.success(),
            "applying {} ({how:?}) failed: {}",
            shell_command(&self.args),
            describe(&out)
        );
    }

    fn env(&self) -> [(&'static str, &'static str); 1] {
        [(
            "ENABLE_INBOUND_IPV6",
            if self.ipv6 { "true" } else { "false" },
        )]
    }

    /// `sh -c script` in the pod.
    fn sh(&self, script: &str) -> Output {
        self.t.exec(&self.t.pod, "sh", &["-c", script], &self.env())
    }

    /// The binary with `words`: in the pod (`in_pod`), or outside the test namespaces.
    fn bin(&self, words: &[String], in_pod: bool) -> Output {
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        if in_pod {
            return self.t.exec(&self.t.pod, BIN, &words, &self.env());
        }
        let mut cmd = Command::new(BIN);
        cmd.args(&words)
            .env_clear()
            .env("PATH", sane_path())
            .envs(self.env());
        run_with_timeout(&mut cmd, DEFAULT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `verify [--native-nftables] ARGS [--output json]` in the pod: exit code and stdout.
    fn verify(&self, nft: bool, json: bool) -> (Option<i32>, String) {
        let mut w = vec!["verify".to_string()];
        if nft {
            w.push("--native-nftables".into());
        }
        w.extend(self.args.iter().cloned());
        if json {
            w.extend(["--output".into(), "json".into()]);
        }
        let out = self.bin(&w, true);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// `nft ARGS` in the pod; stdout, or a panic with stderr.
    fn nft(&self, args: &[&str]) -> String {
        let out = self.t.exec(&self.t.pod, "nft", args, &[]);
        assert!(out.status.success(), "nft {args:?}: {}", describe(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A script that writes `producer`'s output to a file, then runs it (a pipe would hide the
/// producer's failure).
fn tmp_script(pod: &NftPod, producer: &str) -> String {
    let file = pod._tmp.path().join("apply.sh");
    let file = shell_command([&file]);
    format!("set -e\n{producer} > {file}\nsh -e {file}\n")
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

/// explain's `verdict` and `port`, as `redirect 15001` or `not-captured`.
fn verdict(json: &str) -> Result<String, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("not JSON ({e}): {json:?}"))?;
    let word = v["verdict"]
        .as_str()
        .ok_or_else(|| format!("no verdict in {json:?}"))?;
    Ok(match v["port"].as_u64() {
        Some(p) => format!("{word} {p}"),
        None => word.to_string(),
    })
}

/// explain's packet flags for a row (as `tests/it/explain.rs` builds them).
fn packet_flags(pod: &NftPod, s: &TrafficScenario, v6: bool) -> Vec<String> {
    let dst: SocketAddr = sa(s.to.addr(&pod.t, v6), s.port);
    let (inbound, who, src): (bool, _, Option<IpAddr>) = match s.from {
        Sender::Pod(who) => (false, who, None),
        Sender::ProxyFromPassthrough => (false, PROXY, Some(passthrough(v6))),
        Sender::Peer => (true, APP, Some(Dest::Peer.addr(&pod.t, v6))),
    };
    let mut v: Vec<String> = vec![
        "--direction".into(),
        if inbound { "inbound" } else { "outbound" }.into(),
        "--dst".into(),
        dst.to_string(),
    ];
    if let Some(src) = src {
        v.extend(["--src".into(), src.to_string()]);
    }
    if !inbound {
        v.extend(["--uid".into(), who.uid.to_string()]);
        v.extend(["--gid".into(), who.gid.to_string()]);
    }
    v.extend(["--pod-ip".into(), Dest::Pod.addr(&pod.t, v6).to_string()]);
    if s.udp {
        v.extend(["--proto".into(), "udp".into()]);
    }
    v
}

/// The three explain answers for every row of `table` (IPv6 with `v6`) must be the landing
/// `tests/it/traffic.rs` expects; returns the failures.
fn check_explain(pod: &NftPod, v6: bool, table: &[TrafficScenario]) -> Vec<String> {
    let mut failures = Vec::new();
    for s in table {
        let want = match s.lands {
            Lands::Redirect(p) => format!("redirect {p}"),
            Lands::Tproxy(p) => format!("tproxy {p}"),
            Lands::NotCaptured => "not-captured".to_string(),
        };
        let packet = packet_flags(pod, s, v6);
        let argv = |nft: bool, kernel: bool, output: &str| -> Vec<String> {
            let mut w = vec!["explain".to_string()];
            if nft {
                w.push("--native-nftables".into());
            }
            w.extend(pod.args.iter().cloned());
            w.extend(packet.iter().cloned());
            if kernel {
                w.push("--from-kernel".into());
            }
            w.extend(["--output".into(), output.into()]);
            w
        };
        let mut problems = Vec::new();
        for (what, nft, kernel) in [
            ("iptables explain from the config", false, false),
            ("nft explain from the config", true, false),
            ("nft explain --from-kernel", true, true),
        ] {
            let out = pod.bin(&argv(nft, kernel, "json"), kernel);
            let got = if out.status.success() {
                verdict(&String::from_utf8_lossy(&out.stdout))
            } else {
                Err(describe(&out))
            };
            match got {
                Ok(v) if v == want => {}
                Ok(v) => {
                    let text = pod.bin(&argv(nft, kernel, "text"), kernel);
                    problems.push(format!(
                        "{what} says {v}:\n{}",
                        String::from_utf8_lossy(&text.stdout)
                    ));
                }
                Err(e) => problems.push(format!("{what} failed: {e}")),
            }
        }
        let name = format!(
            "{} [{}{}; {want}]",
            s.what,
            if v6 { "IPv6 " } else { "" },
            packet.join(" ")
        );
        if problems.is_empty() {
            eprintln!("PASS {name}");
        } else {
            let mut f = format!("FAIL {name}\n");
            for p in problems {
                let _ = writeln!(f, "  {}", p.replace('\n', "\n    "));
            }
            eprintln!("{f}");
            failures.push(f);
        }
    }
    failures
}

/// Applies `args` (`ipv6`), checks explain on each `(v6, table)` and that verify finds no
/// drift.
fn explain_and_verify(
    name: &str,
    args: &[&str],
    ipv6: bool,
    tables: &[(bool, &[TrafficScenario])],
) {
    for how in [Apply::Real, Apply::Script] {
        let pod = NftPod::new(name, args, ipv6, how);
        let mut failures = Vec::new();
        for (v6, table) in tables {
            failures.extend(check_explain(&pod, *v6, table));
        }
        let (code, out) = pod.verify(true, false);
        if code != Some(0) {
            failures.push(format!(
                "verify --native-nftables right after the apply: exit {code:?}\n{out}"
            ));
        }
        assert!(
            failures.is_empty(),
            "{} failure(s) with {} ({how:?}):\n\n{}\n--- nft list ruleset inet ---\n{}",
            failures.len(),
            shell_command(&pod.args),
            failures.join("\n"),
            pod.nft(&["list", "ruleset", "inet"])
        );
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn explain_seed_ipv4_and_ipv6() {
    if skip_unless_root("explain_seed_ipv4_and_ipv6") {
        return;
    }
    explain_and_verify("nseed4", SEED, false, &[(false, SEED_SCENARIOS)]);
    explain_and_verify(
        "nseed6",
        SEED,
        true,
        &[(false, SEED_SCENARIOS), (true, SEED_SCENARIOS)],
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn explain_cidrs_and_ports() {
    if skip_unless_root("explain_cidrs_and_ports") {
        return;
    }
    explain_cidrs();
    explain_and_verify(
        "noport",
        &proxy_flags("REDIRECT", &["-i", "*", "-b", "*", "-o", "80"]),
        false,
        &[(false, OUTBOUND_PORT_EXCLUDE_SCENARIOS)],
    );
    explain_and_verify(
        "niport",
        &proxy_flags("REDIRECT", &["-i", "*", "-b", "8080"]),
        false,
        &[(false, INBOUND_PORT_INCLUDE_SCENARIOS)],
    );
}

/// `-i <subnet> -x <peer>/32 -b '*'`: the flags name the topology's own addresses, so the
/// pod is built first with the seed, then the CIDR config is applied over it.
fn explain_cidrs() {
    for how in [Apply::Real, Apply::Script] {
        let mut pod = NftPod::new("ncidr", SEED, false, how);
        let (include, exclude) = (pod.t.subnet_v4(), format!("{}/32", pod.t.peer_v4));
        pod.args = proxy_flags("REDIRECT", &["-i", &include, "-x", &exclude, "-b", "*"])
            .into_iter()
            .map(String::from)
            .collect();
        // Over the seed's tables: a re-run rewrites them, the script flushes them first.
        pod.apply(how);
        let mut failures = check_explain(&pod, false, CIDR_SCENARIOS);
        let (code, out) = pod.verify(true, false);
        if code != Some(0) {
            failures.push(format!("verify after the apply: exit {code:?}\n{out}"));
        }
        assert!(failures.is_empty(), "{how:?}: {}", failures.join("\n"));
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn explain_tproxy() {
    if skip_unless_root("explain_tproxy") {
        return;
    }
    explain_and_verify(
        "ntproxy",
        &seed_with("-m", "TPROXY"),
        true,
        &[(false, TPROXY_SCENARIOS), (true, TPROXY_SCENARIOS)],
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn explain_dns() {
    if skip_unless_root("explain_dns") {
        return;
    }
    explain_and_verify(
        "ndns",
        &dns_flags("{resolv}"),
        true,
        &[(false, DNS_SCENARIOS), (true, DNS_SCENARIOS)],
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn verify_sees_a_deleted_rule_and_an_unwanted_chain() {
    if skip_unless_root("verify_sees_a_deleted_rule_and_an_unwanted_chain") {
        return;
    }
    let pod = NftPod::new("nverify", SEED, false, Apply::Real);
    assert_eq!(
        pod.verify(true, false),
        (Some(0), "OK: the live rules match the config\n".into())
    );

    // Delete `counter jump istio-output` from nat's output chain, by its handle.
    let listing = pod.nft(&["-a", "list", "chain", "inet", "istio-proxy-nat", "output"]);
    let handle = listing
        .lines()
        .find(|l| l.contains("jump istio-output"))
        .and_then(|l| l.rsplit_once("# handle "))
        .map(|(_, h)| h.trim().to_string())
        .unwrap_or_else(|| panic!("no jump to istio-output in\n{listing}"));
    pod.nft(&[
        "delete",
        "rule",
        "inet",
        "istio-proxy-nat",
        "output",
        "handle",
        &handle,
    ]);
    let (code, text) = pod.verify(true, false);
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains("inet istio-proxy-nat/output:\n  missing:  counter jump istio-output\n"),
        "{text}"
    );
    let (code, json) = pod.verify(true, true);
    assert_eq!(code, Some(3), "{json}");
    assert!(
        json.contains(r#"{"family":"inet","table":"istio-proxy-nat","chain":"output","missing":["counter jump istio-output"],"extra":[],"out_of_order":false}"#),
        "{json}"
    );

    // Put back, it verifies again: the deletion was the drift.
    pod.nft(&[
        "add",
        "rule",
        "inet",
        "istio-proxy-nat",
        "output",
        "counter",
        "jump",
        "istio-output",
    ]);
    assert_eq!(pod.verify(true, false).0, Some(0));

    // An unwanted chain, with a rule.
    pod.nft(&["add", "chain", "inet", "istio-proxy-nat", "stray"]);
    pod.nft(&[
        "add",
        "rule",
        "inet",
        "istio-proxy-nat",
        "stray",
        "tcp",
        "dport",
        "9999",
        "counter",
        "return",
    ]);
    let (code, text) = pod.verify(true, false);
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains(
            "inet istio-proxy-nat/stray:\n  extra:    chain stray\n  extra:    tcp dport 9999 counter return\n"
        ),
        "{text}"
    );
}

#[test]
#[ignore = "needs root and network namespaces"]
fn verify_finds_the_other_backend() {
    if skip_unless_root("verify_finds_the_other_backend") {
        return;
    }
    let pod = NftPod::new("nboth", SEED, false, Apply::Real);
    // Without --native-nftables our nft tables are drift (and the iptables rules missing).
    let (code, text) = pod.verify(false, false);
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains(
            "other backend: nftables table inet istio-proxy-nat, written by --native-nftables\n"
        ),
        "{text}"
    );
    // An iptables apply removes our nft tables: then only the nft verify sees drift.
    let out = pod.bin(&pod.args, true);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(pod.verify(false, false).0, Some(0));
    let (code, text) = pod.verify(true, false);
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains("  missing:  table inet istio-proxy-nat\n"),
        "{text}"
    );
    // The dry-run script removes nothing: both backends' rules are there, and each verify
    // sees the other's.
    pod.apply(Apply::Script);
    let (code, text) = pod.verify(true, false);
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.starts_with(
            "DRIFT: the live rules differ from the config\nother backend: IPv4 iptables table nat (iptables-nft-save): "
        ) && text.contains("ISTIO_OUTPUT"),
        "only the other backend differs: {text}"
    );
    let (code, json) = pod.verify(true, true);
    assert_eq!(code, Some(3));
    assert!(
        json.contains(
            r#""differences":[],"other_backend":["IPv4 iptables table nat (iptables-nft-save): "#
        ),
        "{json}"
    );
    let (code, text) = pod.verify(false, false);
    assert_eq!(code, Some(3), "{text}");
    assert!(
        !text.contains("missing:"),
        "the iptables rules are all there: {text}"
    );
    assert!(
        text.contains("other backend: nftables table inet istio-proxy-nat"),
        "{text}"
    );
}
