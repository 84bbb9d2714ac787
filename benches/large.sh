#!/usr/bin/env bash
# Benchmark: a very large dual-stack config. The seed command with 20,000 distinct excluded
# CIDRs (-x @exclude.txt: N4 IPv4 10.A.B.0/24 and N6 IPv6 fd00:A:B::/48, one file: far over
# the 128 KiB an argument may hold) and 10,000 excluded outbound ports (-o @ports.txt, Istio's
# flag; two rules per port, tcp and udp), IPv6 on (ENABLE_INBOUND_IPV6=true). Each sample in a
# fresh network namespace; medians of RUNS samples; (a) = ours, (b) = the bare programs doing
# the same work:
#
#   fresh apply  (a) istio-iptables <args>
#                (b) iptables-nft-restore --noflush < v4 payload; ip6tables-nft-restore
#                    --noflush < v6 payload; ip -6 addr add ::6/128 dev lo (the payloads and the
#                    ip command are the binary's own --dry-run script)
#   re-run       (a) the same again in a namespace it has just filled (untimed): nothing to
#                    change (it runs iptables-nft-save and ip6tables-nft-save and compares)
#                (b) iptables-nft-save; ip6tables-nft-save, in such a namespace
#   switch       (a) istio-iptables --native-nftables <args> over the iptables state (untimed
#                    apply first): it applies the nft transaction and removes the iptables rules
#                (b) nft -f < the transaction (its --native-nftables --dry-run block); then one
#                    nft -f of "delete table ip nat; delete table ip6 nat" (those tables hold
#                    nothing but Istio's rules here), the least removing them takes
#                (b+) the same preceded by iptables-nft-save; ip6tables-nft-save (reading the
#                    state, as a tool must before it removes anything): reported for context
#   verify       (a) istio-iptables verify <args> after an apply (untimed)
#                (b) iptables-nft-save; ip6tables-nft-save (the re-run's (b), same samples)
#
# plus our own peak RSS on each path (VmHWM of our process only, held by strace at exit:
# benches/freshns.py). Target: peak RSS < 64 MiB; the times are reported against the bare
# programs, with no target. Before timing it checks that (a) and (b) leave the same rules.
# Istio's own binary cannot take this config (it has no @file lists; 20,000 CIDRs exceed what
# one argument or environment string may hold), so there is no Istio column.
#
#   sudo benches/large.sh                    # RUNS=7 samples per variant (a few minutes)
#   sudo RUNS=5 N4=5000 N6=5000 PORTS=2000 benches/large.sh
#
# Environment: RUNS (default 7), N4 / N6 (IPv4 / IPv6 CIDRs, default 10000 each), PORTS
# (default 10000, from 20000 up), SETTLE_MS (pause between samples, default 300: a namespace
# with 60,000 rules takes a while to tear down), BIN / TARGET / SKIP_BUILD (benches/binary.sh),
# KEEP=1 (keep the work directory).
# Needs root, util-linux unshare, iproute2, iptables (nft flavour), nft, python3 >= 3.8, strace
# (peak RSS). A report, not a test: exits 0 even when the target is missed (non-zero only when
# it could not measure).
set -euo pipefail

RUNS=${RUNS:-7}
N4=${N4:-10000}
N6=${N6:-10000}
PORTS=${PORTS:-10000}
SETTLE_MS=${SETTLE_MS:-300}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)

die() { echo "large.sh: $*" >&2; exit 1; }

[[ $RUNS =~ ^[0-9]+$ ]] && ((RUNS >= 1)) || die "RUNS must be a positive integer"
[[ $N4 =~ ^[0-9]+$ ]] && ((N4 <= 65536)) || die "N4 must be 0..65536"
[[ $N6 =~ ^[0-9]+$ ]] && ((N6 <= 65536)) || die "N6 must be 0..65536"
[[ $PORTS =~ ^[0-9]+$ ]] && ((PORTS >= 1 && PORTS <= 45000)) || die "PORTS must be 1..45000"
[[ $SETTLE_MS =~ ^[0-9]+$ ]] || die "SETTLE_MS must be a non-negative integer"
((EUID == 0)) || die "must run as root (it creates network namespaces); try: sudo $0"
for c in unshare ip iptables-nft-save iptables-nft-restore ip6tables-nft-save ip6tables-nft-restore nft python3; do
    command -v "$c" >/dev/null || die "$c not found: install util-linux, iproute2, iptables (nft), nftables and python3"
done
command -v strace >/dev/null || echo "large.sh: strace not found: no peak RSS" >&2

name=large.sh
# shellcheck source=binary.sh
. "$root/benches/binary.sh"

work=$(mktemp -d /tmp/istio-iptables-large.XXXXXX)
if [[ -n ${KEEP:-} ]]; then
    echo "large.sh: work directory kept: $work" >&2
else
    trap 'rm -rf "$work"' EXIT
fi
install_binary "$work"

python3 - "$N4" "$N6" "$PORTS" "$work" <<'PY'
import sys
n4, n6, ports, work = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
with open(f"{work}/exclude.txt", "w") as f:
    print(f"# {n4} IPv4 and {n6} IPv6 ranges never captured", file=f)
    for i in range(n4):
        print(f"10.{i // 256}.{i % 256}.0/24", file=f)
    for i in range(n6):
        print(f"fd00:{i // 256:x}:{i % 256:x}::/48", file=f)
with open(f"{work}/ports.txt", "w") as f:
    for i in range(ports):
        print(20000 + i, file=f)
PY

args=(-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "@$work/exclude.txt" -b '*' -d 15090,15020 -o "@$work/ports.txt")
printf '%s\0' "${args[@]}" >"$work/args"

# The bare side's inputs are the binary's own --dry-run script: both restore payloads and the
# commands after them (ip -6 addr add ::6/128 dev lo: the script guards each with a check that
# it is missing, `ip -6 addr show ... | grep -q ... || ip -6 addr add ...`, of which the bare
# side, in a fresh namespace, runs the add alone), and the nft transaction.
ENABLE_INBOUND_IPV6=true "$BIN" "${args[@]}" --dry-run >"$work/dry-run" 2>"$work/dry-run.log" \
    || die "--dry-run failed: $(tail -3 "$work/dry-run.log")"
awk -v w="$work" '
    /^iptables-restore --noflush <<.EOF.$/ {out = w "/v4.payload"; next}
    /^ip6tables-restore --noflush <<.EOF.$/ {out = w "/v6.payload"; next}
    out && /^EOF$/ {out = ""; next}
    out {print > out; next}
    /^ip / {sub(/.*\|\| /, ""); print > (w "/after.cmds")}' "$work/dry-run"
[[ -s $work/v4.payload && -s $work/v6.payload ]] || die "no IPv4 and IPv6 restore blocks in the --dry-run (IPv6 not on?)"
ENABLE_INBOUND_IPV6=true "$BIN" --native-nftables "${args[@]}" --dry-run 2>/dev/null |
    awk '/^nft -f - <<.EOF.$/ {on=1; next} on && /^EOF$/ {on=0} on' >"$work/tx.nft"
[[ -s $work/tx.nft ]] || die "no nft transaction in the --native-nftables --dry-run"
printf 'delete table ip nat\ndelete table ip6 nat\n' >"$work/remove.nft"

echo "large.sh: measuring ($RUNS samples per variant; load average $(cut -d' ' -f1-3 /proc/loadavg)) ..." >&2
PYTHONPATH="$root/benches" python3 - "$work" "$BIN" "$RUNS" "$SETTLE_MS" <<'PY'
import os
import re
import statistics as st
import subprocess
import sys
import time

import freshns  # benches/freshns.py (PYTHONPATH)

work, binary, runs, settle_ms = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
DN = subprocess.DEVNULL
ENV = dict(os.environ, ENABLE_INBOUND_IPV6="true")
with open(f"{work}/args", "rb") as f:
    ARGS = [a.decode() for a in f.read().split(b"\0")[:-1]]
APPLY = [binary] + ARGS
SWITCH = [binary, "--native-nftables"] + ARGS
VERIFY = [binary, "verify"] + ARGS
AFTER = [l.split() for l in open(f"{work}/after.cmds")] if os.path.exists(f"{work}/after.cmds") else []


def run(argv, stdin=None, env=None):
    if stdin:
        with open(stdin, "rb") as f:
            p = subprocess.run(argv, stdin=f, stdout=DN, stderr=DN, env=env)
    else:
        p = subprocess.run(argv, stdin=DN, stdout=DN, stderr=DN, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} exited {p.returncode}")


ours_apply = lambda: run(APPLY, env=ENV)
ours_switch = lambda: run(SWITCH, env=ENV)
ours_verify = lambda: run(VERIFY, env=ENV)


def bare_apply():
    run(["iptables-nft-restore", "--noflush"], stdin=f"{work}/v4.payload")
    run(["ip6tables-nft-restore", "--noflush"], stdin=f"{work}/v6.payload")
    for c in AFTER:
        run(c)


def bare_save():
    run(["iptables-nft-save"])
    run(["ip6tables-nft-save"])


def bare_switch():
    run(["nft", "-f", "-"], stdin=f"{work}/tx.nft")
    run(["nft", "-f", "-"], stdin=f"{work}/remove.nft")


def bare_switch_read():
    bare_save()
    bare_switch()


def out(argv):
    return subprocess.run(argv, stdin=DN, capture_output=True, text=True, check=True).stdout


def ipt_state():
    rules = []
    for save in ("iptables-nft-save", "ip6tables-nft-save"):
        rules += [save[:3] + re.sub(r"\[\d+:\d+\]", "", l) for l in out([save]).splitlines()
                  if l and not l.startswith("#")]
    with open("/proc/thread-self/net/ip_tables_names") as f:
        legacy = f.read().split()
    return {"rules": sorted(rules), "addr": "::6/128" in out(["ip", "-6", "addr", "show", "dev", "lo"]),
            "legacy": legacy}


def nft_state():
    return out(["nft", "list", "ruleset"])


def check(fn, prepare, state):
    def body():
        if prepare:
            prepare()
        fn()
        return state()
    return freshns.in_fresh_netns(body, "large.sh")


# Untimed: both sides leave the same state.
a, b = check(ours_apply, None, ipt_state), check(bare_apply, None, ipt_state)
if a["legacy"]:
    sys.exit(f"large.sh: the binary used legacy iptables ({a['legacy']})")
if a != b:
    sys.exit("large.sh: fresh apply: (a) and (b) leave different rules or addresses, e.g. "
             f"{sorted(set(a['rules']) ^ set(b['rules']))[:4]}")
n4 = sum(1 for l in a["rules"] if l.startswith("ipt-A "))
n6 = sum(1 for l in a["rules"] if l.startswith("ip6-A "))
a, b = check(ours_switch, ours_apply, nft_state), check(bare_switch, ours_apply, nft_state)
if a != b or "istio-proxy-nat" not in a or "table ip nat" in a or "table ip6 nat" in a:
    sys.exit("large.sh: switch: (a) and (b) leave different rulesets")
nft_rules = sum(1 for l in a.splitlines() if l.strip() and not l.strip().startswith(("table", "chain", "type", "}")))


def timed(fn, prepare=None):
    def body():
        if prepare:
            prepare()
        t0 = time.perf_counter_ns()
        fn()
        return time.perf_counter_ns() - t0
    time.sleep(settle_ms / 1000)
    return freshns.in_fresh_netns(body, "large.sh")


VARIANTS = [  # key, fn, prepare
    ("fresh.a", ours_apply, None), ("fresh.b", bare_apply, None),
    ("rerun.a", ours_apply, ours_apply), ("save.b", bare_save, ours_apply),
    ("switch.a", ours_switch, ours_apply), ("switch.b", bare_switch, ours_apply),
    ("switch.b+", bare_switch_read, ours_apply),
    ("verify.a", ours_verify, ours_apply),
]
T = {k: [] for k, _, _ in VARIANTS}
busy = 0
for i in range(runs):
    busy += not freshns.quiesce()
    order = VARIANTS if i % 2 == 0 else list(reversed(VARIANTS))
    for k, fn, prep in order:
        T[k].append(timed(fn, prep))

gen = []
for i in range(runs):
    t0 = time.perf_counter_ns()
    run(APPLY + ["--dry-run"], env=ENV)
    gen.append(time.perf_counter_ns() - t0)

rss = {}
if any(os.access(os.path.join(d, "strace"), os.X_OK) for d in os.environ["PATH"].split(":")):
    def own(argv, prepare):
        def body():
            if prepare:
                prepare()
            return freshns.vmhwm_at_exit(argv, ENV)
        return max(freshns.in_fresh_netns(body, "large.sh") or 0 for _ in range(2)) or None
    rss = {"fresh": own(APPLY, None), "rerun": own(APPLY, ours_apply),
           "switch": own(SWITCH, ours_apply), "verify": own(VERIFY, ours_apply),
           "dry-run": max(freshns.vmhwm_at_exit(APPLY + ["--dry-run"], ENV) or 0 for _ in range(2)) or None}

med = lambda k: st.median(T[k]) / 1e6
mib = lambda v: f"{v / 1024:.1f} MiB" if v else "n/a"
size = os.path.getsize(f"{work}/exclude.txt")
print()
print(f"istio-iptables, 20,000-CIDR class dual-stack config: {os.environ['BIN_SOURCE']} (run from a copy)")
print(f"  -x @exclude.txt ({size} bytes), -o @ports.txt, ENABLE_INBOUND_IPV6=true; rules applied:"
      f" {n4} IPv4 + {n6} IPv6 (iptables), {nft_rules} (nft, one inet table); checked: (a) and (b)"
      " leave the same rules")
print(f"  {runs} samples per variant, interleaved (order reversed every other round), each in a"
      " fresh network namespace; medians")
print()
print(f"{'':<10} {'(a) ours':>10} {'(b) bare':>10} {'a/b':>6}  (b) is")
rows = [("fresh", "fresh.a", "fresh.b", "iptables-nft-restore v4; ip6tables-nft-restore v6; ip -6 addr add"),
        ("re-run", "rerun.a", "save.b", "iptables-nft-save; ip6tables-nft-save"),
        ("switch", "switch.a", "switch.b", "nft -f transaction; nft -f 'delete table ip nat; delete table ip6 nat'"),
        ("verify", "verify.a", "save.b", "iptables-nft-save; ip6tables-nft-save (the re-run's samples)")]
for label, ka, kb, what in rows:
    print(f"{label:<10} {med(ka):>7.0f} ms {med(kb):>7.0f} ms {med(ka) / med(kb):>6.2f}  {what}")
print(f"{'switch':<10} {'':>10} {med('switch.b+'):>7.0f} ms {med('switch.a') / med('switch.b+'):>6.2f}"
      "  (b+): the two saves, then the same two nft -f")
print(f"generation (--dry-run, whole process, printing {os.path.getsize(f'{work}/dry-run')} bytes):"
      f" {st.median(gen) / 1e6:.0f} ms (reported, no target)")
print()
if rss:
    worst = max(v for v in rss.values() if v) if any(rss.values()) else 0
    print("peak RSS, our process only: " + ", ".join(f"{k} {mib(v)}" for k, v in rss.items()))
    print(f"  worst {mib(worst)}: target < 64 MiB: {'PASS' if worst and worst < 64 * 1024 else 'FAIL'}")
else:
    print("peak RSS: n/a (strace not installed)")
print("details (ms: min / median / max)")
for k in T:
    xs = sorted(T[k])
    print(f"  {k:<10} {xs[0] / 1e6:7.0f} {st.median(xs) / 1e6:7.0f} {xs[-1] / 1e6:7.0f}")
print(f"machine: {os.cpu_count()} CPUs; load average at the end {open('/proc/loadavg').read().split()[0]};"
      f" rounds that started busy (< 75 % idle for 3 s): {busy}/{runs}")
PY
exit 0
