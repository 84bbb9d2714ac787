//! Programs that hang or flood, SIGTERM and SIGINT during a run: the run ends within bounds,
//! says what the kernel shows, and leaves the lock free.

use super::rollback::existing_state_setup;
use super::*;

/// What a wrapper around the real `program` does before it hands over.
#[derive(Clone, Copy)]
enum Wrap {
    /// The first run with `--noflush` (the commit; not a rollback's) starts a child that
    /// sleeps for an hour and waits for it, after touching `started` beside the wrapper;
    /// later runs are the real program.
    HangOnce,
    /// The first run (whatever its arguments) hangs the same way.
    HangFirstCall,
    /// Writes 1.2 MB to stderr before it reads any of its stdin, then is the real program.
    Flood,
}

impl Script {
    /// Replaces the shim of `program` (after [`Script::shims`]) with a wrapper that does
    /// `wrap` and logs its arguments as the shims do.
    fn wrap(self, program: &str, wrap: Wrap) -> Script {
        let real = real_program(program).unwrap_or_else(|| panic!("no {program}"));
        let real = shell_quote(&real);
        let hang =
            "touch \"$__d/started\"; sleep 3600 & echo $! > \"$__d/child.pid\"; wait; exit 0";
        let what = match wrap {
            Wrap::HangOnce => format!(
                "case \" $* \" in *\" --noflush \"*) [ -e \"$__d/hung\" ] || \
                 {{ touch \"$__d/hung\"; {hang}; }};; esac"
            ),
            Wrap::HangFirstCall => {
                format!("[ -e \"$__d/hung\" ] || {{ touch \"$__d/hung\"; {hang}; }}")
            }
            Wrap::Flood => "head -c 1200000 /dev/zero | tr '\\0' x >&2".to_string(),
        };
        let body = format!(
            "#!/bin/sh\n__d=\"$(dirname \"$0\")\"\necho \"{program} $*\" >> \"$__d/exec.log\"\n\
             {what}\nexec {real} \"$@\"\n"
        );
        self.sh(&format!(
            "cat > \"$NS_TMP/shims/{program}\" <<'WRAP_EOF'\n{body}WRAP_EOF\n\
             chmod 755 \"$NS_TMP/shims/{program}\"\nrm -f \"$NS_TMP/shims/hung\" \"$NS_TMP/shims/started\""
        ))
    }

    /// Records whether the wrapper's sleeping child still runs: `gone`, or its state (`Z`: a
    /// zombie, killed).
    fn child_state(self, label: &str) -> Script {
        self.sh(&format!(
            "__p=$(cat \"$NS_TMP/shims/child.pid\")\n\
             __s=$(cut -d' ' -f3 /proc/$__p/stat 2>/dev/null || true)\n\
             echo \"${{__s:-gone}}\" > \"$NS_OUT/{label}.child\""
        ))
    }

    /// Runs the binary in the background as run `label` (files as [`Script::run`]), sends
    /// it `signal` once the wrapper says it `started`, and waits for it.
    fn run_and_signal(
        self,
        label: &str,
        env: &[(&str, &str)],
        args: &[&str],
        signal: &str,
    ) -> Script {
        let mut words: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        words.push(BIN.to_string());
        words.extend(args.iter().map(|a| a.to_string()));
        let l = shell_quote(label);
        self.sh(&format!(
            "set +x\n\
             env -i PATH=\"$NS_TMP/shims\":{path} {cmd} >\"$NS_OUT/{l}.out\" 2>\"$NS_OUT/{l}.err\" &\n\
             __pid=$!\n\
             __w=0; while [ ! -e \"$NS_TMP/shims/started\" ] && [ $__w -lt 2000 ]; do __w=$((__w+1)); sleep 0.01; done\n\
             __t0=$(date +%s%N)\n\
             kill -{signal} $__pid\n\
             __rc=0; wait $__pid || __rc=$?\n\
             echo $__rc > \"$NS_OUT/{l}.rc\"\n\
             echo $(( ($(date +%s%N) - __t0) / 1000000 )) > \"$NS_OUT/{l}.ms\"\n\
             mv \"$NS_TMP/shims/exec.log\" \"$NS_OUT/{l}.execs\" 2>/dev/null || true\n\
             set -x",
            path = shell_quote(sane_path()),
            cmd = shell_command(&words),
        ))
    }
}

/// A config other than the earlier one of [`existing_state_setup`] (`-b 8080`).
fn changed() -> Vec<&'static str> {
    SEED.to_vec()
}

/// Env with a short program deadline.
fn with_deadline<'a>(env: &[(&'a str, &'a str)], secs: &'a str) -> Vec<(&'a str, &'a str)> {
    let mut v = env.to_vec();
    v.push(("IPTABLES_PROGRAM_TIMEOUT_SECONDS", secs));
    v
}

/// A later run of the same config, with the real programs and a 1 s lock wait, is not
/// blocked by the lock (nothing of the stopped run holds it) and applies.
fn assert_later_run_applies(ns: &Ns, label: &str) {
    let run = ns.run_rc(label, 0);
    assert!(
        run.ms < 5000,
        "a later run must not wait for the lock:\n{}",
        run.describe()
    );
}

/// The wrapper's child was killed with the program: gone, or a zombie.
fn assert_child_killed(ns: &Ns, label: &str) {
    let state = ns.file(&format!("{label}.child")).trim().to_string();
    assert!(
        state == "gone" || state == "Z",
        "the hung program's child must be killed with it (state {state})\n{}",
        ns.context()
    );
}

/// A hung iptables-nft-restore (its commit) is killed at the deadline, with its child; the
/// error names it, its command and the deadline; nothing changed, as the message says.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_hung_restore_is_killed_at_its_deadline_and_nothing_changes() {
    if skip_unless_root("a_hung_restore_is_killed_at_its_deadline_and_nothing_changes") {
        return;
    }
    let env = with_deadline(V4, "1");
    let later = [V4, &[("IPTABLES_LOCK_WAIT_SECONDS", "1")]].concat();
    let ns = Script::new()
        .sh(&existing_state_setup())
        .snap("before")
        .shims(Fail::Nothing)
        .wrap("iptables-nft-restore", Wrap::HangOnce)
        .run("hung", &env, &changed())
        .snap("after")
        .child_state("hung")
        .shims(Fail::Nothing)
        .run("later", &later, &changed())
        .exec();
    let ctx = ns.context();
    let run = ns.run_rc("hung", 1);
    assert!(
        (1000..8000).contains(&run.ms),
        "the run must end soon after the 1 s deadline:\n{}",
        run.describe()
    );
    let line = run.one_error();
    for needle in [
        "iptables-nft-restore did not finish within 1s",
        "(`iptables-nft-restore --noflush",
        "killed it (IPTABLES_PROGRAM_TIMEOUT_SECONDS sets the deadline",
        "; nothing was changed (checked by re-reading the kernel)",
    ] {
        assert!(
            line.contains(needle),
            "the error should say `{needle}`: {line}"
        );
    }
    assert_same(
        "a killed restore changes nothing",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
    assert_child_killed(&ns, "hung");
    assert_later_run_applies(&ns, "later");
}

/// A hung iptables-nft-save (the first read) is killed at the deadline; nothing changed.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_hung_save_is_killed_at_its_deadline_and_nothing_changes() {
    if skip_unless_root("a_hung_save_is_killed_at_its_deadline_and_nothing_changes") {
        return;
    }
    let env = with_deadline(V4, "1");
    let ns = Script::new()
        .sh(&existing_state_setup())
        .snap("before")
        .shims(Fail::Nothing)
        .wrap("iptables-nft-save", Wrap::HangFirstCall)
        .run("hung", &env, &changed())
        .snap("after")
        .child_state("hung")
        .exec();
    let ctx = ns.context();
    let run = ns.run_rc("hung", 1);
    assert!((1000..8000).contains(&run.ms), "{}", run.describe());
    let line = run.one_error();
    assert!(
        line.contains("iptables-nft-save did not finish within 1s (`iptables-nft-save")
            && line.contains("killed it"),
        "the error should name the save and the deadline: {line}"
    );
    assert!(
        !line.contains("restored") && !line.contains("ROLLBACK"),
        "nothing had changed; no rollback to speak of: {line}"
    );
    let restores = run.execs_of(|p| p.ends_with("-restore") || p == "nft" || p == "ip");
    assert!(
        restores.is_empty(),
        "nothing may change after a failed read: {restores:?}"
    );
    assert_same(
        "a failed read changes nothing",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
    assert_child_killed(&ns, "hung");
}

/// Dual stack: IPv4 is committed, then the IPv6 restore hangs: killed at the deadline, IPv4
/// is put back, and the message says so.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_hung_ipv6_restore_after_the_ipv4_commit_is_rolled_back() {
    if skip_unless_root("a_hung_ipv6_restore_after_the_ipv4_commit_is_rolled_back") {
        return;
    }
    let env = with_deadline(V6, "1");
    let ns = Script::new()
        .sh(&existing_state_setup())
        .snap("before")
        .shims(Fail::Nothing)
        .wrap("ip6tables-nft-restore", Wrap::HangOnce)
        .run("hung", &env, &changed())
        .snap("after")
        .child_state("hung")
        .exec();
    let ctx = ns.context();
    let run = ns.run_rc("hung", 1);
    assert!((1000..8000).contains(&run.ms), "{}", run.describe());
    let line = run.one_error();
    for needle in [
        "committing IPv6 rules",
        "ip6tables-nft-restore did not finish within 1s",
        "the previous state was restored (IPv4; checked by re-reading the kernel)",
    ] {
        assert!(
            line.contains(needle),
            "the error should say `{needle}`: {line}"
        );
    }
    let v4_commits = run.execs_of(|p| p == "iptables-nft-restore");
    assert!(
        !v4_commits.is_empty(),
        "IPv4 was committed first: {}",
        run.describe()
    );
    assert_same(
        "IPv4 must be put back",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
    assert_child_killed(&ns, "hung");
}

/// A restore that writes 1.2 MB to stderr before it reads its stdin, with a large payload
/// (12,000 -x CIDRs, about 600 KB): the run completes, and verify finds the rules whole.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_restore_that_floods_stderr_before_reading_gets_its_whole_payload() {
    if skip_unless_root("a_restore_that_floods_stderr_before_reading_gets_its_whole_payload") {
        return;
    }
    let cidrs = "@cidrs";
    let args = seed_with("-x", cidrs);
    let verify = cat(&["verify"], &args);
    let ns = Script::new()
        .sh(
            "awk 'BEGIN { for (i = 0; i < 12000; i++) printf \"10.%d.%d.0/24\\n\", int(i / 256), i % 256 }' > cidrs",
        )
        .shims(Fail::Nothing)
        .wrap("iptables-nft-restore", Wrap::Flood)
        .run("flood", V4, &args)
        .snap("after")
        .run("verify", V4, &verify)
        .exec();
    let run = ns.run_rc("flood", 0);
    assert!(run.error_lines().is_empty(), "{}", run.describe());
    let commits = run.execs_of(|p| p == "iptables-nft-restore");
    assert!(
        !commits.is_empty(),
        "the flooding wrapper ran: {}",
        run.describe()
    );
    let returns = count_lines(ns.state("after").get("v4-nft"), "/24 -j RETURN");
    assert!(returns >= 12000, "every -x CIDR is a rule: {returns}");
    ns.run_rc("verify", 0);
}

/// SIGTERM (then SIGINT) while the IPv6 restore runs, after the IPv4 commit: the restore is
/// killed, IPv4 put back, the exit code is 143 (130), and a later run is not blocked.
#[test]
#[ignore = "needs root and network namespaces"]
fn sigterm_and_sigint_during_a_restore_roll_back_and_exit_with_their_codes() {
    if skip_unless_root("sigterm_and_sigint_during_a_restore_roll_back_and_exit_with_their_codes") {
        return;
    }
    let later = [V6, &[("IPTABLES_LOCK_WAIT_SECONDS", "1")]].concat();
    let mut script = Script::new().sh(&existing_state_setup()).snap("before");
    for signal in ["TERM", "INT"] {
        script = script
            .shims(Fail::Nothing)
            .wrap("ip6tables-nft-restore", Wrap::HangOnce)
            .run_and_signal(signal, V6, &changed(), signal)
            .snap(&format!("after-{signal}"))
            .child_state(signal);
    }
    let ns = script
        .shims(Fail::Nothing)
        .run("later", &later, &changed())
        .exec();
    let ctx = ns.context();
    for (signal, code) in [("TERM", 143), ("INT", 130)] {
        let run = ns.run_rc(signal, code);
        assert!(
            run.ms < 5000,
            "the run must stop soon after the signal:\n{}",
            run.describe()
        );
        let line = run.one_error();
        for needle in [
            "committing IPv6 rules",
            &format!("stopped by SIG{signal} while `ip6tables-nft-restore --noflush"),
            "(killed it)",
            "the previous state was restored (IPv4; checked by re-reading the kernel)",
        ] {
            assert!(
                line.contains(needle),
                "the error should say `{needle}`: {line}"
            );
        }
        assert!(
            run.logs().contains(&format!(
                "SIG{signal} asked the run to stop: exit code {code}"
            )),
            "{}",
            run.describe()
        );
        assert_same(
            &format!("SIG{signal} must put IPv4 back"),
            &ns.state("before"),
            &ns.state(&format!("after-{signal}")),
            &ctx,
        );
        assert_child_killed(&ns, signal);
    }
    assert_later_run_applies(&ns, "later");
}

/// SIGINT during a read-only command exits at once with 130. (SIGINT: a background job of
/// a script ignores it unless the program handles it, so without our handler the run would
/// wait on the hung save; a SIGTERM's 143 would look the same as dying of it.)
#[test]
#[ignore = "needs root and network namespaces"]
fn sigint_during_verify_exits_at_once_with_its_code() {
    if skip_unless_root("sigint_during_verify_exits_at_once_with_its_code") {
        return;
    }
    let verify = cat(&["verify"], SEED);
    // Tables to read (an empty namespace is read without running iptables-nft-save).
    let ns = Script::new()
        .sh(&existing_state_setup())
        .shims(Fail::Nothing)
        .wrap("iptables-nft-save", Wrap::HangFirstCall)
        .run_and_signal("verify", &with_deadline(V4, "20"), &verify, "INT")
        // A read-only run leaves its program to finish on its own: end this one.
        .sh("kill $(cat \"$NS_TMP/shims/child.pid\") || true")
        .exec();
    let run = ns.run_rc("verify", 130);
    assert!(run.ms < 2000, "{}", run.describe());
    assert!(run.stdout.is_empty(), "no report: {}", run.describe());
}
