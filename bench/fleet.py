"""`make scale` (first part): a fleet of sidecars on one Redis.

N sidecar processes (default 20, bounded for a 2-core machine), each with M
apps (default 50), share one real redis-server; the simulator (its own
process) rotates every app's token every few seconds, as another system
would, while a steady trickle of calls reaches every app through random
sidecars. Printed:
  - fetches per app per rotation (target: exactly 1 for each app called
    after the rotation, whichever sidecars saw it), failed calls (target 0),
    token errors that reached an app (target 0);
  - Redis commands per sidecar per minute, idle and under load (INFO
    commandstats, our own INFO calls left out), Redis connections per
    sidecar, RSS per sidecar;
  - an extrapolation to 1,000 pods.
Everything runs on 127.0.0.1, is bounded in time, and is stopped by PID.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import free_port, mem_kib, stop  # noqa: E402  (make bench's helpers)






def appid(n: int) -> str:
    return f"wx{n:016x}"


def sidecar_config(path: Path, port: int, admin: int, sim: str, redis_port: int, apps: int) -> None:
    lines = [f"listen: {{host: 127.0.0.1, port: {port}}}",
             f"admin:  {{host: 127.0.0.1, port: {admin}}}",
             f'upstream: {{base_url: "{sim}", timeout_s: 10}}',
             f'store: {{kind: redis, url: "redis://127.0.0.1:{redis_port}/0", key_prefix: "fleet:"}}',
             "log: {level: warning, access: false}",
             "apps:"]
    for n in range(apps):
        lines.append(f"  - {{name: a{n}, appid: {appid(n)}, secret: fleet-secret-{n}, token_api: stable}}")
    path.write_text("\n".join(lines) + "\n")


class Redis:
    """INFO and CLIENT LIST over redis-cli: the benchmark's own calls are few and counted."""

    def __init__(self, port: int):
        self.cli = shutil.which("redis-cli") or "redis-cli"
        self.port = port

    def run(self, *args: str) -> str:
        return subprocess.run([self.cli, "-p", str(self.port), *args], capture_output=True, text=True,
                              timeout=10).stdout

    def by_command(self) -> dict[str, int]:
        """Commands served so far, by command; INFO and CLIENT (ours) left out."""
        out = {}
        for line in self.run("INFO", "commandstats").splitlines():
            if line.startswith("cmdstat_") and not line.startswith(("cmdstat_info:", "cmdstat_client|")):
                out[line[8:].split(":")[0]] = int(line.split("calls=")[1].split(",")[0])
        return out

    def commands(self) -> int:
        return sum(self.by_command().values())

    def clients(self) -> int:
        return sum(1 for line in self.run("CLIENT", "LIST").splitlines() if "cmd=client" not in line)


async def fetch_counts(http: aiohttp.ClientSession, sim: str) -> dict[str, int]:
    async with http.get(sim + "/_sim/stats") as resp:
        return (await resp.json())["fetches"]


async def run(args: argparse.Namespace) -> dict:
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    results: dict = {"sidecars": args.sidecars, "apps": args.apps, "rotate_every_s": args.rotate_every}
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="wts-fleet-") as tmp_name:
        tmp = Path(tmp_name)
        redis_port, sim_port = free_port(), free_port()
        redis_proc = subprocess.Popen([redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)
        sim_proc = subprocess.Popen([PY, "-m", "proxy.simulator", "--port", str(sim_port),
                                     "--accounts", str(args.apps)], cwd=ROOT)
        sim = f"http://127.0.0.1:{sim_port}"
        redis = Redis(redis_port)
        sidecars: list[tuple[str, str, subprocess.Popen[bytes]]] = []
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30),
                                             connector=aiohttp.TCPConnector(limit=200)) as http:
                for _ in range(500):
                    try:
                        await fetch_counts(http, sim)
                        break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.02)
                for i in range(args.sidecars):
                    port, admin = free_port(), free_port()
                    path = tmp / f"sidecar{i}.yaml"
                    sidecar_config(path, port, admin, sim, redis_port, args.apps)
                    log = open(tmp / f"sidecar{i}.log", "wb")
                    proc = subprocess.Popen([PY, "-m", "proxy", "run", "--config", str(path)], cwd=ROOT,
                                            stdout=log, stderr=subprocess.STDOUT)
                    procs.append(proc)
                    sidecars.append((f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", proc))
                began = time.monotonic()
                for _, admin, proc in sidecars:
                    while True:
                        if proc.poll() is not None:
                            raise SystemExit(f"a sidecar exited: see {tmp}")
                        try:
                            async with http.get(admin + "/readyz") as resp:
                                if resp.status == 200:
                                    break
                        except aiohttp.ClientError:
                            pass
                        await asyncio.sleep(0.05)
                results["fleet_ready_s"] = round(time.monotonic() - began, 1)
                results["startup_fetches"] = sum((await fetch_counts(http, sim)).values())

                # Idle: nothing but the sidecars' own upkeep.
                await asyncio.sleep(2)
                before, t0 = redis.commands(), time.monotonic()
                await asyncio.sleep(args.idle)
                idle = redis.commands() - before
                results["redis_commands_per_sidecar_per_min_idle"] = round(
                    idle / args.sidecars / ((time.monotonic() - t0) / 60), 1)
                results["redis_connections_per_sidecar"] = round(redis.clients() / args.sidecars, 2)

                # Load: rotations and a trickle of calls to every app.
                failed = token_errors = calls = 0
                per_rotation: list[int] = []        # fetches of one app in one rotation period, apps called
                counts = await fetch_counts(http, sim)
                before, t0 = redis.commands(), time.monotonic()
                end = t0 + args.load

                async def one_call(n: int) -> None:
                    nonlocal failed, token_errors, calls
                    base = random.choice(sidecars)[0]
                    calls += 1
                    try:
                        async with http.get(f"{base}/a{n}/cgi-bin/user/info?openid=o") as resp:
                            body = await resp.json(content_type=None)
                            if resp.status != 200 or body.get("errcode") != 0:
                                failed += 1
                            if body.get("errcode") in (40001, 40014, 42001) or \
                                    resp.headers.get("X-Sidecar-Upstream-Errcode"):
                                token_errors += 1
                    except aiohttp.ClientError:
                        failed += 1

                rotations = 0
                while time.monotonic() + args.rotate_every <= end:
                    await asyncio.gather(*(http.post(f"{sim}/_sim/rotate?appid={appid(n)}&api=stable&grace_s=0")
                                           for n in range(args.apps)))
                    rotations += 1
                    period_end = time.monotonic() + args.rotate_every
                    # Each app is called args.calls_per_app times in the period, at random moments.
                    moments = sorted((random.uniform(0, args.rotate_every * 0.8), n)
                                     for n in range(args.apps) for _ in range(args.calls_per_app))
                    start = time.monotonic()
                    tasks = []
                    for at, n in moments:
                        delay = start + at - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                        tasks.append(asyncio.create_task(one_call(n)))
                    await asyncio.gather(*tasks)
                    await asyncio.sleep(max(0.0, period_end - time.monotonic()))
                    now_counts = await fetch_counts(http, sim)
                    for n in range(args.apps):
                        key = f"stable:{appid(n)}"
                        per_rotation.append(now_counts.get(key, 0) - counts.get(key, 0))
                    counts = now_counts
                load_commands = redis.commands() - before
                results["redis_commands_by_kind_total"] = redis.by_command()
                minutes = (time.monotonic() - t0) / 60
                results.update({
                    "rotations": rotations, "calls": calls, "failed_calls": failed,
                    "token_errors_reaching_apps": token_errors,
                    "fetches_per_app_per_rotation": {str(k): per_rotation.count(k) for k in sorted(set(per_rotation))},
                    "redis_commands_per_sidecar_per_min_load": round(load_commands / args.sidecars / minutes, 1),
                    "calls_per_s": round(calls / (minutes * 60), 1),
                })
                rss = [mem_kib(proc.pid, "VmRSS") for _, _, proc in sidecars]
                results["rss_per_sidecar_mib"] = {"median": round(statistics.median(rss) / 1024, 1),
                                                  "max": round(max(rss) / 1024, 1)}
        finally:
            for proc in procs:
                stop(proc)
            stop(sim_proc)
            stop(redis_proc)
    pods = 1000
    results["extrapolated_to_1000_pods"] = {
        "redis_connections": round(results["redis_connections_per_sidecar"] * pods),
        "redis_commands_per_s_idle": round(results["redis_commands_per_sidecar_per_min_idle"] * pods / 60, 1),
        "redis_commands_per_s_load": round(results["redis_commands_per_sidecar_per_min_load"] * pods / 60, 1),
    }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sidecars", type=int, default=20)
    parser.add_argument("--apps", type=int, default=50)
    parser.add_argument("--rotate-every", type=float, default=5.0)
    parser.add_argument("--calls-per-app", type=int, default=2, help="calls to each app per rotation period")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of the idle measurement")
    parser.add_argument("--load", type=float, default=60.0, help="seconds of rotations and calls")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    print(json.dumps(results, indent=2))
    spread = results["fetches_per_app_per_rotation"]
    checks = {
        "exactly 1 fetch per app per rotation": set(spread) == {"1"},
        "no failed call": results["failed_calls"] == 0,
        "no token error reached an app": results["token_errors_reaching_apps"] == 0,
    }
    for name, met in checks.items():
        print(f"{'met    ' if met else 'MISSED '} {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
