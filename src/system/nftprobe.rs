//! The structure of nf_tables, read over netlink: per family the tables and their flags, the
//! chains (base chains with their hook, type and priority) and how many rules each base
//! chain holds. Not the rules themselves: what they say is read from `iptables-nft-save` or
//! `nft list`.
//!
//! It tells a fresh namespace (no tables: nothing to save) without running a process, and
//! shows what iptables-nft-save does not: a dormant table, a base chain another tool made.
//! Any failure (no socket, a short or malformed reply, an error from the kernel) gives
//! `None`, and the caller does without it.
//!
//! Two writes, through [`NfWrite`]: deleting an iptables-nft table whole and changing a
//! table's flags (waking a dormant table of ours), so that neither needs the `nft` program.
//!
//! Hand-written: nf_tables has no well-kept Rust crate (the crates there are bindings to
//! libnftnl, a C library); these reads and writes need five message types and a handful of
//! attributes.

use nix::errno::Errno;
use nix::sys::socket::SockProtocol;

use crate::model::Family;
use crate::system::netlink::{Socket, attributes, push_attribute};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;

const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NLM_F_ACK: u16 = 0x4;
const NFTA_GEN_ID: u16 = 1;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_TABLE_OWNER: u16 = 7;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;

/// `NFT_TABLE_F_DORMANT`: the table's base chains are not attached to their hooks.
pub const TABLE_F_DORMANT: u32 = 1;
/// `NFT_TABLE_F_OWNER` (Linux 5.12): the table belongs to the netlink socket that created it;
/// no other socket may change or delete it, `flush ruleset` passes it by, and the kernel
/// deletes it when that socket is closed.
pub const TABLE_F_OWNER: u32 = 2;

/// An nf_tables family (the `nfgenmsg` family byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NfFamily {
    /// `ip`: iptables-nft's IPv4 tables.
    Ip,
    /// `ip6`: iptables-nft's IPv6 tables.
    Ip6,
    /// `inet`: native nftables' tables (both address families).
    Inet,
}

impl NfFamily {
    /// The family iptables-nft keeps `family`'s tables in.
    pub fn of(family: Family) -> NfFamily {
        match family {
            Family::V4 => NfFamily::Ip,
            Family::V6 => NfFamily::Ip6,
        }
    }

    /// Its name in nft's commands: `ip`, `ip6`, `inet`.
    pub fn name(self) -> &'static str {
        match self {
            NfFamily::Inet => "inet",
            NfFamily::Ip => "ip",
            NfFamily::Ip6 => "ip6",
        }
    }

    fn nfproto(self) -> u8 {
        match self {
            NfFamily::Inet => 1,
            NfFamily::Ip => 2,
            NfFamily::Ip6 => 10,
        }
    }
}

/// The tables of one family, in the kernel's order (creation order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NfTables {
    pub tables: Vec<NfTable>,
}

/// One table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NfTable {
    pub name: String,
    /// `NFTA_TABLE_FLAGS` ([`TABLE_F_DORMANT`], ...).
    pub flags: u32,
    /// `NFTA_TABLE_OWNER`: the netlink port of the socket owning the table
    /// ([`TABLE_F_OWNER`]).
    pub owner: Option<u32>,
    /// Its chains, in the kernel's order.
    pub chains: Vec<NfChain>,
}

/// One chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NfChain {
    pub name: String,
    /// `None`: a regular chain (reached only by jumps).
    pub base: Option<BaseChain>,
    /// How many rules it holds: counted for base chains only (`None` for regular chains).
    pub rules: Option<usize>,
}

/// What makes a chain a base chain: where it is attached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BaseChain {
    /// The hook number (`NF_INET_PRE_ROUTING` = 0, `LOCAL_IN`, `FORWARD`, `LOCAL_OUT`,
    /// `POST_ROUTING` = 4).
    pub hook: u32,
    /// `filter`, `nat` or `route`.
    pub kind: String,
    pub priority: i32,
    /// The policy verdict (`NF_DROP` = 0, `NF_ACCEPT` = 1), when the kernel gave one.
    pub policy: Option<u32>,
}

impl NfTables {
    /// The table called `name`.
    pub fn table(&self, name: &str) -> Option<&NfTable> {
        self.tables.iter().find(|t| t.name == name)
    }

    /// The names of the tables.
    pub fn names(&self) -> Vec<String> {
        self.tables.iter().map(|t| t.name.clone()).collect()
    }
}

impl NfTable {
    pub fn is_dormant(&self) -> bool {
        self.flags & TABLE_F_DORMANT != 0
    }

    /// The chain called `name`.
    pub fn chain(&self, name: &str) -> Option<&NfChain> {
        self.chains.iter().find(|c| c.name == name)
    }
}

/// The tables of `family` in the current network namespace, names and flags only (no
/// chains): one dump. `None` as for [`read`].
pub fn tables(family: NfFamily) -> Option<NfTables> {
    let mut sock = Socket::open(SockProtocol::NetlinkNetFilter)?;
    read_tables(&mut sock, family)
}

/// nf_tables' generation: a number the kernel increments with every committed change, in
/// any table of any family. Two reads that see the same generation saw the same ruleset.
/// `None` as for [`read`].
pub fn generation() -> Option<u32> {
    let mut sock = Socket::open(SockProtocol::NetlinkNetFilter)?;
    let (_, msg) = request(NfFamily::Inet);
    // AF_UNSPEC: the generation is the namespace's, not a family's.
    let (kind, body) = sock.request(msg(NFT_MSG_GETGEN), &[0, 0, 0, 0])?.ok()?;
    if kind != msg(NFT_MSG_NEWGEN) {
        return None;
    }
    be32(Attrs::of(&body).get(NFTA_GEN_ID)?)
}

/// Changes to nf_tables made in process (the tests give fakes).
pub trait NfWrite {
    /// Deletes table `name` of `family` with everything in it, in one transaction.
    fn delete_table(&mut self, family: NfFamily, name: &str) -> Result<(), Errno>;
    /// Sets the flags of the existing table `name` of `family` (never creates it): `ENOENT`
    /// when it is not there.
    fn set_table_flags(&mut self, family: NfFamily, name: &str, flags: u32) -> Result<(), Errno>;
}

/// [`NfWrite`] over a netlink socket of its own per change.
#[derive(Debug, Default)]
pub struct NfNetlink;

impl NfWrite for NfNetlink {
    fn delete_table(&mut self, family: NfFamily, name: &str) -> Result<(), Errno> {
        table_transaction(family, NFT_MSG_DELTABLE, name, None)
    }

    fn set_table_flags(&mut self, family: NfFamily, name: &str, flags: u32) -> Result<(), Errno> {
        // NEWTABLE updates a table that exists and makes one that does not, whatever
        // NLM_F_CREATE says: look first (the namespace lock keeps other runs out between).
        let mut sock =
            Socket::open(SockProtocol::NetlinkNetFilter).ok_or(Errno::EPROTONOSUPPORT)?;
        if !all_tables(&mut sock, family)?
            .tables
            .iter()
            .any(|t| t.name == name)
        {
            return Err(Errno::ENOENT);
        }
        table_transaction(family, NFT_MSG_NEWTABLE, name, Some(flags))
    }
}

/// An [`NfWrite`] that changes nothing and says so (`EPERM`): where a caller must not write
/// (the tests of code that only reads or plans).
#[derive(Debug, Default)]
pub struct NoWrites;

impl NfWrite for NoWrites {
    fn delete_table(&mut self, _family: NfFamily, _name: &str) -> Result<(), Errno> {
        Err(Errno::EPERM)
    }

    fn set_table_flags(&mut self, _: NfFamily, _: &str, _: u32) -> Result<(), Errno> {
        Err(Errno::EPERM)
    }
}

/// One nf_tables transaction (a batch) of one table message `kind` for table `name`.
fn table_transaction(
    family: NfFamily,
    kind: u16,
    name: &str,
    flags: Option<u32>,
) -> Result<(), Errno> {
    let mut sock = Socket::open(SockProtocol::NetlinkNetFilter).ok_or(Errno::EPROTONOSUPPORT)?;
    let (nfgen, msg) = request(family);
    let mut body = nfgen.to_vec();
    let mut cname = name.as_bytes().to_vec();
    cname.push(0);
    push_attribute(&mut body, NFTA_TABLE_NAME, &cname);
    if let Some(flags) = flags {
        push_attribute(&mut body, NFTA_TABLE_FLAGS, &flags.to_be_bytes());
    }
    // A batch is addressed to its subsystem: AF_UNSPEC, res_id (big endian) nf_tables.
    let [hi, lo] = NFNL_SUBSYS_NFTABLES.to_be_bytes();
    let batch = [0, 0, hi, lo];
    sock.transact(&[
        (NFNL_MSG_BATCH_BEGIN, 0, &batch),
        (msg(kind), NLM_F_ACK, &body),
        (NFNL_MSG_BATCH_END, 0, &batch),
    ])
}

/// The nfgenmsg of a dump of `family` (family, NFNETLINK_V0, res_id big endian), and the
/// message type of nf_tables' message `m`.
fn request(family: NfFamily) -> ([u8; 4], impl Fn(u16) -> u16) {
    ([family.nfproto(), 0, 0, 0], |m: u16| {
        (NFNL_SUBSYS_NFTABLES << 8) | m
    })
}

/// The tables of `family`.
fn read_tables(sock: &mut Socket, family: NfFamily) -> Option<NfTables> {
    all_tables(sock, family).ok()
}

fn all_tables(sock: &mut Socket, family: NfFamily) -> Result<NfTables, Errno> {
    let (body, msg) = request(family);
    let mut out = NfTables::default();
    let mut bad = false;

    sock.dump_or_errno(msg(NFT_MSG_GETTABLE), &body, |kind, m| {
        if kind != msg(NFT_MSG_NEWTABLE) {
            return;
        }
        let a = Attrs::of(m);
        let flags = match a.get(NFTA_TABLE_FLAGS) {
            None => Some(0),
            Some(v) => be32(v),
        };
        let owner = a.get(NFTA_TABLE_OWNER).map(be32);
        match (a.string(NFTA_TABLE_NAME), flags, owner) {
            (Some(name), Some(flags), None | Some(Some(_))) => out.tables.push(NfTable {
                name,
                flags,
                owner: owner.flatten(),
                chains: Vec::new(),
            }),
            _ => bad = true,
        }
    })?;
    if bad {
        return Err(Errno::EBADMSG);
    }
    Ok(out)
}

/// The tables of `family` in the current network namespace, with their chains and the rule
/// counts of the base chains; `None` when the kernel could not be asked or answered with
/// something malformed. A family without tables costs one dump; otherwise two (tables,
/// chains) and one per base chain.
pub fn read(family: NfFamily) -> Option<NfTables> {
    let mut sock = Socket::open(SockProtocol::NetlinkNetFilter)?;
    let mut out = read_tables(&mut sock, family)?;
    if out.tables.is_empty() {
        return Some(out);
    }
    let (body, msg) = request(family);
    let mut bad = false;

    sock.dump(msg(NFT_MSG_GETCHAIN), &body, |kind, m| {
        if kind != msg(NFT_MSG_NEWCHAIN) {
            return;
        }
        if read_chain(m, &mut out).is_none() {
            bad = true;
        }
    })?;
    if bad {
        return None;
    }

    // Rules are counted in base chains only, one dump filtered to each: the kernel resumes a
    // rule dump by walking past every rule already sent, so a whole-family dump of a chain
    // with 30,000 rules costs seconds; a base chain holds a few.
    let bases: Vec<(String, String)> = out
        .tables
        .iter()
        .flat_map(|t| {
            t.chains
                .iter()
                .filter(|c| c.base.is_some())
                .map(|c| (t.name.clone(), c.name.clone()))
        })
        .collect();
    for (table, chain) in bases {
        let mut filter = body.to_vec();
        for (ty, name) in [(NFTA_RULE_TABLE, &table), (NFTA_RULE_CHAIN, &chain)] {
            let mut v = name.as_bytes().to_vec();
            v.push(0);
            push_attribute(&mut filter, ty, &v);
        }
        let mut n = 0;
        sock.dump(msg(NFT_MSG_GETRULE), &filter, |kind, m| {
            if kind != msg(NFT_MSG_NEWRULE) {
                return;
            }
            // A kernel that does not filter sends every chain's rules: count this one's.
            let a = Attrs::of(m);
            if a.string(NFTA_RULE_TABLE).as_ref() == Some(&table)
                && a.string(NFTA_RULE_CHAIN).as_ref() == Some(&chain)
            {
                n += 1;
            }
        })?;
        let c = out
            .tables
            .iter_mut()
            .find(|t| t.name == table)
            .and_then(|t| t.chains.iter_mut().find(|c| c.name == chain))
            .expect("a chain of the list");
        c.rules = Some(n);
    }
    Some(out)
}

/// Adds the chain of one `NFT_MSG_NEWCHAIN` message to its table.
fn read_chain(m: &[u8], out: &mut NfTables) -> Option<()> {
    let a = Attrs::of(m);
    let table = a.string(NFTA_CHAIN_TABLE)?;
    let table = out.tables.iter_mut().find(|t| t.name == table)?;
    let name = a.string(NFTA_CHAIN_NAME)?;
    let base = match a.get(NFTA_CHAIN_HOOK) {
        None => None,
        Some(hook) => {
            let hook = Attrs {
                all: attributes(hook),
            };
            Some(BaseChain {
                hook: be32(hook.get(NFTA_HOOK_HOOKNUM)?)?,
                kind: a.string(NFTA_CHAIN_TYPE)?,
                priority: be32(hook.get(NFTA_HOOK_PRIORITY)?)? as i32,
                policy: match a.get(NFTA_CHAIN_POLICY) {
                    None => None,
                    Some(v) => Some(be32(v)?),
                },
            })
        }
    };
    table.chains.push(NfChain {
        name,
        base,
        rules: None,
    });
    Some(())
}

/// The attributes of one netfilter message body (a 4-byte `nfgenmsg`, then attributes), or of
/// a nest, looked up by type.
struct Attrs<'a> {
    all: Vec<(u16, &'a [u8])>,
}

impl<'a> Attrs<'a> {
    /// The attributes of a message body (after its `nfgenmsg`).
    fn of(body: &'a [u8]) -> Attrs<'a> {
        Attrs {
            all: attributes(body.get(4..).unwrap_or_default()),
        }
    }

    fn get(&self, ty: u16) -> Option<&'a [u8]> {
        self.all.iter().find(|(t, _)| *t == ty).map(|(_, v)| *v)
    }

    /// A NUL-terminated string attribute.
    fn string(&self, ty: u16) -> Option<String> {
        let v = self.get(ty)?;
        let v = v.strip_suffix(&[0]).unwrap_or(v);
        std::str::from_utf8(v).ok().map(str::to_string)
    }
}

fn be32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::iptables::save::parse_save;
    use std::io::Write as _;
    use std::process::{Command, Stdio};

    fn root(test: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        eprintln!("SKIPPED nftprobe::{test}: needs root (network namespaces, nft, iptables-nft)");
        false
    }

    /// Runs `f` in a new network namespace (a thread of its own: unshare moves only it).
    fn in_fresh_ns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            f()
        })
        .join()
        .expect("namespace thread")
    }

    fn run(args: &[&str]) -> bool {
        Command::new(args[0])
            .args(&args[1..])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    fn run_with_input(program: &str, args: &[&str], input: &str) {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{program}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn counts_tables_in_a_private_namespace() {
        if !root("counts_tables_in_a_private_namespace") {
            return;
        }
        let r = in_fresh_ns(|| {
            let before = read(NfFamily::Ip);
            let ok = run(&["iptables-nft", "-t", "nat", "-N", "PROBE_TEST"]);
            (before, ok, read(NfFamily::Ip), read(NfFamily::Ip6))
        });
        assert_eq!(r.0, Some(NfTables::default()));
        assert!(r.1, "iptables-nft must work here");
        let v4 = r.2.expect("read");
        assert_eq!(v4.names(), ["nat"]);
        let chain = v4.tables[0].chain("PROBE_TEST").expect("chain");
        assert_eq!((chain.base.as_ref(), chain.rules), (None, None));
        assert_eq!(r.3, Some(NfTables::default()));
    }

    #[test]
    fn lists_inet_tables_and_their_chains() {
        if !root("lists_inet_tables_and_their_chains") {
            return;
        }
        let r = in_fresh_ns(|| {
            let before = read(NfFamily::Inet);
            let ok = run(&["nft", "add table inet istio-proxy-nat"])
                && run(&["nft", "add table inet other"])
                && run(&["iptables-nft", "-t", "nat", "-N", "ISTIO_OUTPUT"]);
            (before, ok, read(NfFamily::Inet), read(NfFamily::Ip))
        });
        assert_eq!(r.0, Some(NfTables::default()));
        assert!(r.1, "nft and iptables-nft must work here");
        assert_eq!(r.2.unwrap().names(), ["istio-proxy-nat", "other"]);
        let ip = r.3.unwrap();
        assert!(ip.tables[0].chains.iter().any(|c| c.name == "ISTIO_OUTPUT"));
    }

    /// What iptables-nft-save does not show: a dormant table, a base chain of another
    /// tool's (hook, type, priority, policy), and how many rules each base chain holds.
    #[test]
    fn sees_dormant_tables_and_foreign_base_chains() {
        if !root("sees_dormant_tables_and_foreign_base_chains") {
            return;
        }
        let r = in_fresh_ns(|| {
            run_with_input(
                "nft",
                &["-f", "-"],
                "table ip other {\n\
                 \tflags dormant\n\
                 \tchain early { type filter hook prerouting priority -150; policy drop; }\n\
                 \tchain late { type nat hook output priority 100; counter; counter; }\n\
                 \tchain plain { counter; }\n\
                 }\n",
            );
            read(NfFamily::Ip)
        });
        let t = r.expect("read");
        let other = t.table("other").expect("table");
        assert!(other.is_dormant(), "{other:?}");
        assert_eq!(
            other.chain("early").unwrap().base,
            Some(BaseChain {
                hook: 0,
                kind: "filter".into(),
                priority: -150,
                policy: Some(0),
            })
        );
        let late = other.chain("late").unwrap();
        let base = late.base.as_ref().unwrap();
        assert_eq!(
            (base.hook, base.kind.as_str(), base.priority),
            (3, "nat", 100)
        );
        assert_eq!(late.rules, Some(2));
        let plain = other.chain("plain").unwrap();
        assert_eq!(
            (plain.base.as_ref(), plain.rules),
            (None, None),
            "not counted"
        );
    }

    /// Waking a dormant table, deleting a table, the generation moving with each change.
    #[test]
    fn wakes_and_deletes_tables_and_counts_generations() {
        if !root("wakes_and_deletes_tables_and_counts_generations") {
            return;
        }
        let r = in_fresh_ns(|| {
            run_with_input(
                "nft",
                &["-f", "-"],
                "table ip nat {\n\tflags dormant\n\tchain ISTIO_OUTPUT { counter; }\n}\n",
            );
            let g0 = generation();
            let mut nf = NfNetlink;
            let woke = nf.set_table_flags(NfFamily::Ip, "nat", 0);
            let after_wake = read(NfFamily::Ip);
            let g1 = generation();
            let missing = nf.set_table_flags(NfFamily::Ip, "mangle", 0);
            let deleted = nf.delete_table(NfFamily::Ip, "nat");
            let after_delete = read(NfFamily::Ip);
            let again = nf.delete_table(NfFamily::Ip, "nat");
            (
                g0,
                woke,
                after_wake,
                g1,
                missing,
                deleted,
                after_delete,
                again,
            )
        });
        let (g0, woke, after_wake, g1, missing, deleted, after_delete, again) = r;
        assert_eq!(woke, Ok(()));
        let nat = after_wake.expect("read");
        let nat = nat.table("nat").expect("nat still there");
        assert!(!nat.is_dormant(), "{nat:?}");
        assert!(nat.chain("ISTIO_OUTPUT").is_some());
        let (g0, g1) = (g0.expect("generation"), g1.expect("generation"));
        assert!(g1 > g0, "the generation moves with a change: {g0} -> {g1}");
        assert_eq!(missing, Err(Errno::ENOENT), "flags never create a table");
        assert_eq!(deleted, Ok(()));
        assert_eq!(after_delete.expect("read").tables, vec![]);
        assert_eq!(again, Err(Errno::ENOENT));
    }

    /// For every conformance case's payloads (Istio's own rules, both families), the
    /// structure read over netlink is the one iptables-nft-save prints: the same tables, the
    /// same regular chains, as many rules per base chain, and each base chain one of the save's
    /// built-in chains.
    #[test]
    fn agrees_with_iptables_nft_save_for_every_conformance_case() {
        if !root("agrees_with_iptables_nft_save_for_every_conformance_case") {
            return;
        }
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        let mut checked = 0;
        let mut failures = Vec::new();
        let cases = ["istio", "istio-more"]
            .iter()
            .flat_map(|d| std::fs::read_dir(data.join(d)).unwrap())
            .map(|c| c.unwrap().path());
        for case in cases {
            for (family, file) in [
                (Family::V4, "expected-v4.rules"),
                (Family::V6, "expected-v6.rules"),
            ] {
                let Ok(text) = std::fs::read_to_string(case.join(file)) else {
                    continue;
                };
                // Group names resolve through /etc/group, which may not have them.
                let text = text
                    .replace("--gid-owner java", "--gid-owner 1000")
                    .replace("--gid-owner ftp", "--gid-owner 1001");
                let (read, saved) = in_fresh_ns(move || {
                    let (restore, save) = match family {
                        Family::V4 => ("iptables-nft-restore", "iptables-nft-save"),
                        Family::V6 => ("ip6tables-nft-restore", "ip6tables-nft-save"),
                    };
                    run_with_input(restore, &["--noflush"], &text);
                    let out = Command::new(save).output().expect("save");
                    assert!(out.status.success(), "{save} failed");
                    (
                        read(NfFamily::of(family)),
                        String::from_utf8(out.stdout).unwrap(),
                    )
                });
                checked += 1;
                let read = read.expect("netlink read");
                let saved = parse_save(&saved).unwrap();
                let mut names: Vec<String> = read.names();
                names.sort();
                let saved_names: Vec<String> = saved.tables.keys().cloned().collect();
                if names != saved_names {
                    failures.push(format!(
                        "{} {family}: tables {names:?} vs {saved_names:?}",
                        case.display()
                    ));
                    continue;
                }
                for t in &read.tables {
                    let s = &saved.tables[&t.name];
                    let mut user: Vec<&str> = t
                        .chains
                        .iter()
                        .filter(|c| c.base.is_none())
                        .map(|c| c.name.as_str())
                        .collect();
                    user.sort();
                    let mut saved_user: Vec<&str> =
                        s.user_chains.iter().map(String::as_str).collect();
                    saved_user.sort();
                    if user != saved_user {
                        failures.push(format!(
                            "{} {family} {}: chains {user:?} vs {saved_user:?}",
                            case.display(),
                            t.name
                        ));
                    }
                    for c in &t.chains {
                        let saved_rules = s.chain_rules(&c.name).count();
                        let builtin = s.builtin.iter().any(|(b, _)| *b == c.name);
                        let counted = c.rules.is_none_or(|n| n == saved_rules);
                        if !counted
                            || c.base.is_some() != c.rules.is_some()
                            || (c.base.is_some() && !builtin)
                        {
                            failures.push(format!(
                                "{} {family} {} {}: {c:?}, saved with {saved_rules} rules",
                                case.display(),
                                t.name,
                                c.name
                            ));
                        }
                    }
                }
            }
        }
        assert!(
            checked >= 38,
            "only {checked} payloads found in {}",
            data.display()
        );
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
