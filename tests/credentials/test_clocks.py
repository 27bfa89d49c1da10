"""A replica's wall clock is never the truth of a token's life (issue: NTP
steps, paused VMs, nodes hours apart). Two sidecar processes on one real
redis-server, one of them under libfaketime whose offset a control file
changes while it runs (FAKETIME_TIMESTAMP_FILE, FAKETIME_NO_CACHE); the
monotonic clock stays real (FAKETIME_DONT_FAKE_MONOTONIC), as it does on a
host whose wall clock is stepped."""
from __future__ import annotations

import asyncio
import glob
import re

import pytest

from ..conftest import APPID, free_port, sidecar_yaml
from .test_redis_store import Replica

LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))), None)
TTL_S = 60


def faketime_env(control) -> dict[str, str]:
    return {"LD_PRELOAD": LIBFAKETIME or "", "FAKETIME_TIMESTAMP_FILE": str(control), "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


async def token_answer(http, replica: Replica) -> dict:
    async with http.get(f"{replica.base}/cgi-bin/token?grant_type=client_credential") as resp:
        assert resp.status == 200
        return await resp.json()


def pttl_ms(redis_server) -> int:
    keys = [k for k in re.findall(rb"t:token:\{[^\r\n]*\}", redis_server.command("KEYS", "t:token:*"))]
    assert len(keys) == 1, keys
    reply = redis_server.command("PTTL", keys[0].decode())
    return int(reply[1:].strip())


@pytest.fixture
def faketime_control(tmp_path):
    if LIBFAKETIME is None:
        pytest.skip("libfaketime is not installed (Debian: faketime); make test's setup installs it")
    control = tmp_path / "faketime"
    control.write_text("+0\n")
    return control


@pytest.mark.parametrize("step", ["-3h", "+3h"])
async def test_a_replica_whose_wall_clock_steps_by_hours_shares_tokens_that_live_their_real_life(
        sim, redis_server, spawn, http, faketime_control, step):
    sim.settings.ttl_s = TTL_S
    store = f'store: {{kind: redis, url: "{redis_server.url}", key_prefix: "t:"}}'
    replicas = []
    for name, env in (("stepped", faketime_env(faketime_control)), ("steady", None)):
        port, admin = free_port(), free_port()
        proc = spawn(sidecar_yaml(sim.url, top=store, listen_port=port, admin_port=admin, refresh_before_s=10),
                     env=env, name=name)
        replicas.append(Replica(proc, port, admin))
    stepped, steady = replicas
    await asyncio.gather(*(r.proc.wait_ready(r.admin) for r in replicas))
    assert (await token_answer(http, stepped))["access_token"] == (await token_answer(http, steady))["access_token"]
    assert sim.fetch_count() == 1

    faketime_control.write_text(f"{step}\n")           # the stepped replica's wall clock jumps now
    await asyncio.sleep(0.1)
    sim.rotate(APPID)                                   # WeChat ends the token: the stepped replica refreshes
    async with http.get(f"{stepped.base}/cgi-bin/user/info") as resp:
        assert resp.status == 200 and (await resp.json())["errcode"] == 0
    assert sim.fetch_count() == 2

    ttl = pttl_ms(redis_server)                         # Redis keeps it for its real life, not 3 h more or less
    assert 0 < ttl <= (TTL_S + 1) * 1000, ttl

    async with http.get(f"{steady.base}/cgi-bin/user/info") as resp:   # the steady one takes it from Redis
        assert resp.status == 200 and (await resp.json())["errcode"] == 0
    assert sim.fetch_count() == 2                       # nobody fetched again: the token was there to share
    answers = [await token_answer(http, replica) for replica in replicas]
    assert answers[0]["access_token"] == answers[1]["access_token"]
    for replica, answer in zip(replicas, answers):
        assert answer["expires_in"] <= TTL_S, (replica.proc.config_path.name, answer["expires_in"])

    faketime_control.write_text("+0\n")                 # and stepped back: still the same token, same life
    await asyncio.sleep(0.1)
    answer = await token_answer(http, stepped)
    assert answer["expires_in"] <= TTL_S and sim.fetch_count() == 2
    for replica in replicas:
        assert "Traceback" not in replica.proc.output()
