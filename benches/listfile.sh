#!/usr/bin/env bash
# Benchmark: 20,000 excluded CIDRs read from a file (-x @PATH), a list that cannot be given
# on the command line (Linux caps one argument at 128 KiB, about 5,000 CIDRs).
#
#   (a)  istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x @exclude.txt -b '*' -d 15090,15020
#   (b)  iptables-nft-restore --noflush < payload      (a bare restore of the same payload)
#   gen  the same (a) with --dry-run: reading the file, validating, building, printing
#
# each apply sample in a fresh, empty network namespace, (a) and (b) interleaved; medians.
# No target applies to it (benches/README.md: the 1.40x apply and 25 ms generation targets are
# for the 5,000-CIDR config of bench.sh); it reports the ratio and the generation time. A
# report, not a test: it exits 0 (non-zero only when it could not measure).
#
#   sudo benches/listfile.sh                # RUNS=21 samples per variant
#   sudo RUNS=41 N=50000 benches/listfile.sh
#
# Environment: RUNS (default 21), N (CIDRs, default 20000), BIN (default: cargo build
# --release, for TARGET: x86_64-unknown-linux-musl when installed, as the release image; TARGET=
# for the glibc build), SKIP_BUILD=1, SETTLE_MS (pause between samples,
# default 50), KEEP=1 (keep the work directory).
# Needs root, util-linux unshare, iptables (nft flavour), python3 >= 3.8.
set -euo pipefail

RUNS=${RUNS:-21}
N=${N:-20000}
SETTLE_MS=${SETTLE_MS:-50}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)

die() { echo "listfile.sh: $*" >&2; exit 1; }

[[ $RUNS =~ ^[0-9]+$ ]] && ((RUNS >= 1)) || die "RUNS must be a positive integer"
[[ $N =~ ^[0-9]+$ ]] && ((N >= 1 && N <= 65536)) || die "N must be 1..65536 (10.A.B.0/24 ranges)"
[[ $SETTLE_MS =~ ^[0-9]+$ ]] || die "SETTLE_MS must be a non-negative integer"
((EUID == 0)) || die "must run as root (it creates network namespaces); try: sudo $0"
for c in unshare iptables-nft-save iptables-nft-restore python3; do
    command -v "$c" >/dev/null || die "$c not found: install util-linux, iptables (nft) and python3"
done


name=listfile.sh
# shellcheck source=binary.sh
. "$root/benches/binary.sh"

work=$(mktemp -d /tmp/istio-iptables-listfile.XXXXXX)
if [[ -n ${KEEP:-} ]]; then
    echo "listfile.sh: work directory kept: $work" >&2
else
    trap 'rm -rf "$work"' EXIT
fi
install_binary "$work"

# The list: N distinct /24s, one per line, with a comment, as a ConfigMap would hold them.
python3 - "$N" >"$work/exclude.txt" <<'PY'
import sys
n = int(sys.argv[1])
print(f"# {n} ranges never captured")
for i in range(n):
    print(f"10.{i // 256}.{i % 256}.0/24")
PY
size=$(stat -c %s "$work/exclude.txt")

args=(-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "@$work/exclude.txt" -b '*' -d 15090,15020)
printf '%s\0' "${args[@]}" >"$work/args"

# The payload of (b) is exactly what the binary's --dry-run would feed iptables-restore.
ENABLE_INBOUND_IPV6=false "$BIN" "${args[@]}" --dry-run >"$work/dry-run" 2>"$work/dry-run.log" \
    || die "$BIN --dry-run failed: $(tail -3 "$work/dry-run.log")"
awk 'inside && /^EOF$/ {inside=0; next} inside {print} /^iptables-restore --noflush <<.EOF.$/ {inside=1}' \
    "$work/dry-run" >"$work/payload"
[[ -s $work/payload ]] || die "no iptables-restore block in the --dry-run output"

PYTHONPATH="$root/benches" python3 - "$work" "$BIN" "$RUNS" "$SETTLE_MS" "$N" "$size" <<'PY'
import json
import os
import re
import statistics as st
import subprocess
import sys
import time

import freshns  # benches/freshns.py (PYTHONPATH)

work, binary, runs, settle_ms, n, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), \
    int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
DEVNULL = subprocess.DEVNULL
ENV = dict(os.environ, ENABLE_INBOUND_IPV6="false")
with open(f"{work}/args", "rb") as f:
    ARGV = [binary] + [a.decode() for a in f.read().split(b"\0")[:-1]]
PAYLOAD = f"{work}/payload"


def in_fresh_netns(fn):
    return freshns.in_fresh_netns(fn, "listfile.sh")


def run_a():
    p = subprocess.run(ARGV, env=ENV, stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"istio-iptables exited {p.returncode}")


def run_b():
    with open(PAYLOAD, "rb") as f:
        p = subprocess.run(["iptables-nft-restore", "--noflush"], stdin=f, stdout=DEVNULL,
                           stderr=DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"iptables-nft-restore exited {p.returncode}")


def saved():
    out = subprocess.run(["iptables-nft-save"], stdin=DEVNULL, capture_output=True,
                         text=True, check=True).stdout
    return sorted(re.sub(r"\[\d+:\d+\]", "", l) for l in out.splitlines()
                  if l and not l.startswith("#"))


def check(fn):
    def body():
        fn()
        with open("/proc/thread-self/net/ip_tables_names") as f:
            legacy = f.read().split()
        return {"rules": saved(), "legacy": legacy}
    return in_fresh_netns(body)


def timed(fn):
    def body():
        t0 = time.perf_counter_ns()
        fn()
        return time.perf_counter_ns() - t0
    return in_fresh_netns(body)


# Untimed: both leave the same rules, and the binary used iptables-nft as (b) does.
a, b = check(run_a), check(run_b)
if a["legacy"]:
    sys.exit("listfile.sh: the binary used legacy iptables; (b) uses iptables-nft")
if a["rules"] != b["rules"]:
    sys.exit("listfile.sh: (a) and (b) leave different rules")
rules = sum(1 for l in a["rules"] if l.startswith("-A "))

ta, tb = [], []
for i in range(runs):
    order = ((ta, run_a), (tb, run_b)) if i % 2 == 0 else ((tb, run_b), (ta, run_a))
    for acc, fn in order:
        time.sleep(settle_ms / 1000)
        acc.append(timed(fn))
gen = []
for i in range(runs):
    t0 = time.perf_counter_ns()
    p = subprocess.run(ARGV + ["--dry-run"], env=ENV, stdin=DEVNULL, stdout=DEVNULL,
                       stderr=DEVNULL)
    gen.append(time.perf_counter_ns() - t0)
    if p.returncode != 0:
        sys.exit("listfile.sh: --dry-run failed")

med = lambda xs: st.median(xs) / 1e6
ratio = med(ta) / med(tb)
print()
print(f"istio-iptables, lists from files: {os.environ['BIN_SOURCE']} (run from a copy)")
print(f"  {n} CIDRs in one file ({size} bytes; one argument may hold 131072), {rules} rules"
      f" applied; {runs} samples per variant, interleaved, each in a fresh namespace; medians")
print("  (a) istio-iptables ... -x @exclude.txt ...   (ENABLE_INBOUND_IPV6=false)")
print("  (b) iptables-nft-restore --noflush < the same payload (from (a)'s --dry-run)")
print()
print(f"{'':<36} {'median':>10}  (no target; reported)")
print(f"{'(a) apply':<36} {med(ta):>7.2f} ms")
print(f"{'(b) bare iptables-nft-restore':<36} {med(tb):>7.2f} ms")
print(f"{'(a)/(b)':<36} {ratio:>10.3f}")
g = med(gen)
print(f"{'generation (--dry-run, whole process)':<36} {g:>7.2f} ms")
print(f"  min/max: (a) {min(ta)/1e6:.2f}/{max(ta)/1e6:.2f} ms, (b) {min(tb)/1e6:.2f}/{max(tb)/1e6:.2f} ms,"
      f" gen {min(gen)/1e6:.2f}/{max(gen)/1e6:.2f} ms; machine: {os.cpu_count()} CPUs,"
      f" load average at the end {open('/proc/loadavg').read().split()[0]}")
PY
exit 0
