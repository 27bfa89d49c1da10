"""Shared fixtures: a WeChat simulator on a real socket, sidecars in-process
(real listeners, real HTTP) or as subprocesses (`python -m proxy run`)."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from proxy import config as config_mod
from proxy.server import Running, start_sidecar
from proxy.simulator import SimSettings, WeChatSimulator

from .ports import free_port

ROOT = Path(__file__).resolve().parent.parent

APPID = "wx00000000000000a1"
SECRET = "test-secret-aaaaaaaaaaaaaaaaaaaaaaa1"
APPID2 = "wx00000000000000b2"
SECRET2 = "test-secret-bbbbbbbbbbbbbbbbbbbbbbb2"
CORPID = "ww00000000000000c3"
CORPSECRET = "test-corpsecret-ccccccccccccccccccc3"


@pytest.fixture
async def sim() -> AsyncIterator[WeChatSimulator]:
    # No timed verify-ticket pushes: tests push when they mean to.
    simulator = WeChatSimulator(accounts={APPID: SECRET, APPID2: SECRET2},
                                corps={CORPID: [CORPSECRET]}, settings=SimSettings(verify_ticket_interval_s=0))
    runner = web.AppRunner(simulator.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    simulator.url = f"http://127.0.0.1:{runner.addresses[0][1]}"  # type: ignore[attr-defined]
    yield simulator
    await runner.cleanup()


async def past_coalescing() -> None:
    """Past the window in which a passive refresh is answered with the token
    just fetched (policy.REFRESH_COALESCE_S): the next one fetches."""
    from proxy.credentials.policy import REFRESH_COALESCE_S
    await asyncio.sleep(REFRESH_COALESCE_S + 0.05)


def head_yaml(upstream: str, *, top: str = "", listen_port: int = 0, admin_port: int = 0) -> str:
    """A test config's listeners, upstream and any other top-level lines (`top`)."""
    return textwrap.dedent(f"""\
        listen: {{host: 127.0.0.1, port: {listen_port}}}
        admin:  {{host: 127.0.0.1, port: {admin_port}}}
        upstream: {{base_url: "{upstream}", timeout_s: 5}}
        {top}
        """)


def sidecar_yaml(upstream: str, *, app: str = "", top: str = "", listen_port: int = 0,
                 admin_port: int = 0, secret: str = SECRET, token_api: str = "stable",
                 refresh_before_s: float = 240, min_refresh_interval_s: float | None = 0,
                 app_extra: str = "") -> str:
    """A config for tests: one app `mp` against the simulator, plus extras
    (min_refresh_interval_s None: the config's default)."""
    spacing = "" if min_refresh_interval_s is None else f"min_refresh_interval_s: {min_refresh_interval_s}"
    return head_yaml(upstream, top=top, listen_port=listen_port, admin_port=admin_port) + textwrap.dedent(f"""\
        apps:
          - name: mp
            appid: {APPID}
            secret: "{secret}"
            token_api: {token_api}
            refresh_before_s: {refresh_before_s}
            {spacing}
        """) + textwrap.indent(app_extra, "    ") + textwrap.indent(textwrap.dedent(app), "  ")


def mini_app_yaml(token_api: str = "client_credential") -> str:
    """A second app entry, `mini`, for tests with two apps in one sidecar."""
    return f"""
- name: mini
  appid: {APPID2}
  secret: "{SECRET2}"
  token_api: {token_api}
"""


async def wait_ready(session: aiohttp.ClientSession, admin_url: str, timeout: float,
                     alive: Callable[[], None]) -> bool:
    """Poll /readyz until 200 (True) or the timeout (False); `alive` raises
    when what is being waited for has gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive()
        try:
            async with session.get(f"{admin_url}/readyz") as resp:
                if resp.status == 200:
                    return True
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.02)
    return False


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll instead of sleeping a fixed time: done as soon as it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


SidecarFactory = Callable[..., Awaitable[Running]]


@pytest.fixture
async def make_sidecar(sim: WeChatSimulator) -> AsyncIterator[SidecarFactory]:
    started: list[Running] = []

    async def factory(text: str | None = None, *, wait_ready: bool = True, **kw: object) -> Running:
        cfg = config_mod.parse(text or sidecar_yaml(sim.url, **kw), "<test>", env={})  # type: ignore[attr-defined]
        running = await start_sidecar(cfg)
        started.append(running)
        if wait_ready:
            assert await running.sidecar.wait_ready(5), "sidecar did not become ready"
        running.base = f"http://127.0.0.1:{running.proxy_port}"  # type: ignore[attr-defined]
        running.admin = f"http://127.0.0.1:{running.admin_port}"  # type: ignore[attr-defined]
        return running

    yield factory
    for running in started:
        await running.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


# ---------------------------------------------------------------- subprocesses

class SidecarProcess:
    """`python -m proxy run` in a subprocess, its output captured to a file."""

    def __init__(self, config_path: Path, log_path: Path, env: dict[str, str] | None = None):
        self.config_path, self.log_path = config_path, log_path
        self.log_file = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(config_path)],
            cwd=ROOT, stdout=self.log_file, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait_ready(self, admin_url: str, timeout: float = 10) -> None:
        def alive() -> None:
            if self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited {self.proc.returncode}: {self.output()}")
        async with aiohttp.ClientSession() as session:
            if not await wait_ready(session, admin_url, timeout, alive):
                raise AssertionError(f"sidecar not ready in {timeout} s: {self.output()}")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def output(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode


@pytest.fixture
def spawn(tmp_path: Path):
    procs: list[SidecarProcess] = []

    def factory(config_text: str, env: dict[str, str] | None = None, name: str = "sidecar") -> SidecarProcess:
        path = tmp_path / f"{name}.yaml"
        path.write_text(config_text)
        proc = SidecarProcess(path, tmp_path / f"{name}.log", env)
        procs.append(proc)
        return proc

    yield factory
    for proc in procs:
        proc.stop()


# ---------------------------------------------------------------- redis

class RedisServer:
    """A real redis-server of our own on a free port; tests may kill and restart it."""

    def __init__(self, directory: Path):
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (.ci/run installs it with apt-get)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise AssertionError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def command(self, *args: str) -> bytes:
        """One RESP command over a plain socket (keeps tests free of client state)."""
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
            conn.sendall(b"".join(parts))
            return conn.recv(65536)


@pytest.fixture
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()
