#!/usr/bin/env bash
# Side by side with Istio's own istio-iptables: the same commands, the same harness, each
# sample in a fresh network namespace; the report gives ours / Istio's (no target).
#
#   seed, fresh apply   -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15020
#   seed, re-run        the same again, in a namespace the same binary has just filled (untimed)
#   (c), fresh apply    the seed with -x = 5,000 distinct 10.A.B.0/24 and -o 20000..20999 (as
#                       bench.sh's (c))
#
# Istio's binary is not part of this repository and nothing here builds it: give the path of
# one built from Istio's source in ISTIO_BIN (and, to have it printed, its commit in
# ISTIO_COMMIT). Without ISTIO_BIN the script says so in one line and exits 0.
#
#   sudo ISTIO_BIN=/path/to/istio-iptables ISTIO_COMMIT=abc1234 benches/istio.sh
#   sudo RUNS=41 ISTIO_BIN=... SKIP_BUILD=1 benches/istio.sh
#
# Both binaries run only inside fresh network namespaces. In each sample, untimed and on both
# sides, the namespace gets a pod address (10.244.1.5/32 on lo): Istio's binary reads the pod's
# IP family from its addresses and fails without a non-loopback one. Ours runs with
# ENABLE_INBOUND_IPV6=false; Istio's then finds only IPv4 and turns IPv6 off too. Before timing
# it checks that a fresh apply of either leaves the same iptables-nft rules.
#
# Environment: ISTIO_BIN, ISTIO_COMMIT, RUNS (default 21), SETTLE_MS (default 50), BIN /
# TARGET / SKIP_BUILD (benches/binary.sh). Needs root, util-linux unshare, iproute2, iptables
# (nft and legacy: Istio's binary probes both), python3 >= 3.8. A report: exits 0.
set -euo pipefail

RUNS=${RUNS:-21}
SETTLE_MS=${SETTLE_MS:-50}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)

die() { echo "istio.sh: $*" >&2; exit 1; }

if [[ -z ${ISTIO_BIN:-} ]]; then
    echo "istio.sh: ISTIO_BIN not set (path of an istio-iptables built from Istio's source): skipping the comparison with Istio's binary"
    exit 0
fi
[[ -x $ISTIO_BIN ]] || die "ISTIO_BIN=$ISTIO_BIN is not an executable"
[[ $RUNS =~ ^[0-9]+$ ]] && ((RUNS >= 1)) || die "RUNS must be a positive integer"
[[ $SETTLE_MS =~ ^[0-9]+$ ]] || die "SETTLE_MS must be a non-negative integer"
((EUID == 0)) || die "must run as root (it creates network namespaces); try: sudo $0"
for c in unshare ip iptables-nft-save iptables-legacy-save python3; do
    command -v "$c" >/dev/null || die "$c not found"
done

name=istio.sh
# shellcheck source=binary.sh
. "$root/benches/binary.sh"

work=$(mktemp -d /tmp/istio-iptables-istio.XXXXXX)
trap 'rm -rf "$work"' EXIT
install_binary "$work"
cp "$ISTIO_BIN" "$work/istio-iptables-istio" && chmod 0755 "$work/istio-iptables-istio" \
    || die "cannot copy $ISTIO_BIN"

echo "istio.sh: measuring ($RUNS samples per variant; load average $(cut -d' ' -f1-3 /proc/loadavg)) ..." >&2
PYTHONPATH="$root/benches" python3 - "$work" "$BIN" "$work/istio-iptables-istio" "$RUNS" "$SETTLE_MS" <<'PY'
import os
import re
import statistics as st
import subprocess
import sys
import time

import freshns  # benches/freshns.py (PYTHONPATH)

work, ours, istio, runs, settle_ms = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
DN = subprocess.DEVNULL
ENV = dict(os.environ, ENABLE_INBOUND_IPV6="false")
cidrs = ",".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(5000))
ports = ",".join(str(20000 + i) for i in range(1000))
SEED = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
        "-b", "*", "-d", "15090,15020"]
LARGE = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", cidrs,
         "-b", "*", "-d", "15090,15020", "-o", ports]
BINS = {"ours": ours, "istio": istio}


def pod_address():
    subprocess.run(["ip", "addr", "add", "10.244.1.5/32", "dev", "lo"], check=True)


def run(binary, args):
    p = subprocess.run([binary] + args, env=ENV, stdin=DN, stdout=DN, stderr=DN)
    if p.returncode != 0:
        raise RuntimeError(f"{binary} exited {p.returncode}")


def saved(prog):
    out = subprocess.run([prog], stdin=DN, capture_output=True, text=True).stdout
    return sorted(re.sub(r"\[\d+:\d+\]", "", l) for l in out.splitlines()
                  if l and not l.startswith("#"))


def state(twice, binary, args):
    def body():
        pod_address()
        run(binary, args)
        if twice:
            run(binary, args)
        with open("/proc/thread-self/net/ip_tables_names") as f:
            legacy_tables = f.read().split()
        return {"nft": saved("iptables-nft-save"),
                "legacy_rules": sum(1 for l in saved("iptables-legacy-save") if l.startswith("-A ")),
                "legacy_tables": legacy_tables}
    return freshns.in_fresh_netns(body, "istio.sh")


notes = []
for label, args in (("seed", SEED), ("(c)", LARGE)):
    o, i = state(False, ours, args), state(False, istio, args)
    if o["nft"] != i["nft"]:
        d = sorted(set(o["nft"]) ^ set(i["nft"]))[:4]
        sys.exit(f"istio.sh: {label}: the two binaries leave different iptables-nft rules, e.g. {d}")
    if o["legacy_tables"]:
        sys.exit(f"istio.sh: {label}: ours used legacy iptables")
    rules = sum(1 for l in o["nft"] if l.startswith("-A "))
    notes.append(f"{label} fresh apply: same {rules} iptables-nft rules from both; legacy tables left"
                 f" by Istio's: {i['legacy_tables'] or 'none'} with {i['legacy_rules']} rules")
o, i = state(True, ours, SEED), state(True, istio, SEED)
notes.append(f"seed re-run: iptables-nft rules afterwards {'the same' if o['nft'] == i['nft'] else 'DIFFERENT'};"
             f" legacy rules afterwards: ours {o['legacy_rules']}, Istio's {i['legacy_rules']}")


def timed(binary, args, prepare):
    def body():
        pod_address()
        if prepare:
            run(binary, args)
        t0 = time.perf_counter_ns()
        run(binary, args)
        return time.perf_counter_ns() - t0
    time.sleep(settle_ms / 1000)
    return freshns.in_fresh_netns(body, "istio.sh")


VARIANTS = [("seed, fresh apply", SEED, False), ("seed, re-run", SEED, True),
            ("(c), fresh apply", LARGE, False)]
T = {(v, who): [] for v, _, _ in VARIANTS for who in BINS}
busy = 0
for n in range(runs):
    busy += not freshns.quiesce()
    for v, args, prep in VARIANTS:
        order = ("ours", "istio") if n % 2 == 0 else ("istio", "ours")
        for who in order:
            T[(v, who)].append(timed(BINS[who], args, prep))

med = lambda k: st.median(T[k]) / 1e6
print()
print(f"istio-iptables against Istio's own binary: ours {os.environ['BIN_SOURCE']}; Istio's"
      f" {os.environ['ISTIO_BIN']} (commit {os.environ.get('ISTIO_COMMIT') or 'not given'}); both run from copies")
print(f"  {runs} samples per variant, interleaved, each in a fresh network namespace with"
      " 10.244.1.5/32 on lo (untimed); medians; ENABLE_INBOUND_IPV6=false")
print()
print(f"{'':<20} {'ours':>9} {'Istio':>9} {'ours/Istio':>11}")
for v, _, _ in VARIANTS:
    a, b = med((v, "ours")), med((v, "istio"))
    print(f"{v:<20} {a:>6.2f} ms {b:>6.2f} ms {a / b:>11.3f}")
print()
for note in notes:
    print("  " + note)
print("details (ms: min / median / max)")
for (v, who), xs in T.items():
    xs = sorted(xs)
    print(f"  {v:<20} {who:<6} {xs[0] / 1e6:7.2f} {st.median(xs) / 1e6:7.2f} {xs[-1] / 1e6:7.2f}")
print(f"machine: {os.cpu_count()} CPUs; load average at the end {open('/proc/loadavg').read().split()[0]};"
      f" rounds that started busy (< 75 % idle for 3 s): {busy}/{runs}")
PY
exit 0
