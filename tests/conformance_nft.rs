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
//! - `native_nftables_applies_only_as_a_dry_run_so_far` and `harness_sanity_nft` check the
//!   refusals and the harness itself.

mod common;

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

/// Applying with nftables is not built yet: without `--dry-run` (and for a cleanup) the flag
/// is refused with exit 2 and one line saying so, before anything runs.
#[test]
fn native_nftables_applies_only_as_a_dry_run_so_far() {
    let cases = nft_cases();
    let case = &cases[0];
    for (extra, says) in [
        (&[][..], "only --dry-run"),
        (&["--dry-run", "--cleanup-only"][..], "--cleanup-only"),
    ] {
        let out = run(command(case, &case.args, extra)).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}",
            describe_output("exit", &out)
        );
        assert!(out.stdout.is_empty(), "{}", describe_output("stdout", &out));
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("--native-nftables"), "{stderr}");
        assert!(stderr.contains("not supported"), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }
    // NATIVE_NFTABLES is the flag's env var.
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
