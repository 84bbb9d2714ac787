//! The data every step speaks: IP families, iptables tables, rules and where they go, the
//! chain names this tool owns and the numbers Istio fixes. The builders in `rules` make
//! these, `render` writes them, `apply` and `inspect` compare them with the kernel's.

use std::fmt;

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

/// One rule: where it goes and its match/target tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub table: Table,
    pub chain: &'static str,
    pub position: Position,
    /// Tokens after the chain (and position), e.g. `["-p", "tcp", "-j", "RETURN"]`.
    pub args: Vec<String>,
}

impl Rule {
    /// The target: the token after the last `-j`.
    pub fn target(&self) -> Option<&str> {
        let i = self.args.iter().rposition(|a| a == "-j")?;
        self.args.get(i + 1).map(String::as_str)
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
