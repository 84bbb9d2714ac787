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
        "mkdir -p \"$NS_TMP/holdshim\"; rm -f \"$NS_TMP/held\"\n\
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

/// Ends the holder of [`hold_ns_lock`] and its sleeping child (which inherited the lock).
fn release_ns_lock() -> &'static str {
    "kill $__holder $(cat \"$NS_TMP/held\") 2>/dev/null || true; wait $__holder || true"
}

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

/// A run that cannot get the namespace's lock in time says so, names the holder, and
/// changes nothing.
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
            && line.contains(&format!("(pid {holder})"))
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
