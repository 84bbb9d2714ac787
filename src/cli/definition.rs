//! The clap definition: [`Cli`], its flags with their env vars and defaults, and the
//! commands with their own options.

use std::ffi::OsStr;

use clap::builder::{PossibleValue, StringValueParser, TypedValueParser};
use clap::{ArgAction, Parser, Subcommand, ValueEnum};

/// `-m`'s value parser: any string (`config` validates it, naming the flag or the env
/// var, and the empty default means REDIRECT), but REDIRECT and TPROXY are offered to
/// completion and shown in --help.
#[derive(Clone, Debug)]
struct ModeValues;

impl TypedValueParser for ModeValues {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<String, clap::Error> {
        StringValueParser::new().parse_ref(cmd, arg, value)
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(
            [PossibleValue::new("REDIRECT"), PossibleValue::new("TPROXY")].into_iter(),
        ))
    }
}

// Every flag, with its env var and default: global, so that `explain` and `verify` take
// them too. (A doc comment here would be the program's about text, which is `Root`'s.)
#[derive(clap::Args, Debug, Clone)]
#[group(skip)]
pub struct Cli {
    /// Envoy port to which all outbound TCP traffic is redirected.
    #[arg(
        global = true,
        short = 'p',
        long,
        env = "ENVOY_PORT",
        default_value = "15001",
        value_name = "PORT"
    )]
    pub envoy_port: String,

    /// Port to which all inbound TCP traffic to the pod/VM is redirected.
    #[arg(
        global = true,
        short = 'z',
        long,
        env = "INBOUND_CAPTURE_PORT",
        default_value = "15006",
        value_name = "PORT"
    )]
    pub inbound_capture_port: String,

    /// Istio tunnel port for inbound TCP traffic (never captured in REDIRECT mode).
    #[arg(
        global = true,
        short = 'e',
        long,
        env = "INBOUND_TUNNEL_PORT",
        default_value = "15008",
        value_name = "PORT"
    )]
    pub inbound_tunnel_port: String,

    /// UID(s) of the proxy, whose traffic is not captured; a comma list of numbers or user
    /// names. Default: the uid of $ENVOY_USER (istio-proxy), else 1337.
    #[arg(
        global = true,
        short = 'u',
        long,
        env = "PROXY_UID",
        value_name = "UID[,UID...]"
    )]
    pub proxy_uid: Option<String>,

    /// GID(s) of the proxy, whose traffic is not captured. Default: the --proxy-uid value.
    #[arg(
        global = true,
        short = 'g',
        long,
        env = "PROXY_GID",
        value_name = "GID[,GID...]"
    )]
    pub proxy_gid: Option<String>,

    /// Inbound interception mode: REDIRECT or TPROXY (empty means REDIRECT).
    #[arg(
        global = true,
        short = 'm',
        long,
        env = "ISTIO_INBOUND_INTERCEPTION_MODE",
        default_value = "",
        value_name = "MODE",
        value_parser = ModeValues
    )]
    pub istio_inbound_interception_mode: String,

    /// Inbound ports to capture: a comma list, `*` for all, empty for none.
    #[arg(
        global = true,
        short = 'b',
        long,
        env = "ISTIO_INBOUND_PORTS",
        default_value = "",
        value_name = "PORTS"
    )]
    pub istio_inbound_ports: String,

    /// Inbound ports never captured (applies with `-b '*'`).
    #[arg(
        global = true,
        short = 'd',
        long,
        env = "ISTIO_LOCAL_EXCLUDE_PORTS",
        default_value = "",
        value_name = "PORTS"
    )]
    pub istio_local_exclude_ports: String,

    /// Interfaces whose traffic is never captured, inbound or outbound.
    #[arg(
        global = true,
        short = 'c',
        long,
        env = "ISTIO_EXCLUDE_INTERFACES",
        default_value = "",
        value_name = "IFACES"
    )]
    pub istio_exclude_interfaces: String,

    /// Outbound CIDRs to capture: a comma list, `*` for all, empty for none.
    #[arg(
        global = true,
        short = 'i',
        long,
        env = "ISTIO_SERVICE_CIDR",
        default_value = "",
        value_name = "CIDRS"
    )]
    pub istio_service_cidr: String,

    /// Outbound CIDRs never captured (`*` is an error).
    #[arg(
        global = true,
        short = 'x',
        long,
        env = "ISTIO_SERVICE_EXCLUDE_CIDR",
        default_value = "",
        value_name = "CIDRS"
    )]
    pub istio_service_exclude_cidr: String,

    /// Outbound ports always captured.
    #[arg(
        global = true,
        short = 'q',
        long,
        env = "ISTIO_OUTBOUND_PORTS",
        default_value = "",
        value_name = "PORTS"
    )]
    pub istio_outbound_ports: String,

    /// Outbound ports never captured (TCP and UDP).
    #[arg(
        global = true,
        short = 'o',
        long,
        env = "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",
        default_value = "",
        value_name = "PORTS"
    )]
    pub istio_local_outbound_ports_exclude: String,

    /// Virtual interfaces whose inbound traffic (from a VM) is treated as outbound.
    #[arg(
        global = true,
        short = 'k',
        long,
        env = "KUBE_VIRT_INTERFACES",
        default_value = "",
        value_name = "IFACES"
    )]
    pub kube_virt_interfaces: String,

    /// Packet mark used by TPROXY mode.
    #[arg(
        global = true,
        short = 't',
        long,
        env = "ISTIO_INBOUND_TPROXY_MARK",
        default_value = "1337",
        value_name = "MARK"
    )]
    pub istio_inbound_tproxy_mark: String,

    /// Routing table used by TPROXY mode.
    #[arg(
        global = true,
        short = 'r',
        long,
        env = "ISTIO_INBOUND_TPROXY_ROUTE_TABLE",
        default_value = "133",
        value_name = "TABLE"
    )]
    pub istio_inbound_tproxy_route_table: String,

    /// Print the rules as a runnable sh script; change nothing.
    #[arg(global = true, short = 'n', long, env = "DRY_RUN", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", require_equals = true, value_name = "BOOL",
          action = ArgAction::Set)]
    pub dry_run: String,

    /// Capture DNS to the resolv.conf servers, redirecting it to the agent on 15053
    /// (also read from ISTIO_META_DNS_CAPTURE).
    #[arg(global = true, long, env = "REDIRECT_DNS", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub redirect_dns: String,

    /// With --redirect-dns: capture all port-53 traffic, not only that to resolv.conf servers.
    #[arg(global = true, long, env = "CAPTURE_ALL_DNS", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub capture_all_dns: String,

    /// Drop packets in conntrack state INVALID (mangle ISTIO_DROP) instead of resetting them
    /// (also read from INVALID_DROP).
    #[arg(global = true, long, env = "DROP_INVALID", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub drop_invalid: String,

    /// Dual stack: IPv6 is on when the pod has any global IPv6 address
    /// (also read from ISTIO_DUAL_STACK).
    #[arg(global = true, long, env = "DUAL_STACK", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub dual_stack: String,

    /// Apply no rules (useful with --run-validation).
    #[arg(global = true, long, env = "SKIP_RULE_APPLY", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub skip_rule_apply: String,

    /// Check that traffic is captured after applying (exit 126 when it is not).
    #[arg(global = true, long, env = "RUN_VALIDATION", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub run_validation: String,

    /// Port the validation probe connects to.
    #[arg(
        global = true,
        long,
        env = "IPTABLES_PROBE_PORT",
        default_value = "15002",
        value_name = "PORT"
    )]
    pub iptables_probe_port: String,

    /// How long validation waits (Go duration syntax: 500ms, 5s, 1m).
    #[arg(
        global = true,
        long,
        env = "PROBE_TIMEOUT",
        default_value = "5s",
        value_name = "DURATION"
    )]
    pub probe_timeout: String,

    /// Network namespace (a path such as /var/run/netns/x) to apply the rules in.
    #[arg(
        global = true,
        long,
        env = "NETWORK_NAMESPACE",
        default_value = "",
        value_name = "PATH"
    )]
    pub network_namespace: String,

    /// Run as the Istio CNI plugin does (xtables lock scoped to the pod).
    #[arg(global = true, long, env = "CNI_MODE", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub cni_mode: String,

    /// Reconcile existing, different ISTIO_* state instead of failing on it.
    #[arg(global = true, long, env = "RECONCILE", default_value = "true", num_args = 0..=1,
          default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub reconcile: String,

    /// Only remove ISTIO_* chains, jumps, routes and addresses; apply nothing.
    #[arg(global = true, long, env = "CLEANUP_ONLY", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub cleanup_only: String,

    /// Apply even when existing state conflicts and --reconcile=false.
    #[arg(global = true, long, env = "FORCE_APPLY", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub force_apply: String,

    /// Use native nftables instead of iptables: one `nft -f -` transaction for Istio's nft tables.
    #[arg(global = true, long, env = "NATIVE_NFTABLES", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub native_nftables: String,

    /// With --native-nftables: each exclusion/inclusion list (-i, -x, -b, -d, -q, -o, owner
    /// groups) as one rule over an anonymous set, not one rule per item (same capture).
    #[arg(global = true, long, env = "EXCLUSION_SETS", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub exclusion_sets: String,

    /// Force the iptables flavour: legacy or nft (default: detect).
    #[arg(
        global = true,
        long,
        env = "FORCE_IPTABLES_BINARY",
        default_value = "",
        value_name = "legacy|nft"
    )]
    pub force_iptables_binary: String,

    /// Where DNS servers are read from for --redirect-dns.
    #[arg(
        global = true,
        long,
        default_value = "/etc/resolv.conf",
        value_name = "PATH"
    )]
    pub resolv_conf: String,

    /// More logging (-v debug, -vv trace), over --log_output_level; RUST_LOG also works.
    #[arg(global = true, short = 'v', long, action = ArgAction::Count)]
    pub verbose: u8,

    /// Minimum level to log, as Istio's `scope:level,...` or a bare level (debug, info, warn,
    /// error, fatal, none). The `default` scope is this tool's; other scopes are accepted.
    #[arg(global = true, long = "log_output_level", default_value = "default:info",
          value_name = "LEVELS", help_heading = LOGGING)]
    pub log_output_level: String,

    /// Log one JSON object per line (keys `level`, `time`, `msg`, then each field).
    #[arg(global = true, long = "log_as_json", default_value = "false", num_args = 0..=1,
          default_missing_value = "true", require_equals = true, value_name = "BOOL",
          help_heading = LOGGING)]
    pub log_as_json: String,

    /// Scopes whose log lines name the caller (source file:line); `default` is this tool's.
    #[arg(global = true, long = "log_caller", default_value = "", value_name = "SCOPES",
          help_heading = LOGGING)]
    pub log_caller: String,

    /// Where logs go: `stdout`, `stderr` or a file path (appended to); repeat for several.
    /// Default: stdout, with warnings and errors on stderr; with --dry-run, explain and verify
    /// (whose stdout is their output) everything on stderr.
    #[arg(global = true, long = "log_target", value_name = "TARGET", action = ArgAction::Append,
          help_heading = LOGGING)]
    pub log_target: Vec<String>,

    /// Accepted for Istio compatibility; no effect (nothing here logs stack traces).
    #[arg(global = true, long = "log_stacktrace_level", default_value = "default:none",
          value_name = "LEVELS", help_heading = LOGGING)]
    pub log_stacktrace_level: String,

    /// Accepted for compatibility with Istio releases that had it; no effect (no rotation:
    /// an init container's log is read once).
    #[arg(global = true, long = "log_rotate", default_value = "", value_name = "PATH",
          help_heading = LOGGING)]
    pub log_rotate: String,

    /// Accepted for compatibility; no effect (see --log_rotate).
    #[arg(global = true, long = "log_rotate_max_age", default_value = "30", value_name = "DAYS",
          help_heading = LOGGING)]
    pub log_rotate_max_age: String,

    /// Accepted for compatibility; no effect (see --log_rotate).
    #[arg(global = true, long = "log_rotate_max_size", default_value = "104857600",
          value_name = "MB", help_heading = LOGGING)]
    pub log_rotate_max_size: String,

    /// Accepted for compatibility; no effect (see --log_rotate).
    #[arg(global = true, long = "log_rotate_max_backups", default_value = "1000",
          value_name = "N", help_heading = LOGGING)]
    pub log_rotate_max_backups: String,

    /// Accepted for Istio compatibility; no effect (klog verbosity: nothing here uses klog).
    #[arg(global = true, long = "vklog", default_value = "0", value_name = "LEVEL",
          help_heading = LOGGING)]
    pub vklog: String,
}

/// Set up iptables rules so that the Istio sidecar (Envoy) captures the pod's traffic.
///
/// A drop-in replacement for Istio's istio-iptables: same flags, same env vars, same rules.
/// Lists are comma separated; empty items are ignored. Every list (-i -x -b -d -q -o -k -c -u
/// -g, their env vars and the owner-group knobs) also takes `@PATH`: the items are read from
/// that file, separated by commas, spaces or newlines, `#` starting a comment. Booleans take
/// Go's spellings (1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False). An env var set to
/// an empty value is unset. A flag given twice takes the last value (with a warning).
#[derive(Parser, Debug, Clone)]
#[command(name = APPLY_COMMAND, version, max_term_width = 100)]
pub struct Root {
    #[command(flatten)]
    pub cli: Cli,
    /// Without a command (or with `istio-iptables`): apply (or print with --dry-run) the
    /// capture rules. `explain` and `verify` take the same config flags and env vars.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Heading of Istio's logging flags in --help.
const LOGGING: &str = "Logging (Istio's pkg/log flags)";

/// The apply command's name, the first word of Istio's injector's arguments.
pub(super) const APPLY_COMMAND: &str = "istio-iptables";

/// Commands. Without one, the capture rules are applied (or printed with --dry-run).
#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// The same as no command: apply the capture rules. Istio's injector runs the proxy
    /// image's `pilot-agent istio-iptables ...`; with this image it runs
    /// `istio-iptables istio-iptables ...`, so that first word is accepted and skipped.
    #[command(name = APPLY_COMMAND)]
    IstioIptables,
    /// Walk one packet through the rules: which rules it meets, and where it ends up
    /// (redirected to the proxy, TPROXY, DNS proxy, dropped or not captured).
    Explain(ExplainArgs),
    /// Compare the live rules with what the config produces: exit 0 when they match, 3 on
    /// drift (with a diff per family, table and chain), 5 when foreign rules take packets
    /// before ours.
    Verify(VerifyArgs),
    /// Will the capture work in this namespace, and if not, exactly why: the backend a run
    /// would choose and why, our state in every place, kernel support, permissions, the
    /// lock, addresses and DNS; read-only. Takes the apply's flags. Exit 0 when capture
    /// works as configured (or an apply would make it so), 7 when a finding stops it.
    Doctor(DoctorArgs),
    /// Print the shell completion script for bash, zsh, fish or powershell.
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff, section 8): `man -l <(istio-iptables man)`.
    Man,
}

/// Output format.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

/// Direction of the packet, as seen from the pod.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

/// Protocol of the packet.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtoArg {
    Tcp,
    Udp,
}

/// `explain` options.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Packet")]
pub struct ExplainArgs {
    /// Inbound (arriving at the pod) or outbound (sent by the pod).
    #[arg(long, value_enum)]
    pub direction: Direction,
    /// Destination ADDR:PORT (IPv6 as [ADDR]:PORT).
    #[arg(long, value_name = "ADDR:PORT")]
    pub dst: String,
    /// Source ADDR or ADDR:PORT (default: loopback for loopback destinations, else --pod-ip
    /// for outbound, or with --from-kernel the source the route picks; 192.0.2.1 /
    /// 2001:db8::1 for inbound).
    #[arg(long, value_name = "ADDR[:PORT]")]
    pub src: Option<String>,
    /// Protocol.
    #[arg(long, value_enum, default_value = "tcp")]
    pub proto: ProtoArg,
    /// uid of the sending socket (outbound; default 0).
    #[arg(long)]
    pub uid: Option<u32>,
    /// gid of the sending socket (outbound; default: --uid, else 0).
    #[arg(long)]
    pub gid: Option<u32>,
    /// Interface the packet arrives on (inbound; default eth0).
    #[arg(long, value_name = "IFACE")]
    pub in_iface: Option<String>,
    /// Interface the packet leaves by (outbound; default lo for 127.0.0.0/8, ::1, --pod-ip
    /// and, with IPv6 on, ::6; else eth0; with --from-kernel, the route's).
    #[arg(long, value_name = "IFACE")]
    pub out_iface: Option<String>,
    /// The pod's own address (traffic to it is routed over lo). With --from-kernel the
    /// namespace's own addresses and routes say that.
    #[arg(long, value_name = "ADDR")]
    pub pod_ip: Option<std::net::IpAddr>,
    /// Walk what the kernel holds (this namespace or --network-namespace) instead of the
    /// config: every place either backend may hold rules in (iptables legacy and nft, both
    /// families; native nftables), in the kernel's order, the packet's path from the
    /// namespace's addresses and routes.
    #[arg(long)]
    pub from_kernel: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

/// `verify` options.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Report")]
pub struct VerifyArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

/// `doctor` options.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Report")]
pub struct DoctorArgs {
    /// Also send `--run-validation`'s probe (needs our rules in place), reported per family.
    #[arg(long)]
    pub probe: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}
