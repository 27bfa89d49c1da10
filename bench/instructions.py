"""`make bench-instructions`: user-space instructions per proxied call, counted.

The speed of this kind of machine drifts by 2x within minutes, so a CPU time
compared across runs says more about the machine than about a change. This
counts instructions instead, with valgrind's callgrind: the sidecar (store:
memory, access log and metrics on) runs under callgrind in front of nginx,
and only the calls of a 4-connection wrk run are counted (instrumentation is
switched on after a warm-up and off after the run). Repeat runs of the same
code agree to about 0.1 %. Kernel time (the socket syscalls) is not counted:
compare the figure between versions of the code, not with `make bench`'s µs.

Installs valgrind, nginx and wrk through apt-get when missing. Loopback only;
everything it starts it stops, by PID; about 40 seconds.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the same nginx, wrk and helpers as `make bench`)


def ensure_valgrind() -> None:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("installing valgrind with apt-get", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "valgrind"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def total_instructions(out_file: Path) -> int:
    """The `totals:` line callgrind writes at exit (its `summary:` line says 0
    when instrumentation starts off)."""
    text = out_file.read_text(errors="replace")
    match = re.search(r"^totals:\s*(\d+)", text, re.MULTILINE)
    if match is None or int(match.group(1)) == 0:
        raise RuntimeError(f"no instruction total in {out_file}")
    return int(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10, help="length of the counted wrk run")
    args = parser.parse_args()
    bench.ensure_tools()
    ensure_valgrind()
    with tempfile.TemporaryDirectory(prefix="wts-instr-") as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)                      # nginx's workers run as an unprivileged user
        (tmp / "media.bin").write_bytes(b"\0")
        (tmp / "media.bin").chmod(0o644)
        up = bench.free_port()
        conf = tmp / "nginx.conf"
        # The same stand-in for WeChat as `make bench` (user/info-sized answers).
        conf.write_text(bench.NGINX_UPSTREAM.format(tmp=tmp, role="upstream", up=up, px=0, user_info=bench.USER_INFO))
        with bench.process(bench.pinned([bench.which("nginx"), "-c", str(conf), "-p", str(tmp),
                                         "-g", "daemon off;"], 1)):
            upstream = f"http://127.0.0.1:{up}"
            bench.wait_http(upstream + "/cgi-bin/ping")
            path, port, admin = bench.sidecar_config(tmp, "memory", upstream, "{kind: memory}")
            out_file = tmp / "callgrind.out"
            cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_file}",
                   bench.PY, "-m", "proxy", "run", "--config", str(path)]
            # Under valgrind the sidecar takes a while to stop: it writes its counts then.
            with bench.process(bench.pinned(cmd, 0), stop_wait=60, cwd=bench.ROOT) as sidecar:
                bench.wait_http(f"http://127.0.0.1:{admin}/readyz", timeout=120)
                url = f"http://127.0.0.1:{port}/cgi-bin/user/info?openid=o1"
                bench.wrk(url, 4, 3)                                   # warm-up, not counted
                subprocess.run(["callgrind_control", "-i", "on", str(sidecar.pid)], check=True,
                               capture_output=True)
                res = bench.wrk(url, 4, args.seconds)
                subprocess.run(["callgrind_control", "-i", "off", str(sidecar.pid)], check=True,
                               capture_output=True)
            deadline = time.monotonic() + 10
            while not out_file.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            calls = int(res["requests"])
            if calls == 0 or res["non_2xx"] or res["socket_errors"]:
                raise RuntimeError(f"the counted run failed: {res}")
            total = total_instructions(out_file)
    print(f"calls counted: {calls}")
    print(f"instructions per call (user space, callgrind): {total / calls:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
