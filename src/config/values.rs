//! Flag and env values, one type and one parser each: ports and port ranges, owners,
//! interfaces, CIDR lists, Go's bools and durations. Every parser names the flag (or the env
//! var) its value came from in its error.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::cli::{Args, Origin, describe};

/// Values echoed in messages are cut to this many characters.
pub const MAX_ECHO_CHARS: usize = 80;

/// A bad input: which flag or env var, the value, and why.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// e.g. `--envoy-port`, `--envoy-port (from env ENVOY_PORT)`, `env ENVOY_USER`.
    pub source_name: String,
    pub value: String,
    /// Why; when `item` is set, what is wrong with it ("is not a port number (1-65535)").
    pub reason: String,
    /// The item of a list that is at fault, shown before the reason. A list read from a
    /// file never shows it: `listfile` puts the line it is on in the reason instead.
    pub item: Option<String>,
}

impl std::error::Error for ConfigError {}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid value {} for {}: ",
            quoted(&self.value),
            self.source_name
        )?;
        if let Some(item) = &self.item {
            write!(f, "{} ", quoted(item))?;
        }
        f.write_str(&self.reason)
    }
}

/// `s` quoted (Rust debug syntax, so control characters show), cut to [`MAX_ECHO_CHARS`]
/// characters: a 100 KB value must not flood the terminal.
pub fn quoted(s: &str) -> String {
    let n = s.chars().count();
    if n <= MAX_ECHO_CHARS {
        return format!("{s:?}");
    }
    let head: String = s.chars().take(MAX_ECHO_CHARS).collect();
    format!("{head:?}... ({n} characters in all)")
}

/// `s` as is when short, else cut like [`quoted`] (for paths printed without quotes).
pub fn shortened(s: &str) -> String {
    let n = s.chars().count();
    if n <= MAX_ECHO_CHARS {
        return s.to_string();
    }
    let head: String = s.chars().take(MAX_ECHO_CHARS).collect();
    format!("{head}... ({n} characters in all)")
}

/// A TCP/UDP port, 1-65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port(pub(super) u16);

impl Port {
    pub fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A port or an iptables port range `a:b` (a <= b).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortSpec {
    One(Port),
    Range(Port, Port),
}

impl PortSpec {
    /// The first and last port.
    fn bounds(self) -> (u16, u16) {
        match self {
            PortSpec::One(p) => (p.0, p.0),
            PortSpec::Range(a, b) => (a.0, b.0),
        }
    }

    /// Whether the two share a port.
    pub fn overlaps(&self, other: &PortSpec) -> bool {
        let ((a1, b1), (a2, b2)) = (self.bounds(), other.bounds());
        a1 <= b2 && a2 <= b1
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSpec::One(p) => write!(f, "{p}"),
            PortSpec::Range(a, b) => write!(f, "{a}:{b}"),
        }
    }
}

/// A uid or gid: a number, or a user/group name that iptables resolves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Id(u32),
    Name(String),
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Id(n) => write!(f, "{n}"),
            Owner::Name(s) => f.write_str(s),
        }
    }
}

/// A network interface name as Linux accepts it (a trailing `+` wildcard allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface(pub(super) String);

impl fmt::Display for Iface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How inbound traffic reaches the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Redirect,
    Tproxy,
}

/// Which inbound ports are captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundPorts {
    None,
    All,
    Only(Vec<PortSpec>),
}

/// IPv4 and IPv6 CIDRs of one list, in the order given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cidrs {
    pub v4: Vec<Ipv4Net>,
    pub v6: Vec<Ipv6Net>,
}

impl Cidrs {
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// The CIDRs as typed that have host bits set (`10.0.0.1/8`).
    pub(super) fn with_host_bits(&self) -> Vec<String> {
        let v4 = self
            .v4
            .iter()
            .filter(|n| **n != n.trunc())
            .map(|n| n.to_string());
        let v6 = self
            .v6
            .iter()
            .filter(|n| **n != n.trunc())
            .map(|n| n.to_string());
        v4.chain(v6).collect()
    }

    /// The kernel's form: host bits cleared (`10.0.0.1/8` is stored as `10.0.0.0/8`).
    pub(super) fn truncated(&self) -> Cidrs {
        Cidrs {
            v4: self.v4.iter().map(Ipv4Net::trunc).collect(),
            v6: self.v6.iter().map(Ipv6Net::trunc).collect(),
        }
    }
}

/// Which outbound destinations are captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundCidrs {
    All,
    Only(Cidrs),
}

/// Owner groups whose outbound traffic is captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerGroups {
    /// Every group but these (Istio: include `*`, exclude list).
    AllExcept(Vec<Owner>),
    /// Only these groups.
    Only(Vec<Owner>),
}

/// iptables flavour forced by `--force-iptables-binary`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Legacy,
    Nft,
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flavor::Legacy => "legacy",
            Flavor::Nft => "nft",
        })
    }
}

/// Names a value's source for error messages.
/// Where a value came from; the flag/env name is only worked out for an error message.
pub(super) enum Src<'a> {
    Arg(&'a Args, &'a str),
    Env(&'a str),
}

impl<'a> Src<'a> {
    pub(super) fn arg(args: &'a Args, id: &'a str) -> Self {
        Src::Arg(args, id)
    }
    pub(super) fn env(var: &'a str) -> Self {
        Src::Env(var)
    }
    pub(super) fn name(&self) -> String {
        self.source().name()
    }
    fn source(&self) -> GivenSource {
        match self {
            Src::Arg(args, id) => GivenSource::Arg {
                id: id.to_string(),
                from_env: args.origin(id) == Origin::Env,
            },
            Src::Env(var) => GivenSource::Env(var.to_string()),
        }
    }
    pub(super) fn err(&self, value: &str, reason: impl Into<String>) -> ConfigError {
        self.given(value).err(reason)
    }
    /// An error about one `item` of the list `value`; `reason` says what is wrong with it
    /// ("is not ...").
    pub(super) fn item_err(
        &self,
        value: &str,
        item: &str,
        reason: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            item: Some(item.to_string()),
            ..self.err(value, reason)
        }
    }
    /// The env var the value came from, if it came from one.
    pub(super) fn env_var(&self) -> Option<String> {
        match self {
            Src::Arg(args, id) if args.origin(id) == Origin::Env => describe(id).1,
            Src::Arg(..) => None,
            Src::Env(var) => Some(var.to_string()),
        }
    }
    pub(super) fn given(&self, value: &str) -> Given {
        Given {
            source: self.source(),
            value: value.to_string(),
        }
    }
}

/// Where a [`Given`] value came from. The flag's name is looked up in the clap definition
/// only for a message: building that definition costs as much as parsing the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GivenSource {
    /// The clap argument `id`, set on the command line or (`from_env`) by its env var.
    Arg { id: String, from_env: bool },
    /// An env-only knob.
    Env(String),
}

impl Default for GivenSource {
    fn default() -> Self {
        GivenSource::Env(String::new())
    }
}

impl GivenSource {
    /// e.g. `--envoy-port`, `--envoy-port (from env ENVOY_PORT)`, `env ENVOY_USER`.
    pub fn name(&self) -> String {
        match self {
            GivenSource::Arg { id, from_env } => {
                let (flag, env) = describe(id);
                match (from_env, env) {
                    (true, Some(env)) => format!("{flag} (from env {env})"),
                    _ => flag,
                }
            }
            GivenSource::Env(var) => format!("env {var}"),
        }
    }
}

/// A value as given and where it came from: kept for the errors found after
/// `Config::build`, once the host is asked (`HostFacts::detect`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Given {
    pub source: GivenSource,
    pub value: String,
}

impl Given {
    /// How errors name the value's source.
    pub fn source_name(&self) -> String {
        self.source.name()
    }

    pub fn err(&self, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            source_name: self.source_name(),
            value: self.value.clone(),
            reason: reason.into(),
            item: None,
        }
    }

    /// An error about one `item` of the value (see [`ConfigError::item`]); an item of a
    /// list read from a file is named by its line, never shown.
    pub fn item_err(&self, item: &str, reason: impl Into<String>) -> ConfigError {
        let mut e = ConfigError {
            item: Some(item.to_string()),
            ..self.err(reason)
        };
        super::listfile::hide_content(&mut e);
        e
    }
}

/// How errors name the flag `id` (or its env var, when the value came from there), for
/// values read outside this module (`@PATH` list files).
pub fn source_name(args: &Args, id: &str) -> String {
    Src::arg(args, id).name()
}

/// Splits a comma list, trimming items and dropping empty ones.
pub fn split_list(s: &str) -> Vec<&str> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .collect()
}

/// Go's spellings of a boolean (strconv.ParseBool), the one wording of every message.
pub const BOOL_SPELLINGS: &str = "1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False";

/// Go's strconv.ParseBool.
pub fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

pub(super) fn parse_u16_strict(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A port number, 1-65535.
pub(super) fn parse_port(s: &str) -> Option<Port> {
    parse_u16_strict(s).filter(|n| *n > 0).map(Port)
}

const NOT_A_PORT: &str = "is not a port number (1-65535)";

pub(super) fn single_port(src: &Src, s: &str) -> Result<Port, ConfigError> {
    parse_port(s.trim()).ok_or_else(|| src.item_err(s, s.trim(), NOT_A_PORT))
}

pub(super) fn port_spec(src: &Src, whole: &str, item: &str) -> Result<PortSpec, ConfigError> {
    let Some((a, b)) = item.split_once(':') else {
        return match parse_port(item) {
            Some(p) => Ok(PortSpec::One(p)),
            // `8000-8080` is how nft and most tools write a range; iptables wants a colon.
            None if item
                .split_once('-')
                .is_some_and(|(a, b)| parse_port(a).is_some() && parse_port(b).is_some()) =>
            {
                Err(src.item_err(
                    whole,
                    item,
                    "is not a port number (1-65535); a port range is written with a colon, \
                     FIRST:LAST (as 8000:8080)",
                ))
            }
            None => Err(src.item_err(whole, item, NOT_A_PORT)),
        };
    };
    let (Some(a), Some(b)) = (parse_port(a), parse_port(b)) else {
        return Err(src.item_err(
            whole,
            item,
            "is not a port range: FIRST:LAST, each a port number (1-65535)",
        ));
    };
    if a.0 > b.0 {
        return Err(src.item_err(
            whole,
            item,
            "is a reversed port range (its first port is above its last)",
        ));
    }
    Ok(PortSpec::Range(a, b))
}

pub(super) fn port_list(src: &Src, s: &str) -> Result<Vec<PortSpec>, ConfigError> {
    split_list(s)
        .into_iter()
        .map(|item| {
            if item == "*" {
                return Err(src.err(s, "`*` is not allowed here"));
            }
            port_spec(src, s, item)
        })
        .collect()
}

pub(super) fn u32_value(src: &Src, s: &str, what: &str) -> Result<u32, ConfigError> {
    let t = s.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(src.err(s, format!("expected {what}")));
    }
    t.parse()
        .map_err(|_| src.err(s, format!("expected {what} (at most {})", u32::MAX)))
}

/// A user or group name as shadow-utils accepts it (no shell or iptables metacharacters).
pub(super) fn valid_account_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().enumerate().all(|(i, &c)| {
            c.is_ascii_alphanumeric()
                || c == b'_'
                || c == b'.'
                || c == b'-'
                || (c == b'$' && i == b.len() - 1)
        })
}

pub(super) fn owner(src: &Src, whole: &str, item: &str) -> Result<Owner, ConfigError> {
    if item.bytes().all(|b| b.is_ascii_digit()) {
        return match item.parse::<u32>() {
            // (uid_t)-1 means "no id" to the kernel; iptables' owner match refuses it.
            Ok(u32::MAX) => Err(src.item_err(
                whole,
                item,
                format!(
                    "is a reserved id (it means \"no id\"); the highest id is {}",
                    u32::MAX - 1
                ),
            )),
            Ok(n) => Ok(Owner::Id(n)),
            Err(_) => Err(src.item_err(
                whole,
                item,
                format!("is an id out of range (at most {})", u32::MAX - 1),
            )),
        };
    }
    if valid_account_name(item) {
        Ok(Owner::Name(item.to_string()))
    } else {
        Err(src.item_err(
            whole,
            item,
            "is neither a numeric id nor a valid user/group name",
        ))
    }
}

pub(super) fn owner_list(src: &Src, s: &str) -> Result<Vec<Owner>, ConfigError> {
    let items = split_list(s);
    if items.is_empty() {
        return Err(src.err(s, "expected at least one id or name"));
    }
    items.into_iter().map(|i| owner(src, s, i)).collect()
}

/// Linux's dev_valid_name, plus no quotes/backslashes/leading `-` or `!` that iptables would
/// read as syntax. A trailing `+` (iptables wildcard) is allowed.
pub(super) fn iface(src: &Src, whole: &str, item: &str) -> Result<Iface, ConfigError> {
    let bad = |why: &str| src.item_err(whole, item, format!("is not an interface name: {why}"));
    if item.is_empty() || item.len() > 15 {
        return Err(bad("it must be 1-15 bytes long"));
    }
    if item == "." || item == ".." {
        return Err(bad("\".\" and \"..\" are not allowed"));
    }
    if item.starts_with('-') || item.starts_with('!') {
        return Err(bad("it must not start with '-' or '!'"));
    }
    if let Some(c) = item.chars().find(|&c| {
        c.is_whitespace()
            || c.is_control()
            || matches!(c, '/' | ':' | '"' | '\'' | '\\' | '#' | ',')
            || !c.is_ascii()
    }) {
        return Err(bad(&format!("it contains the character {c:?}")));
    }
    Ok(Iface(item.to_string()))
}

/// Trimmed like every list (`eth0, eth1`, as an annotation is often written); a blank inside
/// a name is still refused.
pub(super) fn iface_list(src: &Src, s: &str) -> Result<Vec<Iface>, ConfigError> {
    split_list(s)
        .into_iter()
        .map(|i| iface(src, s, i))
        .collect()
}

pub(super) fn cidr(src: &Src, whole: &str, item: &str) -> Result<IpNet, ConfigError> {
    if let Ok(n) = item.parse::<IpNet>() {
        return Ok(n);
    }
    if let Ok(a) = item.parse::<IpAddr>() {
        return Ok(IpNet::from(a));
    }
    Err(src.item_err(whole, item, "is not a valid CIDR or IP address"))
}

pub(super) fn cidr_list(src: &Src, s: &str) -> Result<Cidrs, ConfigError> {
    let mut out = Cidrs::default();
    for item in split_list(s) {
        if item == "*" {
            return Err(src.err(s, "`*` is not allowed here"));
        }
        match cidr(src, s, item)? {
            IpNet::V4(n) => out.v4.push(n),
            IpNet::V6(n) => out.v6.push(n),
        }
    }
    Ok(out)
}

/// Go's time.ParseDuration (non-negative values only).
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_len);
        if num.is_empty() || num == "." || num.matches('.').count() > 1 {
            return None;
        }
        let value: f64 = num.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * scale;
        rest = tail;
    }
    if !total.is_finite() || total > 1e9 {
        return None;
    }
    Some(Duration::from_secs_f64(total))
}

/// A boolean flag given on the command line (or a run-mode switch from any source): it must
/// parse.
pub(super) fn go_bool(args: &Args, id: &str, raw: &str) -> Result<bool, ConfigError> {
    parse_go_bool(raw.trim()).ok_or_else(|| {
        Src::arg(args, id).err(raw, format!("expected a boolean ({BOOL_SPELLINGS})"))
    })
}

/// A value Istio's pkg/flag parses as a type (a boolean, a duration, a port), read as Istio
/// reads it. From the command line it must parse. From env vars, in Istio's order: `alias`
/// first (Istio's `AdditionalEnv` sets the flag after `BindEnv` did), then the flag's own
/// variable; one that does not parse is skipped with a warning, as pkg/flag drops a value
/// its `Set` refuses; without a value that parses, the default. An empty env var never
/// gets here: it is unset (`cli::env_is_set`).
pub(super) struct Lenient<'a, T> {
    pub args: &'a Args,
    pub id: &'a str,
    /// The flag's value: the command line's, its env var's or the default.
    pub raw: &'a str,
    /// The other env var Istio reads for the flag.
    pub alias: Option<&'a str>,
    pub parse: fn(&str) -> Option<T>,
    /// What a value must be ("a boolean (1, t, ...)").
    pub expected: &'a str,
}

impl<T> Lenient<'_, T> {
    pub(super) fn read(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
        warnings: &mut Vec<String>,
    ) -> Result<T, ConfigError> {
        let src = Src::arg(self.args, self.id);
        let parse = |v: &str| (self.parse)(v.trim());
        let origin = self.args.origin(self.id);
        if origin == Origin::Flag {
            return parse(self.raw)
                .ok_or_else(|| src.err(self.raw, format!("expected {}", self.expected)));
        }
        let alias = self.alias.and_then(|a| env(a).map(|v| (a.to_string(), v)));
        let own = (origin == Origin::Env)
            .then(|| (src.env_var().unwrap_or_default(), self.raw.to_string()));
        let mut ignored = Vec::new();
        let mut used = None;
        for (var, v) in alias.into_iter().chain(own) {
            match parse(&v) {
                Some(t) => {
                    used = Some((t, v.trim().to_string(), format!("from {var}")));
                    break;
                }
                None => ignored.push(format!("{var}={}", quoted(&v))),
            }
        }
        let (value, text, whence) = match used {
            Some(u) => u,
            None => {
                let default = if origin == Origin::Default {
                    self.raw.to_string()
                } else {
                    crate::cli::default_value(self.id).unwrap_or_default()
                };
                let t = parse(&default).ok_or_else(|| {
                    src.err(&default, "the built-in default does not parse (a bug)")
                })?;
                (t, default, "its default".to_string())
            }
        };
        if !ignored.is_empty() {
            warnings.push(format!(
                "ignoring env {}: expected {}; {} is {text} ({whence}), as Istio reads it",
                ignored.join(", "),
                self.expected,
                describe(self.id).0,
            ));
        }
        Ok(value)
    }
}

/// An env-only boolean of ours (ENABLE_INBOUND_IPV6), read as Istio reads its boolean env
/// vars: unset, or not a boolean (with a warning), it is `None`.
pub(super) fn env_bool(
    var: &str,
    env: &dyn Fn(&str) -> Option<String>,
    warnings: &mut Vec<String>,
) -> Option<bool> {
    let v = env(var)?;
    let b = parse_go_bool(v.trim());
    if b.is_none() {
        warnings.push(format!(
            "ignoring env {var}={}: expected a boolean ({BOOL_SPELLINGS}); it counts as \
             unset, as Istio reads a boolean env var it cannot parse",
            quoted(&v)
        ));
    }
    b
}
