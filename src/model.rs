//! The data every step speaks: IP families, iptables tables, rules and where they go, the
//! chain names this tool owns and the numbers Istio fixes. The builders in `rules` make
//! these, `render` writes them, `apply` and `inspect` compare them with the kernel's.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The agent's DNS listener port.
pub const DNS_PROXY_PORT: u16 = 15053;
/// Mark the proxy puts on its outbound-to-inbound loopback traffic in TPROXY mode.
pub const OUTBOUND_MARK: u32 = 1338;

/// Our chains. Everything we own starts with `ISTIO_`.
pub mod chain {
    pub const INBOUND: &str = "ISTIO_INBOUND";
    pub const REDIRECT: &str = "ISTIO_REDIRECT";
    pub const IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
    pub const OUTPUT: &str = "ISTIO_OUTPUT";
    pub const OUTPUT_DNS: &str = "ISTIO_OUTPUT_DNS";
    pub const DIVERT: &str = "ISTIO_DIVERT";
    pub const TPROXY: &str = "ISTIO_TPROXY";
    pub const DROP: &str = "ISTIO_DROP";
    /// Prefix of every chain this tool owns.
    pub const PREFIX: &str = "ISTIO_";
}

/// IP family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The families in use: IPv4, and IPv6 too when `ipv6`.
    pub fn in_use(ipv6: bool) -> Vec<Family> {
        if ipv6 {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }

    /// The loopback address, `127.0.0.1` or `::1`.
    pub fn loopback(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Family::V6 => IpAddr::V6(Ipv6Addr::LOCALHOST),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// iptables table. The derived order is alphabetical, the order Istio writes tables in.
/// Serialized by its name (`nat`), as [`Table::name`] gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    Filter,
    Mangle,
    Nat,
    Raw,
}

impl Table {
    pub const ALL: [Table; 4] = [Table::Filter, Table::Mangle, Table::Nat, Table::Raw];

    pub fn name(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Mangle => "mangle",
            Table::Nat => "nat",
            Table::Raw => "raw",
        }
    }

    pub fn from_name(s: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == s)
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Append to the chain, or insert at a 1-based position (as `-I CHAIN N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    Append,
    Insert(u32),
}

impl Position {
    /// Puts `item` into `chain` as iptables would: at the end, or before the rule now at
    /// 1-based position N (past the end: at the end).
    pub fn place<T>(self, chain: &mut Vec<T>, item: T) {
        match self {
            Position::Append => chain.push(item),
            Position::Insert(n) => {
                let at = (n as usize).saturating_sub(1).min(chain.len());
                chain.insert(at, item);
            }
        }
    }
}

/// A number as iptables-save and `ip` print it: decimal, or hex with `0x`.
pub fn parse_number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// One word of a rule (`-p`, `tcp`, `10.0.0.0/8`). The words iptables uses over and over
/// (options, protocols, targets) are borrowed from the program; only the rest (addresses,
/// ports, names) is allocated: a config or a save of 30,000 rules holds one allocation per
/// such word rather than one per word.
pub type Token = std::borrow::Cow<'static, str>;

/// `word` as a [`Token`]: borrowed when it is one of the common words.
pub fn token(word: &str) -> Token {
    match COMMON_WORDS.binary_search(&word) {
        Ok(i) => Token::Borrowed(COMMON_WORDS[i]),
        Err(_) => Token::Owned(word.to_string()),
    }
}

/// Sorted (for the binary search): the words of Istio's rules and of iptables-save's
/// printing of them.
const COMMON_WORDS: &[&str] = &[
    "!",
    "--ctstate",
    "--dport",
    "--dports",
    "--gid-owner",
    "--mark",
    "--on-port",
    "--restore-mark",
    "--save-mark",
    "--set-xmark",
    "--sport",
    "--state",
    "--to-ports",
    "--tproxy-mark",
    "--uid-owner",
    "--zone",
    "-d",
    "-g",
    "-i",
    "-j",
    "-m",
    "-o",
    "-p",
    "-s",
    "0.0.0.0/0",
    "127.0.0.1/32",
    "127.0.0.6/32",
    "::/0",
    "::1/128",
    "::6/128",
    "ACCEPT",
    "CONNMARK",
    "CT",
    "DNAT",
    "DROP",
    "INVALID",
    "MARK",
    "REDIRECT",
    "RETURN",
    "TPROXY",
    "connmark",
    "conntrack",
    "lo",
    "mark",
    "multiport",
    "owner",
    "socket",
    "state",
    "tcp",
    "udp",
];

/// One rule: where it goes and its match/target tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub table: Table,
    pub chain: &'static str,
    pub position: Position,
    /// Tokens after the chain (and position), e.g. `["-p", "tcp", "-j", "RETURN"]`.
    pub args: Vec<Token>,
}

impl Rule {
    /// The target's name, as [`RuleSpec`] reads the args.
    pub fn target(&self) -> Option<String> {
        RuleSpec::parse(&self.args)
            .target_name()
            .map(str::to_string)
    }

    /// The rule's match and target text, without `-A CHAIN`.
    pub fn spec(&self) -> String {
        self.args.join(" ")
    }
}

impl fmt::Display for Rule {
    /// iptables-restore syntax: `-A CHAIN args` or `-I CHAIN N args`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Position::Append => write!(f, "-A {}", self.chain)?,
            Position::Insert(n) => write!(f, "-I {} {}", self.chain, n)?,
        }
        for a in &self.args {
            write!(f, " {a}")?;
        }
        Ok(())
    }
}

/// A rule's match and target tokens (after `-A CHAIN`), read once: the matches in order,
/// then the target. The save canonicaliser, reconcile's ownership tests and the packet
/// walker all read rules through this one parser.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSpec {
    pub matches: Vec<Match>,
    pub target: Option<Target>,
}

/// One match option as written: `[!] FLAG VALUES...`. `-m NAME` is a match too (flag `-m`).
/// A `!` with nothing after it is a match with an empty flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub negated: bool,
    /// The option as written (`-p`, `--dport`, `-m`, ...), or a stray word.
    pub flag: Token,
    /// The values that follow: exactly one for the base options (`-s -d -i -o -p`) and
    /// `-m`; for other options every word up to the next option or `!`.
    pub values: Vec<Token>,
}

impl Match {
    /// The first value, or "" when there is none.
    pub fn value(&self) -> &str {
        self.values.first().map_or("", |v| v)
    }
}

/// The target: `-j NAME` (or `-g NAME`) and every token after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `-g`/`--goto` rather than `-j`/`--jump`.
    pub goto: bool,
    /// None when the flag is the last token.
    pub name: Option<Token>,
    pub options: Vec<Token>,
}

impl RuleSpec {
    /// Reads `tokens` (as [`crate::backend::iptables::save::tokenize`] splits a rule).
    pub fn parse(tokens: &[Token]) -> RuleSpec {
        let mut spec = RuleSpec::default();
        let mut i = 0;
        while i < tokens.len() {
            let negated = tokens[i] == "!";
            if negated {
                i += 1;
            }
            let Some(flag) = tokens.get(i) else {
                spec.matches.push(Match {
                    negated,
                    flag: Token::Borrowed(""),
                    values: Vec::new(),
                });
                break;
            };
            if matches!(&**flag, "-j" | "--jump" | "-g" | "--goto") {
                spec.target = Some(Target {
                    goto: flag == "-g" || flag == "--goto",
                    name: tokens.get(i + 1).cloned(),
                    options: tokens.get(i + 2..).unwrap_or_default().to_vec(),
                });
                break;
            }
            let one_value = matches!(
                &**flag,
                "-s" | "--source"
                    | "--src"
                    | "-d"
                    | "--destination"
                    | "--dst"
                    | "-i"
                    | "--in-interface"
                    | "-o"
                    | "--out-interface"
                    | "-p"
                    | "--protocol"
                    | "-m"
                    | "--match"
            );
            let mut j = i + 1;
            if one_value {
                j = (i + 2).min(tokens.len());
            } else if flag.starts_with('-') {
                while j < tokens.len() && !tokens[j].starts_with('-') && tokens[j] != "!" {
                    j += 1;
                }
            }
            spec.matches.push(Match {
                negated,
                flag: flag.clone(),
                values: tokens[i + 1..j].to_vec(),
            });
            i = j;
        }
        spec
    }

    /// The target's name, when the rule has one.
    pub fn target_name(&self) -> Option<&str> {
        self.target.as_ref()?.name.as_deref()
    }
}

/// Foreign state that takes packets before our rules can (verify): where it is, the foreign
/// rule as the kernel shows it, and what it does to the capture. The iptables, nftables and
/// policy routing checks all report in these words.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    /// "IPv4 iptables-nft nat OUTPUT", "nft table ip foo chain out", "ip -4 rule".
    pub place: String,
    /// The foreign rule's text.
    pub rule: String,
    /// "TCP leaves OUTPUT before the jump to ISTIO_OUTPUT: outbound TCP is not captured".
    pub effect: String,
}

/// How `--uid-owner`/`--gid-owner` names become numbers (iptables-save prints numbers).
pub trait OwnerResolver {
    fn uid(&self, name: &str) -> Option<u32>;
    fn gid(&self, name: &str) -> Option<u32>;
}

/// Resolves nothing: names stay names.
pub struct NoResolver;

impl OwnerResolver for NoResolver {
    fn uid(&self, _: &str) -> Option<u32> {
        None
    }
    fn gid(&self, _: &str) -> Option<u32> {
        None
    }
}

/// What the config's host facts (`config::HostFacts::detect`) ask the machine (kept behind
/// a trait for tests).
pub trait Host {
    /// uid of the user `name`, if it exists.
    fn user_uid(&self, name: &str) -> Option<u32>;
    /// Whether the pod's address is IPv6 (Istio's rule); `None` when it has no usable address.
    fn detect_ipv6(&self, dual_stack: bool) -> Option<bool>;
    /// gid of the group `name`, if it exists.
    fn group_gid(&self, name: &str) -> Option<u32>;
    /// Whether this namespace has an IPv6 address of global scope (not loopback,
    /// link-local or multicast).
    fn has_global_ipv6(&self) -> bool;
    /// [`Host::detect_ipv6`] and [`Host::has_global_ipv6`] together (one read of the
    /// addresses where it can be).
    fn detect_ipv6_and_global(&self, dual_stack: bool) -> (Option<bool>, bool) {
        (self.detect_ipv6(dual_stack), self.has_global_ipv6())
    }
    /// Reads resolv.conf: at most [`RESOLV_CONF_MAX_BYTES`] + 1 bytes (so that a longer
    /// file shows), and only from a regular file (a FIFO or a device is an error).
    fn read_file(&self, path: &std::path::Path) -> std::io::Result<Vec<u8>>;
}

/// How much of resolv.conf is read, as resolvers do (musl reads lines up to a fixed buffer;
/// nobody's resolv.conf is anywhere near this).
pub const RESOLV_CONF_MAX_BYTES: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_words_are_sorted_and_borrowed() {
        assert!(COMMON_WORDS.windows(2).all(|w| w[0] < w[1]));
        assert!(matches!(token("RETURN"), Token::Borrowed("RETURN")));
        assert!(matches!(token("10.0.0.0/8"), Token::Owned(_)));
    }

    fn parse(s: &str) -> RuleSpec {
        RuleSpec::parse(&crate::backend::iptables::save::tokenize(s))
    }

    fn m(negated: bool, flag: &str, values: &[&str]) -> Match {
        Match {
            negated,
            flag: token(flag),
            values: values.iter().map(|v| token(v)).collect(),
        }
    }

    #[test]
    fn reads_matches_in_order_then_the_target() {
        let spec = parse(
            "! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 \
             -j TPROXY --on-port 15006 --tproxy-mark 0x539/0xffffffff",
        );
        assert_eq!(
            spec.matches,
            vec![
                m(true, "-d", &["127.0.0.1/32"]),
                m(false, "-p", &["tcp"]),
                m(false, "-m", &["tcp"]),
                m(true, "--dport", &["15008"]),
                m(false, "-m", &["owner"]),
                m(false, "--uid-owner", &["1337"]),
            ]
        );
        assert_eq!(
            spec.target,
            Some(Target {
                goto: false,
                name: Some("TPROXY".into()),
                options: ["--on-port", "15006", "--tproxy-mark", "0x539/0xffffffff"]
                    .map(token)
                    .to_vec(),
            })
        );
    }

    #[test]
    fn options_take_every_word_up_to_the_next_option() {
        let spec = parse("-p tcp --tcp-flags SYN,ACK SYN -g ISTIO_X");
        assert_eq!(
            spec.matches[1],
            m(false, "--tcp-flags", &["SYN,ACK", "SYN"])
        );
        assert!(spec.target.as_ref().is_some_and(|t| t.goto));
        assert_eq!(spec.target_name(), Some("ISTIO_X"));
    }

    #[test]
    fn a_dangling_bang_and_a_bare_jump_are_kept_for_the_reader_to_refuse() {
        assert_eq!(parse("-p tcp !").matches[1], m(true, "", &[]));
        let bare = parse("-j");
        assert_eq!(bare.target_name(), None);
        assert!(bare.target.is_some());
    }
}
