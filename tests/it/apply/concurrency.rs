//! Concurrent runs in one namespace.

use super::*;

impl Script {
    /// Starts the binary in the background as run `label` (see [`Script::run`]; no timing,
    /// no shims); `wait` collects it.
    fn spawn(self, label: &str, env: &[(&str, &str)], args: &[&str]) -> Script {
        let mut words: Vec<String> = vec![format!("PATH={}", sane_path())];
        words.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        words.push(BIN.to_string());
        words.extend(args.iter().map(|a| a.to_string()));
        let l = shell_quote(label);
        self.sh(&format!(
            "set +x\n( __rc=0; env -i {} >\"$NS_OUT/{l}.out\" 2>\"$NS_OUT/{l}.err\" || __rc=$?; \
             echo $__rc > \"$NS_OUT/{l}.rc\" ) &\nset -x",
            shell_command(&words)
        ))
    }
}

/// `rounds` rounds of ten simultaneous runs, run `i` using `configs[i % configs.len()]`;
/// after each round every run exited 0 and the state is a fresh apply of one of the configs.
pub(super) fn assert_concurrent_runs_converge(
    env: &[(&str, &str)],
    configs: &[Vec<&str>],
    rounds: usize,
) {
    let fresh: Vec<State> = configs.iter().map(|c| fresh_state(env, c)).collect();
    let mut script = Script::new();
    for round in 0..rounds {
        for i in 0..10 {
            script = script.spawn(&format!("r{round}-{i}"), env, &configs[i % configs.len()]);
        }
        script = script.sh("wait").snap(&format!("r{round}"));
    }
    let ns = script.exec();
    let ctx = ns.context();
    let fresh: Vec<State> = fresh.iter().map(State::without_empty_tables).collect();
    for round in 0..rounds {
        let mut logs = String::new();
        for i in 0..10 {
            let run = ns.run_rc(&format!("r{round}-{i}"), 0);
            assert!(
                run.error_lines().is_empty(),
                "a concurrent run must not fail or warn\n{}",
                run.describe()
            );
            logs.push_str(&run.logs());
        }
        // The other config's rules of our shape stay (nothing proves them ours), named: the
        // comparison leaves them out on both sides.
        let mut got = ns.state(&format!("r{round}")).without_kept(&logs);
        got.label = format!("after round {round} of 10 simultaneous runs");
        if !fresh
            .iter()
            .any(|f| f.without_kept(&logs).parts == got.parts)
        {
            // Show the difference from the first config's clean state.
            assert_same(
                "simultaneous runs must end in one config's clean state",
                &fresh[0],
                &got,
                &ctx,
            );
        }
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn ten_simultaneous_runs_of_one_config_end_in_its_clean_state() {
    if skip_unless_root("ten_simultaneous_runs_of_one_config_end_in_its_clean_state") {
        return;
    }
    assert_concurrent_runs_converge(V6, &[SEED.to_vec()], 3);
    if real_program("iptables-legacy").is_some() {
        // Legacy: our lock and the (private) xtables lock together.
        assert_concurrent_runs_converge(V4, &[seed_forcing("legacy")], 2);
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn ten_simultaneous_runs_of_two_configs_end_in_one_clean_state() {
    if skip_unless_root("ten_simultaneous_runs_of_two_configs_end_in_one_clean_state") {
        return;
    }
    let tproxy = cat(&seed_with("-m", "TPROXY"), &["-t", "1400", "-r", "140"]);
    assert_concurrent_runs_converge(V6, &[SEED.to_vec(), tproxy], 3);
}

/// Shell lines: a run of the binary holds the namespace's lock (in the current network
/// namespace, or the one `ns_exec` enters, e.g. `ip netns exec pod`) while its
/// `iptables-nft-restore` (a shim) sleeps, having changed nothing. `$__holder` is the run's
/// pid; [`release_ns_lock`] ends it and the sleeper.
fn hold_ns_lock(ns_exec: &str) -> String {
    let mut words = vec!["ENABLE_INBOUND_IPV6=false".to_string(), BIN.to_string()];
    // --force-apply: it commits (here: sleeps) even where the rules are already in place.
    words.extend(seed_forcing("nft").iter().map(|a| a.to_string()));
    words.push("--force-apply".into());
    format!(
        "{WAIT_GONE}\n\
         mkdir -p \"$NS_TMP/holdshim\"; rm -f \"$NS_TMP/held\"\n\
         printf '#!/bin/sh\\necho $$ > %s/held.tmp; mv %s/held.tmp %s/held; exec sleep 30\\n' \
         \"$NS_TMP\" \"$NS_TMP\" \"$NS_TMP\" > \"$NS_TMP/holdshim/iptables-nft-restore\"\n\
         chmod 755 \"$NS_TMP/holdshim/iptables-nft-restore\"\n\
         {ns_exec} env -i PATH=\"$NS_TMP/holdshim\":{} {} >/dev/null 2>&1 &\n\
         __holder=$!\n\
         __i=0; while [ ! -f \"$NS_TMP/held\" ]; do __i=$((__i+1)); [ $__i -lt 500 ]; sleep 0.01; done",
        shell_quote(sane_path()),
        shell_command(&words)
    )
}

/// Ends the holder of [`hold_ns_lock`] and its sleeping child, and waits until the child is
/// gone too (it is not ours to `wait` for), so that nothing of the holder is left running.
fn release_ns_lock() -> &'static str {
    "kill $__holder $(cat \"$NS_TMP/held\") 2>/dev/null || true; wait $__holder || true\n\
     wait_gone \"$(cat \"$NS_TMP/held\")\""
}

/// Shell lines defining `wait_gone PID`: waits (5 s at most) until PID, not a child of the
/// script, has exited (a zombie has closed its descriptors already).
const WAIT_GONE: &str = "wait_gone() { __i=0; \
    until [ ! -e /proc/$1 ] || grep -q '^State:[[:space:]]*Z' /proc/$1/status 2>/dev/null; \
    do __i=$((__i+1)); [ $__i -lt 500 ]; sleep 0.01; done; }";

/// With `--network-namespace` (and `--cni-mode`), the lock is the target namespace's, not
/// the caller's: a holder in the pod's namespace blocks, one in the caller's does not.
#[test]
#[ignore = "needs root and network namespaces"]
fn the_lock_is_the_target_namespaces() {
    let test = "the_lock_is_the_target_namespaces";
    if skip_unless_root(test) {
        return;
    }
    let env = [
        ("ENABLE_INBOUND_IPV6", "false"),
        ("IPTABLES_LOCK_WAIT_SECONDS", "1"),
    ];
    let args = cat(
        SEED,
        &["--cni-mode", "--network-namespace", "/run/netns/pod"],
    );
    let ns = Script::new()
        .sh("ip netns add pod")
        .sh(&hold_ns_lock(""))
        .run("caller-held", &env, &args)
        .sh(release_ns_lock())
        .sh("ip netns exec pod iptables-nft-save > \"$NS_OUT/pod-after-first\"")
        .sh(&hold_ns_lock("ip netns exec pod"))
        .run("pod-held", &env, &cat(&args, &["--cleanup-only"]))
        .sh(release_ns_lock())
        .sh("ip netns exec pod iptables-nft-save > \"$NS_OUT/pod-after-second\"")
        .exec();
    ns.run_rc("caller-held", 0);
    assert!(ns.file("pod-after-first").contains("-A ISTIO_OUTPUT"));
    let run = ns.run_rc("pod-held", 1);
    assert!(
        run.one_error().contains("gave up waiting"),
        "{}",
        run.describe()
    );
    assert!(
        ns.file("pod-after-second").contains("-A ISTIO_OUTPUT"),
        "the cleanup that did not get the lock must change nothing"
    );
}

/// A run that cannot get the namespace's lock in time says so, names the holder (pid,
/// command, uid), and changes nothing.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_run_that_waited_past_the_lock_timeout_says_so() {
    let test = "a_run_that_waited_past_the_lock_timeout_says_so";
    if skip_unless_root(test) {
        return;
    }
    let hold = hold_ns_lock("");
    let hold = hold.as_str();
    let env = [
        ("ENABLE_INBOUND_IPV6", "false"),
        ("IPTABLES_LOCK_WAIT_SECONDS", "1"),
    ];
    let ns = Script::new()
        .snap("before")
        .sh(hold)
        .run("apply", &env, SEED)
        .sh("echo $__holder > \"$NS_OUT/holder\"")
        .sh(release_ns_lock())
        .snap("after")
        .exec();
    let ctx = ns.context();
    let run = ns.run_rc("apply", 1);
    let line = run.one_error();
    let holder = ns.file("holder").trim().to_string();
    assert!(
        line.contains("gave up waiting")
            && line.contains("more than 1 s")
            && line.contains(&format!("by pid {holder} (istio-iptables, uid 0)"))
            && line.contains("flock on /run/istio-iptables/netns-")
            && line.contains("nothing was changed"),
        "the error should say the run waited past the lock timeout and name the holder: {line}"
    );
    assert_same(
        "nothing may change without the lock",
        &ns.state("before"),
        &ns.state("after"),
        &ctx,
    );
}

/// A run that waits for another names it (pid, command, uid) while it waits, then goes on
/// once the other is done. Holding the lock changes no rules.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_waiting_run_names_the_run_it_waits_for() {
    let test = "a_waiting_run_names_the_run_it_waits_for";
    if skip_unless_root(test) {
        return;
    }
    let env = [("ENABLE_INBOUND_IPV6", "false")];
    let ns = Script::new()
        .snap("before")
        .sh(&hold_ns_lock(""))
        .sh("echo $__holder > \"$NS_OUT/holder\"")
        .snap("held")
        .spawn("waiter", &env, SEED)
        .sh(
            "__i=0; until grep -q 'waiting up to' \"$NS_OUT/waiter.out\" 2>/dev/null; \
             do __i=$((__i+1)); [ $__i -lt 1000 ]; sleep 0.01; done",
        )
        .sh(release_ns_lock())
        .sh("wait")
        .snap("after")
        .exec();
    let ctx = ns.context();
    let holder = ns.file("holder").trim().to_string();
    let run = ns.run_rc("waiter", 0);
    let logs = run.logs();
    let waiting = logs
        .lines()
        .find(|l| l.contains("waiting up to 30 s"))
        .unwrap_or_default();
    assert!(
        waiting.contains("this network namespace's lock (flock on /run/istio-iptables/netns-")
            && waiting.contains(&format!("pid {holder} (istio-iptables, uid 0)")),
        "the waiting run should name the run holding the lock\n{}",
        run.describe()
    );
    assert!(
        !waiting.contains("(sleep, uid 0)"),
        "the program the holder started does not hold the lock (close-on-exec)\n{}",
        run.describe()
    );
    assert!(
        logs.contains(&format!(
            ".lock), held before by pid {holder} (istio-iptables"
        )),
        "{}",
        run.describe()
    );
    let (before, held) = (ns.state("before"), ns.state("held"));
    assert_same(
        "holding the lock changes nothing in the kernel",
        &before,
        &held,
        &ctx,
    );
    assert!(ns.state("after").get("v4-nft").contains("-A ISTIO_OUTPUT"));
}

/// A holder killed with SIGKILL releases the lock at once, though the program it started
/// still runs: programs never hold the lock (close-on-exec), so a hung one cannot keep every
/// later run out.
#[test]
#[ignore = "needs root and network namespaces"]
fn a_killed_holder_releases_the_lock_though_its_program_still_runs() {
    let test = "a_killed_holder_releases_the_lock_though_its_program_still_runs";
    if skip_unless_root(test) {
        return;
    }
    let env = [
        ("ENABLE_INBOUND_IPV6", "false"),
        ("IPTABLES_LOCK_WAIT_SECONDS", "1"),
    ];
    let ns = Script::new()
        .sh(&hold_ns_lock(""))
        .sh("kill -9 $__holder; wait $__holder || true")
        .sh("[ -e /proc/$(cat \"$NS_TMP/held\") ] && echo running > \"$NS_OUT/child\"")
        .run("orphan-running", &env, SEED)
        .sh("kill \"$(cat \"$NS_TMP/held\")\"; wait_gone \"$(cat \"$NS_TMP/held\")\"")
        .snap("after")
        .exec();
    assert_eq!(ns.file("child").trim(), "running", "the orphan still ran");
    let run = ns.run_rc("orphan-running", 0);
    assert!(run.error_lines().is_empty(), "{}", run.describe());
    assert!(ns.state("after").get("v4-nft").contains("-A ISTIO_OUTPUT"));
}

/// Any local user can bind the abstract socket name that used to be the lock: a `nobody`
/// process holding `@istio-iptables.netns.lock` must not stop or slow a run.
#[test]
#[ignore = "needs root and network namespaces"]
fn an_unprivileged_process_cannot_hold_the_lock() {
    let test = "an_unprivileged_process_cannot_hold_the_lock";
    if skip_unless_root(test) || skip_unless_installed(test, &["setpriv", "perl"]) {
        return;
    }
    let env = [("ENABLE_INBOUND_IPV6", "false")];
    let squat = "socket(S, AF_UNIX, SOCK_STREAM, 0) or die \"socket: $!\"; \
                 bind(S, pack_sockaddr_un(\"\\0istio-iptables.netns.lock\")) or die \"bind: $!\"; \
                 listen(S, 5) or die; sleep 60";
    let ns = Script::new()
        .sh(&format!(
            "setpriv --reuid 65534 --regid 65534 --clear-groups perl -MSocket -e {} &\n\
             __squatter=$!\n\
             __i=0; until grep -q '@istio-iptables.netns.lock' /proc/net/unix; \
             do __i=$((__i+1)); [ $__i -lt 500 ]; sleep 0.01; done\n\
             grep '^Uid:' /proc/$__squatter/status > \"$NS_OUT/squatter-uid\"",
            shell_quote(squat)
        ))
        .run("apply", &env, SEED)
        .snap("after")
        .sh("kill $__squatter; wait $__squatter || true")
        .exec();
    assert!(
        ns.file("squatter-uid").contains("65534"),
        "the squatter should run as nobody: {}",
        ns.file("squatter-uid")
    );
    let run = ns.run_rc("apply", 0);
    assert!(
        run.error_lines().is_empty() && !run.logs().contains("waiting up to"),
        "{}",
        run.describe()
    );
    assert!(
        run.ms < 5_000,
        "the run should not wait: {}",
        run.describe()
    );
    assert!(ns.state("after").get("v4-nft").contains("-A ISTIO_OUTPUT"));
}
