"""`make bench`: the sidecar against the alternatives, in one run, on this machine.

Starts nginx as a stand-in for WeChat (token endpoint, a user/info answer of
about 300 bytes with no errcode, a 20 MiB binary, and an endpoint that
rotates tokens every 2 s), a second nginx as a proxy appending a static token
(proxy_buffering off), a minimal aiohttp proxy (bench/minimal_proxy.py, on
uvloop and with an access log, as the sidecar), a redis-server, and the
sidecar with `store: memory` and `store: redis`. Proxies are pinned to CPU 0,
wrk and the upstream to CPU 1. JSON GET throughput, CPU per call and latency
are taken in interleaved rounds (medians; ratios paired within a round, and
only from rounds where neither side had an error); redis against memory is
also run side by side on the one core; the rest once. Errors are counted in
every run. Prints a markdown table and the targets, and writes
bench/results.json. Everything it starts it stops, by PID; loopback only;
bounded in time (about four minutes at the defaults).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.ports import free_port  # noqa: E402  (one port picker for tests and bench)
PY = sys.executable
MEDIA_BYTES = 20 * 1024 * 1024
POST_BODY = json.dumps({"touser": "o", "msgtype": "text", "text": {"content": "x" * 1990}})[:2048]

NGINX_HEAD = """
worker_processes 1;
pid {tmp}/{role}.pid;
error_log {tmp}/{role}-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/{role}-body;
    proxy_temp_path {tmp}/{role}-proxy;
    fastcgi_temp_path {tmp}/{role}-fastcgi;
    uwsgi_temp_path {tmp}/{role}-uwsgi;
    scgi_temp_path {tmp}/{role}-scgi;
    keepalive_requests 1000000;
"""

# A user/info answer as WeChat sends it: about 300 bytes of JSON with no errcode.
USER_INFO = ('{"subscribe":1,"openid":"o6_bmjrPTlm6_2sgVt7hMZOPfL2M","language":"zh_CN","subscribe_time":1382694957,'
             '"unionid":"o6_bmasdasdsad6_2sgVt7hMZOPfL","remark":"","groupid":0,"tagid_list":[128,2],'
             '"subscribe_scene":"ADD_SCENE_QR_CODE","qr_scene":98765,"qr_scene_str":"","nickname":"Band"}')

# WeChat's stand-in, on the core wrk uses. Tokens carry the second they were
# issued in (T<msec>); /cgi-bin/tags/get takes a token only within the
# two-second span it was issued in and answers 40001 after that, so under
# load the sidecar meets a rotation every two seconds: a share of calls is
# answered 40001, refreshed and replayed, as when another system rotates.
# The token endpoint and the user/info answer, as every WeChat stand-in here serves them.
NGINX_TOKEN_AND_USER_INFO = """
        location = /cgi-bin/stable_token {{
            default_type application/json;
            return 200 '{{"access_token":"T$msec","expires_in":7200}}';
        }}
        location = /cgi-bin/user/info {{
            default_type application/json;
            return 200 '{user_info}';
        }}"""

NGINX_UPSTREAM = NGINX_HEAD + """
    map "$arg_access_token:$msec" $stale {{
        default 1;
        "~^T(\\d*)[01]\\.\\d+:\\1[01]\\." 0;
        "~^T(\\d*)[23]\\.\\d+:\\1[23]\\." 0;
        "~^T(\\d*)[45]\\.\\d+:\\1[45]\\." 0;
        "~^T(\\d*)[67]\\.\\d+:\\1[67]\\." 0;
        "~^T(\\d*)[89]\\.\\d+:\\1[89]\\." 0;
    }}
    server {{
        listen 127.0.0.1:{up};""" + NGINX_TOKEN_AND_USER_INFO + """
        location = /cgi-bin/media/get {{
            default_type image/jpeg;
            alias {tmp}/media.bin;
        }}
        location = /cgi-bin/ticket/getticket {{
            default_type application/json;
            return 200 '{{"errcode":0,"errmsg":"ok","ticket":"BENCH_TICKET_$arg_type","expires_in":7200}}';
        }}
        location = /cgi-bin/tags/get {{
            default_type application/json;
            if ($stale) {{
                return 200 '{{"errcode":40001,"errmsg":"invalid credential, access_token is invalid or not latest"}}';
            }}
            return 200 '{{"tags":[{{"id":2,"name":"starred","count":0}},{{"id":128,"name":"bench","count":5}}]}}';
        }}
        location / {{
            default_type application/json;
            return 200 '{{"errcode":0,"errmsg":"ok"}}';
        }}
    }}
}}
"""

# nginx appending a static token: a process of its own on the proxies' core,
# streaming answers as the sidecar does (proxy_buffering off).
NGINX_PROXY = NGINX_HEAD + """
    upstream wechat {{ server 127.0.0.1:{up}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{px};
        location / {{
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_pass http://wechat$uri?$args&access_token=STATIC_TOKEN;
        }}
    }}
}}
"""

WRK_POST = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
"""


def which(tool: str) -> str:
    return shutil.which(tool) or f"/usr/sbin/{tool}"


def ensure_tools() -> None:
    packages = {"wrk": "wrk", "nginx": "nginx-light", "redis-server": "redis-server", "taskset": "util-linux"}
    missing = [t for t in packages if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]
    if missing:
        print(f"installing {', '.join(missing)} with apt-get", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *{packages[m] for m in missing}], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def pinned(args: list[str], cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu), *args] if (os.cpu_count() or 1) > 1 else args


@contextmanager
def process(args: list[str], stop_wait: float = 10, **kw) -> Iterator[subprocess.Popen[bytes]]:
    """A process that gets SIGTERM on the way out, and SIGKILL after `stop_wait` s."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    try:
        yield proc
    finally:
        stop(proc, stop_wait)


def stop(proc: subprocess.Popen[bytes], stop_wait: float = 10) -> None:
    """SIGTERM, then SIGKILL after `stop_wait` s: only a process we started, by its handle."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(stop_wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_http(url: str, timeout: float = 15) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return time.monotonic() - started
        except OSError:
            time.sleep(0.005)
    raise RuntimeError(f"{url} not ready in {timeout} s")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mem_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def wrk_args(url: str, connections: int, seconds: int, script: Path | None = None) -> list[str]:
    args = [which("wrk"), "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s"]
    if script:
        args += ["-s", str(script)]
    return pinned(args + [url], 1)


def wrk(url: str, connections: int, seconds: int, script: Path | None = None) -> dict[str, float]:
    out = subprocess.run(wrk_args(url, connections, seconds, script), capture_output=True, text=True,
                         check=True).stdout
    return parse_wrk(out)


def wrk_together(urls: list[str], connections: int, seconds: int) -> list[dict[str, float]]:
    """One wrk per URL, all at the same time."""
    procs = [subprocess.Popen(wrk_args(url, connections, seconds), stdout=subprocess.PIPE, text=True)
             for url in urls]
    return [parse_wrk(proc.communicate(timeout=seconds + 30)[0]) for proc in procs]


def parse_wrk(out: str) -> dict[str, float]:

    def ms(pct: str) -> float:
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else float("nan")

    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    mib_s = float(transfer.group(1)) * {"B": 1 / 2**20, "KB": 1 / 1024, "MB": 1, "GB": 1024}[transfer.group(2)] \
        if transfer else 0.0
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "non_2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": sum(map(int, socket_errors.groups())) if socket_errors else 0,
            "p50_ms": ms("50"), "p99_ms": ms("99"), "mib_s": mib_s}


class Target:
    """One thing measured. Throughput, CPU and latency are measured in rounds
    that go over every target in turn, so a slow spell of the machine hits
    all targets alike; each figure is the median over the rounds."""

    def __init__(self, name: str, base: str, pid: int | None):
        self.name, self.base, self.pid = name, base, pid
        self.get = f"{base}/cgi-bin/user/info?openid=o1"
        self.r: dict[str, float] = {}
        self.rounds: dict[str, list[float]] = {"get_rps": [], "cpu_us_per_call": [], "p50_ms": [], "p99_ms": []}
        self.round_errors: list[int] = []   # per round: a ratio is never taken from a round with errors
        self.errors = 0

    def _count(self, res: dict[str, float]) -> int:
        errors = int(res["non_2xx"] + res["socket_errors"])
        self.errors += errors
        return errors

    def warm_up(self) -> None:
        wrk(self.get, 64, 2)

    def throughput_round(self, seconds: int) -> None:
        cpu0 = cpu_seconds(self.pid) if self.pid else 0.0
        res = wrk(self.get, 64, seconds)
        self.rounds["get_rps"].append(res["rps"])
        self.round_errors.append(self._count(res))
        if self.pid:
            self.rounds["cpu_us_per_call"].append((cpu_seconds(self.pid) - cpu0) / max(1, res["requests"]) * 1e6)

    def latency_round(self, seconds: int) -> None:
        lat = wrk(self.get, 4, seconds)
        self.rounds["p50_ms"].append(lat["p50_ms"])
        self.rounds["p99_ms"].append(lat["p99_ms"])
        self.round_errors[-1] += self._count(lat)

    def once(self, seconds: int, post_script: Path) -> None:
        """POST throughput, peak RSS, then the binary downloads (which move RSS)."""
        res = wrk(f"{self.base}/cgi-bin/message/custom/send", 64, seconds, post_script)
        self.r["post_rps"] = res["rps"] if not self._count(res) else float("nan")
        if self.pid:
            self.r["peak_rss_mib"] = mem_kib(self.pid, "VmHWM") / 1024
        before = mem_kib(self.pid, "VmRSS") if self.pid else 0
        res = wrk(f"{self.base}/cgi-bin/media/get?media_id=M1", 16, seconds)
        self.r["binary_mib_s"] = res["mib_s"] if not self._count(res) else float("nan")
        if self.pid:
            self.r["binary_rss_growth_mib"] = (mem_kib(self.pid, "VmHWM") - before) / 1024

    def rotation(self, seconds: int, metrics_url: str) -> None:
        """JSON GET while the upstream rotates the token every 2 s: the
        sidecar's throughput with its replays, and how many calls were
        replayed. Every call must still end 200 with WeChat's answer."""
        before = replays(metrics_url)
        res = wrk(f"{self.base}/cgi-bin/tags/get", 64, seconds)
        self.r["rotation_rps"] = res["rps"] if not self._count(res) else float("nan")
        self.r["replayed_share"] = (replays(metrics_url) - before) / max(1, res["requests"])

    def local_answers(self, seconds: int) -> None:
        """The calls the sidecar answers itself (no upstream): getticket and
        /sidecar/jssdk, against a forwarded JSON GET measured right before."""
        forwarded = wrk(self.get, 64, seconds)
        ticket = wrk(f"{self.base}/cgi-bin/ticket/getticket?type=jsapi", 64, seconds)
        signed = wrk(f"{self.base}/sidecar/jssdk?url=https%3A%2F%2Fshop.example.com%2Fitem%3Fid%3D7", 64, seconds)
        if not (self._count(forwarded) or self._count(ticket) or self._count(signed)):
            self.r["getticket_vs_forwarded"] = ticket["rps"] / forwarded["rps"]
            self.r["jssdk_vs_forwarded"] = signed["rps"] / forwarded["rps"]

    def summarise(self) -> None:
        for key, values in self.rounds.items():
            if values:
                self.r[key] = statistics.median(values)
        self.r["errors"] = self.errors


def replays(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("wts_replays_total"))


TUNNEL = "sidecar through a CONNECT proxy"


def by_name(targets: list["Target"], name: str) -> "Target":
    return next(t for t in targets if t.name == name)


def sidecar_config(tmp: Path, name: str, upstream: str, store: str, extra: str = "") -> tuple[Path, int, int]:
    port, admin = free_port(), free_port()
    path = tmp / f"{name}.yaml"
    path.write_text(f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin}}}
upstream: {{base_url: "{upstream}", timeout_s: 15{extra}}}
store: {store}
apps:
  - {{name: mp, appid: wxbench, secret: bench-secret, token_api: stable}}
""")
    return path, port, admin


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=3, help="wrk duration per measurement")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of the throughput and latency runs")
    args = parser.parse_args()
    ensure_tools()
    targets: list[Target] = []
    startup_s: list[float] = []
    admins: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="wts-bench-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)                      # nginx's workers run as an unprivileged user
        (tmp / "media.bin").write_bytes(os.urandom(MEDIA_BYTES))
        (tmp / "media.bin").chmod(0o644)
        post_script = tmp / "post.lua"
        post_script.write_text(WRK_POST.format(body=json.dumps(POST_BODY)))
        up, px, redis_port = free_port(), free_port(), free_port()
        for role, template, cpu in (("upstream", NGINX_UPSTREAM, 1), ("proxy", NGINX_PROXY, 0)):
            conf = tmp / f"nginx-{role}.conf"
            conf.write_text(template.format(tmp=tmp, role=role, up=up, px=px, user_info=USER_INFO))
            stack.enter_context(process(pinned([which("nginx"), "-c", str(conf), "-p", str(tmp),
                                                "-g", "daemon off;"], cpu)))
        upstream = f"http://127.0.0.1:{up}"
        wait_http(upstream + "/cgi-bin/ping")
        wait_http(f"http://127.0.0.1:{px}/cgi-bin/ping")
        stack.enter_context(process(pinned([which("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1",
                                            "--save", "", "--appendonly", "no", "--dir", str(tmp)], 1)))
        env = {**os.environ}
        targets.append(Target("upstream direct (nginx)", upstream, None))
        nginx_proxy = Target("nginx appending a static token", f"http://127.0.0.1:{px}", None)
        targets.append(nginx_proxy)

        min_port = free_port()
        minimal = stack.enter_context(process(pinned([PY, str(ROOT / "bench" / "minimal_proxy.py"), upstream,
                                                      str(min_port)], 0), env=env))
        wait_http(f"http://127.0.0.1:{min_port}/cgi-bin/ping")
        targets.append(Target("minimal aiohttp proxy", f"http://127.0.0.1:{min_port}", minimal.pid))

        for name, store in (("memory", "{kind: memory}"),
                            ("redis", f'{{kind: redis, url: "redis://127.0.0.1:{redis_port}/0"}}')):
            path, port, admin = sidecar_config(tmp, name, upstream, store)
            proc = stack.enter_context(process(pinned([PY, "-m", "proxy", "run", "--config", str(path)], 0),
                                               cwd=ROOT, env=env))
            startup_s.append(wait_http(f"http://127.0.0.1:{admin}/readyz"))
            targets.append(Target(f"sidecar, store: {name}", f"http://127.0.0.1:{port}", proc.pid))
            admins[targets[-1].name] = f"http://127.0.0.1:{admin}/metrics"

        # The same sidecar behind a corporate egress: every connection an HTTP
        # CONNECT tunnel through a proxy process (pinned beside nginx), to a
        # host name only the proxy can resolve.
        cx = free_port()
        stack.enter_context(process(pinned([PY, str(ROOT / "bench" / "connect_proxy.py"), str(cx), "wechat.bench",
                                            str(up), str(up)], 1), env=env))
        time.sleep(0.5)
        path, port, admin = sidecar_config(tmp, "tunnel", f"http://wechat.bench:{up}", "{kind: memory}",
                                           extra=f', proxy: "http://127.0.0.1:{cx}"')
        proc = stack.enter_context(process(pinned([PY, "-m", "proxy", "run", "--config", str(path)], 0),
                                           cwd=ROOT, env=env))
        wait_http(f"http://127.0.0.1:{admin}/readyz")
        targets.append(Target(TUNNEL, f"http://127.0.0.1:{port}", proc.pid))

        for target in targets:
            target.warm_up()
        for n in range(args.rounds):
            # Every other round runs backwards: the speed of this kind of
            # machine drifts within minutes (a fixed Python loop was seen
            # taking 0.28 to 0.51 s), and a fixed order would favour the first.
            order = targets if n % 2 == 0 else targets[::-1]
            print(f"round {n + 1}/{args.rounds}: JSON GET at 64 and at 4 connections", flush=True)
            for target in order:
                target.throughput_round(args.seconds)
            for target in order:
                target.latency_round(args.seconds)
        # store: redis against store: memory, both at once on the same core:
        # whatever the machine's speed does, it does to both, and the ratio of
        # their throughputs is the ratio of their costs per call.
        memory, redis = by_name(targets, "sidecar, store: memory"), by_name(targets, "sidecar, store: redis")
        together: list[float] = []
        for n in range(args.rounds):
            print(f"redis and memory side by side {n + 1}/{args.rounds}", flush=True)
            pair = [memory, redis] if n % 2 == 0 else [redis, memory]
            res = dict(zip((t.name for t in pair), wrk_together([t.get for t in pair], 32, args.seconds),
                           strict=True))
            bad = sum(r["non_2xx"] + r["socket_errors"] for r in res.values())
            memory.errors += bad
            if not bad:                    # no ratio from a round with errors
                together.append(res[redis.name]["rps"] / res[memory.name]["rps"])
        print("POST and binary downloads", flush=True)
        for target in targets:
            target.once(args.seconds, post_script)
            if target.name in admins:
                print(f"{target.name}: a token rotation every 2 s", flush=True)
                target.rotation(args.seconds, admins[target.name])
                print(f"{target.name}: getticket and /sidecar/jssdk answered locally", flush=True)
                target.local_answers(args.seconds)
            target.summarise()

    by = {t.name: t.r for t in targets}
    rounds = {t.name: t.rounds for t in targets}
    side, mini = by["sidecar, store: memory"], by["minimal aiohttp proxy"]
    ngx = by["nginx appending a static token"]

    errors = {t.name: t.round_errors for t in targets}
    clean_rounds: list[int] = []

    def paired(key: str, a: str, b: str, op) -> float:  # type: ignore[no-untyped-def]
        """The median over rounds of a figure taken within each round, from
        the rounds where neither side had an error (NaN when none: a ratio
        from a round with errors is no figure, and the target is missed)."""
        values = [op(x, y) for x, y, ea, eb in zip(rounds[a][key], rounds[b][key], errors[a], errors[b], strict=True)
                  if ea == 0 and eb == 0]
        clean_rounds.append(len(values))
        return statistics.median(values) if values else float("nan")

    SIDE, MINI, DIRECT, NGX = ("sidecar, store: memory", "minimal aiohttp proxy", "upstream direct (nginx)",
                               "nginx appending a static token")
    ratio, minus = (lambda x, y: x / y), (lambda x, y: x - y)
    figures = {
        "throughput vs minimal aiohttp proxy (target >= 2.0)": paired("get_rps", SIDE, MINI, ratio),
        "CPU per call vs minimal aiohttp proxy (target <= 0.5)": paired("cpu_us_per_call", SIDE, MINI, ratio),
        "throughput vs nginx static-token proxy (figure)": paired("get_rps", SIDE, NGX, ratio),
        "added p50 latency at 4 connections, ms (target < 0.4)": paired("p50_ms", SIDE, DIRECT, minus),
        "added p99 latency at 4 connections, ms (target < 1.5)": paired("p99_ms", SIDE, DIRECT, minus),
        "peak RSS vs minimal aiohttp proxy (target <= 1.15)": side["peak_rss_mib"] / mini["peak_rss_mib"],
        "RSS growth over 16 x 20 MiB downloads, MiB (target < 16)": side["binary_rss_growth_mib"],
        "binary throughput vs nginx proxy (target >= 0.5)": side["binary_mib_s"] / ngx["binary_mib_s"],
        "start-up to ready, s (target < 1)": max(startup_s),
        "store: redis / store: memory throughput, side by side on one core (target >= 0.95)":
            statistics.median(together) if together else float("nan"),
        "store: redis / store: memory throughput, one after the other (figure)":
            paired("get_rps", "sidecar, store: redis", SIDE, ratio),
        "getticket answered locally / forwarded JSON GET throughput (target >= 1.0)":
            side.get("getticket_vs_forwarded", float("nan")),
        "/sidecar/jssdk / forwarded JSON GET throughput (target >= 1.0)":
            side.get("jssdk_vs_forwarded", float("nan")),
        "sidecar CPU per call through a CONNECT tunnel / direct (target <= 1.2)":
            paired("cpu_us_per_call", TUNNEL, SIDE, ratio),
    }
    targets_met = {
        "throughput_2x": figures["throughput vs minimal aiohttp proxy (target >= 2.0)"] >= 2.0,
        "cpu_half": figures["CPU per call vs minimal aiohttp proxy (target <= 0.5)"] <= 0.5,
        "p50_added_under_0.4ms": figures["added p50 latency at 4 connections, ms (target < 0.4)"] < 0.4,
        "p99_added_under_1.5ms": figures["added p99 latency at 4 connections, ms (target < 1.5)"] < 1.5,
        "rss_1.15x": figures["peak RSS vs minimal aiohttp proxy (target <= 1.15)"] <= 1.15,
        "binary_rss_under_16mib": figures["RSS growth over 16 x 20 MiB downloads, MiB (target < 16)"] < 16,
        "binary_half_nginx": figures["binary throughput vs nginx proxy (target >= 0.5)"] >= 0.5,
        "startup_under_1s": figures["start-up to ready, s (target < 1)"] < 1,
        "getticket_as_fast_as_forwarded": figures[
            "getticket answered locally / forwarded JSON GET throughput (target >= 1.0)"] >= 1.0,
        "jssdk_as_fast_as_forwarded": figures["/sidecar/jssdk / forwarded JSON GET throughput (target >= 1.0)"] >= 1.0,
        "tunnel_cpu_1.2x": figures["sidecar CPU per call through a CONNECT tunnel / direct (target <= 1.2)"] <= 1.2,
        "redis_0.95": figures["store: redis / store: memory throughput, side by side on one core (target >= 0.95)"]
        >= 0.95,
    }

    def f(value: float | None, spec: str) -> str:
        return "" if value is None else format(value, spec)

    def replayed(share: float | None) -> str:
        return "" if share is None else f" ({share:.2%})"

    print("\n| target | JSON GET req/s (64 conn) | JSON POST 2 KiB req/s | p50 / p99 ms (4 conn) "
          "| CPU µs/call | peak RSS MiB | 16 × 20 MiB downloads MiB/s | rotation every 2 s req/s (replayed) "
          "| errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in targets:
        r = t.r
        print(f"| {t.name} | {r['get_rps']:,.0f} | {r['post_rps']:,.0f} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} "
              f"| {f(r.get('cpu_us_per_call'), '.0f')} | {f(r.get('peak_rss_mib'), '.1f')} "
              f"| {f(r.get('binary_mib_s'), ',.0f')} "
              f"| {f(r.get('rotation_rps'), ',.0f')}{replayed(r.get('replayed_share'))} "
              f"| {int(r['errors'])} |")
    print()
    for name, value in figures.items():
        print(f"- {name}: {value:.3f}")
    print(f"\ntargets met: {sum(targets_met.values())}/{len(targets_met)} "
          f"({', '.join(k for k, v in targets_met.items() if not v) or 'all'} missed)"
          if not all(targets_met.values()) else f"\ntargets met: all {len(targets_met)}")
    print(f"(medians of {args.rounds} interleaved rounds of {args.seconds} s; ratios paired within each round; "
          f"rounds without errors used: {min(clean_rounds)}-{max(clean_rounds)} of {args.rounds})")
    (ROOT / "bench" / "results.json").write_text(json.dumps(
        {"results": by, "rounds": rounds, "redis_memory_side_by_side": together, "figures": figures,
         "targets_met": targets_met, "round_errors": errors,
         "seconds": args.seconds}, indent=2) + "\n")
    print("written: bench/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
