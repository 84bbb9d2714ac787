//! Conformance of `--native-nftables` against Istio's istio-nftables test data
//! (`tests/data/istio-nftables/<case>/`, the shared set, and `tests/data/istio-nftables-more/`,
//! Istio's other goldens transcribed by us; discovered by listing the directories): `args`
//! (one per line, run from inside the case folder), `env`, `resolv.conf` where DNS is
//! captured, and `expected.nft`, Istio's golden: the exact transaction it feeds to `nft -f -`.
//!
//! - `dry_run_transaction_matches_expected` (any user): `--dry-run` prints an sh script with
//!   one `nft -f - <<'EOF'` here-document equal to `expected.nft` line by line, followed by
//!   the same `ip` commands the iptables backend's dry run prints for the same config.
//! - `dry_run_script_matches_expected_in_the_kernel` (root only): in a fresh network + mount
//!   namespace, `nft list ruleset` after running the dry-run script with `sh` equals the one
//!   after `nft -f expected.nft`.
//! - `real_apply_matches_expected_and_reruns_commit_nothing` (root only): in a fresh
//!   namespace, the real apply leaves the same `nft list ruleset` as `nft -f expected.nft`,
//!   runs no program but one `nft` (and the config's `ip` steps), and a second run commits
//!   nothing and changes nothing.
//! - `native_nftables_env_var_and_cleanup_dry_run` and `harness_sanity_nft` check the env
//!   var, the cleanup script and the harness itself.

use crate::common;

use common::{
    BIN, DEFAULT_TIMEOUT, case_dirs, compare_lines, describe_output, extract_heredoc_blocks,
    indent, parse_args_file, parse_env_file, report_cases, run_in_fresh_ns_ok, run_with_timeout,
    sane_path, shell_quote, skip_unless_root, with_test_groups_prelude,
};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const NFT_MARKER: &str = "nft -f - <<'EOF'";
const V4_MARKER: &str = "iptables-restore --noflush <<'EOF'";

/// One case directory of `tests/data/istio-nftables`.
struct NftCase {
    name: String,
    dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    expected: String,
}

/// `tests/data/istio-nftables`: the shared set, copied as it is.
const SHARED: &str = "tests/data/istio-nftables";
/// `tests/data/istio-nftables-more`: Istio's other nft goldens, transcribed by us from its
/// run_test.go (each SOURCE names the golden and the commit).
const MORE: &str = "tests/data/istio-nftables-more";

/// Every case: the shared set, then ours.
fn nft_cases() -> Vec<NftCase> {
    let mut cases = read_cases(SHARED);
    cases.extend(read_cases(MORE));
    cases
}

/// The cases under `root` (relative to the crate), sorted by name. Panics on malformed data
/// or an empty set.
fn read_cases(root: &str) -> Vec<NftCase> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(root);
    let dirs = case_dirs(&root);
    dirs.into_iter()
        .map(|dir| {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            let read = |f: &str| {
                fs::read_to_string(dir.join(f))
                    .unwrap_or_else(|e| panic!("case {name}: cannot read {f}: {e}"))
            };
            let args = parse_args_file(&read("args"));
            assert_eq!(
                args.first().map(String::as_str),
                Some("--native-nftables"),
                "case {name}: args must start with --native-nftables"
            );
            let env = if dir.join("env").exists() {
                parse_env_file(&read("env")).unwrap_or_else(|e| panic!("case {name}: env: {e}"))
            } else {
                Vec::new()
            };
            NftCase {
                expected: read("expected.nft"),
                name,
                dir,
                args,
                env,
            }
        })
        .collect()
}

/// The binary for `case` with `args` (the case's, or a variant) and `extra` appended: run
/// from the case folder, environment cleared but for PATH and the case's env.
fn command(case: &NftCase, args: &[String], extra: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .args(extra)
        .current_dir(&case.dir)
        .env_clear()
        .env("PATH", sane_path())
        .envs(case.env.iter().cloned());
    cmd
}

fn run(mut cmd: Command) -> Result<Output, String> {
    run_with_timeout(&mut cmd, DEFAULT_TIMEOUT)
}

/// The case's `--dry-run` script.
fn dry_run_script(case: &NftCase) -> Result<String, String> {
    let out = run(command(case, &case.args, &["--dry-run"]))?;
    if !out.status.success() {
        return Err(describe_output("`--dry-run` did not exit 0", &out));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Lines after the last line that is exactly `EOF`, blank ones dropped.
fn after_last_heredoc(script: &str) -> Vec<&str> {
    let lines: Vec<&str> = script.lines().collect();
    let start = lines.iter().rposition(|l| *l == "EOF").map_or(0, |i| i + 1);
    lines[start..]
        .iter()
        .copied()
        .filter(|l| !l.trim().is_empty())
        .collect()
}

// ---------------------------------------------------------------------------
// Test 1: the dry-run text
// ---------------------------------------------------------------------------

fn check_dry_run(case: &NftCase) -> Result<(), String> {
    let script = dry_run_script(case)?;
    let context = || format!("--- dry-run script ---\n{}\n", script.trim_end());
    let mut problems = String::new();

    match extract_heredoc_blocks(&script, NFT_MARKER) {
        Ok(blocks) if blocks.len() == 1 => {
            let want: Vec<&str> = case.expected.lines().collect();
            let got: Vec<&str> = blocks[0].lines().collect();
            if let Some(diff) = compare_lines("expected.nft", &want, "dry-run transaction", &got) {
                let _ = writeln!(problems, "transaction mismatch:\n{diff}");
            }
        }
        Ok(blocks) => {
            let _ = writeln!(
                problems,
                "expected exactly one `{NFT_MARKER}` block, found {}",
                blocks.len()
            );
        }
        Err(e) => {
            let _ = writeln!(problems, "{e}");
        }
    }
    if script.contains("iptables-restore") {
        let _ = writeln!(problems, "the nft script must not run iptables-restore");
    }

    // The same `ip` steps as the iptables backend's dry run of the same config.
    let iptables_args: Vec<String> = case.args[1..].to_vec();
    let iptables_script = match run(command(case, &iptables_args, &["--dry-run"])) {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        Ok(out) => {
            return Err(describe_output(
                "the iptables `--dry-run` did not exit 0",
                &out,
            ));
        }
        Err(e) => return Err(e),
    };
    if extract_heredoc_blocks(&iptables_script, V4_MARKER).map(|b| b.len()) != Ok(1) {
        return Err(format!(
            "harness problem: the iptables dry run has no `{V4_MARKER}` block:\n{iptables_script}"
        ));
    }
    let want = after_last_heredoc(&iptables_script);
    let got = after_last_heredoc(&script);
    if let Some(diff) = compare_lines(
        "iptables dry-run ip steps",
        &want,
        "nft dry-run ip steps",
        &got,
    ) {
        let _ = writeln!(problems, "ip steps differ:\n{diff}");
    }

    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{problems}{}", context()))
    }
}

#[test]
fn dry_run_transaction_matches_expected() {
    let cases = nft_cases();
    let mut failures = Vec::new();
    for case in &cases {
        match check_dry_run(case) {
            Ok(()) => eprintln!("nft dry-run  PASS {}", case.name),
            Err(why) => {
                eprintln!("nft dry-run  FAIL {}", case.name);
                failures.push((case.name.clone(), why));
            }
        }
    }
    report_cases("nft conformance dry-run", cases.len(), failures);
}

// ---------------------------------------------------------------------------
// Test 2: the kernel state (root)
// ---------------------------------------------------------------------------

/// Script tail that saves the ruleset into `$NS_OUT/ruleset`.
const LIST_RULESET: &str = "nft list ruleset > \"$NS_OUT/ruleset\"\n";

fn ruleset_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// The ruleset after `nft -f expected.nft` in a fresh namespace.
fn expected_ruleset(case: &NftCase, groups: &str) -> Result<Vec<String>, String> {
    let script = format!(
        "{groups}ip link set lo up\nnft -f {}\n{LIST_RULESET}",
        shell_quote(case.dir.join("expected.nft"))
    );
    let out = run_in_fresh_ns_ok(&script)?;
    Ok(ruleset_lines(out.file("ruleset")?))
}

/// The ruleset after running the dry-run script with `sh` (from the case folder, with an
/// empty environment but PATH) in a fresh namespace.
fn dry_run_ruleset(case: &NftCase, groups: &str, dry_run: &str) -> Result<Vec<String>, String> {
    const END: &str = "__ISTIO_IPTABLES_NFT_DRY_RUN_END__";
    let script = format!(
        "{groups}ip link set lo up\n\
         cat > \"$NS_TMP/dry-run.sh\" <<'{END}'\n{}\n{END}\n\
         (cd {} && exec env -i PATH=\"$PATH\" sh \"$NS_TMP/dry-run.sh\")\n{LIST_RULESET}",
        dry_run.trim_end_matches('\n'),
        shell_quote(&case.dir)
    );
    let out = run_in_fresh_ns_ok(&script)?;
    Ok(ruleset_lines(out.file("ruleset")?))
}

fn check_kernel(case: &NftCase, groups: &str) -> Result<(), String> {
    let want = expected_ruleset(case, groups)
        .map_err(|e| format!("`nft -f expected.nft` failed:\n{}", indent(&e, "  ")))?;
    // Harness sanity: the expected transaction really is in the kernel.
    if !want.iter().any(|l| l == "table inet istio-proxy-nat {") {
        return Err(format!(
            "harness problem: no istio-proxy-nat table after `nft -f expected.nft`:\n{}",
            want.join("\n")
        ));
    }
    let script = dry_run_script(case)?;
    let got = dry_run_ruleset(case, groups, &script)
        .map_err(|e| format!("running the dry-run script failed:\n{}", indent(&e, "  ")))?;
    match compare_lines(
        "nft list ruleset after nft -f expected.nft",
        &want,
        "nft list ruleset after the dry-run script",
        &got,
    ) {
        None => Ok(()),
        Some(diff) => Err(format!("{diff}--- dry-run script ---\n{script}")),
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn dry_run_script_matches_expected_in_the_kernel() {
    if skip_unless_root("nft conformance kernel") {
        return;
    }
    let groups = with_test_groups_prelude();
    let cases = nft_cases();
    let mut failures = Vec::new();
    for case in &cases {
        match check_kernel(case, &groups) {
            Ok(()) => eprintln!("nft kernel   PASS {}", case.name),
            Err(why) => {
                eprintln!("nft kernel   FAIL {}", case.name);
                failures.push((case.name.clone(), why));
            }
        }
    }
    report_cases("nft conformance kernel", cases.len(), failures);
}

// ---------------------------------------------------------------------------
// Refusals and harness checks
// ---------------------------------------------------------------------------

/// `NATIVE_NFTABLES` is the flag's env var; `--dry-run --cleanup-only` with it prints the
/// cleanup script (which removes both backends' state).
#[test]
fn native_nftables_env_var_and_cleanup_dry_run() {
    let cases = nft_cases();
    let case = &cases[0];
    let mut args = case.args[1..].to_vec();
    args.push("--dry-run".into());
    let out = run({
        let mut c = command(case, &args, &[]);
        c.env("NATIVE_NFTABLES", "true");
        c
    })
    .unwrap();
    assert!(out.status.success(), "{}", describe_output("env", &out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(NFT_MARKER));

    // Istio CNI's rule: native nftables wins over a forced iptables flavour, with a warning.
    let out = run(command(
        case,
        &case.args,
        &["--dry-run", "--force-iptables-binary", "legacy"],
    ))
    .unwrap();
    assert!(out.status.success(), "{}", describe_output("forced", &out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(NFT_MARKER));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ignored with --native-nftables"),
        "{}",
        describe_output("forced", &out)
    );

    let out = run(command(case, &case.args, &["--dry-run", "--cleanup-only"])).unwrap();
    assert!(out.status.success(), "{}", describe_output("cleanup", &out));
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(script.contains("nft delete table inet \"$t\""), "{script}");
}

// ---------------------------------------------------------------------------
// Test 3: the real apply (root)
// ---------------------------------------------------------------------------

/// The case's command as one shell line: from its folder, with only PATH and its env.
fn shell_line(case: &NftCase, prefix: &str, out: &str) -> String {
    let env: Vec<String> = case
        .env
        .iter()
        .map(|(k, v)| shell_quote(format!("{k}={v}")))
        .collect();
    let args: Vec<String> = case.args.iter().map(shell_quote).collect();
    format!(
        "(cd {} && exec env -i PATH=\"$PATH\" {} {prefix}{} {}) > \"$NS_OUT/{out}\" 2>&1\n",
        shell_quote(&case.dir),
        env.join(" "),
        shell_quote(BIN),
        args.join(" ")
    )
}

/// In a fresh namespace: apply for real (under strace, recording every program started),
/// list the ruleset, run again, list again.
fn check_real_apply(case: &NftCase, groups: &str) -> Result<(), String> {
    let want = expected_ruleset(case, groups)
        .map_err(|e| format!("`nft -f expected.nft` failed:\n{}", indent(&e, "  ")))?;
    let script = format!(
        "{groups}ip link set lo up\n{}{LIST_RULESET}{}nft list ruleset > \"$NS_OUT/ruleset2\"\n",
        shell_line(
            case,
            "strace -f -qq -e trace=execve -e signal=none -o \"$NS_OUT/trace\" ",
            "log1"
        ),
        shell_line(case, "", "log2"),
    );
    let out = run_in_fresh_ns_ok(&script)?;
    let got = ruleset_lines(out.file("ruleset")?);
    let mut problems = String::new();
    if let Some(diff) = compare_lines(
        "nft list ruleset after nft -f expected.nft",
        &want,
        "nft list ruleset after the real apply",
        &got,
    ) {
        let _ = writeln!(problems, "first run:\n{diff}");
    }
    // Exactly one program besides ours, nft (and `ip` where the config has ip steps).
    let programs: Vec<String> = out
        .file("trace")?
        .lines()
        .filter(|l| l.contains("execve(") && !l.contains("= -1"))
        .filter_map(|l| l.split('"').nth(1).map(str::to_string))
        .filter(|p| p != BIN)
        .collect();
    let ip_steps = dry_run_script(case)?
        .lines()
        .filter(|l| l.starts_with("ip "))
        .count();
    let nft_runs = programs.iter().filter(|p| p.ends_with("/nft")).count();
    let others: Vec<&String> = programs
        .iter()
        .filter(|p| !p.ends_with("/nft") && !p.ends_with("/ip"))
        .collect();
    if nft_runs != 1 || !others.is_empty() || programs.len() > 1 + ip_steps {
        let _ = writeln!(
            problems,
            "a fresh apply must run nft once (and ip at most once per ip step: {ip_steps}); it ran {programs:?}"
        );
    }
    let log2 = out.file("log2")?;
    if !log2.contains("nothing to commit") {
        let _ = writeln!(problems, "the second run committed something:\n{log2}");
    }
    let again = ruleset_lines(out.file("ruleset2")?);
    if let Some(diff) = compare_lines("after the first run", &got, "after the second run", &again) {
        let _ = writeln!(problems, "the second run changed the ruleset:\n{diff}");
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{problems}--- first run's log ---\n{}",
            out.file("log1").unwrap_or_default()
        ))
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn real_apply_matches_expected_and_reruns_commit_nothing() {
    if skip_unless_root("nft conformance real apply") {
        return;
    }
    let groups = with_test_groups_prelude();
    let cases = nft_cases();
    let mut failures = Vec::new();
    for case in &cases {
        match check_real_apply(case, &groups) {
            Ok(()) => eprintln!("nft apply    PASS {}", case.name),
            Err(why) => {
                eprintln!("nft apply    FAIL {}", case.name);
                failures.push((case.name.clone(), why));
            }
        }
    }
    report_cases("nft conformance real apply", cases.len(), failures);
}

/// Root only: the namespace harness starts from an empty ruleset, and different transactions
/// give different rulesets (the comparison can fail).
#[test]
#[ignore = "needs root and network namespaces"]
fn harness_sanity_nft() {
    if skip_unless_root("nft conformance harness sanity") {
        return;
    }
    let groups = with_test_groups_prelude();
    let empty = run_in_fresh_ns_ok(LIST_RULESET).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        ruleset_lines(empty.file("ruleset").unwrap()),
        Vec::<String>::new()
    );

    let cases = nft_cases();
    let by_name = |n: &str| cases.iter().find(|c| c.name == n).unwrap();
    let plain = expected_ruleset(by_name("empty"), &groups).unwrap_or_else(|e| panic!("{e}"));
    let drop = expected_ruleset(by_name("drop-invalid"), &groups).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(plain, drop);
    assert!(
        drop.iter().any(|l| l == "table inet istio-proxy-mangle {"),
        "{drop:?}"
    );

    // A failing nft step fails the namespace script, with nft's error.
    let err = run_in_fresh_ns_ok("echo 'add rule inet nosuch t c counter' | nft -f -\n")
        .expect_err("a failing nft -f must fail the namespace script");
    assert!(err.contains("nft"), "{err}");
}
