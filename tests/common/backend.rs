//! Which backend programs the capture (iptables, or native nftables with `--native-nftables`)
//! and how a config is applied in a namespace with it: the one place the real-traffic tests
//! decide that ([`Topology::apply_ok`]), and what a failure report shows of the rules
//! ([`Topology::describe_for`]).

use super::*;

/// The env var that makes the [`Backend::Nft`] apply run the binary for real
/// (`NFT_REAL_APPLY=1`) instead of running its dry-run script with `sh` (the default, until the
/// real `--native-nftables` apply lands).
pub const NFT_REAL_APPLY: &str = "NFT_REAL_APPLY";

/// The table every capture config of the traffic tests writes with `--native-nftables`.
const NFT_NAT_TABLE: &str = "table inet istio-proxy-nat";

/// The backend the binary programs the capture with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// iptables, the binary's default (whichever of nft and legacy it detects).
    Iptables,
    /// Native nftables: `--native-nftables`, Istio's `istio-proxy-*` tables of family `inet`.
    Nft,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Iptables, Backend::Nft];

    /// `iptables` or `nft`: the suffix of the traffic tests' names.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Iptables => "iptables",
            Backend::Nft => "nft",
        }
    }

    /// The flags that select this backend on the binary's command line.
    pub fn flags(self) -> &'static [&'static str] {
        match self {
            Backend::Iptables => &[],
            Backend::Nft => &["--native-nftables"],
        }
    }

    /// The binary's arguments for `args` with this backend: its [`Backend::flags`], then
    /// `args`. Use it for every run of the binary that must see the backend (`explain`,
    /// `--run-validation`, ...).
    pub fn argv<'a>(self, args: &[&'a str]) -> Vec<&'a str> {
        let mut v = self.flags().to_vec();
        v.extend_from_slice(args);
        v
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Declares each test once per backend, as two root tests (`#[ignore = "needs root and
/// network namespaces"]`): `$iptables` runs `$run(stringify!($iptables), Backend::Iptables)`,
/// `$nft` runs `$run(stringify!($nft), Backend::Nft)`. `$run` applies its config with
/// [`Topology::apply_ok`] for that backend, and passes the backend's [`Backend::argv`] to
/// every other run of the binary. Doc comments before a pair go on both tests.
///
/// ```ignore
/// common::per_backend! {
///     /// The seed command over IPv4.
///     seed_ipv4_iptables, seed_ipv4_nft => |test, backend| seed(test, backend, false);
/// }
/// ```
#[allow(unused_macros)] // only the test files with per-backend tests use it
macro_rules! per_backend {
    ($($(#[doc = $doc:literal])* $iptables:ident, $nft:ident => $run:expr;)*) => {$(
        $(#[doc = $doc])*
        #[test]
        #[ignore = "needs root and network namespaces"]
        fn $iptables() {
            ($run)(stringify!($iptables), $crate::common::Backend::Iptables);
        }

        $(#[doc = $doc])*
        #[test]
        #[ignore = "needs root and network namespaces"]
        fn $nft() {
            ($run)(stringify!($nft), $crate::common::Backend::Nft);
        }
    )*};
}
#[allow(unused_imports)] // only the test files with per-backend tests use it
pub(crate) use per_backend;

/// True when `NFT_REAL_APPLY=1`: apply `--native-nftables` with the binary itself.
pub fn nft_real_apply() -> bool {
    std::env::var(NFT_REAL_APPLY).is_ok_and(|v| v == "1")
}

impl Topology {
    /// Applies the capture config `args` in namespace `ns` with `backend`
    /// (`ENABLE_INBOUND_IPV6=<ipv6>`), then checks that the capture is where that backend
    /// puts it (so an nft test cannot pass on iptables rules, nor the other way round).
    /// Panics with what ran, its output and the namespace's rules otherwise. Returns how it
    /// was applied and the binary's log, for failure reports.
    pub fn apply_ok(&self, backend: Backend, ns: &str, ipv6: bool, args: &[&str]) -> String {
        let log = match backend {
            Backend::Iptables => format!(
                "applied with `istio-iptables {}`\n{}",
                shell_command(args),
                self.run_bin_ok(ns, ipv6, args)
            ),
            Backend::Nft => self.apply_nft(ns, ipv6, args),
        };
        if let Err(e) = self.capture_is_in(backend, ns) {
            panic!(
                "after applying with the {backend} backend in {ns}: {e}\n--- how ---\n{log}\n{}",
                self.describe_for(backend, ns)
            );
        }
        log
    }

    /// Applies `args` with `--native-nftables` in `ns`; see [`Topology::apply_ok`].
    fn apply_nft(&self, ns: &str, ipv6: bool, args: &[&str]) -> String {
        if nft_real_apply() {
            // The real run, what an init container does: `istio-iptables --native-nftables
            // ARGS` in the namespace.
            let argv = Backend::Nft.argv(args);
            return format!(
                "applied with `istio-iptables {}` ({NFT_REAL_APPLY}=1)\n{}",
                shell_command(&argv),
                self.run_bin_ok(ns, ipv6, &argv)
            );
        }
        // TEMPORARY until the real --native-nftables apply lands: apply via the dry-run script.
        // (To switch: drop this part and the `if` above, keep the real run.) The dry run runs
        // in the namespace too, so IPv6 and the DNS servers are detected there, as a real run
        // would; its stdout is the script (one `nft -f -` transaction, then the `ip` steps),
        // which `sh` runs from a file in the namespace (as piping it to `ip netns exec NS sh`).
        let dry = ["--dry-run", "--native-nftables"];
        let argv: Vec<&str> = dry.iter().copied().chain(args.iter().copied()).collect();
        let out = self.run_bin(ns, ipv6, &argv);
        let (script, dry_log) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        let how = format!(
            "applied with the script of `istio-iptables {}` (ENABLE_INBOUND_IPV6={ipv6}) \
             run with `sh` in {ns}",
            shell_command(&argv)
        );
        assert!(
            out.status.success(),
            "{how}: the dry run failed with {}\n--- stdout ---\n{script}\n--- stderr ---\n{dry_log}",
            out.status
        );
        let tmp = TempDir::new("istio-iptables-nft-script");
        let path = tmp.path().join("apply.sh");
        fs::write(&path, &script).expect("write the dry-run script");
        let path = path.to_string_lossy().into_owned();
        let sh = self.exec(ns, "sh", &["-e", &path], &[]);
        // The script without its header (the effective configuration, also in the log).
        let body: String = script
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        let sh_err = String::from_utf8_lossy(&sh.stderr);
        assert!(
            sh.status.success(),
            "{how}: the script failed with {}\n--- script ---\n{body}--- sh stdout ---\n{}\n\
             --- sh stderr ---\n{sh_err}\n--- dry run's log ---\n{dry_log}",
            sh.status,
            String::from_utf8_lossy(&sh.stdout),
        );
        format!("{how}\n--- script ---\n{body}--- dry run's log ---\n{dry_log}")
    }

    /// Whether the capture in `ns` is in `backend`'s place: with nft, Istio's `inet
    /// istio-proxy-nat` table and no iptables `ISTIO_*` chain (iptables-nft's rules are in
    /// `nft list ruleset` too); with iptables, no `istio-proxy-*` table.
    pub fn capture_is_in(&self, backend: Backend, ns: &str) -> Result<(), String> {
        let out = self.exec(ns, "nft", &["list", "ruleset"], &[]);
        if !out.status.success() {
            return Err(format!(
                "`nft list ruleset` failed with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let ruleset = String::from_utf8_lossy(&out.stdout);
        let has = |s: &str| ruleset.lines().any(|l| l.contains(s));
        match backend {
            Backend::Nft if !has(NFT_NAT_TABLE) => {
                Err(format!("`nft list ruleset` has no `{NFT_NAT_TABLE}`"))
            }
            Backend::Nft if has("chain ISTIO_") => {
                Err("`nft list ruleset` has iptables' ISTIO_* chains".to_string())
            }
            Backend::Iptables if has("table inet istio-proxy-") => {
                Err("`nft list ruleset` has native nftables istio-proxy-* tables".to_string())
            }
            _ => Ok(()),
        }
    }

    /// The rules and routing state of namespace `ns` as `backend` sees them, for failure
    /// messages: `iptables-save` and `ip6tables-save`, or `nft list ruleset`; then `ip rule`
    /// of both families and the addresses.
    pub fn describe_for(&self, backend: Backend, ns: &str) -> String {
        let rules: &[(&str, &[&str])] = match backend {
            Backend::Iptables => &[("iptables-save", &[]), ("ip6tables-save", &[])],
            Backend::Nft => &[("nft", &["list", "ruleset"])],
        };
        let routing: &[(&str, &[&str])] = &[
            ("ip", &["-4", "rule"]),
            ("ip", &["-6", "rule"]),
            ("ip", &["-br", "addr"]),
        ];
        let mut s = String::new();
        for &(program, args) in rules.iter().chain(routing) {
            let out = self.exec(ns, program, args, &[]);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stdout = match backend {
                Backend::Iptables => normalize_save(&stdout),
                Backend::Nft => stdout.into_owned(),
            };
            let _ = writeln!(
                s,
                "--- {ns}: {program} {} ---\n{stdout}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        s
    }
}
