#!/usr/bin/env python3
"""bench/siege.py — what unauthenticated connections cost an iounitd.

Starts target/release/iounitd on 127.0.0.1 (tcp, ram:64MiB), then holds
  - N connections (default 1000) that complete the tcp hello and then say
    nothing (no NVMe Connect), each from its own source address in
    127.0.0.0/8, so that no per-address limit hides the cost;
  - 64 slowloris sockets that send two bytes of a hello and stall;
and meanwhile runs `hostctl list` and a 2 s `hostctl bench` as a good host.
Prints the daemon's VmRSS and threads before, while held, and after the
connections are gone, and whether the good host got through.

Usage: bench/siege.py [--stalled N] [--slow N] [--hold SECONDS]
"""

import argparse
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IOUNITD = os.path.join(ROOT, "target/release/iounitd")
HOSTCTL = os.path.join(ROOT, "target/release/hostctl")


def tcp_hello():
    """A client hello carrying a host channel's parameter block (v2)."""
    params = bytearray(32)
    params[0] = 2                                       # parameter block version
    params[4:6] = (136).to_bytes(2, "little")           # recv_depth
    params[6:8] = (0).to_bytes(2, "little")             # slot_count
    params[8:12] = (4160).to_bytes(4, "little")         # msg_size
    header = b"CHIO" + (2).to_bytes(2, "little") + (1).to_bytes(2, "little")
    header += (0).to_bytes(4, "little") + len(params).to_bytes(4, "little")
    return header + bytes(params)


def status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return int(out["VmRSS"].split()[0]) // 1024, int(out["Threads"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stalled", type=int, default=1000)
    ap.add_argument("--slow", type=int, default=64)
    ap.add_argument("--hold", type=float, default=5.0)
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = subprocess.Popen([IOUNITD, "--listen", f"tcp://127.0.0.1:{port}", "--ns", "ram:64MiB"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        uri = f"tcp://127.0.0.1:{port}"
        for _ in range(100):
            if subprocess.run([HOSTCTL, "--target", uri, "list"], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        rss0, thr0 = status(d.pid)
        hello = tcp_hello()
        held, refused = [], 0
        t0 = time.monotonic()
        for i in range(a.stalled):
            s = socket.socket()
            s.bind((f"127.{10 + i // 60000}.{(i // 250) % 240 + 1}.{i % 250 + 1}", 0))
            try:
                s.connect(("127.0.0.1", port))
                s.sendall(hello)
                held.append(s)
            except OSError:
                refused += 1
                s.close()
        slow = []
        for i in range(a.slow):
            s = socket.socket()
            s.bind((f"127.200.{i // 250 + 1}.{i % 250 + 1}", 0))
            s.connect(("127.0.0.1", port))
            s.sendall(hello[:2])
            slow.append(s)
        opened = time.monotonic() - t0
        time.sleep(min(a.hold, 1.0))
        good = subprocess.run([HOSTCTL, "--target", uri, "--timeout", "10s", "list"], capture_output=True, text=True)
        bench = subprocess.run([HOSTCTL, "--target", uri, "bench", "--ns", "1", "--qd", "1", "--time", "2s", "--json"],
                               capture_output=True, text=True)
        rss1, thr1 = status(d.pid)
        time.sleep(max(0.0, a.hold - 1.0))
        for s in held + slow:
            s.close()
        time.sleep(12)   # past the I/O unit's Connect deadline
        rss2, thr2 = status(d.pid)
        print(f"connections: {len(held)} stalled after the hello ({refused} refused at connect), "
              f"{len(slow)} slowloris; opened in {opened:.1f} s")
        print(f"iounitd VmRSS: {rss0} MiB idle, {rss1} MiB held, {rss2} MiB after; "
              f"threads: {thr0}, {thr1}, {thr2}")
        print(f"good host while held: list {'ok' if good.returncode == 0 else 'FAILED: ' + good.stderr.strip()}; "
              f"bench {bench.stdout.strip() if bench.returncode == 0 else 'FAILED: ' + bench.stderr.strip()}")
    finally:
        d.terminate()
        d.wait()


if __name__ == "__main__":
    sys.exit(main())
