//! Conformance against Istio's own istio-iptables test data
//! (`tests/data/istio/<case>/`, discovered by listing the directory).
//!
//! - `dry_run_payloads_match_expected` (any user): `--dry-run` must print an
//!   sh script whose `iptables-restore --noflush <<'EOF'` (and, when IPv6 is
//!   expected, `ip6tables-restore --noflush <<'EOF'`) payloads equal
//!   `expected-v4.rules` / `expected-v6.rules`.
//! - `real_run_matches_expected_in_fresh_namespace` (root only): the rules
//!   the binary installs for real (A), and those installed by running its
//!   dry-run script (C), must equal, as `iptables-save`/`ip6tables-save`
//!   show them, what restoring the expected payloads installs (B).
//! - `harness_sanity` / `helpers_behave` check the harness itself.

use crate::common;

use common::{
    Case, NsOutput, all_istio_cases, case_command, case_shell_command, compare_lines,
    describe_output, extract_heredoc_blocks, indent, normalize_restore_payload, normalize_save,
    report_cases, run_in_fresh_ns, run_in_fresh_ns_ok, run_with_timeout, shell_quote,
    skip_unless_root, with_test_groups_prelude,
};
use std::fmt::Write as _;
use std::process::Output;

const V4_MARKER: &str = "iptables-restore --noflush <<'EOF'";
const V6_MARKER: &str = "ip6tables-restore --noflush <<'EOF'";

/// Output of the binary run for a case with `--dry-run`.
fn dry_run(case: &Case) -> Result<Output, String> {
    run_with_timeout(
        &mut case_command(case, &["--dry-run"]),
        common::DEFAULT_TIMEOUT,
    )
}

// ---------------------------------------------------------------------------
// Test 1: dry-run payloads
// ---------------------------------------------------------------------------

/// Checks one case's dry-run script against the expected payloads.
fn check_dry_run(case: &Case) -> Result<(), String> {
    let out = dry_run(case)?;
    if !out.status.success() {
        return Err(describe_output("`--dry-run` did not exit 0", &out));
    }
    let script = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let context = || {
        format!(
            "--- dry-run script (stdout) ---\n{}\n--- binary stderr ---\n{}\n",
            script.trim_end(),
            stderr.trim_end()
        )
    };
    let mut problems = String::new();

    let families: [(&str, &str, Option<&String>); 2] = [
        ("v4", V4_MARKER, Some(&case.expected_v4)),
        ("v6", V6_MARKER, case.expected_v6.as_ref()),
    ];
    for (family, marker, expected) in families {
        let blocks = match extract_heredoc_blocks(&script, marker) {
            Ok(b) => b,
            Err(e) => {
                let _ = writeln!(problems, "[{family}] {e}");
                continue;
            }
        };
        match expected {
            None => {
                let stray: Vec<&str> = script
                    .lines()
                    .filter(|l| l.trim_start().starts_with("ip6tables-restore"))
                    .collect();
                if !blocks.is_empty() || !stray.is_empty() {
                    let _ = writeln!(
                        problems,
                        "[{family}] no expected-{family}.rules, so nothing may be applied to \
                         ip6tables, but the script has ip6tables-restore: {stray:?}"
                    );
                }
            }
            Some(expected) => {
                if blocks.len() != 1 {
                    let _ = writeln!(
                        problems,
                        "[{family}] expected exactly one `{marker}` block, found {}",
                        blocks.len()
                    );
                    continue;
                }
                let want = normalize_restore_payload(expected);
                let got = normalize_restore_payload(&blocks[0]);
                if let Some(diff) = compare_lines(
                    &format!("expected-{family}.rules"),
                    &want,
                    &format!("dry-run {family} payload"),
                    &got,
                ) {
                    let _ = writeln!(problems, "[{family}] payload mismatch:\n{diff}");
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{problems}{}", context()))
    }
}

#[test]
fn dry_run_payloads_match_expected() {
    let cases = all_istio_cases();
    let mut failures = Vec::new();
    for case in &cases {
        match check_dry_run(case) {
            Ok(()) => eprintln!("dry-run  PASS {}", case.name),
            Err(why) => {
                eprintln!("dry-run  FAIL {}", case.name);
                failures.push((case.name.clone(), why));
            }
        }
    }
    report_cases("conformance dry-run", cases.len(), failures);
}

// ---------------------------------------------------------------------------
// Test 2: real run in fresh namespaces
// ---------------------------------------------------------------------------

/// Normalised `iptables-save` and `ip6tables-save` of one namespace.
struct Saves {
    v4: Vec<String>,
    v6: Vec<String>,
}

/// Script tail that dumps both families into `$NS_OUT/v4.save`/`v6.save`.
const SAVE_BOTH: &str =
    "iptables-save > \"$NS_OUT/v4.save\"\nip6tables-save > \"$NS_OUT/v6.save\"\n";

fn saves_of(out: &NsOutput) -> Result<Saves, String> {
    let lines = |s: &str| normalize_save(s).lines().map(str::to_string).collect();
    Ok(Saves {
        v4: lines(out.file("v4.save")?),
        v6: lines(out.file("v6.save")?),
    })
}

/// Reads `$NS_OUT/<prefix>.rc` and fails (with the step's stdout/stderr) if
/// it is not 0.
fn check_step_rc(out: &NsOutput, prefix: &str, what: &str) -> Result<(), String> {
    let rc = out.file(&format!("{prefix}.rc"))?.trim().to_string();
    if rc == "0" {
        return Ok(());
    }
    Err(format!(
        "{what} exited with status {rc}\n--- {what} stdout ---\n{}\n--- {what} stderr ---\n{}\n",
        out.files
            .get(&format!("{prefix}.stdout"))
            .map_or("", |s| s.trim_end()),
        out.files
            .get(&format!("{prefix}.stderr"))
            .map_or("", |s| s.trim_end()),
    ))
}

/// State A: the binary, run for real.
fn state_a(case: &Case, groups: &str) -> Result<(Saves, String), String> {
    let script = format!(
        "{groups}ip link set lo up\n\
         # No xtrace while stderr is redirected: it would land in bin.stderr.\n\
         set +x\nrc=0\n{} >\"$NS_OUT/bin.stdout\" 2>\"$NS_OUT/bin.stderr\" || rc=$?\n\
         echo \"$rc\" > \"$NS_OUT/bin.rc\"\nset -x\n{SAVE_BOTH}",
        case_shell_command(case, &[])
    );
    let out = run_in_fresh_ns_ok(&script)?;
    let bin_stderr = out.files.get("bin.stderr").cloned().unwrap_or_default();
    check_step_rc(&out, "bin", "the binary (real run)")?;
    Ok((saves_of(&out)?, bin_stderr))
}

/// State B: the expected payloads restored.
fn state_b(case: &Case, groups: &str) -> Result<Saves, String> {
    let mut script = format!(
        "{groups}ip link set lo up\niptables-restore --noflush < {}\n",
        shell_quote(case.dir.join("expected-v4.rules"))
    );
    if case.expected_v6.is_some() {
        let _ = writeln!(
            script,
            "ip6tables-restore --noflush < {}",
            shell_quote(case.dir.join("expected-v6.rules"))
        );
    }
    script.push_str(SAVE_BOTH);
    saves_of(&run_in_fresh_ns_ok(&script)?)
}

/// State C: the dry-run script executed with `sh`.
fn state_c(case: &Case, groups: &str, dry_run_script: &str) -> Result<Saves, String> {
    const END: &str = "__ISTIO_IPTABLES_DRY_RUN_SCRIPT_END__";
    let script = format!(
        "{groups}ip link set lo up\n\
         cat > \"$NS_TMP/dry-run.sh\" <<'{END}'\n{}\n{END}\n\
         set +x\nrc=0\n(cd {} && exec env -i PATH=\"$PATH\" sh \"$NS_TMP/dry-run.sh\") \
         >\"$NS_OUT/dry.stdout\" 2>\"$NS_OUT/dry.stderr\" || rc=$?\n\
         echo \"$rc\" > \"$NS_OUT/dry.rc\"\nset -x\n{SAVE_BOTH}",
        dry_run_script.trim_end_matches('\n'),
        shell_quote(&case.dir)
    );
    let out = run_in_fresh_ns_ok(&script)?;
    check_step_rc(&out, "dry", "the dry-run script run with sh")?;
    saves_of(&out)
}

fn compare_saves(problems: &mut String, expected: &Saves, actual: &Saves, actual_label: &str) {
    for (family, want, got) in [
        ("iptables-save", &expected.v4, &actual.v4),
        ("ip6tables-save", &expected.v6, &actual.v6),
    ] {
        if let Some(diff) = compare_lines(
            &format!("{family} after restoring expected rules (B)"),
            want,
            &format!("{family} after {actual_label}"),
            got,
        ) {
            let _ = writeln!(
                problems,
                "[{family}] {actual_label} differs from expected:\n{diff}"
            );
        }
    }
}

fn check_real_run(case: &Case, groups: &str) -> Result<(), String> {
    let b = state_b(case, groups)
        .map_err(|e| format!("state B (restoring the expected rules) failed:\n{e}"))?;
    // Harness sanity: the expected rules must show up in the saves.
    if !b.v4.iter().any(|l| l.starts_with("-A ")) {
        return Err(format!(
            "harness problem: iptables-save after restoring expected-v4.rules has no rules:\n{}",
            b.v4.join("\n")
        ));
    }
    if case.expected_v6.is_some() && !b.v6.iter().any(|l| l.starts_with("-A ")) {
        return Err(format!(
            "harness problem: ip6tables-save after restoring expected-v6.rules has no rules:\n{}",
            b.v6.join("\n")
        ));
    }

    let mut problems = String::new();
    let mut bin_stderr = None;

    match state_a(case, groups) {
        Ok((a, stderr)) => {
            bin_stderr = Some(stderr);
            compare_saves(&mut problems, &b, &a, "the binary's real run (A)");
        }
        Err(e) => {
            let _ = writeln!(
                problems,
                "state A (real run of the binary) failed:\n{}",
                indent(&e, "  ")
            );
        }
    }

    match dry_run(case) {
        Ok(out) if out.status.success() => {
            let script = String::from_utf8_lossy(&out.stdout).into_owned();
            match state_c(case, groups, &script) {
                Ok(c) => compare_saves(&mut problems, &b, &c, "running the dry-run script (C)"),
                Err(e) => {
                    let _ = writeln!(
                        problems,
                        "state C (running the dry-run script) failed:\n{}",
                        indent(&e, "  ")
                    );
                }
            }
        }
        Ok(out) => {
            let _ = writeln!(
                problems,
                "state C skipped: {}",
                describe_output("`--dry-run` did not exit 0", &out)
            );
        }
        Err(e) => {
            let _ = writeln!(problems, "state C skipped: {e}");
        }
    }

    if problems.is_empty() {
        Ok(())
    } else if let Some(stderr) = bin_stderr {
        Err(format!(
            "{problems}--- binary stderr (real run) ---\n{}\n",
            stderr.trim_end()
        ))
    } else {
        // State A failed: its error already shows the binary's stderr.
        Err(problems)
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn real_run_matches_expected_in_fresh_namespace() {
    if skip_unless_root("conformance real-run") {
        return;
    }
    let groups = with_test_groups_prelude();
    let cases = all_istio_cases();
    let mut failures = Vec::new();
    for case in &cases {
        match check_real_run(case, &groups) {
            Ok(()) => eprintln!("real-run PASS {}", case.name),
            Err(why) => {
                eprintln!("real-run FAIL {}", case.name);
                failures.push((case.name.clone(), why));
            }
        }
    }
    report_cases("conformance real-run", cases.len(), failures);
}

// ---------------------------------------------------------------------------
// Harness self-checks
// ---------------------------------------------------------------------------

/// Root only: the namespace harness really applies rules, isolates them,
/// makes the test groups exist, and reports failing commands loudly.
#[test]
#[ignore = "needs root and network namespaces"]
fn harness_sanity() {
    if skip_unless_root("conformance harness sanity") {
        return;
    }
    let host_group = std::fs::read_to_string("/etc/group").unwrap();
    let groups = with_test_groups_prelude();

    // The same payload applied in two namespaces gives equal, non-empty saves.
    let cases = all_istio_cases();
    let case = cases
        .iter()
        .find(|c| c.expected_v6.is_some() && c.env.iter().any(|(_, v)| v.contains("java")))
        .or_else(|| cases.iter().find(|c| c.expected_v6.is_some()))
        .unwrap_or(&cases[0]);
    let first = state_b(case, &groups).unwrap_or_else(|e| panic!("{e}"));
    let second = state_b(case, &groups).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        first.v4.iter().any(|l| l.starts_with("-A ")),
        "{:?}",
        first.v4
    );
    if case.expected_v6.is_some() {
        assert!(
            first.v6.iter().any(|l| l.starts_with("-A ")),
            "{:?}",
            first.v6
        );
    }
    assert_eq!(first.v4, second.v4);
    assert_eq!(first.v6, second.v6);
    assert!(
        !first.v4.iter().any(|l| l.contains('[')),
        "counters not stripped: {:?}",
        first.v4
    );

    // A fresh namespace starts empty (nothing leaked from the previous ones).
    let empty = run_in_fresh_ns_ok(SAVE_BOTH).unwrap_or_else(|e| panic!("{e}"));
    let empty = saves_of(&empty).unwrap();
    assert!(
        empty.v4.is_empty() && empty.v6.is_empty(),
        "{:?} {:?}",
        empty.v4,
        empty.v6
    );

    // The groups exist inside, and the bind mount does not leak to the host.
    let out = run_in_fresh_ns_ok(&format!(
        "{groups}getent group java > \"$NS_OUT/java\"\ngetent group ftp > \"$NS_OUT/ftp\"\n"
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.file("java").unwrap().starts_with("java:"));
    assert!(out.file("ftp").unwrap().starts_with("ftp:"));
    assert_eq!(std::fs::read_to_string("/etc/group").unwrap(), host_group);

    // A failing command inside the script is an error carrying its stderr.
    let err = run_in_fresh_ns_ok(
        "echo harness-marker-before >&2\n\
         printf '*nat\\n-A NO_SUCH_CHAIN -j RETURN\\nCOMMIT\\n' | iptables-restore --noflush\n\
         echo harness-marker-after > \"$NS_OUT/after\"\n",
    )
    .expect_err("a failing iptables-restore must fail the namespace script");
    assert!(err.contains("harness-marker-before"), "{err}");
    assert!(err.contains("iptables-restore"), "{err}");
    assert!(
        !err.contains("$NS_OUT/after ---"),
        "script went on after a failure: {err}"
    );
    let raw = run_in_fresh_ns("exit 3");
    assert_eq!(raw.status.code(), Some(3));
}

/// Any user: pure helpers.
#[test]
fn helpers_behave() {
    assert_eq!(
        common::parse_args_file("-b\n\n-u\n1337\n"),
        vec!["-b", "", "-u", "1337"]
    );
    assert_eq!(common::parse_args_file("-b\n*\n"), vec!["-b", "*"]);
    assert!(common::parse_args_file("").is_empty());
    assert_eq!(
        common::parse_env_file("A=1\n\nB=x=y\n").unwrap(),
        vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]
    );

    assert_eq!(
        normalize_restore_payload("* nat\n\n  -A  X   -j RETURN \nCOMMIT\n"),
        vec!["*nat", "-A X -j RETURN", "COMMIT"]
    );
    assert_eq!(
        normalize_save(
            "# Generated by x\n*nat\n:PREROUTING ACCEPT [12:345]\n:FOO - [0:0]\n\n-A FOO -j RETURN\nCOMMIT\n# Completed\n"
        ),
        "*nat\n:PREROUTING ACCEPT\n:FOO -\n-A FOO -j RETURN\nCOMMIT\n"
    );

    let script = format!(
        "set -e\n{V4_MARKER}\n* nat\n-A X\nCOMMIT\nEOF\nip rule add x\n{V6_MARKER}\n*nat\nCOMMIT\nEOF\n"
    );
    assert_eq!(
        extract_heredoc_blocks(&script, V4_MARKER).unwrap(),
        vec!["* nat\n-A X\nCOMMIT\n"]
    );
    assert_eq!(
        extract_heredoc_blocks(&script, V6_MARKER).unwrap(),
        vec!["*nat\nCOMMIT\n"]
    );
    assert!(extract_heredoc_blocks(&format!("{V4_MARKER}\n*nat\n"), V4_MARKER).is_err());

    assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    assert_eq!(shell_quote(""), "''");
    assert_eq!(shell_quote("*"), "'*'");

    assert!(compare_lines("e", &["a", "b"], "a", &["a", "b"]).is_none());
    let diff = compare_lines("e", &["a", "b", "c"], "a", &["a", "x", "c"]).unwrap();
    assert!(diff.contains("line 2"), "{diff}");
    assert!(diff.contains("- b") && diff.contains("+ x"), "{diff}");
}
