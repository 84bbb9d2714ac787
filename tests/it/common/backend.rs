//! Which backend programs the capture (iptables, or native nftables with `--native-nftables`)
//! and how a config is applied in a namespace with it: the one place the real-traffic tests
//! decide that ([`Topology::apply_ok`]), and what a failure report shows of the rules
//! ([`Topology::describe_for`]).

use super::*;

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
pub(crate) use per_backend;

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

    /// Applies `args` with `--native-nftables` in `ns`, as an init container does; see
    /// [`Topology::apply_ok`].
    fn apply_nft(&self, ns: &str, ipv6: bool, args: &[&str]) -> String {
        let argv = Backend::Nft.argv(args);
        format!(
            "applied with `istio-iptables {}`\n{}",
            shell_command(&argv),
            self.run_bin_ok(ns, ipv6, &argv)
        )
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
