//! Shell snippets for namespace scripts: quoting, the test groups prelude.

use super::*;

// ---------------------------------------------------------------------------
// Shell snippets
// ---------------------------------------------------------------------------

/// Quotes `s` as one POSIX sh word (single quotes).
pub fn shell_quote(s: impl AsRef<OsStr>) -> String {
    let s = s.as_ref().to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        return s.into_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Quotes a program and its arguments as one sh command line.
pub fn shell_command<I, S>(words: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    words
        .into_iter()
        .map(shell_quote)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Shell snippet for a fresh mount namespace: makes each named group exist
/// by bind-mounting a copy of `/etc/group` with extra `name:x:gid:` lines over
/// `/etc/group` (names already present are left alone; gids are picked so
/// they clash with no existing group). Uses `$NS_TMP` (falls back to `/tmp`).
/// Must only be used in a private mount namespace (e.g. [`run_in_fresh_ns`]).
pub fn groups_prelude(names: &[&str]) -> String {
    let existing = fs::read_to_string("/etc/group").unwrap_or_default();
    let mut used_gids: BTreeSet<u32> = BTreeSet::new();
    for line in existing.lines() {
        if let Some(gid) = line.split(':').nth(2).and_then(|g| g.parse().ok()) {
            used_gids.insert(gid);
        }
    }
    let mut next_gid = 40000u32;
    let mut s = String::new();
    s.push_str("__groups_file=$(mktemp \"${NS_TMP:-/tmp}/group.XXXXXX\")\n");
    s.push_str("cat /etc/group > \"$__groups_file\"\n");
    for name in names {
        while used_gids.contains(&next_gid) {
            next_gid += 1;
        }
        let gid = next_gid;
        used_gids.insert(gid);
        let line = format!("{name}:x:{gid}:");
        let _ = writeln!(
            s,
            "grep -q {} \"$__groups_file\" || echo {} >> \"$__groups_file\"",
            shell_quote(format!("^{name}:")),
            shell_quote(&line)
        );
    }
    s.push_str("chmod 0644 \"$__groups_file\"\n");
    s.push_str("mount --bind \"$__groups_file\" /etc/group\n");
    for name in names {
        let _ = writeln!(s, "getent group {} >/dev/null", shell_quote(name));
    }
    s
}

/// [`groups_prelude`] for the groups the Istio test data refers to by name
/// (`java`, `ftp`).
pub fn with_test_groups_prelude() -> String {
    groups_prelude(&["java", "ftp"])
}
