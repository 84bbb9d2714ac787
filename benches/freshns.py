"""Shared by the benchmark harnesses (bench.sh, listfile.sh, bench-nft.sh): run a function in
a forked child inside a new network namespace (what `unshare -n` does) and hand its
JSON-serialisable result back to the parent."""
import ctypes
import json
import os
import sys

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def in_fresh_netns(fn, name="bench"):
    """fn() in a forked child inside a new network namespace; returns its result. Any
    failure in the child ends the harness with `NAME: sample failed: ...`."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            if _libc.unshare(CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise OSError(e, "unshare(CLONE_NEWNET): " + os.strerror(e))
            out = {"ok": fn()}
        except BaseException as e:  # report anything to the parent
            out = {"error": f"{type(e).__name__}: {e}"}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while True:
        c = os.read(r, 1 << 16)
        if not c:
            break
        chunks.append(c)
    os.close(r)
    os.waitpid(pid, 0)
    res = json.loads(b"".join(chunks) or b'{"error": "child died"}')
    if "error" in res:
        sys.exit(f"{name}: sample failed: {res['error']}")
    return res["ok"]
