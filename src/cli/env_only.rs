//! Environment variables read directly (no flag), documented once here.

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
/// Ours: seconds to wait for the xtables lock with the legacy backend, and for another run
/// in the same network namespace (its lock, `system::nslock`) (default 30).
pub const LOCK_WAIT: &str = "IPTABLES_LOCK_WAIT_SECONDS";
/// Ours: seconds a program we run (iptables-restore, iptables-save, nft, ip) may take before
/// it is killed and the run rolls back (default: 30 more than `LOCK_WAIT`, so 60, since a
/// legacy restore may wait that long for the xtables lock first).
pub const PROGRAM_TIMEOUT: &str = "IPTABLES_PROGRAM_TIMEOUT_SECONDS";

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
        "seconds to wait for the xtables lock (legacy backend) and for another run in this network namespace",
    ),
    (
        PROGRAM_TIMEOUT,
        "IPTABLES_LOCK_WAIT_SECONDS + 30",
        "seconds a program we run (iptables-restore, iptables-save, nft, ip) may take before it is killed and the run rolls back; at least 1",
    ),
];
