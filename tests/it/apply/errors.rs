//! Error messages.

use super::*;

/// File-creating syscalls in an strace log, ignoring /dev and the two locks: iptables'
/// `xtables.lock` and our own per-namespace lock in the root-only `/run/istio-iptables`
/// (its directory and its `netns-<inode>.lock`, nothing else there).
fn file_writes(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            let writes = l.contains("O_CREAT")
                || l.contains("O_WRONLY")
                || l.contains("O_RDWR")
                || l.contains("creat(")
                || l.contains("mkdir")
                || l.contains("rename")
                || l.contains("unlink");
            let our_lock = l.contains("\"/run/istio-iptables\"")
                || (l.contains("\"/run/istio-iptables/netns-") && l.contains(".lock\""));
            writes && !l.contains("\"/dev/") && !l.contains("xtables.lock") && !our_lock
        })
        .collect()
}

/// The group that only the binary sees: owner group names are checked before anything runs,
/// so a real iptables-nft-restore refuses a real payload line only when the name resolves for
/// the binary and not for the restore. `/etc/group` gains the group (a bind mount in the
/// test's mount namespace); `iptables-nft-restore` in PATH is a wrapper that puts the
/// original back in a mount namespace of its own, then runs the real program.
const GROUP_ONLY_WE_SEE: &str = "istio-test-grp";

fn with_group_only_we_see(mut script: Script) -> Script {
    let real = real_program("iptables-nft-restore").expect("iptables-nft-restore");
    let real = real.display();
    script = script.sh(&format!(
        "cp /etc/group \"$NS_TMP/group.orig\"\n\
         cp /etc/group \"$NS_TMP/group\"; echo '{GROUP_ONLY_WE_SEE}:x:4242:' >> \"$NS_TMP/group\"\n\
         mount -n --bind \"$NS_TMP/group\" /etc/group\n\
         mkdir -p \"$NS_TMP/hide\"\n\
         cat > \"$NS_TMP/hide/iptables-nft-restore\" <<HIDE_EOF\n\
         #!/bin/sh\n\
         exec unshare -m sh -c 'mount -n --bind \"\\$0\" /etc/group && exec {real} \"\\$@\"' \"$NS_TMP/group.orig\" \"\\$@\"\n\
         HIDE_EOF\n\
         chmod 755 \"$NS_TMP/hide/iptables-nft-restore\"\n"
    ));
    script.path = Some(format!(
        "PATH=\"$NS_TMP/hide\":{}",
        shell_quote(sane_path())
    ));
    script
}

#[test]
#[ignore = "needs root and network namespaces"]
fn failed_restore_reports_phase_program_version_and_changes_nothing() {
    if skip_unless_root("failed_restore_reports_phase_program_version_and_changes_nothing") {
        return;
    }
    let env = [
        ("ENABLE_INBOUND_IPV6", "false"),
        ("ISTIO_OUTBOUND_OWNER_GROUPS", GROUP_ONLY_WE_SEE),
    ];
    let trace = have_strace()
        .then_some("openat,open,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat");
    // (A foreign rule, so that iptables-nft-save's header names the version: the wrapper
    // of `with_group_only_we_see` is a script the version cannot be read from.)
    let ns = with_group_only_we_see(Script::new())
        .sh("iptables-nft -t nat -A OUTPUT -d 192.0.2.99 -j RETURN")
        .sh("iptables-nft-restore --version > \"$NS_OUT/version\"")
        .snap("before")
        .run_traced("apply", &env, SEED, trace)
        .snap("after")
        .exec();
    let ctx = ns.context();
    let run = ns.run_rc("apply", 1);
    let line = run.one_error();
    let version = ns
        .file("version")
        .split_whitespace()
        .find(|w| w.starts_with('v') && w[1..].starts_with(|c: char| c.is_ascii_digit()))
        .map(|w| w[1..].to_string())
        .unwrap_or_else(|| panic!("no version in {:?}", ns.file("version")));
    for needle in [
        "committing IPv4 rules",
        "iptables-nft-restore",
        &format!("iptables {version}"),
        "nothing was changed",
    ] {
        assert!(
            line.contains(needle),
            "the error should contain `{needle}`: {line}"
        );
    }
    assert_same(
        "a rejected restore must change nothing",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
    if trace.is_some() {
        let log = ns.file("apply.strace");
        let writes = file_writes(log);
        assert!(
            writes.is_empty(),
            "the binary and its children must not create or write files:\n{}",
            writes.join("\n")
        );
    }
}

/// The rejected payload line must be quoted. iptables-nft-restore 1.8.9 reports a bad
/// option value as `Error occurred at line: 21`.
#[test]
#[ignore = "needs root and network namespaces"]
fn failed_restore_quotes_the_rejected_payload_line() {
    if skip_unless_root("failed_restore_quotes_the_rejected_payload_line") {
        return;
    }
    let env = [
        ("ENABLE_INBOUND_IPV6", "false"),
        ("ISTIO_OUTBOUND_OWNER_GROUPS", GROUP_ONLY_WE_SEE),
    ];
    let ns = with_group_only_we_see(Script::new())
        .run("apply", &env, SEED)
        .exec();
    let run = ns.run_rc("apply", 1);
    let line = run.one_error();
    assert!(
        line.contains(&format!("--gid-owner {GROUP_ONLY_WE_SEE}")),
        "the error should quote the rejected payload line (`... --gid-owner {GROUP_ONLY_WE_SEE} ...`): \
         {line}"
    );
}
