//! Typed, validated configuration. `Config::build` is the one place where raw flag and env
//! strings become typed values; nothing raw survives past it, so every string that later
//! reaches an iptables-restore payload has been checked here. It is pure: what it needs to
//! know about the host is read afterwards, by [`HostFacts::detect`].

pub mod host;
pub mod listfile;
mod names;
pub mod values;

pub use self::host::{DnsServer, HostFacts, parse_resolv_conf};
use self::values::{
    BOOL_SPELLINGS, Lenient, Src, cidr_list, env_bool, go_bool, iface_list, owner, owner_list,
    port_list, single_port, u32_value,
};
pub use self::values::{
    Cidrs, ConfigError, Flavor, Given, Iface, InboundPorts, MAX_ECHO_CHARS, Mode, OutboundCidrs,
    Owner, OwnerGroups, Port, PortSpec, parse_go_bool, parse_go_duration, quoted, shortened,
    source_name, split_list,
};

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::Ipv4Net;

use crate::cli::{Args, Origin, env_only};

/// Istio's default proxy uid when `ENVOY_USER` does not resolve.
pub const DEFAULT_PROXY_UID: u32 = 1337;
/// Istio documents 64 for the include list of owner groups, but they become ONE rule
/// (`-m owner ! --gid-owner G` five words each) and iptables-restore's parser stops at 255
/// words a line (`MAX_ARGC`, iptables 1.8.x): 49 groups fit, 50 fail with "Parser cannot
/// handle more arguments" (measured with iptables 1.8.9, legacy and nft). We reject at 50.
pub const MAX_OWNER_GROUPS_INCLUDE: usize = 49;
/// How long the legacy backend waits for the xtables lock by default.
pub const DEFAULT_LOCK_WAIT_SECS: u32 = 30;
/// How much longer than the lock wait a program may run by default: a legacy restore may
/// wait the whole lock wait for the xtables lock before it starts its work.
pub const PROGRAM_TIMEOUT_MARGIN_SECS: u32 = 30;

/// The whole, validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Outbound capture port (-p, ENVOY_PORT).
    pub proxy_port: Port,
    /// Inbound capture port (-z, INBOUND_CAPTURE_PORT).
    pub inbound_capture_port: Port,
    /// Tunnel port, never captured (-e, INBOUND_TUNNEL_PORT).
    pub inbound_tunnel_port: Port,
    /// Proxy uids (-u, PROXY_UID); without them, the uid of `envoy_user`
    /// ([`HostFacts::proxy_uids`]).
    pub proxy_uids: Option<Vec<Owner>>,
    /// Proxy gids (-g, PROXY_GID); without them, the proxy uids ([`HostFacts::proxy_gids`]).
    pub proxy_gids: Option<Vec<Owner>>,
    /// The user whose uid is the proxy uid without -u (ENVOY_USER, else istio-proxy).
    pub envoy_user: String,
    /// Inbound mode (-m).
    pub mode: Mode,
    /// Inbound ports captured (-b).
    pub inbound_ports: InboundPorts,
    /// Inbound ports excluded with `-b '*'` (-d).
    pub inbound_ports_exclude: Vec<PortSpec>,
    /// Interfaces never captured (-c).
    pub exclude_interfaces: Vec<Iface>,
    /// Outbound CIDRs captured (-i).
    pub outbound_include: OutboundCidrs,
    /// Outbound CIDRs not captured (-x).
    pub outbound_exclude: Cidrs,
    /// Outbound ports always captured (-q).
    pub outbound_ports_include: Vec<PortSpec>,
    /// Outbound ports never captured (-o).
    pub outbound_ports_exclude: Vec<PortSpec>,
    /// Virtual interfaces whose inbound traffic is treated as outbound (-k).
    pub kube_virt_interfaces: Vec<Iface>,
    /// TPROXY mark (-t).
    pub tproxy_mark: u32,
    /// TPROXY routing table (-r).
    pub tproxy_route_table: u32,
    /// What this run does: apply, print (-n), clean up, or apply nothing.
    pub run: RunMode,
    /// DNS capture (--redirect-dns).
    pub redirect_dns: bool,
    /// Capture all port-53 traffic (--capture-all-dns).
    pub capture_all_dns: bool,
    /// mangle ISTIO_DROP of INVALID packets (--drop-invalid).
    pub drop_invalid: bool,
    /// Dual stack detection (--dual-stack).
    pub dual_stack: bool,
    /// Validate capture after apply (--run-validation).
    pub run_validation: bool,
    /// Validation probe port (--iptables-probe-port).
    pub probe_port: Port,
    /// Validation timeout (--probe-timeout).
    pub probe_timeout: Duration,
    /// Namespace to enter (--network-namespace).
    pub network_namespace: Option<PathBuf>,
    /// CNI mode (--cni-mode).
    pub cni_mode: bool,
    /// Reconcile existing state (--reconcile).
    pub reconcile: bool,
    /// Apply despite conflicts (--force-apply).
    pub force_apply: bool,
    /// iptables or native nftables (--native-nftables, --force-iptables-binary).
    pub backend: BackendChoice,
    /// Host loopback CIDR (ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR).
    pub host_loopback_cidr: Ipv4Net,
    /// Owner groups captured (`ISTIO_OUTBOUND_OWNER_GROUPS`, `..._EXCLUDE`).
    pub owner_groups: OwnerGroups,
    /// Generate IPv6 rules (ENABLE_INBOUND_IPV6); unset, [`HostFacts::ipv6`] is detected.
    pub enable_inbound_ipv6: Option<bool>,
    /// Where the DNS servers are read from (--resolv-conf).
    pub resolv_conf: PathBuf,
    /// -u, -g and --resolv-conf as given, for the errors of [`HostFacts::detect`].
    pub given: GivenValues,
    /// Seconds to wait for the xtables lock (IPTABLES_LOCK_WAIT_SECONDS).
    pub lock_wait_secs: u32,
    /// Seconds a program may run before it is killed (IPTABLES_PROGRAM_TIMEOUT_SECONDS).
    pub program_timeout_secs: u32,
    /// Each list as one rule over an anonymous nft set (--exclusion-sets, EXCLUSION_SETS;
    /// only with native nftables).
    pub exclusion_sets: bool,
}

/// Which backend programs the capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// iptables, in the flavour `--force-iptables-binary` names, or the one detection picks.
    Iptables { flavor: Option<Flavor> },
    /// Native nftables (`--native-nftables`): Istio's `inet` tables, applied with nft.
    /// `--force-iptables-binary` has no effect then (it is kept only to warn of that).
    Nftables { ignored_flavor: Option<Flavor> },
}

impl BackendChoice {
    /// The choice of `--native-nftables` and `--force-iptables-binary`.
    fn of(native_nftables: bool, flavor: Option<Flavor>) -> BackendChoice {
        if native_nftables {
            BackendChoice::Nftables {
                ignored_flavor: flavor,
            }
        } else {
            BackendChoice::Iptables { flavor }
        }
    }

    /// The flavour `--force-iptables-binary` named, whichever backend was chosen.
    pub fn forced_flavor(self) -> Option<Flavor> {
        match self {
            BackendChoice::Iptables { flavor } => flavor,
            BackendChoice::Nftables { ignored_flavor } => ignored_flavor,
        }
    }
}

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    /// Apply the rules (the default).
    Apply,
    /// `--dry-run`: print the script (of a cleanup, with `--cleanup-only`), change nothing.
    DryRun { cleanup: bool },
    /// `--cleanup-only`: remove everything of ours.
    Cleanup,
    /// `--skip-rule-apply`: apply nothing (`--run-validation` may still run).
    SkipApply,
}

impl RunMode {
    /// The mode of the three flags: `--dry-run` first, then `--cleanup-only`, then
    /// `--skip-rule-apply`.
    fn of(dry_run: bool, cleanup_only: bool, skip_rule_apply: bool) -> RunMode {
        match (dry_run, cleanup_only, skip_rule_apply) {
            (true, cleanup, _) => RunMode::DryRun { cleanup },
            (false, true, _) => RunMode::Cleanup,
            (false, false, true) => RunMode::SkipApply,
            (false, false, false) => RunMode::Apply,
        }
    }

    /// `--cleanup-only`, printed or run.
    pub fn cleans_up(self) -> bool {
        matches!(self, RunMode::Cleanup | RunMode::DryRun { cleanup: true })
    }

    /// Whether the run applies rules (warnings about what they capture matter then).
    pub fn applies(self) -> bool {
        matches!(self, RunMode::Apply | RunMode::DryRun { cleanup: false })
    }
}

/// The values [`HostFacts::detect`] checks on the host, as given, so that its errors name
/// them as `Config::build`'s do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GivenValues {
    pub proxy_uid: Given,
    /// (-u's value when -g is not given: the gids default to it.)
    pub proxy_gid: Given,
    /// --resolv-conf, when given on the command line (not its default).
    pub resolv_conf: Option<Given>,
    /// Where DNS capture was asked for (--redirect-dns or one of its env vars).
    pub redirect_dns: Given,
    /// The owner-group knob that holds the groups (`ISTIO_OUTBOUND_OWNER_GROUPS` or, with
    /// `*`, `..._EXCLUDE`).
    pub owner_groups: Given,
}

impl GivenValues {
    /// -u, -g (-u's value when -g is not given) and --resolv-conf as given, and the sources
    /// of DNS capture and of the owner groups.
    fn of(args: &Args, redirect_dns: Given, owner_groups: Given) -> GivenValues {
        let c = &args.cli;
        let src = |id: &'static str| Src::arg(args, id);
        let uid_raw = c.proxy_uid.as_deref().unwrap_or_default();
        GivenValues {
            proxy_uid: src("proxy_uid").given(uid_raw),
            proxy_gid: src("proxy_gid").given(
                c.proxy_gid
                    .as_deref()
                    .filter(|s| !s.is_empty())
                    .unwrap_or(uid_raw),
            ),
            resolv_conf: (args.origin("resolv_conf") == Origin::Flag)
                .then(|| src("resolv_conf").given(&c.resolv_conf)),
            redirect_dns,
            owner_groups,
        }
    }
}

impl Config {
    /// Validates every flag and env value, without asking the host anything. `env` reads
    /// environment variables (for env-only knobs). The groups are read in this order, each in
    /// its own order, so that of several bad values the same one is always reported.
    ///
    /// An env var that is set but empty (or blank) is unset, for the flags' env vars (`cli`)
    /// and the env-only knobs alike. Warnings (values ignored as Istio ignores them, flags
    /// given twice, settings that cannot do what they seem to) are logged only once every
    /// value is valid: a bad input gets its one error line.
    pub fn build(args: &Args, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let env = &|k: &str| env(k).filter(|v| crate::cli::env_is_set(v.as_ref()));
        let mut warnings = Vec::new();
        let ports = ProxyPorts::parse(args)?;
        let owners = ProxyOwners::parse(args, env)?;
        let inbound = InboundCapture::parse(args)?;
        let outbound = OutboundCapture::parse(args)?;
        let tproxy = Tproxy::parse(args)?;
        let switches = Switches::parse(args, env, &mut warnings)?;
        if switches.exclusion_sets && !switches.native_nftables {
            return Err(Src::arg(args, "exclusion_sets").err(
                &args.cli.exclusion_sets,
                "needs --native-nftables (NATIVE_NFTABLES=true): iptables has no sets of \
                 addresses and ports without ipset, which Istio's image does not carry",
            ));
        }
        if switches.native_nftables {
            names::check_nft(
                args,
                &inbound.exclude_interfaces,
                &outbound.kube_virt_interfaces,
            )?;
        }
        let (probe_port, probe_timeout) = validation_probe(args, env, &mut warnings)?;
        let network_namespace = network_namespace(args)?;
        let flavor = iptables_flavor(args)?;
        // Env-only knobs.
        let host_loopback_cidr = host_loopback_cidr(env)?;
        let (owner_groups, owner_groups_given) = owner_groups(env)?;
        let enable_inbound_ipv6 = env_bool(env_only::ENABLE_INBOUND_IPV6, env, &mut warnings);
        let lock_wait_secs = lock_wait_secs(env)?;
        let program_timeout_secs = program_timeout_secs(env, lock_wait_secs)?;
        for r in &args.repeated {
            warnings.push(format!(
                "{} was given {} times: the last value, {}, is used (as Istio's flag parser \
                 does)",
                r.flag,
                r.times,
                quoted(&r.last)
            ));
        }
        for w in warnings {
            tracing::warn!("{w}");
        }
        warn_of_host_bits(&outbound, host_loopback_cidr);

        Ok(Config {
            proxy_port: ports.proxy,
            inbound_capture_port: ports.inbound_capture,
            inbound_tunnel_port: ports.inbound_tunnel,
            proxy_uids: owners.uids,
            proxy_gids: owners.gids,
            envoy_user: owners.envoy_user,
            mode: inbound.mode,
            inbound_ports: inbound.ports,
            inbound_ports_exclude: inbound.ports_exclude,
            exclude_interfaces: inbound.exclude_interfaces,
            outbound_include: outbound.include,
            outbound_exclude: outbound.exclude,
            outbound_ports_include: outbound.ports_include,
            outbound_ports_exclude: outbound.ports_exclude,
            kube_virt_interfaces: outbound.kube_virt_interfaces,
            tproxy_mark: tproxy.mark,
            tproxy_route_table: tproxy.route_table,
            run: switches.run_mode(),
            redirect_dns: switches.redirect_dns,
            capture_all_dns: switches.capture_all_dns,
            drop_invalid: switches.drop_invalid,
            dual_stack: switches.dual_stack,
            run_validation: switches.run_validation,
            probe_port,
            probe_timeout,
            network_namespace,
            cni_mode: switches.cni_mode,
            reconcile: switches.reconcile,
            force_apply: switches.force_apply,
            backend: BackendChoice::of(switches.native_nftables, flavor),
            host_loopback_cidr,
            owner_groups,
            enable_inbound_ipv6,
            resolv_conf: PathBuf::from(&args.cli.resolv_conf),
            given: GivenValues::of(args, switches.redirect_dns_given, owner_groups_given),
            lock_wait_secs,
            program_timeout_secs,
            exclusion_sets: switches.exclusion_sets,
        })
    }

    /// Whether `-i` names a loopback CIDR (the app's own traffic over lo is then captured).
    /// Both backends' builders ask.
    pub fn include_has_loopback(&self) -> bool {
        match &self.outbound_include {
            OutboundCidrs::All => false,
            OutboundCidrs::Only(c) => {
                c.v4.iter().any(|n| n.addr().is_loopback())
                    || c.v6.iter().any(|n| n.addr().is_loopback())
            }
        }
    }

    /// Istio: DNS capture needs --redirect-dns and either capture-all or at least one known
    /// server. Both backends' builders ask (each warns in its own words when it is off).
    pub fn dns_capture_on(&self, facts: &HostFacts) -> bool {
        self.redirect_dns
            && (self.capture_all_dns
                || !facts.dns_servers_v4.is_empty()
                || !facts.dns_servers_v6.is_empty())
    }

    /// Warns about settings that silently do nothing, or less or more than they seem to
    /// (worth a warning at the default level), when the run applies rules.
    pub fn warn_if_nothing_captured(&self) {
        let outbound = match &self.outbound_include {
            OutboundCidrs::All => true,
            OutboundCidrs::Only(c) => !c.is_empty(),
        };
        let inbound = self.inbound_ports != InboundPorts::None;
        if !(outbound || inbound || !self.outbound_ports_include.is_empty() || self.redirect_dns) {
            tracing::warn!(
                "this configuration captures no traffic: no outbound CIDRs (-i), no inbound ports \
                 (-b), no outbound ports (-q) and no DNS capture; Istio's sidecar uses -i '*' -b '*'"
            );
        }
        for (what, every) in [
            (
                "IPv4",
                self.outbound_exclude.v4.iter().any(|n| n.prefix_len() == 0),
            ),
            (
                "IPv6",
                self.outbound_exclude.v6.iter().any(|n| n.prefix_len() == 0),
            ),
        ] {
            if every {
                tracing::warn!(
                    "--istio-service-exclude-cidr holds a /0: every {what} destination is \
                     excluded, so no outbound {what} traffic is captured (to capture none, \
                     leave --istio-service-cidr empty)"
                );
            }
        }
        for (flag, owners, kind) in [
            ("--proxy-uid", &self.proxy_uids, "user"),
            ("--proxy-gid", &self.proxy_gids, "group"),
        ] {
            let root = |o: &Owner| matches!(o, Owner::Id(0)) || *o == Owner::Name("root".into());
            if owners.as_ref().is_some_and(|o| o.iter().any(root)) {
                tracing::warn!(
                    "{flag} includes 0 (root): the traffic of every process of the root {kind} \
                     bypasses capture, as the proxy's own does"
                );
            }
        }
        if self.proxy_port == self.inbound_capture_port {
            tracing::warn!(
                port = self.proxy_port.get(),
                "--envoy-port and --inbound-capture-port are the same port: outbound and \
                 inbound traffic are redirected to one listener (the proxy listens on 15001 and \
                 15006)"
            );
        }
        if let InboundPorts::Only(captured) = &self.inbound_ports {
            let overlap: Vec<String> = self
                .inbound_ports_exclude
                .iter()
                .filter(|d| captured.iter().any(|b| b.overlaps(d)))
                .map(|d| d.to_string())
                .collect();
            if !overlap.is_empty() {
                tracing::warn!(
                    ports = %overlap.join(","),
                    "--istio-local-exclude-ports has no effect with a list of inbound ports: \
                     it applies only with --istio-inbound-ports '*' (as in Istio), so these \
                     ports are captured; leave them out of --istio-inbound-ports instead"
                );
            }
        }
        if self.capture_all_dns && !self.redirect_dns {
            tracing::warn!("--capture-all-dns has no effect without --redirect-dns");
        }
        if let BackendChoice::Nftables {
            ignored_flavor: Some(_),
        } = self.backend
        {
            // Istio CNI says the same of the two settings together.
            tracing::warn!(
                "--force-iptables-binary is ignored with --native-nftables: the capture uses \
                 native nftables (ISTIO_* iptables rules of either flavour are removed)"
            );
        }
    }

    /// The configuration as the kernel stores it: CIDRs without host bits. Rules built from
    /// it compare equal to what iptables-save shows, so a second run changes nothing and
    /// `verify` sees no drift. (The dry-run script keeps the CIDRs as typed, like Istio.)
    pub fn kernel_form(&mut self) {
        if let OutboundCidrs::Only(c) = &mut self.outbound_include {
            *c = c.truncated();
        }
        self.outbound_exclude = self.outbound_exclude.truncated();
        self.host_loopback_cidr = self.host_loopback_cidr.trunc();
    }

    /// The effective configuration as `NAME=value` pairs (Istio's names), for logs and the
    /// dry-run header.
    pub fn summary(&self, facts: &HostFacts) -> Vec<(&'static str, String)> {
        fn join<T: fmt::Display>(v: &[T]) -> String {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        }
        fn cidrs(c: &Cidrs) -> String {
            let mut v: Vec<String> = c.v4.iter().map(|n| n.to_string()).collect();
            v.extend(c.v6.iter().map(|n| n.to_string()));
            v.join(",")
        }
        let mode = match self.mode {
            Mode::Redirect => "REDIRECT",
            Mode::Tproxy => "TPROXY",
        };
        let inbound_ports = match &self.inbound_ports {
            InboundPorts::None => String::new(),
            InboundPorts::All => "*".into(),
            InboundPorts::Only(p) => join(p),
        };
        let (groups_include, groups_exclude) = match &self.owner_groups {
            OwnerGroups::AllExcept(g) => ("*".into(), join(g)),
            OwnerGroups::Only(g) => (join(g), String::new()),
        };
        let outbound_include = match &self.outbound_include {
            OutboundCidrs::All => "*".into(),
            OutboundCidrs::Only(c) => cidrs(c),
        };
        let dns: Vec<&str> = facts
            .dns_servers_v4
            .iter()
            .chain(&facts.dns_servers_v6)
            .map(|d| d.text.as_str())
            .collect();
        let netns = self
            .network_namespace
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let nftables = matches!(self.backend, BackendChoice::Nftables { .. });
        let flavor = self
            .backend
            .forced_flavor()
            .map(|f| f.to_string())
            .unwrap_or_default();
        let mut summary = vec![
            ("PROXY_PORT", self.proxy_port.to_string()),
            (
                "PROXY_INBOUND_CAPTURE_PORT",
                self.inbound_capture_port.to_string(),
            ),
            ("PROXY_TUNNEL_PORT", self.inbound_tunnel_port.to_string()),
            ("PROXY_UID", join(&facts.proxy_uids)),
            ("PROXY_GID", join(&facts.proxy_gids)),
            ("INBOUND_INTERCEPTION_MODE", mode.into()),
            ("INBOUND_TPROXY_MARK", self.tproxy_mark.to_string()),
            (
                "INBOUND_TPROXY_ROUTE_TABLE",
                self.tproxy_route_table.to_string(),
            ),
            ("INBOUND_PORTS_INCLUDE", inbound_ports),
            ("INBOUND_PORTS_EXCLUDE", join(&self.inbound_ports_exclude)),
            ("OUTBOUND_OWNER_GROUPS_INCLUDE", groups_include),
            ("OUTBOUND_OWNER_GROUPS_EXCLUDE", groups_exclude),
            ("OUTBOUND_IP_RANGES_INCLUDE", outbound_include),
            ("OUTBOUND_IP_RANGES_EXCLUDE", cidrs(&self.outbound_exclude)),
            ("OUTBOUND_PORTS_INCLUDE", join(&self.outbound_ports_include)),
            ("OUTBOUND_PORTS_EXCLUDE", join(&self.outbound_ports_exclude)),
            ("KUBE_VIRT_INTERFACES", join(&self.kube_virt_interfaces)),
            ("EXCLUDE_INTERFACES", join(&self.exclude_interfaces)),
            ("ENABLE_INBOUND_IPV6", facts.ipv6.to_string()),
            ("DUAL_STACK", self.dual_stack.to_string()),
            ("DNS_CAPTURE", self.redirect_dns.to_string()),
            ("CAPTURE_ALL_DNS", self.capture_all_dns.to_string()),
            ("DNS_SERVERS", dns.join(",")),
            ("DROP_INVALID", self.drop_invalid.to_string()),
            (
                "HOST_IPV4_LOOPBACK_CIDR",
                self.host_loopback_cidr.to_string(),
            ),
            ("NETWORK_NAMESPACE", netns),
            ("CNI_MODE", self.cni_mode.to_string()),
            ("RECONCILE", self.reconcile.to_string()),
            ("CLEANUP_ONLY", self.run.cleans_up().to_string()),
            ("FORCE_APPLY", self.force_apply.to_string()),
            ("NATIVE_NFTABLES", nftables.to_string()),
            ("FORCE_IPTABLES_BINARY", flavor),
        ];
        // Ours, not Istio's: said only when on, so that the summary stays Istio's otherwise.
        if self.exclusion_sets {
            summary.push(("EXCLUSION_SETS", "true".into()));
        }
        summary
    }
}

// The groups of flags `Config::build` reads, in its order. Each reads its flags in a fixed
// order too: of several bad values, the first one read is the one reported.

/// -p, -z, -e: the proxy's ports.
struct ProxyPorts {
    proxy: Port,
    inbound_capture: Port,
    inbound_tunnel: Port,
}

impl ProxyPorts {
    fn parse(args: &Args) -> Result<ProxyPorts, ConfigError> {
        let c = &args.cli;
        let src = |id: &'static str| Src::arg(args, id);
        Ok(ProxyPorts {
            proxy: single_port(&src("envoy_port"), &c.envoy_port)?,
            inbound_capture: single_port(&src("inbound_capture_port"), &c.inbound_capture_port)?,
            inbound_tunnel: single_port(&src("inbound_tunnel_port"), &c.inbound_tunnel_port)?,
        })
    }
}

/// -u, -g and ENVOY_USER: whose traffic is the proxy's.
struct ProxyOwners {
    uids: Option<Vec<Owner>>,
    gids: Option<Vec<Owner>>,
    envoy_user: String,
}

impl ProxyOwners {
    fn parse(
        args: &Args,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ProxyOwners, ConfigError> {
        let c = &args.cli;
        let src = |id: &'static str| Src::arg(args, id);
        let uids = match c.proxy_uid.as_deref().filter(|s| !s.is_empty()) {
            Some(s) => Some(owner_list(&src("proxy_uid"), s)?),
            None => None,
        };
        let envoy_user = env(env_only::ENVOY_USER).unwrap_or_else(|| "istio-proxy".into());
        let gids = match c.proxy_gid.as_deref().filter(|s| !s.is_empty()) {
            Some(s) => Some(owner_list(&src("proxy_gid"), s)?),
            None => None,
        };
        Ok(ProxyOwners {
            uids,
            gids,
            envoy_user,
        })
    }
}

/// -m, -b, -d, -c: how and which inbound traffic is captured.
struct InboundCapture {
    mode: Mode,
    ports: InboundPorts,
    ports_exclude: Vec<PortSpec>,
    exclude_interfaces: Vec<Iface>,
}

impl InboundCapture {
    fn parse(args: &Args) -> Result<InboundCapture, ConfigError> {
        let c = &args.cli;
        let src = |id: &'static str| Src::arg(args, id);
        let mode = match c.istio_inbound_interception_mode.trim() {
            "" | "REDIRECT" => Mode::Redirect,
            "TPROXY" => Mode::Tproxy,
            _ => {
                return Err(src("istio_inbound_interception_mode").err(
                    &c.istio_inbound_interception_mode,
                    "expected REDIRECT or TPROXY",
                ));
            }
        };
        let items = split_list(&c.istio_inbound_ports);
        let ports = if items == ["*"] {
            InboundPorts::All
        } else if items.is_empty() {
            InboundPorts::None
        } else {
            InboundPorts::Only(port_list(
                &src("istio_inbound_ports"),
                &c.istio_inbound_ports,
            )?)
        };
        let ports_exclude = port_list(
            &src("istio_local_exclude_ports"),
            &c.istio_local_exclude_ports,
        )?;
        let exclude_interfaces = iface_list(
            &src("istio_exclude_interfaces"),
            &c.istio_exclude_interfaces,
        )?;
        Ok(InboundCapture {
            mode,
            ports,
            ports_exclude,
            exclude_interfaces,
        })
    }
}

/// -i, -x, -q, -o, -k: which outbound traffic is captured.
struct OutboundCapture {
    include: OutboundCidrs,
    exclude: Cidrs,
    ports_include: Vec<PortSpec>,
    ports_exclude: Vec<PortSpec>,
    kube_virt_interfaces: Vec<Iface>,
}

impl OutboundCapture {
    fn parse(args: &Args) -> Result<OutboundCapture, ConfigError> {
        let c = &args.cli;
        let src = |id: &'static str| Src::arg(args, id);
        let include = if split_list(&c.istio_service_cidr) == ["*"] {
            OutboundCidrs::All
        } else {
            OutboundCidrs::Only(cidr_list(
                &src("istio_service_cidr"),
                &c.istio_service_cidr,
            )?)
        };
        let exclude = cidr_list(
            &src("istio_service_exclude_cidr"),
            &c.istio_service_exclude_cidr,
        )?;
        let ports_include = port_list(&src("istio_outbound_ports"), &c.istio_outbound_ports)?;
        let ports_exclude = port_list(
            &src("istio_local_outbound_ports_exclude"),
            &c.istio_local_outbound_ports_exclude,
        )?;
        let kube_virt_interfaces =
            iface_list(&src("kube_virt_interfaces"), &c.kube_virt_interfaces)?;
        Ok(OutboundCapture {
            include,
            exclude,
            ports_include,
            ports_exclude,
            kube_virt_interfaces,
        })
    }
}

/// -t, -r: the TPROXY mark and routing table.
struct Tproxy {
    mark: u32,
    route_table: u32,
}

impl Tproxy {
    /// Both are parsed before either is checked against the kernel's special values.
    fn parse(args: &Args) -> Result<Tproxy, ConfigError> {
        let c = &args.cli;
        let src = |id: &'static str| Src::arg(args, id);
        let mark = u32_value(
            &src("istio_inbound_tproxy_mark"),
            &c.istio_inbound_tproxy_mark,
            "a packet mark (a non-negative integer)",
        )?;
        let route_table = u32_value(
            &src("istio_inbound_tproxy_route_table"),
            &c.istio_inbound_tproxy_route_table,
            "a routing table number (a non-negative integer)",
        )?;
        // Mark 0 makes `ip rule add fwmark 0` match every packet ("from all"); tables 0, 253,
        // 254 and 255 are unspec, default, main and local: a `local default` route there takes
        // the namespace's routing away.
        if mark == 0 {
            return Err(src("istio_inbound_tproxy_mark").err(
                &c.istio_inbound_tproxy_mark,
                "mark 0 would match every packet (`ip rule add fwmark 0` means \"from all\"); \
                 use 1-4294967295",
            ));
        }
        if matches!(route_table, 0 | 253..=255) {
            let name = match route_table {
                0 => "unspec",
                253 => "default",
                254 => "main",
                _ => "local",
            };
            return Err(src("istio_inbound_tproxy_route_table").err(
                &c.istio_inbound_tproxy_route_table,
                format!(
                    "table {route_table} is the kernel's {name} table; \
                     use 1-252 or 256-4294967295"
                ),
            ));
        }
        Ok(Tproxy { mark, route_table })
    }
}

/// The boolean flags. They mix DNS, run mode, validation and backend, but are read in this
/// one order (Istio's), so that of several bad ones the same is reported.
struct Switches {
    dry_run: bool,
    redirect_dns: bool,
    /// Where `redirect_dns` came from, for the errors of DNS capture.
    redirect_dns_given: Given,
    capture_all_dns: bool,
    drop_invalid: bool,
    dual_stack: bool,
    skip_rule_apply: bool,
    run_validation: bool,
    cni_mode: bool,
    reconcile: bool,
    cleanup_only: bool,
    force_apply: bool,
    native_nftables: bool,
    exclusion_sets: bool,
}

impl Switches {
    /// From env vars, a boolean that does not parse is ignored with a warning, as in Istio
    /// ([`Lenient`]), except the three that choose what the run does (`DRY_RUN`,
    /// `CLEANUP_ONLY`, `SKIP_RULE_APPLY`): their default applies the rules, which a value
    /// such as `yes` surely did not ask for, so they are refused.
    fn parse(
        args: &Args,
        env: &dyn Fn(&str) -> Option<String>,
        warnings: &mut Vec<String>,
    ) -> Result<Switches, ConfigError> {
        let c = &args.cli;
        let expected = format!("a boolean ({BOOL_SPELLINGS})");
        let mut lenient = |id: &str, raw: &str, alias: Option<&str>| {
            Lenient {
                args,
                id,
                raw,
                alias,
                parse: parse_go_bool,
                expected: &expected,
            }
            .read(env, warnings)
        };
        let dry_run = go_bool(args, "dry_run", &c.dry_run)?;
        let dns_alias = env_only::DNS_CAPTURE_ALIAS;
        let redirect_dns = lenient("redirect_dns", &c.redirect_dns, Some(dns_alias))?;
        let redirect_dns_given = match env(dns_alias) {
            Some(v)
                if args.origin("redirect_dns") != Origin::Flag
                    && parse_go_bool(v.trim()).is_some() =>
            {
                Src::env(dns_alias).given(&v)
            }
            _ => Src::arg(args, "redirect_dns").given(&c.redirect_dns),
        };
        Ok(Switches {
            dry_run,
            redirect_dns,
            redirect_dns_given,
            capture_all_dns: lenient("capture_all_dns", &c.capture_all_dns, None)?,
            drop_invalid: lenient(
                "drop_invalid",
                &c.drop_invalid,
                Some(env_only::INVALID_DROP_ALIAS),
            )?,
            dual_stack: lenient(
                "dual_stack",
                &c.dual_stack,
                Some(env_only::DUAL_STACK_ALIAS),
            )?,
            skip_rule_apply: go_bool(args, "skip_rule_apply", &c.skip_rule_apply)?,
            run_validation: lenient("run_validation", &c.run_validation, None)?,
            cni_mode: lenient("cni_mode", &c.cni_mode, None)?,
            reconcile: lenient("reconcile", &c.reconcile, None)?,
            cleanup_only: go_bool(args, "cleanup_only", &c.cleanup_only)?,
            force_apply: lenient("force_apply", &c.force_apply, None)?,
            native_nftables: lenient("native_nftables", &c.native_nftables, None)?,
            exclusion_sets: exclusion_sets(args)?,
        })
    }

    fn run_mode(&self) -> RunMode {
        RunMode::of(self.dry_run, self.cleanup_only, self.skip_rule_apply)
    }
}

/// --exclusion-sets: ours, so a value that is not a boolean is refused from env too.
fn exclusion_sets(args: &Args) -> Result<bool, ConfigError> {
    go_bool(args, "exclusion_sets", &args.cli.exclusion_sets)
}

/// --iptables-probe-port, --probe-timeout: the probe of --run-validation. Istio's flags are
/// a uint16 and a duration: from env, a value that does not parse is ignored ([`Lenient`]).
fn validation_probe(
    args: &Args,
    env: &dyn Fn(&str) -> Option<String>,
    warnings: &mut Vec<String>,
) -> Result<(Port, Duration), ConfigError> {
    let c = &args.cli;
    let port = Lenient {
        args,
        id: "iptables_probe_port",
        raw: &c.iptables_probe_port,
        alias: None,
        parse: values::parse_port,
        expected: "a port number (1-65535)",
    }
    .read(env, warnings)?;
    let timeout = Lenient {
        args,
        id: "probe_timeout",
        raw: &c.probe_timeout,
        alias: None,
        parse: parse_go_duration,
        expected: "a duration such as 500ms, 5s or 1m",
    }
    .read(env, warnings)?;
    Ok((port, timeout))
}

/// --network-namespace: the namespace to enter, if any.
fn network_namespace(args: &Args) -> Result<Option<PathBuf>, ConfigError> {
    match args.cli.network_namespace.trim() {
        "" => Ok(None),
        p if p.contains('\0') => {
            Err(Src::arg(args, "network_namespace").err(p, "contains a NUL byte"))
        }
        p => Ok(Some(PathBuf::from(p))),
    }
}

/// --force-iptables-binary: the iptables flavour, if one is forced.
fn iptables_flavor(args: &Args) -> Result<Option<Flavor>, ConfigError> {
    let raw = &args.cli.force_iptables_binary;
    match raw.trim() {
        "" => Ok(None),
        "legacy" => Ok(Some(Flavor::Legacy)),
        "nft" => Ok(Some(Flavor::Nft)),
        _ => Err(Src::arg(args, "force_iptables_binary").err(raw, "expected legacy or nft")),
    }
}

/// ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR: a loopback CIDR of mask 8 to 32, else 127.0.0.1/32.
fn host_loopback_cidr(env: &dyn Fn(&str) -> Option<String>) -> Result<Ipv4Net, ConfigError> {
    let var = env_only::HOST_IPV4_LOOPBACK_CIDR;
    let Some(v) = env(var) else {
        return Ok(Ipv4Net::from(std::net::Ipv4Addr::LOCALHOST));
    };
    let s = Src::env(var);
    let net: Ipv4Net = v
        .trim()
        .parse()
        .map_err(|_| s.err(&v, "expected an IPv4 CIDR such as 127.0.0.1/32"))?;
    if !net.addr().is_loopback() {
        return Err(s.err(&v, "expected an IPv4 loopback address (127.0.0.0/8)"));
    }
    if net.prefix_len() < 8 {
        return Err(s.err(&v, "expected a mask between 8 and 32"));
    }
    Ok(net)
}

/// ISTIO_OUTBOUND_OWNER_GROUPS (default `*`) and, with `*`, ..._EXCLUDE; and the one of the
/// two that holds the groups, as given (for the check of group names on the host).
fn owner_groups(env: &dyn Fn(&str) -> Option<String>) -> Result<(OwnerGroups, Given), ConfigError> {
    let inc_var = env_only::OWNER_GROUPS_INCLUDE;
    let exc_var = env_only::OWNER_GROUPS_EXCLUDE;
    let include = env(inc_var).unwrap_or_else(|| "*".into());
    if include.trim() == "*" {
        let exclude = env(exc_var).unwrap_or_default();
        let s = Src::env(exc_var);
        let groups = split_list(&exclude)
            .into_iter()
            .map(|g| owner(&s, &exclude, g))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok((OwnerGroups::AllExcept(groups), s.given(&exclude)));
    }
    let s = Src::env(inc_var);
    let groups = split_list(&include)
        .into_iter()
        .map(|g| owner(&s, &include, g))
        .collect::<Result<Vec<_>, _>>()?;
    if groups.len() > MAX_OWNER_GROUPS_INCLUDE {
        return Err(s.err(
            &include,
            format!(
                "at most {MAX_OWNER_GROUPS_INCLUDE} groups can be captured, got {} \
                 (they form one iptables rule, and iptables-restore cannot parse a \
                 longer one; capture all groups with `*` and list the others in {})",
                groups.len(),
                env_only::OWNER_GROUPS_EXCLUDE
            ),
        ));
    }
    Ok((OwnerGroups::Only(groups), s.given(&include)))
}

/// IPTABLES_LOCK_WAIT_SECONDS: how long to wait for the xtables lock.
fn lock_wait_secs(env: &dyn Fn(&str) -> Option<String>) -> Result<u32, ConfigError> {
    match env(env_only::LOCK_WAIT) {
        None => Ok(DEFAULT_LOCK_WAIT_SECS),
        Some(v) => u32_value(&Src::env(env_only::LOCK_WAIT), &v, "a number of seconds"),
    }
}

/// IPTABLES_PROGRAM_TIMEOUT_SECONDS: how long a program may run (at least 1 s); by default
/// [`PROGRAM_TIMEOUT_MARGIN_SECS`] more than the lock wait.
fn program_timeout_secs(
    env: &dyn Fn(&str) -> Option<String>,
    lock_wait_secs: u32,
) -> Result<u32, ConfigError> {
    let src = Src::env(env_only::PROGRAM_TIMEOUT);
    match env(env_only::PROGRAM_TIMEOUT) {
        None => Ok(lock_wait_secs.saturating_add(PROGRAM_TIMEOUT_MARGIN_SECS)),
        Some(v) => match u32_value(&src, &v, "a number of seconds")? {
            0 => Err(src.err(&v, "expected a number of seconds, at least 1")),
            secs => Ok(secs),
        },
    }
}

/// Warns of CIDRs typed with host bits (-i, -x, the host loopback CIDR), which the kernel
/// drops. Only once every value is valid: a failed build warns of nothing.
fn warn_of_host_bits(outbound: &OutboundCapture, host_loopback_cidr: Ipv4Net) {
    let mut host_bits = match &outbound.include {
        OutboundCidrs::Only(c) => c.with_host_bits(),
        OutboundCidrs::All => Vec::new(),
    };
    host_bits.extend(outbound.exclude.with_host_bits());
    if host_loopback_cidr != host_loopback_cidr.trunc() {
        host_bits.push(host_loopback_cidr.to_string());
    }
    if !host_bits.is_empty() {
        tracing::warn!(
            cidrs = %host_bits.join(","),
            "host bits of these CIDRs are ignored: the kernel matches the network \
             (10.0.0.1/8 is 10.0.0.0/8)"
        );
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{Host, RESOLV_CONF_MAX_BYTES};
    use std::collections::HashMap;

    /// A host with no users, no addresses, and the given files.
    pub struct FakeHost {
        pub files: HashMap<PathBuf, String>,
        pub ipv6: Option<bool>,
    }

    impl Host for FakeHost {
        fn user_uid(&self, name: &str) -> Option<u32> {
            match name {
                "istio-proxy" => Some(1337),
                "svc" => Some(500), // a user without a group of its name
                _ => None,
            }
        }
        fn detect_ipv6(&self, _dual_stack: bool) -> Option<bool> {
            self.ipv6
        }
        fn has_global_ipv6(&self) -> bool {
            false
        }
        fn group_gid(&self, name: &str) -> Option<u32> {
            ["istio-proxy", "java", "ftp"]
                .iter()
                .position(|g| *g == name)
                .map(|i| 1337 + i as u32)
        }
        fn read_file(&self, path: &std::path::Path) -> std::io::Result<Vec<u8>> {
            self.files
                .get(path)
                .map(|s| s.clone().into_bytes())
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        }
    }

    /// The seed command of the issue: Istio's usual sidecar injection.
    pub const SEED: &[&str] = &[
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        "1337",
        "-m",
        "REDIRECT",
        "-i",
        "*",
        "-x",
        "",
        "-b",
        "*",
        "-d",
        "15090,15020",
    ];

    /// The config of `argv` and `env`, and its host facts read from a [`FakeHost`] (whose
    /// resolv.conf has one server per family).
    pub fn build(argv: &[&str], env: &[(&str, &str)]) -> Result<(Config, HostFacts), ConfigError> {
        let host = FakeHost {
            files: HashMap::from([(
                PathBuf::from("/etc/resolv.conf"),
                "nameserver 10.96.0.10\nnameserver fd00::10\nsearch x\n".to_string(),
            )]),
            ipv6: Some(false),
        };
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut full = vec!["istio-iptables"];
        full.extend_from_slice(argv);
        let args = Args::parse_from(full).expect("clap accepts");
        // As main builds it: `@PATH` lists expanded, then `Config::build`.
        let cfg = super::listfile::build_config(&args, &|k| env.get(k).cloned())?;
        let facts = HostFacts::detect(&cfg, &host)?;
        Ok((cfg, facts))
    }

    /// The rules of a config and its host facts (as [`build`] returns them).
    pub fn plan((cfg, facts): (Config, HostFacts)) -> crate::backend::iptables::build::Plan {
        crate::backend::iptables::build::build(&cfg, &facts)
    }

    #[test]
    fn defaults_match_istio() {
        let (c, f) = build(&[], &[]).unwrap();
        assert_eq!(c.proxy_port.get(), 15001);
        assert_eq!(c.inbound_capture_port.get(), 15006);
        assert_eq!(c.inbound_tunnel_port.get(), 15008);
        assert_eq!(f.proxy_uids, vec![Owner::Id(1337)]);
        assert_eq!(f.proxy_gids, vec![Owner::Id(1337)]);
        assert_eq!(c.mode, Mode::Redirect);
        assert_eq!(c.inbound_ports, InboundPorts::None);
        assert_eq!(c.outbound_include, OutboundCidrs::Only(Cidrs::default()));
        assert_eq!(c.tproxy_mark, 1337);
        assert_eq!(c.tproxy_route_table, 133);
        assert_eq!(c.probe_port.get(), 15002);
        assert_eq!(c.probe_timeout, Duration::from_secs(5));
        assert!(c.reconcile);
        assert_eq!(c.owner_groups, OwnerGroups::AllExcept(vec![]));
        assert_eq!(c.host_loopback_cidr.to_string(), "127.0.0.1/32");
    }

    #[test]
    fn lists_ignore_empty_items_and_keep_order() {
        let (c, _) = build(
            &["-d", "15090,15021,", "-i", "10.0.0.0/8,,fd00::/8,1.2.3.4"],
            &[],
        )
        .unwrap();
        assert_eq!(c.inbound_ports_exclude.len(), 2);
        let OutboundCidrs::Only(cidrs) = c.outbound_include else {
            panic!()
        };
        assert_eq!(cidrs.v4[0].to_string(), "10.0.0.0/8");
        assert_eq!(cidrs.v4[1].to_string(), "1.2.3.4/32");
        assert_eq!(cidrs.v6[0].to_string(), "fd00::/8");
    }

    #[test]
    fn port_ranges() {
        let (c, _) = build(&["-b", "80:90,443"], &[]).unwrap();
        assert_eq!(
            c.inbound_ports,
            InboundPorts::Only(vec![
                PortSpec::Range(Port(80), Port(90)),
                PortSpec::One(Port(443))
            ])
        );
        assert!(
            build(&["-b", "90:80"], &[])
                .unwrap_err()
                .reason
                .contains("reversed")
        );
    }

    #[test]
    fn bad_values_name_flag_or_env() {
        let e = build(&["-p", "70000"], &[]).unwrap_err();
        assert_eq!(e.source_name, "--envoy-port");
        assert_eq!(e.value, "70000");
        let e = build(&["-i", "10.0.0.0/33"], &[]).unwrap_err();
        assert_eq!(e.source_name, "--istio-service-cidr");
        let e = build(&["-x", "*"], &[]).unwrap_err();
        assert_eq!(e.source_name, "--istio-service-exclude-cidr");
        let e = build(&["-c", "eth0 -j DROP"], &[]).unwrap_err();
        assert_eq!(e.source_name, "--istio-exclude-interfaces");
        let e = build(&["-k", "abcdefghijklmnop"], &[]).unwrap_err();
        assert!(e.reason.contains("1-15 bytes"), "{e}");
        let e = build(&["-c", "eth\n0"], &[]).unwrap_err();
        assert!(!e.to_string().contains('\n'), "one line: {e}");
        let e = build(&[], &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "10.0.0.1/32")]).unwrap_err();
        assert_eq!(e.source_name, "env ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR");
        let many: Vec<String> = (0..65).map(|i| i.to_string()).collect();
        let e = build(&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS", &many.join(","))]).unwrap_err();
        assert!(e.reason.contains("at most 49"), "{e}");
        let e = build(&["-u", "4294967295"], &[]).unwrap_err();
        assert!(e.reason.contains("reserved"), "{e}");
        assert!(build(&["-u", "4294967294"], &[]).is_ok());
        let e = build(&["-g", "nobody-here"], &[]).unwrap_err();
        assert_eq!(e.source_name, "--proxy-gid");
        assert_eq!(e.item.as_deref(), Some("nobody-here"));
        assert!(e.reason.contains("names no group"), "{e}");
        let e = build(&["-u", "nobody-here"], &[]).unwrap_err();
        assert_eq!(e.source_name, "--proxy-uid");
        let e = build(&["-u", "svc"], &[]).unwrap_err();
        assert_eq!(e.source_name, "--proxy-gid");
        assert!(
            e.reason.contains("defaults to the --proxy-uid value"),
            "{e}"
        );
        assert!(build(&["-u", "svc", "-g", "0"], &[]).is_ok());
        assert!(build(&["-u", "svc", "--cleanup-only"], &[]).is_ok());
        // The dry run prints names as given; the script may run on another machine.
        assert!(build(&["-u", "nobody-here", "--dry-run"], &[]).is_ok());
        let e = build(&["--probe-timeout", "forever"], &[]).unwrap_err();
        assert_eq!(e.source_name, "--probe-timeout");
        let e = build(&["--force-iptables-binary", "foo"], &[]).unwrap_err();
        assert_eq!(e.source_name, "--force-iptables-binary");
        let e = build(&["-m", "FOO"], &[]).unwrap_err();
        assert_eq!(e.source_name, "--istio-inbound-interception-mode");
        assert!(build(&["-t", "abc"], &[]).is_err());
        assert!(build(&["-z", "0"], &[]).is_err());
        assert!(build(&["-u", "1337;rm"], &[]).is_err());
        assert!(
            build(&["--native-nftables"], &[]).unwrap().0.backend
                == BackendChoice::Nftables {
                    ignored_flavor: None
                }
        );
        assert!(
            build(&["--native-nftables", "--dry-run", "--cleanup-only"], &[])
                .unwrap()
                .0
                .run
                == RunMode::DryRun { cleanup: true }
        );
        assert!(matches!(
            build(&["--native-nftables", "--dry-run"], &[])
                .unwrap()
                .0
                .backend,
            BackendChoice::Nftables { .. }
        ));
    }

    #[test]
    fn bool_aliases_and_go_spellings() {
        assert!(
            build(&[], &[("ISTIO_META_DNS_CAPTURE", "T")])
                .unwrap()
                .0
                .redirect_dns
        );
        assert!(build(&[], &[("INVALID_DROP", "1")]).unwrap().0.drop_invalid);
        assert!(
            build(&[], &[("ISTIO_DUAL_STACK", "True")])
                .unwrap()
                .0
                .dual_stack
        );
        // Istio's pkg/flag drops an env value it cannot parse: the default stays.
        let (c, _) = build(&[], &[("ISTIO_META_DNS_CAPTURE", "yes")]).unwrap();
        assert!(!c.redirect_dns);
        let (c, _) = build(&[], &[("ENABLE_INBOUND_IPV6", "maybe")]).unwrap();
        assert_eq!(c.enable_inbound_ipv6, None);
        // The command line beats the alias, and must parse.
        let (c, _) = build(
            &["--redirect-dns=false"],
            &[("ISTIO_META_DNS_CAPTURE", "1")],
        )
        .unwrap();
        assert!(!c.redirect_dns);
        assert!(build(&["--redirect-dns=yes"], &[]).is_err());
        // An empty env-only knob is unset.
        let (c, _) = build(&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS", "")]).unwrap();
        assert_eq!(c.owner_groups, OwnerGroups::AllExcept(vec![]));
        let (c, _) = build(&[], &[("IPTABLES_LOCK_WAIT_SECONDS", " ")]).unwrap();
        assert_eq!(c.lock_wait_secs, DEFAULT_LOCK_WAIT_SECS);
    }

    #[test]
    fn group_names_of_the_owner_group_knobs_must_exist_before_anything_runs() {
        for var in [
            "ISTIO_OUTBOUND_OWNER_GROUPS",
            "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
        ] {
            let e = build(&[], &[(var, "java,nogroup-9")]).unwrap_err();
            assert_eq!(e.source_name, format!("env {var}"));
            assert_eq!(e.item.as_deref(), Some("nogroup-9"), "{e}");
            assert!(build(&[], &[(var, "java,ftp,7")]).is_ok());
            assert!(build(&["--dry-run"], &[(var, "nogroup-9")]).is_ok());
        }
    }

    #[test]
    fn dns_capture_without_resolv_conf_names_dns_capture_not_the_flag_never_given() {
        let host = FakeHost {
            files: HashMap::new(),
            ipv6: Some(false),
        };
        let args = Args::parse_from(["x", "--redirect-dns"]).unwrap();
        let cfg = listfile::build_config(&args, &|_| None).unwrap();
        let e = HostFacts::detect(&cfg, &host).unwrap_err();
        assert_eq!(e.source_name, "--redirect-dns");
        assert!(e.reason.contains("--capture-all-dns"), "{e}");
        let alias = |k: &str| (k == "ISTIO_META_DNS_CAPTURE").then(|| "true".to_string());
        let args = Args::parse_from(["x"]).unwrap();
        let cfg = listfile::build_config(&args, &alias).unwrap();
        let e = HostFacts::detect(&cfg, &host).unwrap_err();
        assert_eq!(e.source_name, "env ISTIO_META_DNS_CAPTURE");
        let args = Args::parse_from(["x", "--redirect-dns", "--resolv-conf", "/r"]).unwrap();
        let cfg = listfile::build_config(&args, &|_| None).unwrap();
        let e = HostFacts::detect(&cfg, &host).unwrap_err();
        assert_eq!(e.source_name, "--resolv-conf");
    }

    #[test]
    fn interface_lists_are_trimmed_like_every_list() {
        let (c, _) = build(&["-c", "eth0, eth1 ,", "-k", " virt0"], &[]).unwrap();
        let names: Vec<String> = c.exclude_interfaces.iter().map(|i| i.to_string()).collect();
        assert_eq!(names, ["eth0", "eth1"]);
        assert_eq!(c.kube_virt_interfaces[0].to_string(), "virt0");
        assert!(build(&["-c", "eth 0"], &[]).is_err());
    }

    #[test]
    fn a_dash_range_points_at_the_colon() {
        let e = build(&["-d", "8000-8080"], &[]).unwrap_err().to_string();
        assert!(e.contains("FIRST:LAST"), "{e}");
        assert!(PortSpec::Range(Port(80), Port(90)).overlaps(&PortSpec::One(Port(90))));
        assert!(!PortSpec::Range(Port(80), Port(90)).overlaps(&PortSpec::One(Port(91))));
    }

    #[test]
    fn dns_servers_from_resolv_conf() {
        let (_, f) = build(&["--redirect-dns"], &[]).unwrap();
        assert_eq!(f.dns_servers_v4[0].text, "10.96.0.10");
        assert_eq!(f.dns_servers_v6[0].text, "fd00::10");
        let (_, f) = build(&["--redirect-dns", "--capture-all-dns"], &[]).unwrap();
        assert!(f.dns_servers_v4.is_empty());
        let e = build(&["--redirect-dns", "--resolv-conf", "/nope"], &[]).unwrap_err();
        assert_eq!(e.source_name, "--resolv-conf");
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        let long = "x".repeat(100_000);
        let e = build(&["-c", &long], &[]).unwrap_err().to_string();
        assert!(e.len() < 400, "{} bytes", e.len());
        assert!(e.contains("(100000 characters in all)"), "{e}");
        assert_eq!(quoted("eth\n0"), r#""eth\n0""#);
    }

    #[test]
    fn host_bits_are_cleared_in_the_kernel_form_only() {
        let (mut c, _) = build(
            &["-x", "10.0.0.1/8,2001:db8:5::1/48", "-i", "192.168.1.7/24"],
            &[],
        )
        .unwrap();
        assert_eq!(c.outbound_exclude.v4[0].to_string(), "10.0.0.1/8");
        c.kernel_form();
        assert_eq!(c.outbound_exclude.v4[0].to_string(), "10.0.0.0/8");
        assert_eq!(c.outbound_exclude.v6[0].to_string(), "2001:db8:5::/48");
        let OutboundCidrs::Only(inc) = &c.outbound_include else {
            panic!()
        };
        assert_eq!(inc.v4[0].to_string(), "192.168.1.0/24");
    }

    #[test]
    fn resolv_conf_is_read_like_a_resolver() {
        let mut text = b"# caf\xe9 in Latin-1\nnameserver 10.0.0.1\nnameserver bad\xff\n".to_vec();
        text.extend_from_slice(b"options ndots:5\nnameserver 10.0.0.1\nnameserver fd00::1 x\n");
        text.extend_from_slice(b"nameserver\n  nameserver\t10.0.0.2\nnameserver 10.0.0.1\n");
        let (v4, v6) = parse_resolv_conf(&text);
        let v4: Vec<&str> = v4.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(v4, ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(v6[0].text, "fd00::1");
        // A line cut at the size limit is dropped, not misread.
        let mut big = vec![b'#'; RESOLV_CONF_MAX_BYTES - 12];
        big.extend_from_slice(b"\nnameserver 10.0.0.77\n");
        assert!(parse_resolv_conf(&big).0.is_empty());
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("5"), None);
        assert_eq!(parse_go_duration("forever"), None);
        assert_eq!(parse_go_duration("-5s"), None);
    }

    /// The program deadline follows the lock wait unless set; 0 would kill every program.
    #[test]
    fn program_timeout_defaults_past_the_lock_wait_and_is_at_least_one_second() {
        let secs = |vars: &[(&str, &str)]| build(&[], vars).map(|(c, _)| c.program_timeout_secs);
        assert_eq!(secs(&[]).unwrap(), 60);
        assert_eq!(secs(&[("IPTABLES_LOCK_WAIT_SECONDS", "100")]).unwrap(), 130);
        assert_eq!(
            secs(&[("IPTABLES_PROGRAM_TIMEOUT_SECONDS", "5")]).unwrap(),
            5
        );
        for bad in ["0", "soon", "-1"] {
            let e = secs(&[("IPTABLES_PROGRAM_TIMEOUT_SECONDS", bad)])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("IPTABLES_PROGRAM_TIMEOUT_SECONDS") && e.contains("number of seconds"),
                "{e}"
            );
        }
    }

    #[test]
    fn ipv6_override_and_owner_group_filters() {
        assert!(
            build(&[], &[("ENABLE_INBOUND_IPV6", "true")])
                .unwrap()
                .1
                .ipv6
        );
        let (c, _) = build(&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS", "java,202")]).unwrap();
        assert_eq!(
            c.owner_groups,
            OwnerGroups::Only(vec![Owner::Name("java".into()), Owner::Id(202)])
        );
        let (c, _) = build(&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "888,ftp")]).unwrap();
        assert_eq!(
            c.owner_groups,
            OwnerGroups::AllExcept(vec![Owner::Id(888), Owner::Name("ftp".into())])
        );
    }

    #[test]
    fn tproxy_mark_and_table_that_break_routing_are_refused() {
        for (flag, value) in [
            ("-t", "0"),
            ("-r", "0"),
            ("-r", "253"),
            ("-r", "254"),
            ("-r", "255"),
        ] {
            let e = build(&[flag, value], &[]).unwrap_err();
            let long = if flag == "-t" {
                "--istio-inbound-tproxy-mark"
            } else {
                "--istio-inbound-tproxy-route-table"
            };
            assert_eq!(e.source_name, long, "{e}");
            assert_eq!(e.value, value);
        }
        for (t, r) in [
            ("1", "1"),
            ("4294967295", "252"),
            ("1337", "256"),
            ("7", "4294967295"),
        ] {
            let (c, _) = build(&["-t", t, "-r", r], &[]).unwrap();
            assert_eq!(c.tproxy_mark.to_string(), t);
            assert_eq!(c.tproxy_route_table.to_string(), r);
        }
        assert!(build(&["-t", "4294967296"], &[]).is_err());
    }
}
