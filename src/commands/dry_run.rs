//! `--dry-run`: the script of what a run would do, on stdout; nothing is changed.

use crate::backend::Backend;
use crate::config::{Config, HostFacts};

/// The script of an apply of `cfg` with `backend`.
pub fn apply_script<B: Backend>(backend: &B, cfg: &Config, facts: &HostFacts) -> String {
    backend.script(cfg, facts, &backend.build(cfg, facts))
}

/// The part of the cleanup script that does not depend on the configuration: it reads the
/// live state with each installed iptables variant and removes, as a real `--cleanup-only`
/// does, every jump into an ISTIO_* chain, the rules of our shape in built-in chains of
/// tables that hold ISTIO_* chains, then every ISTIO_* chain. Nothing is removed (nor run)
/// where nothing is ours, so a clean namespace is left as it is.
const CLEANUP_BODY: &str = r#"set -e

# Reads iptables-save output; prints the iptables-restore payload that removes our state.
istio_cleanup_payload() {
    awk '
        function flush() {
            if (nd + nc > 0) {
                print table
                for (i = 1; i <= nd; i++) print del[i]
                for (i = 1; i <= nc; i++) print "-F " chains[i]
                for (i = 1; i <= nc; i++) print "-X " chains[i]
                print "COMMIT"
            }
            nd = 0; nc = 0
        }
        /^\*/ { table = $0; name = substr($0, 2); nd = 0; nc = 0; next }
        /^:ISTIO_/ { chains[++nc] = substr($1, 2); next }
        /^COMMIT/ { flush(); next }
        /^-A / {
            if ($2 ~ /^ISTIO_/) next
            rule = $0; sub(/^-A [^ ]+ /, "", rule)
            ours = (rule ~ / -[jg] ISTIO_[^ ]*( |$)/ || rule ~ /^-[jg] ISTIO_/)
            if (!ours && nc > 0 && (name == "nat" || name == "mangle")) {
                if ($2 == "PREROUTING" && rule ~ /^-i [^ ]+ -j RETURN$/) ours = 1
                if ($2 == "OUTPUT" && rule ~ /^-o [^ ]+ -j RETURN$/) ours = 1
            }
            if (!ours && nc > 0 && name == "mangle") {
                if ($2 == "PREROUTING" && rule ~ /^-p tcp -m mark --mark [^ ]+ -j CONNMARK --save-mark/) ours = 1
                if ($2 == "OUTPUT" && rule ~ /^-o lo -p tcp -m mark --mark [^ ]+ -j RETURN$/) ours = 1
                if ($2 == "OUTPUT" && rule ~ /^-p tcp -m connmark --mark [^ ]+ -j CONNMARK --restore-mark/) ours = 1
                if ($2 == "OUTPUT" && rule ~ /^! -d [^ ]+ -o lo -p tcp -m owner .* -j MARK --set-xmark /) ours = 1
            }
            if (ours) del[++nd] = "-D " $2 " " rule
        }'
}

# $1: an iptables program name (iptables-nft, ip6tables-legacy, ...).
istio_cleanup() {
    command -v "$1-save" >/dev/null 2>&1 || return 0
    command -v "$1-restore" >/dev/null 2>&1 || return 0
    # No state to read (e.g. IPv6 disabled): nothing of ours either.
    state=$("$1-save" 2>/dev/null) || return 0
    payload=$(printf '%s\n' "$state" | istio_cleanup_payload)
    [ -n "$payload" ] || return 0
    printf '%s\n' "$payload" | "$1-restore" --noflush
    # nft keeps a table emptied this way; a real cleanup deletes it, as this does.
    case "$1" in *-nft) ;; *) return 0 ;; esac
    command -v nft >/dev/null 2>&1 || return 0
    fam=ip
    case "$1" in ip6*) fam=ip6 ;; esac
    for t in $(printf '%s\n' "$payload" | sed -n 's/^[*]//p'); do
        if "$1-save" -t "$t" 2>/dev/null | awk '
            /^-A / { busy = 1 }
            /^:/ && !/^:(PREROUTING|INPUT|FORWARD|OUTPUT|POSTROUTING) ACCEPT/ { busy = 1 }
            END { exit busy }'; then
            nft delete table "$fam" "$t"
        fi
    done
}

# TPROXY policy routing of any run, whatever its mark and table: a plain
# "fwmark M lookup T" rule whose table T holds a "local default dev lo" route, then such
# routes that no rule looks up. $1: -4 or -6.
istio_cleanup_routing() {
    ip "$1" -N rule show 2>/dev/null \
        | awk 'NF == 7 && $2 == "from" && $3 == "all" && $4 == "fwmark" && $5 !~ /\// &&
               $6 == "lookup" { print $5, $7 }' \
        | while read -r mark table; do
            if ip "$1" route show table "$table" 2>/dev/null | grep -q '^local default dev lo '; then
                ip "$1" rule del fwmark "$mark" lookup "$table"
            fi
        done
    tables=$(ip "$1" route show table all type local 2>/dev/null \
        | sed -n 's/^local default dev lo table \([0-9][0-9]*\) .*/\1/p' | sort -u)
    for table in $tables; do
        if ! ip "$1" -N rule show 2>/dev/null | grep -q " lookup $table\$"; then
            ip "$1" route del local default dev lo table "$table"
        fi
    done
}

found=
for v in iptables-legacy iptables-nft ip6tables-legacy ip6tables-nft; do
    if command -v "$v-save" >/dev/null 2>&1; then found=1; fi
    istio_cleanup "$v"
done
if [ -z "$found" ]; then
    istio_cleanup iptables
    istio_cleanup ip6tables
fi
# Istio's native nftables capture (--native-nftables) keeps its rules in tables of its own.
if command -v nft >/dev/null 2>&1; then
    for t in istio-proxy-nat istio-proxy-mangle istio-proxy-raw; do
        if nft list table inet "$t" >/dev/null 2>&1; then
            nft delete table inet "$t"
        fi
    done
fi
istio_cleanup_routing -4
istio_cleanup_routing -6
while ip -6 addr del ::6/128 dev lo 2>/dev/null; do :; done
"#;

/// `--dry-run --cleanup-only`: a script that works on any state (a script for a VM cannot
/// know what it will meet): it removes whatever this tool may have added, in an order that
/// works, and changes nothing on a clean namespace. It depends on no configuration value.
/// The script of `--cleanup-only`, for either backend: it removes both backends' state.
pub fn cleanup_script(_cfg: &Config) -> String {
    let mut s = String::from("#!/bin/sh\n");
    s.push_str(&format!(
        "# Generated by istio-iptables {} (--dry-run --cleanup-only).\n\
         # Run as root inside the target network namespace. Like a real --cleanup-only, it\n\
         # reads the live state (rules with every installed iptables variant, both families)\n\
         # and removes every jump into an ISTIO_* chain, the other rules istio-iptables adds to\n\
         # built-in chains (by their shape), then every ISTIO_* chain; the tables of Istio's\n\
         # native nftables capture (inet istio-proxy-nat, -mangle, -raw); then TPROXY policy\n\
         # routing of any mark and table (a plain fwmark rule whose table routes local default\n\
         # via lo) and the ::6 address on lo.\n\
         # On a namespace without such state it changes nothing and exits 0.\n",
        env!("CARGO_PKG_VERSION"),
    ));
    s.push_str(CLEANUP_BODY);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::build as config;

    #[test]
    fn cleanup_script_carries_no_config_value() {
        let (a, _) = config(&["-b", "*", "-c", "eth9", "-t", "4242", "-r", "77"], &[]).unwrap();
        let (b, _) = config(&[], &[]).unwrap();
        assert_eq!(cleanup_script(&a), cleanup_script(&b));
        assert!(!cleanup_script(&a).contains("eth9"));
    }
}
