#!/usr/bin/env bash
# Benchmark: what the exclusion lists cost each new outbound connection (the packet path),
# and what --exclusion-sets makes of it.
#
# For each backend (iptables, native nftables in Istio's form, native nftables with
# --exclusion-sets) and each size (N excluded CIDRs with -x, P excluded ports with -o), in a
# fresh network namespace: apply
#   istio-iptables [--native-nftables [--exclusion-sets]] -p 15001 -z 15006 -u 1337 -m REDIRECT
#                  -i '*' -x @cidrs -b '*' -d 15090,15020 [-o @ports]
# then time TCP connects (connect, accept, close) to an address routed out of a veth and not
# excluded, so that each SYN walks the whole list in nat output before it is redirected to a
# listener on :15001. Reported: microseconds per connect (median of BATCHES batches of
# CONNECTS), and for --exclusion-sets its increase over no exclusions (target in force:
# <= 10% with 20,000 CIDRs and 1,000 ports).
#
# Then the apply of that largest set config: a fresh istio-iptables apply against one bare
# `nft -f -` of its own transaction (the dry run's here-document), RUNS samples each,
# interleaved, medians (target in force: <= 1.30x). A report, not a test: it exits 0 even
# when a target is missed (non-zero only when it could not measure).
#
#   sudo benches/connect.sh
#   sudo SIZES="0 20000" CONNECTS=1000 SKIP_BUILD=1 benches/connect.sh
#
# Environment: SIZES (CIDR counts, default "0 1000 5000 20000"), PORTS (the -o count of the
# last row, default 1000), CONNECTS (per batch, default 2000), BATCHES (default 5), RUNS
# (apply samples, default 21), ROUNDS (namespaces per side of the 10% comparison, default 7),
# BIN, TARGET, SKIP_BUILD (benches/binary.sh).
# Needs root, nft (nftables >= 1.0.1), iptables (nft flavour), iproute2, python3 >= 3.8.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
name=connect.sh

die() { echo "connect.sh: $*" >&2; exit 1; }
SIZES=${SIZES:-0 1000 5000 20000}
PORTS=${PORTS:-1000}
CONNECTS=${CONNECTS:-2000}
BATCHES=${BATCHES:-5}
RUNS=${RUNS:-21}
[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
for c in nft ip iptables-nft-restore python3; do command -v "$c" >/dev/null || die "$c not found"; done
# shellcheck source=binary.sh
. "$root/benches/binary.sh"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
install_binary "$work"

PYTHONPATH="$root/benches" python3 - "$work" "$BIN" "$SIZES" "$PORTS" "$CONNECTS" "$BATCHES" "$RUNS" <<'PY'
import ipaddress, os, socket, statistics, subprocess, sys, threading, time

import freshns  # benches/freshns.py

work, binary = sys.argv[1], sys.argv[2]
sizes = [int(x) for x in sys.argv[3].split()]
ports, connects, batches, runs = (int(x) for x in sys.argv[4:8])
ROUNDS = int(os.environ.get("ROUNDS", "7"))
ENV = dict(os.environ, ENABLE_INBOUND_IPV6="false")
Q = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
DST = ("10.250.0.9", 80)  # routed out of the veth, never excluded
BACKENDS = [("iptables", []), ("nft", ["--native-nftables"]),
            ("nft sets", ["--native-nftables", "--exclusion-sets"])]


def lists(n, p):
    """Files of n excluded CIDRs (every other /32 of 10.64.0.0/10: none merge, the worst case
    for Istio's rules and a set alike) and p excluded ports (20000 on); their flags."""
    base = int(ipaddress.IPv4Address("10.64.0.0"))
    cidrs = f"{work}/cidrs-{n}.txt"
    with open(cidrs, "w") as f:
        f.write("\n".join(f"{ipaddress.IPv4Address(base + 2 * i)}/32" for i in range(n)))
    args = ["-x", f"@{cidrs}" if n else ""]
    if p:
        pf = f"{work}/ports-{p}.txt"
        with open(pf, "w") as f:
            f.write("\n".join(str(20000 + i) for i in range(p)))
        args += ["-o", f"@{pf}"]
    return args


def argv(flags, n, p):
    return [binary, *flags, "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
            "-i", "*", *lists(n, p), "-b", "*", "-d", "15090,15020"]


def sh(*cmd):
    r = subprocess.run(cmd, **Q)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} failed: {r.stderr.decode()[-500:]}")


def connect_cost(cmd):
    """In the fresh namespace: a veth out, the capture applied, a listener on :15001; µs per
    connect, median of the batches."""
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    sh("ip", "addr", "add", "10.250.0.1/24", "dev", "v0")
    sh("ip", "link", "set", "v0", "up")
    sh("ip", "link", "set", "v1", "up")
    r = subprocess.run(cmd, env=ENV, **Q)
    if r.returncode != 0:
        raise RuntimeError(f"apply failed: {r.stderr.decode()[-500:]}")
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", 15001))
    ls.listen(4096)

    def serve():
        while True:
            c, _ = ls.accept()
            c.close()
    threading.Thread(target=serve, daemon=True).start()

    def once():
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        s.connect(DST)
        s.close()
    for _ in range(200):
        once()
    out = []
    for _ in range(batches):
        t0 = time.perf_counter_ns()
        for _ in range(connects):
            once()
        out.append((time.perf_counter_ns() - t0) / connects / 1000)
    return statistics.median(out)


rows = [(n, 0) for n in sizes] + ([(max(sizes), ports)] if ports else [])
cost = {}
print(f"connect cost (µs per new outbound TCP connection, median of {batches} x {connects}), "
      f"{os.cpu_count()} CPUs, {os.uname().release}, {os.environ['BIN_SOURCE']} (run from a copy)")
print(f"  {'excluded CIDRs':>14} {'ports':>6}" + "".join(f" {b:>10}" for b, _ in BACKENDS))
for n, p in rows:
    line = f"  {n:>14} {p:>6}"
    for b, flags in BACKENDS:
        us = freshns.in_fresh_netns(lambda: connect_cost(argv(flags, n, p)), "connect.sh")
        cost[(b, n, p)] = us
        line += f" {us:>10.0f}"
        time.sleep(0.05)
    print(line, flush=True)
# The target: the set form with the largest lists against no exclusions, each measured in
# ROUNDS fresh namespaces, alternating (one table cell is one namespace, noisy to +-15%).
big = rows[-1]
flags = BACKENDS[2][1]
none, full = [], []
for i in range(ROUNDS):
    pair = [(none, (0, 0)), (full, big)]
    for acc, (n, p) in pair if i % 2 == 0 else pair[::-1]:
        acc.append(freshns.in_fresh_netns(lambda: connect_cost(argv(flags, n, p)), "connect.sh"))
        time.sleep(0.05)
ratio = statistics.median(full) / statistics.median(none)
print(f"  --exclusion-sets, {big[0]} CIDRs + {big[1]} ports against none, {ROUNDS} namespaces "
      f"each, alternating: {statistics.median(full):.0f} against {statistics.median(none):.0f} µs, "
      f"{(ratio - 1) * 100:+.1f}% (target <= +10%: {'PASS' if ratio <= 1.10 else 'FAIL'})")

# The apply of the largest set config against one bare nft -f of its own text.
n, p = rows[-1]
cmd = argv(BACKENDS[2][1], n, p)
dry = subprocess.run([cmd[0], "--dry-run", *cmd[1:]], env=ENV, capture_output=True, text=True)
tx, on = [], False
for l in dry.stdout.splitlines():
    if l == "nft -f - <<'EOF'":
        on = True
    elif l == "EOF":
        on = False
    elif on:
        tx.append(l)
if not tx:
    sys.exit("connect.sh: no nft transaction in the dry run")
txt = "\n".join(tx) + "\n"


def ours():
    if subprocess.run(cmd, env=ENV, **Q).returncode != 0:
        raise RuntimeError("istio-iptables failed")


def bare():
    if subprocess.run(["nft", "-f", "-"], input=txt.encode(), stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).returncode != 0:
        raise RuntimeError("nft -f failed")


def timed(fn):
    def body():
        t0 = time.perf_counter_ns()
        fn()
        return time.perf_counter_ns() - t0
    t = freshns.in_fresh_netns(body, "connect.sh")
    time.sleep(0.05)
    return t


a, b = [], []
for i in range(runs):
    pair = [(a, ours), (b, bare)] if i % 2 == 0 else [(b, bare), (a, ours)]
    for acc, fn in pair:
        acc.append(timed(fn))
ma, mb = statistics.median(a) / 1e6, statistics.median(b) / 1e6
print(f"apply of --exclusion-sets with {n} CIDRs + {p} ports, {runs} samples each (medians): "
      f"istio-iptables {ma:.1f} ms, bare nft -f {mb:.1f} ms, ratio {ma / mb:.2f} "
      f"(target <= 1.30: {'PASS' if ma / mb <= 1.30 else 'FAIL'})")
PY
