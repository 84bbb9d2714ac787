//! Istio's test cases (args, env, expected output) and how outputs are normalised and
//! compared.

use super::*;

// ---------------------------------------------------------------------------
// Test cases
// ---------------------------------------------------------------------------

/// One test case directory (`tests/data/istio/<name>/`).
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub dir: PathBuf,
    /// Command-line arguments (one per line of `args`; empty line = "").
    pub args: Vec<String>,
    /// `KEY=VALUE` lines of `env`.
    pub env: Vec<(String, String)>,
    /// Content of `expected-v4.rules`.
    pub expected_v4: String,
    /// Content of `expected-v6.rules`, if present (absent = no ip6tables).
    pub expected_v6: Option<String>,
}

/// `tests/data/istio` of this crate: the shared conformance set, copied as it is.
pub fn istio_cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/istio")
}

/// `tests/data/istio-more`: more of Istio's golden cases, transcribed by us from Istio's
/// run_test.go (each has a SOURCE naming the golden and its commit).
pub fn istio_more_cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/istio-more")
}

/// Every conformance case: the shared set, then ours.
pub fn all_istio_cases() -> Vec<Case> {
    let mut cases = read_cases(&istio_cases_dir());
    cases.extend(read_cases(&istio_more_cases_dir()));
    cases
}

/// Parses an `args` file: one argument per line, an empty line is an empty
/// argument; the final newline does not make an extra argument.
pub fn parse_args_file(content: &str) -> Vec<String> {
    let content = content.strip_suffix('\n').unwrap_or(content);
    if content.is_empty() {
        return Vec::new();
    }
    content
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
        .collect()
}

/// Parses an `env` file: `KEY=VALUE` lines; blank lines and `#` comments are
/// skipped.
pub fn parse_env_file(content: &str) -> Result<Vec<(String, String)>, String> {
    let mut env = Vec::new();
    for (i, line) in content.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        match line.split_once('=') {
            Some((k, v)) if !k.is_empty() => env.push((k.to_string(), v.to_string())),
            _ => return Err(format!("line {}: not KEY=VALUE: {line:?}", i + 1)),
        }
    }
    Ok(env)
}

/// Reads one case directory. Panics with a clear message on malformed data.
pub fn read_case(dir: &Path) -> Case {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    let read = |file: &str| -> Option<String> {
        let p = dir.join(file);
        if p.exists() {
            Some(
                fs::read_to_string(&p)
                    .unwrap_or_else(|e| panic!("case {name}: cannot read {}: {e}", p.display())),
            )
        } else {
            None
        }
    };
    let args = parse_args_file(
        &read("args").unwrap_or_else(|| panic!("case {name}: missing `args` file")),
    );
    let env = match read("env") {
        Some(c) => parse_env_file(&c).unwrap_or_else(|e| panic!("case {name}: env: {e}")),
        None => Vec::new(),
    };
    let expected_v4 = read("expected-v4.rules")
        .unwrap_or_else(|| panic!("case {name}: missing `expected-v4.rules`"));
    let expected_v6 = read("expected-v6.rules");
    Case {
        name,
        dir: dir.to_path_buf(),
        args,
        env,
        expected_v4,
        expected_v6,
    }
}

/// Every sub-directory of `root` (one test case each), sorted by name. Panics if there are
/// none.
pub fn case_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(root)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", root.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "no test cases found in {}",
        root.display()
    );
    dirs
}

/// Reads every sub-directory of `root` as a case, sorted by name. Panics if
/// there are none.
pub fn read_cases(root: &Path) -> Vec<Case> {
    case_dirs(root).iter().map(|d| read_case(d)).collect()
}

/// A finished process for a failure message: `what`, its exit status, stdout and stderr.
pub fn describe_output(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

/// Ends a test over many cases: a one-line summary when all passed, otherwise a panic with
/// every failure (`(case name, why)`) and then the summary.
pub fn report_cases(test: &str, total: usize, failures: Vec<(String, String)>) {
    if failures.is_empty() {
        eprintln!("{test}: all {total} cases passed");
        return;
    }
    let mut msg = String::new();
    for (name, why) in &failures {
        let _ = writeln!(
            msg,
            "\n==================== case {name} ===================="
        );
        msg.push_str(why);
    }
    let names: Vec<&str> = failures.iter().map(|(n, _)| n.as_str()).collect();
    let _ = writeln!(
        msg,
        "\n{test}: {} of {total} cases FAILED: {}",
        failures.len(),
        names.join(", ")
    );
    panic!("{msg}");
}

/// Environment a case runs with: PATH ([`sane_path`]) then the case's env.
pub fn case_env(case: &Case) -> Vec<(String, String)> {
    let mut env = vec![("PATH".to_string(), sane_path())];
    env.extend(case.env.iter().cloned());
    env
}

/// `Command` running the binary for `case` with `extra_args` appended:
/// environment cleared, then [`case_env`]; working directory = case dir.
pub fn case_command(case: &Case, extra_args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(&case.args)
        .args(extra_args)
        .current_dir(&case.dir)
        .env_clear()
        .envs(case_env(case));
    cmd
}

/// Shell line (for a namespace script) running the binary for `case` like
/// [`case_command`] does: `(cd DIR && exec env -i K=V... BIN ARGS... EXTRA...)`.
/// Under `set -x`, dash writes the trace of a redirected command into the
/// redirection target: wrap it in `set +x` ... `set -x` to keep a captured
/// stderr clean.
pub fn case_shell_command(case: &Case, extra_args: &[&str]) -> String {
    let mut words: Vec<String> = vec!["env".into(), "-i".into()];
    words.extend(case_env(case).into_iter().map(|(k, v)| format!("{k}={v}")));
    words.push(BIN.to_string());
    words.extend(case.args.iter().cloned());
    words.extend(extra_args.iter().map(|s| s.to_string()));
    format!(
        "(cd {} && exec {})",
        shell_quote(&case.dir),
        shell_command(&words)
    )
}

// ---------------------------------------------------------------------------
// Output normalisation and comparison
// ---------------------------------------------------------------------------

/// Normalises `iptables-save` output: drops `#` comment lines and blank
/// lines, strips counters from chain lines (`:CHAIN POLICY [x:y]` →
/// `:CHAIN POLICY`) and trailing whitespace.
pub fn normalize_save(save: &str) -> String {
    let mut out = String::new();
    for line in save.lines() {
        let line = line.trim_end();
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let line = if line.starts_with(':') && line.ends_with(']') {
            match line.rfind(" [") {
                Some(i) => line[..i].trim_end(),
                None => line,
            }
        } else {
            line
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Normalises an iptables-restore payload for comparison: trims each line,
/// collapses inner whitespace runs to one space, turns `*  nat` into `*nat`,
/// and drops blank lines.
pub fn normalize_restore_payload(payload: &str) -> Vec<String> {
    payload
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .map(|l| match l.strip_prefix('*') {
            Some(rest) => format!("*{}", rest.trim_start()),
            None => l,
        })
        .collect()
}

/// Finds every here-document in `script` whose opening line (trimmed) is
/// exactly `marker` and returns the bodies (lines up to the next line that
/// is exactly `EOF`). A body without its `EOF` is an `Err`.
pub fn extract_heredoc_blocks(script: &str, marker: &str) -> Result<Vec<String>, String> {
    let lines: Vec<&str> = script.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() == marker {
            let start = i + 1;
            let end = (start..lines.len())
                .find(|&j| lines[j] == "EOF")
                .ok_or_else(|| format!("`{marker}` at line {} has no closing EOF line", i + 1))?;
            let mut body = lines[start..end].join("\n");
            body.push('\n');
            blocks.push(body);
            i = end + 1;
        } else {
            i += 1;
        }
    }
    Ok(blocks)
}

/// Line diff of `expected` vs `actual` (LCS based): unchanged lines prefixed
/// with two spaces, missing ones with `- `, unexpected ones with `+ `.
pub fn line_diff<E: AsRef<str>, A: AsRef<str>>(expected: &[E], actual: &[A]) -> String {
    let (n, m) = (expected.len(), actual.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if expected[i].as_ref() == actual[j].as_ref() {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut out = String::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && expected[i].as_ref() == actual[j].as_ref() {
            let _ = writeln!(out, "  {}", expected[i].as_ref());
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            let _ = writeln!(out, "- {}", expected[i].as_ref());
            i += 1;
        } else {
            let _ = writeln!(out, "+ {}", actual[j].as_ref());
            j += 1;
        }
    }
    out
}

/// Compares two line lists. `None` if equal; otherwise a report with the
/// first differing line (both sides), a `-expected/+actual` diff and both
/// full texts.
pub fn compare_lines<E: AsRef<str>, A: AsRef<str>>(
    expected_label: &str,
    expected: &[E],
    actual_label: &str,
    actual: &[A],
) -> Option<String> {
    let first = (0..expected.len().max(actual.len()))
        .find(|&i| expected.get(i).map(AsRef::as_ref) != actual.get(i).map(AsRef::as_ref))?;
    let show = |v: Option<&str>| v.map_or("<no line>".to_string(), |s| format!("{s:?}"));
    let mut r = String::new();
    let _ = writeln!(r, "first difference at line {}:", first + 1);
    let _ = writeln!(
        r,
        "  {expected_label}: {}",
        show(expected.get(first).map(AsRef::as_ref))
    );
    let _ = writeln!(
        r,
        "  {actual_label}: {}",
        show(actual.get(first).map(AsRef::as_ref))
    );
    let _ = writeln!(r, "diff (- {expected_label}, + {actual_label}):");
    r.push_str(&line_diff(expected, actual));
    let _ = writeln!(r, "full {expected_label}:");
    for l in expected {
        let _ = writeln!(r, "    {}", l.as_ref());
    }
    let _ = writeln!(r, "full {actual_label}:");
    for l in actual {
        let _ = writeln!(r, "    {}", l.as_ref());
    }
    Some(r)
}

/// Indents every line of `text` by `prefix` (for nesting reports).
pub fn indent(text: &str, prefix: &str) -> String {
    text.lines()
        .map(|l| format!("{prefix}{l}\n"))
        .collect::<String>()
}
