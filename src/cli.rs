//! Command line: every flag of Istio's istio-iptables, each with its env var.
//!
//! Values stay raw strings here on purpose: `config` validates every one of them and,
//! because it can ask clap where a value came from, its error names the flag *or* the env var
//! that carried the bad value. Nothing in this file is interpreted beyond clap's precedence
//! rules (flag > env > default).

use std::ffi::OsStr;

use clap::builder::{PossibleValue, StringValueParser, TypedValueParser};
use clap::error::ErrorKind;
use clap::{
    ArgAction, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum, parser::ValueSource,
};

use crate::inspect::{self, interp::Proto};

/// Environment variables read directly (no flag), documented once here.
pub mod env_only {
    /// Loopback CIDR the proxy treats as "host local" (default 127.0.0.1/32).
    pub const HOST_IPV4_LOOPBACK_CIDR: &str = "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR";
    /// Comma list of groups whose outbound traffic is captured; `*` = all (default).
    pub const OWNER_GROUPS_INCLUDE: &str = "ISTIO_OUTBOUND_OWNER_GROUPS";
    /// Comma list of groups whose outbound traffic is not captured (with include `*`).
    pub const OWNER_GROUPS_EXCLUDE: &str = "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE";
    /// User name whose uid is the default for `--proxy-uid` (default istio-proxy).
    pub const ENVOY_USER: &str = "ENVOY_USER";
    /// Ours: `true`/`false` overrides IPv6 detection.
    pub const ENABLE_INBOUND_IPV6: &str = "ENABLE_INBOUND_IPV6";
    /// Istio's older spelling of `REDIRECT_DNS`.
    pub const DNS_CAPTURE_ALIAS: &str = "ISTIO_META_DNS_CAPTURE";
    /// Istio's older spelling of `DROP_INVALID`.
    pub const INVALID_DROP_ALIAS: &str = "INVALID_DROP";
    /// Istio's agent spelling of `DUAL_STACK`.
    pub const DUAL_STACK_ALIAS: &str = "ISTIO_DUAL_STACK";
    /// Ours: seconds to wait for the xtables lock with the legacy backend (default 30).
    pub const LOCK_WAIT: &str = "IPTABLES_LOCK_WAIT_SECONDS";

    /// The knobs above that have no flag, with their default and meaning, for `--help` and
    /// the man page.
    pub const DOCS: &[(&str, &str, &str)] = &[
        (
            HOST_IPV4_LOOPBACK_CIDR,
            "127.0.0.1/32",
            "the host loopback CIDR; IPv4 loopback with a mask of 8 to 32",
        ),
        (
            OWNER_GROUPS_INCLUDE,
            "*",
            "groups whose outbound traffic is captured (`*`: all); accepts @PATH",
        ),
        (
            OWNER_GROUPS_EXCLUDE,
            "empty",
            "groups whose outbound traffic is not captured (with `*` above); accepts @PATH",
        ),
        (
            ENVOY_USER,
            "istio-proxy",
            "user whose uid is the --proxy-uid default (1337 when there is no such user)",
        ),
        (
            ENABLE_INBOUND_IPV6,
            "detected",
            "true/false overrides the detection of IPv6 from the pod's addresses",
        ),
        (
            LOCK_WAIT,
            "30",
            "seconds the legacy backend waits for the xtables lock",
        ),
    ];
}

/// Exit codes and their meaning (the values are `main.rs`'s), for `--help` and the man page.
pub const EXIT_CODES: &[(u8, &str)] = &[
    (0, "success (also: nothing to do)"),
    (
        1,
        "applying or cleaning up failed (what had changed was restored unless the message \
         says ROLLBACK FAILED), or the network namespace could not be entered",
    ),
    (
        2,
        "bad input (unknown flag, invalid value, unreadable @PATH); nothing was run",
    ),
    (3, "verify: the live rules differ from the config"),
    (
        4,
        "--reconcile=false and the namespace holds different ISTIO_* rules; nothing changed",
    ),
    (125, "--run-validation could not run its probe"),
    (
        126,
        "--run-validation: traffic was not captured within --probe-timeout",
    ),
];

/// `--version`: the crate version and the git commit it was built from (see build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("ISTIO_IPTABLES_GIT_COMMIT"),
    ")"
);

/// Flags that only mean something when applying: `explain`, `verify` (and `completion`,
/// `man`) refuse them on the command line and leave them out of their --help. Their env vars
/// are ignored there (a pod's environment is shared by every command).
pub const APPLY_ONLY: &[&str] = &[
    "dry_run",
    "skip_rule_apply",
    "run_validation",
    "iptables_probe_port",
    "probe_timeout",
    "cni_mode",
    "reconcile",
    "cleanup_only",
    "force_apply",
];

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

/// Set up iptables rules so that the Istio sidecar (Envoy) captures the pod's traffic.
///
/// A drop-in replacement for Istio's istio-iptables: same flags, same env vars, same rules.
/// Lists are comma separated; empty items are ignored. Every list (-i -x -b -d -q -o -k -c -u
/// -g, their env vars and the owner-group knobs) also takes `@PATH`: the items are read from
/// that file, separated by commas, spaces or newlines, `#` starting a comment. Booleans given
/// through env vars take Go's spellings (1, t, T, TRUE, true, True, 0, f, F, FALSE, false,
/// False).
#[derive(Parser, Debug, Clone)]
#[command(name = "istio-iptables", version, max_term_width = 100)]
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

    /// Istio tunnel port for inbound TCP traffic (never captured).
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

    /// Without a command (or with `istio-iptables`): apply (or print with --dry-run) the
    /// capture rules. `explain` and `verify` take the same config flags and env vars.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Heading of Istio's logging flags in --help.
const LOGGING: &str = "Logging (Istio's pkg/log flags)";

/// The apply command's name, the first word of Istio's injector's arguments.
const APPLY_COMMAND: &str = "istio-iptables";

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
    /// drift (with a diff per family, table and chain).
    Verify(VerifyArgs),
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
    /// for outbound; 192.0.2.1 / 2001:db8::1 for inbound).
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
    /// and, with IPv6 on, ::6; else eth0).
    #[arg(long, value_name = "IFACE")]
    pub out_iface: Option<String>,
    /// The pod's own address (traffic to it is routed over lo).
    #[arg(long, value_name = "ADDR")]
    pub pod_ip: Option<std::net::IpAddr>,
    /// Evaluate the live iptables-save (this namespace or --network-namespace) instead of
    /// the config.
    #[arg(long)]
    pub from_kernel: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

impl From<&ExplainArgs> for inspect::ExplainRequest {
    fn from(a: &ExplainArgs) -> Self {
        inspect::ExplainRequest {
            direction: match a.direction {
                Direction::Inbound => inspect::Direction::Inbound,
                Direction::Outbound => inspect::Direction::Outbound,
            },
            dst: a.dst.clone(),
            src: a.src.clone(),
            proto: match a.proto {
                ProtoArg::Tcp => Proto::Tcp,
                ProtoArg::Udp => Proto::Udp,
            },
            uid: a.uid,
            gid: a.gid,
            in_iface: a.in_iface.clone(),
            out_iface: a.out_iface.clone(),
            pod_ip: a.pod_ip,
            from_kernel: a.from_kernel,
            format: a.output.into(),
        }
    }
}

impl From<Output> for inspect::Format {
    fn from(o: Output) -> Self {
        match o {
            Output::Text => inspect::Format::Text,
            Output::Json => inspect::Format::Json,
        }
    }
}

/// `verify` options.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Report")]
pub struct VerifyArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

/// Where a value came from, so errors can name the flag or the env var.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Flag,
    Env,
    Default,
}

/// Parsed command line plus the knowledge of each value's origin.
#[derive(Debug, Clone)]
pub struct Args {
    pub cli: Cli,
    origins: Origins,
}

/// Where [`Args::origin`] looks: clap's matches, or the fast parser's origins (one per row
/// of [`FLAGS`]).
#[derive(Debug, Clone)]
enum Origins {
    Clap(clap::ArgMatches),
    Fast([Origin; FLAGS.len()]),
}

impl Args {
    /// Parse `argv` (program name first). Errors are clap's (usage, --help, --version).
    pub fn parse_from<I, T>(argv: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let argv: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
        match Self::parse_fast(&argv, &|name| std::env::var_os(name)) {
            Some(parsed) => Ok(parsed),
            None => Self::parse_clap(argv),
        }
    }

    /// The full definition's parse ([`command`]): every command, --help, every error.
    fn parse_clap(argv: Vec<std::ffi::OsString>) -> Result<Self, clap::Error> {
        let mut cmd = command();
        let matches = cmd.try_get_matches_from_mut(argv)?;
        refuse_foreign_flags(&mut cmd, &matches)?;
        let cli = Cli::from_arg_matches(&matches)?;
        Ok(Self {
            cli,
            origins: Origins::Clap(matches),
        })
    }

    /// The fast path of every pod start, without building a clap `Command` (that costs
    /// about as much as everything else a --dry-run does): the apply command's arguments,
    /// read with [`FLAGS`], the table of [`Cli`]'s flags (a test holds it equal to clap's
    /// definition), giving what clap gives: same values, same origins (flag > env >
    /// default). It takes the forms of a pod's arguments: an optional leading
    /// `istio-iptables` (the injector's), then `--long VALUE`, `--long=VALUE`, `-s VALUE`;
    /// `--flag` or `--flag=VALUE` and `-s` for the optional-value booleans; `-v` and
    /// `--verbose`, counted; `--log_target` repeated. `None` for anything else (a command
    /// word, a positional, `--`, --help, --version, an unknown flag, `-vv` or `-p15001`,
    /// a missing value or one starting with `-`, a flag given twice, a value or env var
    /// that is not UTF-8): clap's full definition decides, so every message stays clap's.
    /// `env` reads an environment variable (a parameter so tests need not set any).
    fn parse_fast(
        argv: &[std::ffi::OsString],
        env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Option<Self> {
        let mut words = argv.iter().skip(1).peekable();
        let mut command = None;
        if words.next_if(|w| *w == APPLY_COMMAND).is_some() {
            command = Some(Command::IstioIptables);
        }
        let mut slots: Vec<Slot> = FLAGS
            .iter()
            .map(|_| Slot {
                values: Vec::new(),
                origin: Origin::Default,
            })
            .collect();
        while let Some(word) = words.next() {
            let word = word.to_str()?;
            let (i, attached) = if let Some(long) = word.strip_prefix("--") {
                let (name, value) = match long.split_once('=') {
                    Some((name, value)) => (name, Some(value)),
                    None => (long, None),
                };
                (FLAGS.iter().position(|f| f.long == name)?, value)
            } else if let Some(short) = word.strip_prefix('-') {
                let mut chars = short.chars();
                let (Some(c), None) = (chars.next(), chars.next()) else {
                    return None;
                };
                (FLAGS.iter().position(|f| f.short == Some(c))?, None)
            } else {
                return None;
            };
            let (flag, slot) = (&FLAGS[i], &mut slots[i]);
            let value = match (flag.kind, attached) {
                (Kind::Count, None) => String::new(),
                (Kind::Count, Some(_)) => return None,
                (Kind::OptBool, None) => "true".to_string(),
                (_, Some(value)) => value.to_string(),
                (Kind::Value | Kind::Append, None) => {
                    let value = words.next()?.to_str()?;
                    if value.starts_with('-') {
                        return None;
                    }
                    value.to_string()
                }
            };
            if slot.origin == Origin::Flag && matches!(flag.kind, Kind::Value | Kind::OptBool) {
                return None;
            }
            slot.origin = Origin::Flag;
            slot.values.push(value);
        }
        let mut origins = [Origin::Default; FLAGS.len()];
        for ((flag, slot), origin) in FLAGS.iter().zip(&mut slots).zip(&mut origins) {
            if slot.origin == Origin::Flag {
                // After `istio-iptables`, clap also reads the env var of a flag given (the
                // root's copy of the flag is not), and refuses one that is not UTF-8.
                if command.is_some() && flag.env.and_then(env).is_some_and(|v| v.to_str().is_none())
                {
                    return None;
                }
            } else if let Some(value) = flag.env.and_then(env) {
                slot.values.push(value.into_string().ok()?);
                slot.origin = Origin::Env;
            } else if let Some(default) = flag.default {
                slot.values.push(default.to_string());
            }
            *origin = slot.origin;
        }
        Some(Self {
            cli: cli_from_slots(slots, command),
            origins: Origins::Fast(origins),
        })
    }

    /// Where the value of the field `id` (clap's id: the field name) came from.
    pub fn origin(&self, id: &str) -> Origin {
        match &self.origins {
            Origins::Clap(matches) => match matches.value_source(id) {
                Some(ValueSource::CommandLine) => Origin::Flag,
                Some(ValueSource::EnvVariable) => Origin::Env,
                _ => Origin::Default,
            },
            Origins::Fast(origins) => match FLAGS.iter().position(|f| f.id == id) {
                Some(i) => origins[i],
                None => {
                    // clap's matches panic on an unknown id in debug builds, too.
                    debug_assert!(false, "{id:?} is not the id of a flag");
                    Origin::Default
                }
            },
        }
    }
}

/// How the fast parser reads a flag of [`FLAGS`] (each matches one shape of clap argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// One value (`ArgAction::Set`, one value): `--long VALUE`, `--long=VALUE`, `-s VALUE`.
    Value,
    /// A boolean whose value is optional (`num_args = 0..=1`, `require_equals`,
    /// `default_missing_value = "true"`): `--long`, `-s` or `--long=VALUE`.
    OptBool,
    /// `ArgAction::Count`: `-s` or `--long`, each counted.
    Count,
    /// `ArgAction::Append`: `--long VALUE` or `--long=VALUE`, repeatable.
    Append,
}

/// One root flag of [`Cli`] as the fast parser sees it.
#[derive(Debug)]
struct Flag {
    /// clap's id: the field's name.
    id: &'static str,
    short: Option<char>,
    long: &'static str,
    env: Option<&'static str>,
    default: Option<&'static str>,
    kind: Kind,
}

/// What the fast parser found for one flag: its values (one empty string per occurrence
/// for a [`Kind::Count`]) and where they came from.
struct Slot {
    values: Vec<String>,
    origin: Origin,
}

/// A field of [`Cli`] from its [`Slot`], as clap's derive reads its matches.
trait FromSlot {
    fn from_slot(slot: Slot) -> Self;
}

impl FromSlot for String {
    fn from_slot(slot: Slot) -> Self {
        slot.values.into_iter().next().unwrap_or_default()
    }
}

impl FromSlot for Option<String> {
    fn from_slot(slot: Slot) -> Self {
        slot.values.into_iter().next()
    }
}

impl FromSlot for Vec<String> {
    fn from_slot(slot: Slot) -> Self {
        slot.values
    }
}

impl FromSlot for u8 {
    fn from_slot(slot: Slot) -> Self {
        // clap's Count saturates, too.
        u8::try_from(slot.values.len()).unwrap_or(u8::MAX)
    }
}

/// [`FLAGS`] and [`cli_from_slots`] from one list, in [`Cli`]'s field order: `id, short,
/// long, env, default, kind;`. The struct literal makes a field of `Cli` missing here a
/// compile error; `fast_parse_table_is_the_clap_definition` holds every row equal to clap's.
macro_rules! root_flags {
    ($($id:ident, $short:expr, $long:expr, $env:expr, $default:expr, $kind:ident;)*) => {
        /// Every root flag of [`Cli`], for the fast parser ([`Args::parse_fast`]).
        const FLAGS: [Flag; [$(stringify!($id)),*].len()] = [$(Flag {
            id: stringify!($id),
            short: $short,
            long: $long,
            env: $env,
            default: $default,
            kind: Kind::$kind,
        }),*];

        /// The [`Cli`] of the slots (one per row of [`FLAGS`], in order).
        fn cli_from_slots(slots: Vec<Slot>, command: Option<Command>) -> Cli {
            let mut slots = slots.into_iter();
            // A struct expression evaluates its fields in the order written: FLAGS's.
            Cli {
                $($id: FromSlot::from_slot(slots.next().expect("one slot per flag")),)*
                command,
            }
        }
    };
}

root_flags! {
    envoy_port, Some('p'), "envoy-port", Some("ENVOY_PORT"), Some("15001"), Value;
    inbound_capture_port, Some('z'), "inbound-capture-port", Some("INBOUND_CAPTURE_PORT"), Some("15006"), Value;
    inbound_tunnel_port, Some('e'), "inbound-tunnel-port", Some("INBOUND_TUNNEL_PORT"), Some("15008"), Value;
    proxy_uid, Some('u'), "proxy-uid", Some("PROXY_UID"), None, Value;
    proxy_gid, Some('g'), "proxy-gid", Some("PROXY_GID"), None, Value;
    istio_inbound_interception_mode, Some('m'), "istio-inbound-interception-mode", Some("ISTIO_INBOUND_INTERCEPTION_MODE"), Some(""), Value;
    istio_inbound_ports, Some('b'), "istio-inbound-ports", Some("ISTIO_INBOUND_PORTS"), Some(""), Value;
    istio_local_exclude_ports, Some('d'), "istio-local-exclude-ports", Some("ISTIO_LOCAL_EXCLUDE_PORTS"), Some(""), Value;
    istio_exclude_interfaces, Some('c'), "istio-exclude-interfaces", Some("ISTIO_EXCLUDE_INTERFACES"), Some(""), Value;
    istio_service_cidr, Some('i'), "istio-service-cidr", Some("ISTIO_SERVICE_CIDR"), Some(""), Value;
    istio_service_exclude_cidr, Some('x'), "istio-service-exclude-cidr", Some("ISTIO_SERVICE_EXCLUDE_CIDR"), Some(""), Value;
    istio_outbound_ports, Some('q'), "istio-outbound-ports", Some("ISTIO_OUTBOUND_PORTS"), Some(""), Value;
    istio_local_outbound_ports_exclude, Some('o'), "istio-local-outbound-ports-exclude", Some("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE"), Some(""), Value;
    kube_virt_interfaces, Some('k'), "kube-virt-interfaces", Some("KUBE_VIRT_INTERFACES"), Some(""), Value;
    istio_inbound_tproxy_mark, Some('t'), "istio-inbound-tproxy-mark", Some("ISTIO_INBOUND_TPROXY_MARK"), Some("1337"), Value;
    istio_inbound_tproxy_route_table, Some('r'), "istio-inbound-tproxy-route-table", Some("ISTIO_INBOUND_TPROXY_ROUTE_TABLE"), Some("133"), Value;
    dry_run, Some('n'), "dry-run", Some("DRY_RUN"), Some("false"), OptBool;
    redirect_dns, None, "redirect-dns", Some("REDIRECT_DNS"), Some("false"), OptBool;
    capture_all_dns, None, "capture-all-dns", Some("CAPTURE_ALL_DNS"), Some("false"), OptBool;
    drop_invalid, None, "drop-invalid", Some("DROP_INVALID"), Some("false"), OptBool;
    dual_stack, None, "dual-stack", Some("DUAL_STACK"), Some("false"), OptBool;
    skip_rule_apply, None, "skip-rule-apply", Some("SKIP_RULE_APPLY"), Some("false"), OptBool;
    run_validation, None, "run-validation", Some("RUN_VALIDATION"), Some("false"), OptBool;
    iptables_probe_port, None, "iptables-probe-port", Some("IPTABLES_PROBE_PORT"), Some("15002"), Value;
    probe_timeout, None, "probe-timeout", Some("PROBE_TIMEOUT"), Some("5s"), Value;
    network_namespace, None, "network-namespace", Some("NETWORK_NAMESPACE"), Some(""), Value;
    cni_mode, None, "cni-mode", Some("CNI_MODE"), Some("false"), OptBool;
    reconcile, None, "reconcile", Some("RECONCILE"), Some("true"), OptBool;
    cleanup_only, None, "cleanup-only", Some("CLEANUP_ONLY"), Some("false"), OptBool;
    force_apply, None, "force-apply", Some("FORCE_APPLY"), Some("false"), OptBool;
    native_nftables, None, "native-nftables", Some("NATIVE_NFTABLES"), Some("false"), OptBool;
    force_iptables_binary, None, "force-iptables-binary", Some("FORCE_IPTABLES_BINARY"), Some(""), Value;
    resolv_conf, None, "resolv-conf", None, Some("/etc/resolv.conf"), Value;
    verbose, Some('v'), "verbose", None, None, Count;
    log_output_level, None, "log_output_level", None, Some("default:info"), Value;
    log_as_json, None, "log_as_json", None, Some("false"), OptBool;
    log_caller, None, "log_caller", None, Some(""), Value;
    log_target, None, "log_target", None, None, Append;
    log_stacktrace_level, None, "log_stacktrace_level", None, Some("default:none"), Value;
    log_rotate, None, "log_rotate", None, Some(""), Value;
    log_rotate_max_age, None, "log_rotate_max_age", None, Some("30"), Value;
    log_rotate_max_size, None, "log_rotate_max_size", None, Some("104857600"), Value;
    log_rotate_max_backups, None, "log_rotate_max_backups", None, Some("1000"), Value;
    vklog, None, "vklog", None, Some("0"), Value;
}

/// Commands that do not apply rules, and the root flags each refuses: `explain` and `verify`
/// take the capture config but not [`APPLY_ONLY`]; `completion` and `man` take no flags.
fn refused_flags(subcommand: &str) -> Option<fn(&clap::Arg) -> bool> {
    match subcommand {
        "explain" | "verify" => Some(|a| APPLY_ONLY.contains(&a.get_id().as_str())),
        "completion" | "man" => Some(|a| a.is_global_set()),
        _ => None,
    }
}

/// The clap command: [`Cli`] plus the version with its commit, the long help's closing
/// sections (env-only knobs, exit codes), and, in the commands that do not apply rules, a
/// hidden stand-in (no env var, no default) for each root flag they refuse, so that it is
/// missing from their --help and `refuse_foreign_flags` can name it. Parsing, completion
/// and the man page all use this one definition.
pub fn command() -> clap::Command {
    let mut cmd = Cli::command()
        .version(VERSION)
        .after_long_help(after_long_help());
    let root: Vec<clap::Arg> = cmd.get_arguments().cloned().collect();
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for name in names {
        let Some(refused) = refused_flags(&name) else {
            continue;
        };
        let stand_ins: Vec<clap::Arg> = root
            .iter()
            .filter(|a| refused(a))
            .map(|a| {
                a.clone()
                    .global(false)
                    .hide(true)
                    .env(None)
                    .default_value(None)
                    .required(false)
            })
            .collect();
        cmd = cmd.mut_subcommand(name, |sc| sc.args(stand_ins));
    }
    cmd
}

/// The same command as [`command`], for completion scripts: each command offers exactly the
/// flags it takes (generators list hidden stand-ins too, so none are used here). Every flag
/// is given to each command that takes it instead of being global: the root and
/// `istio-iptables` take them all, `explain` and `verify` all but [`APPLY_ONLY`],
/// `completion` and `man` none.
pub fn completion_command() -> clap::Command {
    let mut cmd = Cli::command().version(VERSION);
    let root: Vec<clap::Arg> = cmd.get_arguments().cloned().collect();
    cmd = cmd.mut_args(|a| a.global(false));
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for name in names {
        let refused = refused_flags(&name);
        let taken: Vec<clap::Arg> = root
            .iter()
            .filter(|a| refused.is_none_or(|r| !r(a)))
            .map(|a| a.clone().global(false))
            .collect();
        cmd = cmd.mut_subcommand(name, |sc| sc.args(taken));
    }
    cmd
}

/// `explain --dry-run` (or `--dry-run explain`): an error naming the flag and the command.
fn refuse_foreign_flags(cmd: &mut clap::Command, m: &clap::ArgMatches) -> Result<(), clap::Error> {
    let Some((name, sub)) = m.subcommand() else {
        return Ok(());
    };
    let Some(refused) = refused_flags(name) else {
        return Ok(());
    };
    let given = |id: &str| {
        [m, sub].iter().any(|m| {
            m.try_contains_id(id).unwrap_or(false)
                && m.value_source(id) == Some(ValueSource::CommandLine)
        })
    };
    let bad = cmd
        .get_arguments()
        .find(|a| refused(a) && given(a.get_id().as_str()));
    if let Some(a) = bad {
        let flag = format!("--{}", a.get_long().unwrap_or(a.get_id().as_str()));
        let why = if APPLY_ONLY.contains(&a.get_id().as_str()) {
            format!("{flag} is only for applying the rules; `{name}` does not take it")
        } else {
            format!("`{name}` takes no flags; {flag} has no effect on it")
        };
        return Err(cmd.error(ErrorKind::ArgumentConflict, why));
    }
    Ok(())
}

/// The closing sections of `--help` (not `-h`): env-only knobs and exit codes.
fn after_long_help() -> String {
    let mut s = String::from("Environment variables without a flag:\n");
    for (name, default, meaning) in env_only::DOCS {
        s.push_str(&format!(
            "  {name}\n          {meaning} [default: {default}]\n"
        ));
    }
    s.push_str("\nExit codes:\n");
    for (code, meaning) in EXIT_CODES {
        s.push_str(&format!("  {code:<5} {meaning}\n"));
    }
    s
}

/// Flag name and env var of every clap argument, for messages (`--envoy-port / ENVOY_PORT`).
pub fn describe(id: &str) -> (String, Option<String>) {
    let cmd = Cli::command();
    match cmd.get_arguments().find(|a| a.get_id() == id) {
        Some(a) => (
            format!("--{}", a.get_long().unwrap_or(id)),
            a.get_env().map(|e| e.to_string_lossy().into_owned()),
        ),
        None => (id.to_string(), None),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::ffi::OsString;

    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

    use super::*;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bool_flags_take_optional_value() {
        let a = Args::parse_from(["x", "--dry-run", "--reconcile=false"]).unwrap();
        assert_eq!(a.cli.dry_run, "true");
        assert_eq!(a.cli.reconcile, "false");
        assert_eq!(a.origin("dry_run"), Origin::Flag);
        assert_eq!(a.origin("envoy_port"), Origin::Default);
    }

    /// `argv` with the program name first.
    fn argv<S: AsRef<std::ffi::OsStr>>(words: &[S]) -> Vec<OsString> {
        std::iter::once("x".as_ref())
            .chain(words.iter().map(AsRef::as_ref))
            .map(Into::into)
            .collect()
    }

    /// The fast parser with the process's environment.
    fn fast(argv: &[OsString]) -> Option<Args> {
        Args::parse_fast(argv, &|name| std::env::var_os(name))
    }

    /// The fast parse and the full definition's parse agree: same `Cli`, same origin for
    /// every argument of clap's definition.
    fn assert_same(fast: &Args, full: &Args, what: &str) {
        assert_eq!(
            format!("{:?}", fast.cli),
            format!("{:?}", full.cli),
            "{what}"
        );
        assert!(matches!(fast.origins, Origins::Fast(_)), "{what}");
        assert!(matches!(full.origins, Origins::Clap(_)), "{what}");
        for a in Cli::command().get_arguments() {
            let id = a.get_id().as_str();
            assert_eq!(fast.origin(id), full.origin(id), "{what}: {id}");
        }
    }

    /// The table of the fast parser is clap's definition: every argument of `Cli` (but
    /// clap's own --help and --version) is a row, in field order, with the same short,
    /// long, env var, default and shape, and nothing clap would read differently (aliases,
    /// hyphen values, delimiters, positionals).
    #[test]
    fn fast_parse_table_is_the_clap_definition() {
        let mut cmd = Cli::command();
        cmd.build();
        let args: Vec<&clap::Arg> = cmd
            .get_arguments()
            .filter(|a| !matches!(a.get_action(), ArgAction::Help | ArgAction::Version))
            .collect();
        assert_eq!(
            args.iter().map(|a| a.get_id().as_str()).collect::<Vec<_>>(),
            FLAGS.iter().map(|f| f.id).collect::<Vec<_>>()
        );
        let strs = |v: &[clap::builder::OsStr]| -> Vec<String> {
            v.iter().map(|s| s.to_str().unwrap().to_string()).collect()
        };
        for (a, f) in args.iter().zip(&FLAGS) {
            let id = f.id;
            assert_eq!(a.get_short(), f.short, "{id}");
            assert_eq!(a.get_long(), Some(f.long), "{id}");
            assert_eq!(a.get_env().map(|e| e.to_str().unwrap()), f.env, "{id}");
            assert_eq!(a.get_all_aliases(), None, "{id}");
            assert_eq!(a.get_all_short_aliases(), None, "{id}");
            assert!(!a.is_positional(), "{id}");
            assert!(!a.is_required_set(), "{id}");
            assert!(!a.is_allow_hyphen_values_set(), "{id}");
            assert!(!a.is_allow_negative_numbers_set(), "{id}");
            assert!(!a.is_last_set(), "{id}");
            assert_eq!(a.get_value_delimiter(), None, "{id}");
            let num_args = a.get_num_args().expect("built");
            let defaults = strs(a.get_default_values());
            // The value of a bare `--long` (clap has no getter for default_missing_value).
            let bare = clap::Command::new("x")
                .arg((*a).clone().env(None))
                .try_get_matches_from(["x", &format!("--{}", f.long)])
                .map(|m| {
                    if f.kind == Kind::Count {
                        m.get_count(id).to_string()
                    } else {
                        m.get_one::<String>(id).cloned().unwrap_or_default()
                    }
                })
                .ok();
            let action = format!("{:?}", a.get_action());
            let expected = match f.kind {
                Kind::Value => ("Set", 1.into(), false, None),
                Kind::Append => ("Append", 1.into(), false, None),
                Kind::OptBool => ("Set", (0..=1).into(), true, Some("true")),
                Kind::Count => ("Count", 0.into(), false, Some("1")),
            };
            assert_eq!(
                (
                    action.as_str(),
                    num_args,
                    a.is_require_equals_set(),
                    bare.as_deref()
                ),
                expected,
                "{id}"
            );
            if f.kind == Kind::Count {
                assert_eq!(defaults, ["0"], "{id}");
                assert_eq!((f.env, f.default), (None, None), "{id}");
            } else {
                assert_eq!(defaults, Vec::from_iter(f.default), "{id}");
                assert_eq!(
                    a.get_value_parser().type_id(),
                    clap::builder::ValueParser::string().type_id(),
                    "{id}"
                );
            }
        }
    }

    /// clap's behaviour the fast parser mirrors (or declines), found by experiment.
    #[test]
    fn clap_behaviour_the_fast_parser_follows() {
        let clap = |words: &[&str]| Args::parse_clap(argv(words));
        let conflict = |words: &[&str]| {
            let kind = clap(words).map(|_| ()).unwrap_err().kind();
            assert_eq!(kind, ErrorKind::ArgumentConflict, "{words:?}");
        };
        // A value option or an optional-value bool given twice is an error (declined)...
        conflict(&["-p", "1", "-p", "2"]);
        conflict(&["-p", "1", "--envoy-port=2"]);
        conflict(&["--dry-run", "--dry-run"]);
        conflict(&["--dry-run", "--dry-run=false"]);
        conflict(&["istio-iptables", "-n", "--dry-run"]);
        // ... -v and --log_target add up.
        let a = clap(&["-v", "--verbose", "-v"]).unwrap();
        assert_eq!(a.cli.verbose, 3);
        let a = clap(&["--log_target", "a", "--log_target=", "--log_target", ""]).unwrap();
        assert_eq!(a.cli.log_target, ["a", "", ""]);
        assert_eq!(a.origin("log_target"), Origin::Flag);
        // Empty values are values; `--x=` too, also for the optional-value bools.
        let a = clap(&["-x", "", "--envoy-port=", "--dry-run="]).unwrap();
        assert_eq!(a.cli.istio_service_exclude_cidr, "");
        assert_eq!(a.cli.envoy_port, "");
        assert_eq!(a.cli.dry_run, "");
        assert_eq!(a.origin("dry_run"), Origin::Flag);
        // A value after `=` is taken whatever it starts with; a separate one starting with
        // `-` is a flag (an error here), but `-` alone is a value (declined anyway).
        assert_eq!(clap(&["--envoy-port=-5"]).unwrap().cli.envoy_port, "-5");
        assert_eq!(
            clap(&["-p", "-5"]).map(|_| ()).unwrap_err().kind(),
            ErrorKind::UnknownArgument
        );
        assert_eq!(clap(&["-p", "-"]).unwrap().cli.envoy_port, "-");
        // A command's name after a value option is its value.
        assert_eq!(clap(&["-p", "explain"]).unwrap().cli.envoy_port, "explain");
        // `--verbose` takes no value; `-vv` and `-n=false` are clap's (declined here).
        assert_eq!(
            clap(&["--verbose=1"]).map(|_| ()).unwrap_err().kind(),
            ErrorKind::TooManyValues
        );
        assert_eq!(clap(&["-vv"]).unwrap().cli.verbose, 2);
        assert_eq!(clap(&["-n=false"]).unwrap().cli.dry_run, "false");
        // A flag before `istio-iptables` is overridden by the same flag after it (declined).
        assert_eq!(
            clap(&["-p", "1", "istio-iptables", "-p", "2"])
                .unwrap()
                .cli
                .envoy_port,
            "2"
        );
    }

    /// The fast path parses as the full definition does: same values, same origins, for
    /// the injector's arguments and every flag of the table in each form it takes.
    #[test]
    fn fast_parse_is_the_full_parse() {
        // Istio's injector: the apply command's word, the seed command, its log level.
        let injector: Vec<&str> = std::iter::once(APPLY_COMMAND)
            .chain(crate::config::tests::SEED.iter().copied())
            .chain(["--log_output_level=default:info"])
            .collect();
        let mut lines: Vec<Vec<String>> = vec![
            injector.iter().map(|w| w.to_string()).collect(),
            injector[1..].iter().map(|w| w.to_string()).collect(),
            vec!["istio-iptables".into()],
            vec![],
        ];
        let seed = "-p 15001 -z 15006 -u 1337 -m REDIRECT -i * -x 10.0.0.0/8 -b * -d 15090,15020";
        for line in [
            format!("istio-iptables {seed} --log_output_level=default:info --log_as_json"),
            format!("{seed} --dry-run --reconcile=false -v -q 80 --cni-mode"),
            "--redirect-dns --capture-all-dns=true -k veth1 --istio-service-cidr=".to_string(),
            "-p explain -z istio-iptables -e help --probe-timeout=-1s".to_string(),
        ] {
            lines.push(line.split_whitespace().map(Into::into).collect());
        }
        for f in &FLAGS {
            let long = format!("--{}", f.long);
            let short = f.short.map(|c| format!("-{c}"));
            let mut forms: Vec<Vec<String>> = match f.kind {
                Kind::Value | Kind::Append => vec![
                    vec![long.clone(), "v1".into()],
                    vec![long.clone(), String::new()],
                    vec![format!("{long}=v2")],
                    vec![format!("{long}=")],
                    vec![format!("{long}=-3")],
                    vec![format!("{long}=a=b")],
                ],
                Kind::OptBool => vec![
                    vec![long.clone()],
                    vec![format!("{long}=false")],
                    vec![format!("{long}=true")],
                    vec![format!("{long}=")],
                ],
                Kind::Count => vec![vec![long.clone()], vec![long.clone(), long.clone()]],
            };
            if let Some(short) = short {
                forms.push(match f.kind {
                    Kind::Value | Kind::Append => vec![short, "v4".into()],
                    Kind::OptBool | Kind::Count => vec![short],
                });
            }
            if f.kind == Kind::Append {
                forms.push(vec![
                    long.clone(),
                    "a".into(),
                    format!("{long}=b"),
                    long,
                    "".into(),
                ]);
            }
            for form in forms {
                lines.push(form.clone());
                let mut named = vec!["istio-iptables".to_string()];
                named.extend(form.clone());
                let other = if f.short == Some('c') { "-k" } else { "-c" };
                named.extend([other.to_string(), "eth9".to_string()]);
                lines.push(named);
            }
        }
        for line in lines {
            let argv = argv(&line);
            let fast = fast(&argv).unwrap_or_else(|| panic!("the fast path takes {line:?}"));
            let full = Args::parse_clap(argv).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            assert_same(&fast, &full, &format!("{line:?}"));
        }
    }

    /// Other commands, help, version, errors and every form clap reads another way or
    /// refuses take the full definition.
    #[test]
    fn fast_parse_leaves_the_rest() {
        for line in [
            "explain --direction inbound --dst 10.0.0.1:80",
            "-p 15001 verify",
            "istio-iptables explain",
            "istio-iptables istio-iptables",
            "-p 1 istio-iptables",
            "help",
            "--help",
            "-h",
            "--version",
            "-V",
            "--no-such-flag",
            "--envoy_port 1",
            "--",
            "-- -p 1",
            "-",
            "-p",
            "-p --",
            "-p -5",
            "-p -",
            "-p15001",
            "-p=15001",
            "-n=true",
            "-vv",
            "-nv",
            "--verbose=1",
            "--dry-run false",
            "-p 1 -p 2",
            "-p 1 --envoy-port=1",
            "--dry-run --dry-run",
            "--reconcile=false --reconcile",
            "stray",
        ] {
            let words: Vec<&str> = line.split_whitespace().collect();
            assert!(fast(&argv(&words)).is_none(), "{line}");
        }
        assert!(fast(&argv(&[""])).is_none());
        assert!(fast(&argv(&["-x", "a", ""])).is_none());
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            let bad = OsString::from_vec(vec![0xff]);
            assert!(fast(&argv(&[OsString::from("-p"), bad.clone()])).is_none());
            assert!(fast(&argv(std::slice::from_ref(&bad))).is_none());
            // A non-UTF-8 env var is clap's error to report; one the command line
            // overrides is never read.
            let env = |name: &str| (name == "ENVOY_PORT").then(|| bad.clone());
            assert!(Args::parse_fast(&argv(&["-z", "1"]), &env).is_none());
            assert!(Args::parse_fast(&argv(&["-p", "1"]), &env).is_some());
            // ... but by the root command when the flag follows `istio-iptables`.
            assert!(Args::parse_fast(&argv(&["istio-iptables", "-p", "1"]), &env).is_none());
        }
    }

    /// Env vars fill what the command line leaves, empty ones too, with their origin.
    #[test]
    fn fast_parse_reads_env_vars() {
        let vars = HashMap::from([
            ("ENVOY_PORT", "15002"),
            ("DRY_RUN", ""),
            ("PROXY_UID", "7"),
            ("INBOUND_CAPTURE_PORT", "9"),
        ]);
        let env = |name: &str| vars.get(name).map(OsString::from);
        let a = Args::parse_fast(&argv(&["-z", "1"]), &env).unwrap();
        assert_eq!(a.cli.envoy_port, "15002");
        assert_eq!(a.origin("envoy_port"), Origin::Env);
        assert_eq!(a.cli.dry_run, "");
        assert_eq!(a.origin("dry_run"), Origin::Env);
        assert_eq!(a.cli.proxy_uid.as_deref(), Some("7"));
        assert_eq!(a.cli.inbound_capture_port, "1");
        assert_eq!(a.origin("inbound_capture_port"), Origin::Flag);
        assert_eq!(a.cli.proxy_gid, None);
        assert_eq!(a.origin("proxy_gid"), Origin::Default);
        assert_eq!(a.cli.reconcile, "true");
        assert_eq!(a.origin("reconcile"), Origin::Default);
    }

    /// Values for random command lines (empty, with `=`, command names...) ...
    const VALUES: &[&str] = &[
        "",
        "0",
        "15001",
        "*",
        "true",
        "false",
        "1",
        "a=b",
        "a b",
        "explain",
        "verify",
        "istio-iptables",
        "help",
        "x\u{e9}",
    ];
    /// ... and, less often, values starting with `-`.
    const HYPHEN_VALUES: &[&str] = &["-", "-5", "--", "-p", "--dry-run"];

    fn value() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            4 => proptest::sample::select(VALUES),
            1 => proptest::sample::select(HYPHEN_VALUES),
        ]
    }
    /// ... and words that are no flag of the table.
    const OTHERS: &[&str] = &[
        "explain",
        "verify",
        "man",
        "istio-iptables",
        "help",
        "stray",
        "",
        "-",
        "--",
        "-h",
        "--help",
        "-V",
        "--version",
        "--no-such",
        "-Z",
        "-vv",
        "-nv",
        "--envoy_port",
        "--dry-run=x=y",
        "-p15001",
        "-p=1",
    ];

    /// One flag of the table in one form, or another word.
    fn word_group() -> impl Strategy<Value = Vec<String>> {
        let flag = (0..FLAGS.len(), 0..6usize, value()).prop_map(|(i, form, value)| {
            let f = &FLAGS[i];
            let long = format!("--{}", f.long);
            let short = f.short.map(|c| format!("-{c}"));
            match (form, short) {
                (0, _) => vec![long, value.to_string()],
                (1, _) => vec![format!("{long}={value}")],
                (2, _) => vec![long],
                (3, Some(short)) => vec![short, value.to_string()],
                (4, Some(short)) => vec![short],
                (5, Some(short)) => vec![format!("{short}{value}")],
                _ => vec![long, value.to_string()],
            }
        });
        // A few flags often, so that repeats are frequent.
        let common = (
            proptest::sample::select(&["-p", "--dry-run", "-v", "--log_target", "-x"][..]),
            proptest::sample::select(&["15001", "", "true"][..]),
            any::<bool>(),
        )
            .prop_map(|(flag, value, with_value)| {
                let mut g = vec![flag.to_string()];
                if with_value {
                    g.push(value.to_string());
                }
                g
            });
        let other = proptest::sample::select(OTHERS).prop_map(|w| vec![w.to_string()]);
        prop_oneof![12 => flag, 6 => common, 1 => other]
    }

    /// A random command line: maybe `istio-iptables`, then word groups.
    fn command_line() -> impl Strategy<Value = Vec<String>> {
        (any::<bool>(), proptest::collection::vec(word_group(), 0..7)).prop_map(
            |(named, groups)| {
                let mut words: Vec<String> =
                    named.then(|| "istio-iptables".into()).into_iter().collect();
                words.extend(groups.into_iter().flatten());
                words
            },
        )
    }

    /// Runs `check` on `cases` random values, deterministically; returns how many it took.
    fn run<S: Strategy>(cases: u32, strategy: S, check: impl Fn(S::Value) -> bool) -> u32
    where
        S::Value: std::fmt::Debug,
    {
        let taken = std::cell::Cell::new(0);
        let config = Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        };
        let rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
        TestRunner::new_with_rng(config, rng)
            .run(&strategy, |v| {
                if check(v) {
                    taken.set(taken.get() + 1);
                }
                Ok(())
            })
            .unwrap();
        taken.get()
    }

    /// Whenever the fast parser takes a random command line, clap takes it too, with the
    /// same values and origins.
    #[test]
    fn fast_parse_of_random_command_lines_is_clap_parse() {
        let taken = run(3000, command_line(), |line| {
            let argv = argv(&line);
            let Some(fast) = fast(&argv) else {
                return false;
            };
            let full = Args::parse_clap(argv)
                .unwrap_or_else(|e| panic!("the fast path took {line:?}, clap did not: {e}"));
            assert_same(&fast, &full, &format!("{line:?}"));
            true
        });
        eprintln!("random command lines: {taken} of 3000 taken");
        assert!(taken > 600, "the fast path took only {taken} of 3000");
    }

    /// The test harness runs [`fast_parse_with_random_env_vars_is_clap_parse`] in a
    /// process of its own when this variable is set: there it sets env vars, which clap
    /// reads from the process, without racing other tests.
    const ENV_CHILD: &str = "ISTIO_IPTABLES_TEST_FAST_PARSE_ENV_CHILD";

    /// With random env vars of the table set (empty, starting with `-`, not UTF-8), the
    /// fast parser (reading them from a map) and clap (from the process) agree.
    #[test]
    fn fast_parse_with_random_env_vars_is_clap_parse() {
        if std::env::var_os(ENV_CHILD).is_some() {
            return env_child();
        }
        let name = "cli::tests::fast_parse_with_random_env_vars_is_clap_parse";
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--test-threads=1", "--nocapture"])
            .env(ENV_CHILD, "1")
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{stdout}\n{stderr}");
        assert!(stdout.contains("1 passed"), "{stdout}\n{stderr}");
        assert!(stderr.contains("env child done"), "{stdout}\n{stderr}");
    }

    #[allow(unsafe_code)] // removed by the cli rework
    fn env_child() {
        use std::os::unix::ffi::OsStringExt;
        let names: Vec<&str> = FLAGS.iter().filter_map(|f| f.env).collect();
        let clear = || {
            for name in &names {
                // SAFETY: this process runs this one test, on one thread.
                unsafe { std::env::remove_var(name) };
            }
        };
        let value = prop_oneof![
            9 => value().prop_map(OsString::from),
            1 => Just(OsString::from_vec(vec![b'a', 0xff])),
        ];
        let vars =
            proptest::collection::vec((proptest::sample::select(names.clone()), value), 0..5);
        // clap refuses a non-UTF-8 env var of a flag given after `istio-iptables`, not
        // before; the fast path declines both.
        clear();
        // SAFETY: as above.
        unsafe { std::env::set_var("ENVOY_PORT", OsString::from_vec(vec![0xff])) };
        assert!(Args::parse_clap(argv(&["-p", "1"])).is_ok());
        let err = Args::parse_clap(argv(&["istio-iptables", "-p", "1"])).map(|_| ());
        assert_eq!(err.unwrap_err().kind(), ErrorKind::InvalidUtf8);
        let taken = run(2000, (command_line(), vars), |(line, vars)| {
            clear();
            let map: HashMap<&str, OsString> = vars.iter().cloned().collect();
            for (name, value) in &map {
                // SAFETY: as above.
                unsafe { std::env::set_var(name, value) };
            }
            let argv = argv(&line);
            let Some(fast) = Args::parse_fast(&argv, &|name| map.get(name).cloned()) else {
                return false;
            };
            let full = Args::parse_clap(argv).unwrap_or_else(|e| {
                panic!("the fast path took {line:?} with {map:?}, clap did not: {e}")
            });
            assert_same(&fast, &full, &format!("{line:?} with {map:?}"));
            true
        });
        clear();
        assert!(taken > 300, "the fast path took only {taken} of 2000");
        eprintln!("env child done: {taken} of 2000 taken");
    }

    #[test]
    fn describe_names_flag_and_env() {
        assert_eq!(
            describe("envoy_port"),
            ("--envoy-port".to_string(), Some("ENVOY_PORT".to_string()))
        );
    }
}
