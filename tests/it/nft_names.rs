//! Interface names in the native nftables text: nft keywords (`bridge`, `inet`, `tcp`,
//! `tproxy`...) apply, a name means on nft what it means on iptables (`eth*` is the literal
//! name, `eth+` the wildcard), and what nft cannot express (`+` alone) is refused at the door.

use std::process::Command;

use crate::common::*;

/// Names nft reads as keywords when bare, a literal `*` at the end and alone, a `*` inside,
/// and iptables' wildcard.
const NAMES: &str = "bridge,inet,netdev,tcp,udp,eth*,*,a*b,veth+";

fn bin(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_clear().env("PATH", sane_path());
    run_with_timeout(&mut cmd, DEFAULT_TIMEOUT).expect("run the binary")
}

#[test]
fn every_interface_is_refused_at_the_door_with_native_nftables_only() {
    for flag in ["-c", "-k"] {
        let out = bin(&["--native-nftables", "--dry-run", "-b", "*", flag, "eth0,+"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}",
            describe_output(flag, &out)
        );
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.contains("invalid value \"eth0,+\" for --")
                && stderr
                    .contains("interface name \"+\" (every interface) has no native nftables form"),
            "{stderr}"
        );
        assert!(
            out.stdout.is_empty(),
            "nothing printed: {}",
            describe_output(flag, &out)
        );
        // iptables takes it (every interface).
        let out = bin(&["--dry-run", "-b", "*", flag, "eth0,+"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            describe_output(flag, &out)
        );
    }
}

/// The verdict line of `explain` for an inbound packet arriving on `iface`.
fn verdict(backend: &[&str], exclude: &str, iface: &str) -> String {
    let mut args = backend.to_vec();
    args.push("explain");
    args.extend(SEED);
    args.extend([
        "-c",
        exclude,
        "--direction",
        "inbound",
        "--dst",
        "10.0.0.5:8080",
        "--in-iface",
        iface,
    ]);
    let out = bin(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        describe_output("explain", &out)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.starts_with("verdict: "))
        .unwrap_or_else(|| panic!("no verdict in {text}"))
        .to_string()
}

#[test]
fn a_name_means_the_same_on_both_backends() {
    // (excluded, arriving on, excluded?)
    for (exclude, iface, excluded) in [
        ("eth*", "eth*", true),
        ("eth*", "ethX", false),
        ("eth+", "ethX", true),
        ("eth+", "eth*", true),
        ("eth+", "veth0", false),
        ("*", "*", true),
        ("*", "eth0", false),
        ("a*b", "a*b", true),
        ("a*b", "axb", false),
        ("tcp", "tcp", true),
    ] {
        let ipt = verdict(&[], exclude, iface);
        let nft = verdict(&["--native-nftables"], exclude, iface);
        assert_eq!(ipt, nft, "-c {exclude:?}, in {iface:?}");
        assert_eq!(
            ipt.starts_with("verdict: not captured"),
            excluded,
            "-c {exclude:?}, in {iface:?}: {ipt}"
        );
    }
}

#[test]
#[ignore = "needs root and network namespaces"]
fn keyword_and_wildcard_names_apply_verify_and_walk_in_the_kernel() {
    if skip_unless_root("keyword_and_wildcard_names_apply_verify_and_walk_in_the_kernel") {
        return;
    }
    // `sub`: a command word first (`verify`), or none (the apply).
    let run = |sub: &[&str]| {
        let mut flags = vec!["--native-nftables"];
        flags.extend(seed_with("-m", "TPROXY"));
        flags.extend(["-c", NAMES, "-k", "tproxy"]);
        shell_command([BIN].iter().chain(sub).chain(&flags))
    };
    let (apply, verify) = (run(&[]), run(&["verify"]));
    let explain = |iface: &str| {
        format!(
            "{} explain --from-kernel --native-nftables -p 15001 -z 15006 -u 1337 -m TPROXY \
             -i '*' -b '*' --direction inbound --dst 10.0.0.5:8080 --in-iface {}",
            shell_quote(BIN),
            shell_quote(iface)
        )
    };
    let script = format!(
        "ip link set lo up\n\
         {apply} > \"$NS_OUT/log1\" 2>&1\n\
         nft list ruleset > \"$NS_OUT/ruleset\"\n\
         {apply} > \"$NS_OUT/log2\" 2>&1\n\
         {verify} > \"$NS_OUT/verify\" 2>&1\n\
         {} > \"$NS_OUT/literal\" 2>&1\n\
         {} > \"$NS_OUT/other\" 2>&1\n\
         {} > \"$NS_OUT/wildcard\" 2>&1\n",
        explain("eth*"),
        explain("ethX"),
        explain("veth7"),
    );
    let out = run_in_fresh_ns_ok(&script).unwrap_or_else(|e| panic!("{e}"));
    let ruleset = out.file("ruleset").unwrap();
    for want in [
        "iifname \"bridge\"",
        "iifname \"inet\"",
        "oifname \"netdev\"",
        "iifname \"tcp\"",
        "oifname \"udp\"",
        "iifname \"tproxy\"",
        "iifname \"eth\\*\"",
        "iifname \"\\*\"",
        "iifname \"a*b\"",
        "iifname \"veth*\"",
    ] {
        assert!(
            ruleset.contains(want),
            "{want} missing:\n{}",
            out.describe()
        );
    }
    assert!(
        out.file("log2").unwrap().contains("nothing to commit"),
        "a re-run commits nothing\n{}",
        out.describe()
    );
    assert!(
        out.file("verify").unwrap().contains("OK"),
        "verify finds no drift\n{}",
        out.describe()
    );
    for (file, captured) in [("literal", false), ("other", true), ("wildcard", false)] {
        let text = out.file(file).unwrap();
        let verdict = text
            .lines()
            .find(|l| l.starts_with("verdict: "))
            .unwrap_or("");
        assert_eq!(
            !verdict.starts_with("verdict: not captured"),
            captured,
            "{file}: {verdict}\n{}",
            out.describe()
        );
    }
}
