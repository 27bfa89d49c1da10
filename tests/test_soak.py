"""Soak: mixed calls (JSON GET/POST, binary downloads, multipart uploads)
through a sidecar process while the token rotates every 2 s, memory sampled.
`make test` runs it for a few seconds; `make soak` for two minutes
(SOAK_SECONDS). Loopback only; bounded in time; stops by itself."""
from __future__ import annotations

import asyncio
import hashlib
import os
import statistics

import aiohttp

from proxy.simulator import media_bytes

from .conftest import APPID, free_port, sidecar_yaml

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "8"))
ROTATE_EVERY_S = 2.0
WORKERS = 8
MEDIA_SIZE = 256 * 1024
MEDIA_SHA = hashlib.sha256(b"".join(media_bytes("SOAK", MEDIA_SIZE))).hexdigest()
UPLOAD = bytes(range(256)) * 256   # 64 KiB


async def one_call(http: aiohttp.ClientSession, base: str, kind: int) -> str | None:
    """One call of the mix; None when it succeeded, else what went wrong."""
    if kind == 0:
        async with http.get(f"{base}/cgi-bin/user/info?openid=o") as r:
            body = await r.json()
            return None if r.status == 200 and body["errcode"] == 0 else f"GET {r.status} {body}"
    if kind == 1:
        async with http.post(f"{base}/cgi-bin/message/custom/send", data=b'{"touser":"o"}') as r:
            body = await r.json()
            return None if r.status == 200 and body["errcode"] == 0 else f"POST {r.status} {body}"
    if kind == 2:
        async with http.get(f"{base}/cgi-bin/media/get?media_id=SOAK&size={MEDIA_SIZE}") as r:
            data = await r.read()
            ok = r.status == 200 and hashlib.sha256(data).hexdigest() == MEDIA_SHA
            return None if ok else f"media {r.status} {data[:100]!r}"
    form = aiohttp.FormData()
    form.add_field("media", UPLOAD, filename="a.jpg", content_type="image/jpeg")
    async with http.post(f"{base}/cgi-bin/media/upload?type=image", data=form) as r:
        body = await r.json()
        return None if r.status == 200 and "media_id" in body else f"upload {r.status} {body}"


async def test_soak_mixed_calls_with_rotating_tokens(sim, spawn):
    port, admin = free_port(), free_port()
    proc = spawn(sidecar_yaml(sim.url, listen_port=port, admin_port=admin, min_refresh_interval_s=0.5))
    await proc.wait_ready(f"http://127.0.0.1:{admin}")
    base = f"http://127.0.0.1:{port}"
    loop = asyncio.get_running_loop()
    end = loop.time() + SOAK_SECONDS
    failures: list[str] = []
    counts = [0, 0, 0, 0]
    samples: list[tuple[float, int]] = []

    async def worker(n: int, http: aiohttp.ClientSession) -> None:
        i = n
        while loop.time() < end:
            kind = i % 4
            problem = await one_call(http, base, kind)
            counts[kind] += 1
            if problem:
                failures.append(problem)
            i += 1

    async def rotator() -> int:
        rotations = 0
        while loop.time() + ROTATE_EVERY_S < end:
            await asyncio.sleep(ROTATE_EVERY_S)
            sim.rotate(APPID, "stable", grace_s=0)
            rotations += 1
        return rotations

    async def sampler() -> None:
        while loop.time() < end:
            samples.append((loop.time(), proc.rss_kib()))
            await asyncio.sleep(0.25)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        results = await asyncio.gather(rotator(), sampler(), *(worker(n, http) for n in range(WORKERS)))
    rotations = results[0]

    assert failures == [], failures[:5]
    assert min(counts) > 10, counts
    assert rotations >= SOAK_SECONDS / ROTATE_EVERY_S - 2
    # every rotation cost one fetch at most (all calls that saw it shared one)
    assert sim.fetch_count() <= 1 + rotations
    # memory: after a warm-up fifth, the last quarter stays within 10 % of the second fifth
    rss = [kib for _, kib in samples]
    fifth = max(1, len(rss) // 5)
    baseline = statistics.median(rss[fifth:2 * fifth])
    tail = statistics.median(rss[-max(1, len(rss) // 4):])
    growth = (tail - baseline) / baseline
    print(f"soak {SOAK_SECONDS:.0f} s: calls {counts}, rotations {rotations}, fetches {sim.fetch_count()}, "
          f"RSS {baseline / 1024:.1f} -> {tail / 1024:.1f} MiB ({growth:+.1%}), peak {max(rss) / 1024:.1f} MiB")
    assert growth < 0.10, f"RSS grew {growth:.1%}"
    assert proc.proc.poll() is None
