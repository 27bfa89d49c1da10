"""`make bench-pushes`: pushes per second through the callbacks listener, in
plaintext and in safe mode, and the latency the sidecar adds to a push.

A sidecar (`python -m proxy run`, store: memory) delivers to a small aiohttp
app in its own process that answers `success`. A Python client sends N
distinct pushes (each its own MsgId and nonce, signed, and encrypted in safe
mode, as WeChat sends them) at a fixed concurrency; the same messages are
also sent straight to the app: the difference of the two latency
percentiles is what the sidecar adds (verify, decrypt, take once, deliver,
answer). The client is Python too, so the rates are the pair's, not the
sidecar's alone; the sidecar's own CPU per push is counted from /proc.
Loopback only; everything it starts it stops, by PID; about 30 seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import run as bench  # noqa: E402  (process, pinned, wait_http, cpu_seconds, free_port)

from proxy.wechat.crypto import MessageCrypto, plain_signature, signature  # noqa: E402

APPID, TOKEN, AES_KEY = "wxbenchpush00001", "bench-push-token", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"

RECEIVER = """
import sys
from aiohttp import web
async def ok(request):
    await request.read()
    return web.Response(text="success")
app = web.Application()
app.router.add_post("/wechat", ok)
app.router.add_get("/ping", lambda r: web.Response(text="ok"))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def message(n: int) -> bytes:
    return (f"<xml><ToUserName><![CDATA[gh_bench]]></ToUserName><FromUserName><![CDATA[oBenchUser]]></FromUserName>"
            f"<CreateTime>{int(time.time())}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
            f"<Content><![CDATA[message number {n}]]></Content><MsgId>{10 ** 12 + n}</MsgId></xml>").encode()


def pushes(count: int, safe: bool, offset: int) -> list[tuple[str, bytes, bytes]]:
    crypto = MessageCrypto(TOKEN, AES_KEY, APPID)
    out = []
    for n in range(offset, offset + count):
        body = message(n)
        ts, nonce = str(int(time.time())), f"{n}"
        query = f"signature={plain_signature(TOKEN, ts, nonce)}&timestamp={ts}&nonce={nonce}&openid=oBenchUser"
        wire = body
        if safe:
            encrypt = crypto.encrypt(body)
            query += f"&encrypt_type=aes&msg_signature={signature(TOKEN, ts, nonce, encrypt)}"
            wire = f"<xml><ToUserName><![CDATA[gh_bench]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>".encode()
        out.append((query, wire, body))
    return out


async def send(url: str, items: list[tuple[str, bytes]], concurrency: int) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors = 0
    queue = list(items)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker() -> None:
            nonlocal errors
            while queue:
                query, body = queue.pop()
                started = time.perf_counter()
                async with session.post(f"{url}?{query}" if query else url, data=body) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies, errors


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wts-pushes-") as tmp_name:
        tmp = Path(tmp_name)
        rx_port, port, admin, callbacks = (bench.free_port() for _ in range(4))
        config = tmp / "sidecar.yaml"
        config.write_text(f"""
listen: {{host: 127.0.0.1, port: {port}}}
admin: {{host: 127.0.0.1, port: {admin}}}
upstream: {{base_url: "http://127.0.0.1:9", timeout_s: 5}}
callbacks: {{host: 127.0.0.1, port: {callbacks}}}
log: {{access: false}}
apps:
  - name: mp
    appid: {APPID}
    secret: unused
    push: {{token: {TOKEN}, encoding_aes_key: {AES_KEY}, deliver_to: "http://127.0.0.1:{rx_port}/wechat"}}
""")
        with bench.process(bench.pinned([bench.PY, "-c", RECEIVER, str(rx_port)], 1)), \
                bench.process(bench.pinned([bench.PY, "-m", "proxy", "run", "--config", str(config)], 0),
                              cwd=bench.ROOT) as sidecar:
            bench.wait_http(f"http://127.0.0.1:{rx_port}/ping")
            bench.wait_http(f"http://127.0.0.1:{admin}/healthz")
            rows = []
            offset = 0
            for mode in ("plaintext", "safe"):
                items = pushes(args.count, mode == "safe", offset)
                offset += args.count
                direct = asyncio.run(send(f"http://127.0.0.1:{rx_port}/wechat", [("", b) for _, _, b in items],
                                          args.concurrency))
                cpu0 = bench.cpu_seconds(sidecar.pid)
                through = asyncio.run(send(f"http://127.0.0.1:{callbacks}/wechat/mp", [(q, w) for q, w, _ in items],
                                           args.concurrency))
                cpu = bench.cpu_seconds(sidecar.pid) - cpu0
                rows.append((mode, args.count / through[0], pct(through[1], 50), pct(through[1], 99),
                             pct(through[1], 99) - pct(direct[1], 99), cpu / args.count * 1e6, through[2] + direct[2]))
    print(f"\n{args.count} pushes per mode, {args.concurrency} at a time\n")
    print("| mode | pushes/s | p50 ms | p99 ms | p99 added vs straight to the app, ms | sidecar CPU µs/push | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, rate, p50, p99, added, cpu_us, errors in rows:
        print(f"| {mode} | {rate:,.0f} | {p50:.2f} | {p99:.2f} | {added:.2f} | {cpu_us:.0f} | {errors} |")
    return 0 if all(r[-1] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
