#!/usr/bin/env bash
# Benchmark of the native nftables backend: a fresh `istio-iptables --native-nftables` apply
# of the seed command against one bare `nft -f -` of the same transaction (the target in force: <= 1.30x),
# and a re-run with nothing to change against one bare `nft list ruleset inet` (reported).
# Each sample runs in a fresh, empty network namespace; samples are interleaved and the order
# inside a pair alternates; medians are reported. A report, not a test: it exits 0 even when
# the target is missed (non-zero only when it could not measure).
#
#   sudo benches/bench-nft.sh            # RUNS=31 samples per side
#   sudo RUNS=61 SKIP_BUILD=1 BIN=path benches/bench-nft.sh
#   BIN, TARGET, SKIP_BUILD: which binary, as for bench.sh (benches/binary.sh)
#
# Needs root, nft (nftables >= 1.0.1), python3 >= 3.8.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
name=bench-nft.sh

die() { echo "bench-nft.sh: $*" >&2; exit 1; }
RUNS=${RUNS:-31}
SETTLE_MS=${SETTLE_MS:-50}
[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
for c in nft python3; do command -v "$c" >/dev/null || die "$c not found"; done
# shellcheck source=binary.sh
. "$root/benches/binary.sh"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
seed=(--native-nftables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15020)
# The transaction of (b): the here-document of the binary's own dry run.
ENABLE_INBOUND_IPV6=false "$BIN" --dry-run "${seed[@]}" 2>/dev/null |
    awk '/^nft -f - <<.EOF.$/ {on=1; next} /^EOF$/ {on=0} on' >"$work/tx.nft"
[ -s "$work/tx.nft" ] || die "no nft transaction in the dry run"
printf '%s\0' "${seed[@]}" >"$work/seed.args"
install_binary "$work"

PYTHONPATH="$root/benches" python3 - "$work" "$BIN" "$RUNS" "$SETTLE_MS" <<'PY'
import os, statistics, subprocess, sys, time

import freshns  # benches/freshns.py

work, binary, runs, settle = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with open(f"{work}/seed.args", "rb") as f:
    ARGV = [binary] + [a.decode() for a in f.read().split(b"\0")[:-1]]
ENV = dict(os.environ, ENABLE_INBOUND_IPV6="false")
Q = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

def ours():
    if subprocess.run(ARGV, env=ENV, **Q).returncode != 0:
        raise RuntimeError("istio-iptables --native-nftables failed")

def bare_apply():
    with open(f"{work}/tx.nft", "rb") as f:
        if subprocess.run(["nft", "-f", "-"], stdin=f, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode != 0:
            raise RuntimeError("nft -f failed")

def bare_list():
    if subprocess.run(["nft", "list", "ruleset", "inet"], **Q).returncode != 0:
        raise RuntimeError("nft list failed")

def listing():
    return subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout

def sample(fn, prepare=None, check=False):
    """fn timed in a fresh network namespace (prepare runs there first, untimed); with
    check, also the ruleset it left."""
    def body():
        if prepare:
            prepare()
        t0 = time.perf_counter_ns()
        fn()
        t = time.perf_counter_ns() - t0
        return [t, listing() if check else ""]
    t, out = freshns.in_fresh_netns(body, "bench-nft.sh")
    time.sleep(settle / 1000)
    return t, out

# Both sides leave the same ruleset.
_, a = sample(ours, check=True)
_, b = sample(bare_apply, check=True)
if a != b or "istio-proxy-nat" not in a:
    sys.exit("bench-nft.sh: the binary and the bare nft -f leave different rulesets")

fa, fb, ra, rb = [], [], [], []
for i in range(runs):
    pairs = [(fa, lambda: sample(ours)), (fb, lambda: sample(bare_apply)),
             (ra, lambda: sample(ours, prepare=ours)), (rb, lambda: sample(bare_list, prepare=ours))]
    if i % 2:
        pairs = [pairs[1], pairs[0], pairs[3], pairs[2]]
    for acc, fn in pairs:
        acc.append(fn()[0])

def ms(v):
    return statistics.median(v) / 1e6

print(f"native nftables, seed command, {runs} samples per side (medians), "
      f"{os.cpu_count()} CPUs, {os.uname().release}, {os.environ['BIN_SOURCE']} (run from a copy)")
print(f"  fresh apply: istio-iptables {ms(fa):.2f} ms, bare nft -f {ms(fb):.2f} ms, "
      f"ratio {ms(fa) / ms(fb):.2f} (target <= 1.30: {'PASS' if ms(fa) / ms(fb) <= 1.30 else 'FAIL'})")
print(f"  re-run:      istio-iptables {ms(ra):.2f} ms, bare nft list ruleset inet {ms(rb):.2f} ms, "
      f"ratio {ms(ra) / ms(rb):.2f} (no target)")
PY
