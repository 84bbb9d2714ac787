"""Shared by the benchmark harnesses (bench.sh, listfile.sh, bench-nft.sh, large.sh, istio.sh): run a function in
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


def cpu_times():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]  # total, idle + iowait


def quiesce(max_s=3.0, window=0.2, idle_min=0.75):
    """Waits (at most max_s) for a 0.2 s window with the machine >= 75 % idle (the kernel
    tears namespaces down asynchronously; other jobs may be running). False if it stayed
    busy. (bench.sh has its own copy of this and of vmhwm_at_exit.)"""
    import time
    end = time.monotonic() + max_s
    while True:
        t0 = cpu_times()
        time.sleep(window)
        t1 = cpu_times()
        if (t1[1] - t0[1]) / max(1, t1[0] - t0[0]) >= idle_min:
            return True
        if time.monotonic() >= end:
            return False


def vmhwm_at_exit(argv, env):
    """The binary's OWN peak RSS (KiB, or None): strace, not following children, holds it at
    exit_group entry for 0.5 s while /proc/PID/status VmHWM (its own address space only, the
    iptables/nft programs it ran excluded) is read. Raises if the binary exits non-zero."""
    import re
    import subprocess
    import time
    dn = subprocess.DEVNULL
    tracer = subprocess.Popen(
        ["strace", "-qq", "-o", "/dev/null", "-e", "trace=exit_group",
         "-e", "inject=exit_group:delay_enter=500000", "--"] + argv,
        env=env, stdin=dn, stdout=dn, stderr=dn)
    hwm = None
    deadline = time.monotonic() + 60
    want = argv[0].encode()
    while tracer.poll() is None and time.monotonic() < deadline:
        child = None
        try:
            with open(f"/proc/{tracer.pid}/task/{tracer.pid}/children") as f:
                for k in f.read().split():
                    try:
                        with open(f"/proc/{k}/cmdline", "rb") as c:
                            if c.read().split(b"\0")[0] == want:
                                child = int(k)
                    except OSError:
                        pass
        except OSError:
            pass
        if child is not None:
            try:
                with open(f"/proc/{child}/syscall") as f:
                    sc = f.read().split()
                if sc and sc[0] == "231":  # exit_group, held by strace
                    if int(sc[1], 16) != 0:
                        raise RuntimeError(f"binary exited {int(sc[1], 16)}")
                    with open(f"/proc/{child}/status") as f:
                        m = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
                    hwm = int(m.group(1)) if m else None
                    break
            except (OSError, ValueError):
                pass
        time.sleep(0.0005)
    tracer.wait()
    return hwm
