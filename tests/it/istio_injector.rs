//! The binary as Istio's sidecar injector runs it: the `istio-init` argument lists of
//! `manifests/charts/istio-control/istio-discovery/files/injection-template.yaml` (Istio
//! master), each branch of the template, with Istio's logging flags and log formats; and a
//! re-run over the multiport form earlier versions of this tool wrote.

use crate::common;

use common::{BIN, normalize_save, run_in_fresh_ns, sane_path, shell_command, skip_unless_root};

/// The template's fixed part, as the injector renders it with default values:
/// `istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*' -d 15090,15021,15020`.
fn template(mode: &str, over: &[(&str, &str)]) -> Vec<String> {
    let mut pairs: Vec<(&str, &str)> = vec![
        ("-p", "15001"),
        ("-z", "15006"),
        ("-u", "1337"),
        ("-m", mode),
        ("-i", "*"),
        ("-x", ""),
        ("-b", "*"),
        ("-d", "15090,15021,15020"),
    ];
    for (flag, value) in over {
        match pairs.iter_mut().find(|(f, _)| f == flag) {
            Some(p) => p.1 = value,
            None => pairs.push((flag, value)),
        }
    }
    pairs
        .into_iter()
        .flat_map(|(f, v)| [f.to_string(), v.to_string()])
        .collect()
}

/// One branch of the template: the capture flags, the flags that follow them (logging,
/// validation, force-apply), and a setup run first (CNI installed the rules already).
struct Branch {
    name: &'static str,
    capture: Vec<String>,
    tail: Vec<&'static str>,
    preinstalled: bool,
}

fn branches() -> Vec<Branch> {
    let info = "--log_output_level=default:info";
    let b = |name, capture, tail: &[&'static str]| Branch {
        name,
        capture,
        tail: tail.to_vec(),
        preinstalled: false,
    };
    vec![
        b("redirect", template("REDIRECT", &[]), &[info]),
        // With TPROXY the template passes -u "1337" whatever the proxy uid.
        b("tproxy", template("TPROXY", &[]), &[info]),
        // No interceptionMode annotation renders `-m ""`.
        b("empty-mode", template("", &[]), &[info]),
        b(
            "ports-and-ranges",
            template(
                "REDIRECT",
                &[
                    ("-i", "10.0.0.0/8,172.16.0.0/12"),
                    ("-x", "10.96.0.1/32,169.254.169.254/32"),
                    ("-b", "8080,9090"),
                    ("-d", "15090,15021,15020,8081"),
                    ("-q", "3306,5432"),
                    ("-o", "22,443"),
                ],
            ),
            &[info],
        ),
        b(
            "interfaces",
            template("REDIRECT", &[("-k", "eth1,net1"), ("-c", "eth2")]),
            &[info],
        ),
        b(
            "tproxy-interfaces",
            template("TPROXY", &[("-k", "eth1"), ("-c", "eth2")]),
            &[info],
        ),
        b(
            "agent-log-level",
            template("REDIRECT", &[]),
            &["--log_output_level=misc:error,default:debug"],
        ),
        b("json", template("REDIRECT", &[]), &[info, "--log_as_json"]),
        b(
            "json-debug-tproxy",
            template("TPROXY", &[]),
            &["--log_output_level=default:debug", "--log_as_json"],
        ),
        b(
            "force-apply",
            template("REDIRECT", &[]),
            &[info, "--force-apply"],
        ),
        Branch {
            name: "cni-validation",
            capture: template("REDIRECT", &[]),
            tail: vec![info, "--run-validation", "--skip-rule-apply"],
            preinstalled: true,
        },
        // Helm `global.nativeNftables`: the flag comes last.
        b(
            "native-nftables",
            template("REDIRECT", &[]),
            &[info, "--native-nftables"],
        ),
        b(
            "native-nftables-tproxy-json",
            template("TPROXY", &[("-k", "eth1"), ("-c", "eth2")]),
            &[info, "--log_as_json", "--native-nftables"],
        ),
        Branch {
            name: "cni-validation-native-nftables",
            capture: template("REDIRECT", &[]),
            tail: vec![
                info,
                "--run-validation",
                "--skip-rule-apply",
                "--native-nftables",
            ],
            preinstalled: true,
        },
        Branch {
            name: "cni-validation-json",
            capture: template("REDIRECT", &[]),
            tail: vec![
                info,
                "--log_as_json",
                "--run-validation",
                "--skip-rule-apply",
            ],
            preinstalled: true,
        },
    ]
}

/// Shell that prints the namespace's capture state: both families' rules, policy routing and
/// lo's addresses.
const SNAPSHOT: &str = "snapshot() {\n\
    { iptables-nft-save; echo '## v6'; ip6tables-nft-save; echo '## rules'; ip rule show; \
      ip -6 rule show; echo '## routes'; ip route show table all; ip -6 route show table all; \
      echo '## lo'; ip -o addr show dev lo; echo '## nft'; nft list ruleset inet; } \
      > \"$NS_OUT/$1\" 2>/dev/null\n}\n";

/// Runs `argv` in a fresh namespace (after `setup`, if any): exit code, stdout, stderr and
/// the state after.
struct Outcome {
    rc: String,
    stdout: String,
    stderr: String,
    state: String,
    describe: String,
}

fn run_in_ns(setup: Option<&[String]>, argv: &[String]) -> Outcome {
    let env = shell_command([format!("PATH={}", sane_path())]);
    let mut script = format!("{SNAPSHOT}ip link set lo up\n");
    if let Some(setup) = setup {
        let mut cmd = vec![BIN.to_string()];
        cmd.extend(setup.iter().cloned());
        script.push_str(&format!(
            "env -i {env} {} >/dev/null\n",
            shell_command(&cmd)
        ));
    }
    let mut cmd = vec![BIN.to_string()];
    cmd.extend(argv.iter().cloned());
    script.push_str(&format!(
        "set +e\nenv -i {env} {} >\"$NS_OUT/out\" 2>\"$NS_OUT/err\"\necho $? >\"$NS_OUT/rc\"\nset -e\nsnapshot state\n",
        shell_command(&cmd)
    ));
    let out = run_in_fresh_ns(&script);
    assert!(out.success(), "{}", out.describe());
    let f = |n: &str| out.file(n).unwrap_or_default().to_string();
    Outcome {
        rc: f("rc").trim().to_string(),
        stdout: f("out"),
        stderr: f("err"),
        state: normalize_save(&f("state")),
        describe: out.describe(),
    }
}

/// Every line of `text` is one JSON object with Istio's keys.
fn check_json_lines(text: &str, what: &str) -> Result<usize, String> {
    let mut n = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| format!("{what}: not a JSON line ({e}): {line}"))?;
        for key in ["level", "time", "msg"] {
            if !v.get(key).is_some_and(|k| k.is_string()) {
                return Err(format!("{what}: no string {key:?} in {line}"));
            }
        }
        n += 1;
    }
    Ok(n)
}

/// Istio's console line: `2026-11-26T23:50:00.123456Z<TAB>level<TAB>message`.
fn is_console_line(line: &str) -> bool {
    let mut parts = line.splitn(3, '\t');
    let (Some(time), Some(level), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    time.len() == 27
        && time.ends_with('Z')
        && time.as_bytes()[10] == b'T'
        && time.as_bytes()[19] == b'.'
        && ["debug", "info", "warn", "error"].contains(&level)
}

#[test]
#[ignore = "needs root and network namespaces"]
fn injector_argument_lists_apply_istios_rules_with_istios_logs() {
    if skip_unless_root("injector_argument_lists_apply_istios_rules_with_istios_logs") {
        return;
    }
    let mut failures = Vec::new();
    for branch in branches() {
        let mut argv = vec!["istio-iptables".to_string()];
        argv.extend(branch.capture.iter().cloned());
        argv.extend(branch.tail.iter().map(|s| s.to_string()));
        // The capture flags and those of the tail that `keep` keeps.
        let capture_and = |keep: &dyn Fn(&str) -> bool| -> Vec<String> {
            let tail = branch
                .tail
                .iter()
                .filter(|t| keep(t))
                .map(|s| s.to_string());
            branch.capture.iter().cloned().chain(tail).collect()
        };
        // The same config without the first word and without the log flags.
        let plain = capture_and(&|t| !t.starts_with("--log_"));
        // CNI installed the rules with the same backend.
        let installed = capture_and(&|t| t == "--native-nftables");
        let setup = branch.preinstalled.then_some(installed.as_slice());
        let got = run_in_ns(setup, &argv);
        let want = run_in_ns(setup, &plain);
        let mut wrong = Vec::new();
        if got.rc != "0" {
            wrong.push(format!("exit code {} (want 0)", got.rc));
        }
        if want.rc != "0" {
            wrong.push(format!("the plain command exited {}", want.rc));
        }
        if got.state != want.state {
            wrong.push(format!(
                "kernel state differs from the plain command's:\n--- plain ---\n{}--- injector ---\n{}",
                want.state, got.state
            ));
        }
        let nft = branch.tail.contains(&"--native-nftables");
        if nft
            && (!got.state.contains("table inet istio-proxy-nat") || got.state.contains("ISTIO_"))
        {
            wrong.push("not Istio's nft tables alone in the kernel".to_string());
        }
        if !nft && !got.state.contains("ISTIO_") {
            wrong.push("no ISTIO_ chains in the kernel".to_string());
        }
        let json = branch.tail.contains(&"--log_as_json");
        if json {
            for (text, what) in [(&got.stdout, "stdout"), (&got.stderr, "stderr")] {
                if let Err(e) = check_json_lines(text, what) {
                    wrong.push(e);
                }
            }
        } else if !got.stdout.lines().next().is_some_and(is_console_line) {
            wrong.push("stdout does not start with an Istio console log line".to_string());
        }
        let logs = format!("{}{}", got.stdout, got.stderr);
        let debug_on = branch.tail.iter().any(|t| t.contains("default:debug"));
        let has_debug = logs.contains("\tdebug\t") || logs.contains("\"level\":\"debug\"");
        if debug_on != has_debug {
            wrong.push(format!(
                "debug lines present: {has_debug}, wanted: {debug_on}"
            ));
        }
        if !branch.preinstalled && !logs.contains("Istio config:") {
            wrong.push("no `Istio config:` log entry".to_string());
        }
        if branch.preinstalled && !logs.contains("validation passed") {
            wrong.push("validation did not report success".to_string());
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "branch {}: `{}`:\n  {}\n{}",
                branch.name,
                shell_command(&argv),
                wrong.join("\n  "),
                got.describe
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn json_logs_carry_errors_too() {
    // A bad value after the log flags parsed: the error is a JSON object on stderr too.
    let out = std::process::Command::new(BIN)
        .args(["istio-iptables", "--log_as_json", "-p", "70000"])
        .env_clear()
        .env("PATH", sane_path())
        .output()
        .expect("run the binary");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let n = check_json_lines(&stderr, "stderr").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(n, 1, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stderr.trim()).unwrap();
    assert_eq!(v["level"], "error");
    let msg = v["msg"].as_str().unwrap();
    assert!(
        msg.contains("--envoy-port") && msg.contains("70000"),
        "{msg}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn log_target_file_and_dry_run_keep_stdout_for_the_script() {
    let dir = common::TempDir::new("istio-iptables-logs");
    let file = dir.path().join("init.log");
    let run = |extra: &[&str]| {
        let mut args = vec!["istio-iptables", "--dry-run"];
        args.extend_from_slice(common::SEED);
        args.extend_from_slice(extra);
        std::process::Command::new(BIN)
            .args(&args)
            .env_clear()
            .env("PATH", sane_path())
            .output()
            .expect("run the binary")
    };
    // Dry-run without a target: the script alone on stdout, logs on stderr.
    let out = run(&["--log_output_level=default:info"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("#!/bin/sh\n"), "{stdout}");
    assert!(!stdout.contains("\tinfo\t"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("\tinfo\tIstio config:"));
    // A named target gets every line; nothing else does.
    let out = run(&["--log_target", file.to_str().unwrap(), "--log_as_json"]);
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let logged = std::fs::read_to_string(&file).unwrap();
    assert!(
        check_json_lines(&logged, "log file").unwrap() >= 2,
        "{logged}"
    );
    // Flags Istio has had but that do nothing here are accepted, in both forms.
    let out = run(&[
        "--log_rotate",
        "/tmp/x",
        "--log_rotate_max_age=7",
        "--log_rotate_max_size",
        "10",
        "--log_rotate_max_backups=3",
        "--log_stacktrace_level=default:error",
        "--log_caller=default",
        "--vklog",
        "9",
        "--log_output_level",
        "default:none",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stderr.is_empty(), "none: no log lines");
}

#[test]
#[ignore = "needs root and network namespaces"]
fn rerun_over_the_old_multiport_form_reconciles_to_istio_masters_form() {
    if skip_unless_root("rerun_over_the_old_multiport_form_reconciles_to_istio_masters_form") {
        return;
    }
    let seed: Vec<String> = common::SEED.iter().map(|s| s.to_string()).collect();
    let env = shell_command([format!("PATH={}", sane_path())]);
    let mut dry = vec![BIN.to_string(), "--dry-run".to_string()];
    dry.extend(seed.iter().cloned());
    let mut apply = vec![BIN.to_string()];
    apply.extend(seed.iter().cloned());
    let mut verify = vec![BIN.to_string(), "verify".to_string()];
    verify.extend(seed.iter().cloned());
    // What versions before this one committed: both excluded ports in one multiport rule.
    let script = format!(
        "{SNAPSHOT}ip link set lo up\nenv -i {env} {dry} 2>/dev/null \
         | sed -e 's/^-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN$/-A ISTIO_INBOUND -p tcp -m multiport --dports 15090,15020 -j RETURN/' \
               -e '/^-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN$/d' > old.sh\n\
         grep -q multiport old.sh\nsh old.sh\nsnapshot old\n\
         env -i {env} {apply} >\"$NS_OUT/out\" 2>&1\nsnapshot after\n\
         set +e\nenv -i {env} {verify} >\"$NS_OUT/verify\" 2>&1\necho $? >\"$NS_OUT/verify.rc\"\n",
        dry = shell_command(&dry),
        apply = shell_command(&apply),
        verify = shell_command(&verify),
    );
    let out = run_in_fresh_ns(&script);
    assert!(out.success(), "{}", out.describe());
    let old = out.file("old").unwrap();
    assert!(old.contains("--dports 15090,15020"), "{}", out.describe());
    assert_eq!(
        out.file("verify.rc").unwrap().trim(),
        "0",
        "verify must find no drift after the re-run\n{}",
        out.describe()
    );
    let fresh = run_in_ns(None, &seed);
    assert_eq!(fresh.rc, "0", "{}", fresh.describe);
    assert_eq!(
        normalize_save(out.file("after").unwrap()),
        fresh.state,
        "{}",
        out.describe()
    );
}
