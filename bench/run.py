"""`make bench`: throughput of the sidecar, in one run, on this machine.

Starts nginx as a static WeChat stand-in (token endpoint + small JSON), a
redis-server of its own, and the sidecar twice (store: memory, store: redis),
each pinned to CPU 0 with wrk on CPU 1. Prints a markdown table and writes
bench/results.json. Everything it starts it stops, by PID. Loopback only.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

NGINX_CONF = """
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location = /cgi-bin/stable_token {{
            default_type application/json;
            return 200 '{{"access_token":"BENCH_TOKEN_0123456789","expires_in":7200}}';
        }}
        location / {{
            default_type application/json;
            return 200 '{{"errcode":0,"errmsg":"ok","data":"small json answer"}}';
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_tools() -> None:
    missing = [tool for tool in ("wrk", "nginx", "redis-server", "taskset") if shutil.which(tool) is None
               and not Path(f"/usr/sbin/{tool}").exists()]
    if missing:
        packages = {"wrk": "wrk", "nginx": "nginx-light", "redis-server": "redis-server", "taskset": "util-linux"}
        print(f"installing {', '.join(missing)} with apt-get", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *{packages[m] for m in missing}], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def which(tool: str) -> str:
    return shutil.which(tool) or f"/usr/sbin/{tool}"


def wait_http(url: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} not ready in {timeout} s")


@contextmanager
def process(args: list[str], cpu: int | None = None, **kw) -> Iterator[subprocess.Popen[bytes]]:
    if cpu is not None and shutil.which("taskset") and os.cpu_count() and os.cpu_count() > 1:
        args = ["taskset", "-c", str(cpu), *args]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wrk(url: str, connections: int, seconds: int) -> dict[str, float]:
    out = subprocess.run(["taskset", "-c", "1", which("wrk"), "-t1", f"-c{connections}", f"-d{seconds}s",
                          "--latency", url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def ms(pct: str) -> float:
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    return {"rps": rps, "requests": total, "non_2xx": int(errors.group(1)) if errors else 0,
            "p50_ms": ms("50"), "p99_ms": ms("99")}


def sidecar_config(tmp: Path, name: str, upstream: str, store: str) -> tuple[Path, int, int]:
    port, admin = free_port(), free_port()
    path = tmp / f"{name}.yaml"
    path.write_text(f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin}}}
upstream: {{base_url: "{upstream}", timeout_s: 5}}
store: {store}
apps:
  - {{name: mp, appid: wxbench, secret: bench-secret, token_api: stable}}
""")
    return path, port, admin


def measure_sidecar(tmp: Path, name: str, upstream: str, store: str, seconds: int) -> dict[str, float]:
    path, port, admin = sidecar_config(tmp, name, upstream, store)
    env = {**os.environ, "SIDECAR_LOG_LEVEL": "warning"}
    with process([PY, "-m", "proxy", "run", "--config", str(path)], cpu=0, cwd=ROOT, env=env) as proc:
        wait_http(f"http://127.0.0.1:{admin}/readyz")
        url = f"http://127.0.0.1:{port}/cgi-bin/user/info?openid=o1"
        wrk(url, 64, 2)                                   # warm-up
        pid = proc.pid if not shutil.which("taskset") else proc.pid
        cpu0 = cpu_seconds(pid)
        result = wrk(url, 64, seconds)
        result["cpu_us_per_call"] = (cpu_seconds(pid) - cpu0) / max(1, result["requests"]) * 1e6
        result["peak_rss_mib"] = rss_mib(pid)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per scenario")
    args = parser.parse_args()
    ensure_tools()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="wts-bench-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        nginx_port, redis_port = free_port(), free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=nginx_port))
        stack.enter_context(process([which("nginx"), "-c", str(conf), "-p", str(tmp), "-g", "daemon off;"], cpu=1))
        upstream = f"http://127.0.0.1:{nginx_port}"
        wait_http(upstream + "/cgi-bin/ping")
        stack.enter_context(process([which("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1",
                                     "--save", "", "--appendonly", "no", "--dir", str(tmp)], cpu=1))
        time.sleep(0.3)

        results["upstream direct (nginx)"] = wrk(upstream + "/cgi-bin/user/info?openid=o1", 64, args.seconds)
        results["sidecar, store: memory"] = measure_sidecar(tmp, "memory", upstream, "{kind: memory}", args.seconds)
        results["sidecar, store: redis"] = measure_sidecar(
            tmp, "redis", upstream, f'{{kind: redis, url: "redis://127.0.0.1:{redis_port}/0"}}', args.seconds)

    ratio = results["sidecar, store: redis"]["rps"] / results["sidecar, store: memory"]["rps"]
    print("\n| target (64 connections) | req/s | p50 ms | p99 ms | CPU µs/call | peak RSS MiB | non-2xx |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r.get('cpu_us_per_call', float('nan')):.0f} | {r.get('peak_rss_mib', float('nan')):.1f} | {r['non_2xx']} |")
    print(f"\nstore: redis / store: memory throughput: {ratio:.3f} (target >= 0.95)")
    summary = {"results": results, "redis_over_memory": ratio,
               "targets": {"redis_over_memory>=0.95": ratio >= 0.95}}
    (ROOT / "bench" / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("written: bench/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
