"""App factory: everything built from the config object, resources opened and
closed in one place (`cleanup_ctx`), two listeners (proxy and admin)."""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
from typing import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from .admin import AdminRoutes
from .config import Config
from .forward import Forwarder, sidecar_error
from .tokens import MemoryStore, TokenManager, TokenStore, make_fetcher

log = logging.getLogger("proxy.server")

# Upstream connections kept per sidecar; calls beyond it queue for a free one.
UPSTREAM_POOL_LIMIT = 100


def make_store(cfg: Config) -> TokenStore:
    if cfg.store.kind == "redis":
        from .tokens.redis_store import RedisStore
        # Wait for another sidecar's fetch at most as long as a fetch may take.
        return RedisStore(cfg.store.url, cfg.store.key_prefix, cfg.store.daily_fetch_cap,
                          wait_budget_s=cfg.upstream.timeout_s + 5)
    return MemoryStore(cfg.store.daily_fetch_cap)


class Sidecar:
    """The live resources of one running sidecar."""

    def __init__(self, config: Config):
        self.config = config
        self.session: aiohttp.ClientSession | None = None
        self.store: TokenStore | None = None
        self.managers: dict[str, TokenManager] = {}
        self.forwarder: Forwarder | None = None

    async def open(self) -> None:
        cfg = self.config
        timeout = aiohttp.ClientTimeout(sock_connect=cfg.upstream.timeout_s,
                                        sock_read=cfg.upstream.timeout_s)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=UPSTREAM_POOL_LIMIT, ttl_dns_cache=300),
            timeout=timeout,
            auto_decompress=False,              # bytes pass through as WeChat sent them
            cookie_jar=aiohttp.DummyCookieJar(),  # apps' cookies are not ours to keep
        )
        self.store = make_store(cfg)
        await self.store.start()
        for app in cfg.apps:
            fetcher = make_fetcher(app, self.session, cfg.upstream.timeout_s)
            self.managers[app.name] = TokenManager(app, fetcher, self.store, role=cfg.store.role,
                                                   on_store_down=cfg.store.on_store_down)
        self.forwarder = Forwarder(cfg, self.managers, self.session)
        for manager in self.managers.values():
            manager.start()

    async def close(self) -> None:
        for manager in self.managers.values():
            await manager.close()
        if self.store is not None:
            await self.store.close()
        if self.session is not None:
            await self.session.close()

    async def context(self, app: web.Application) -> AsyncIterator[None]:
        await self.open()
        yield
        await self.close()

    async def wait_ready(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if all(m.current() is not None for m in self.managers.values()):
                return True
            await asyncio.sleep(0.02)
        return False


@web.middleware
async def _json_errors(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Errors made by the sidecar are JSON, never an HTML page or a stack trace."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return sidecar_error(exc.status, exc.reason.lower())
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return sidecar_error(500, "internal error")


def build_proxy_app(sidecar: Sidecar) -> web.Application:
    app = web.Application(client_max_size=sidecar.config.max_body_bytes,
                          middlewares=[_json_errors])
    app.cleanup_ctx.append(sidecar.context)

    async def forward(request: web.Request) -> web.StreamResponse:
        assert sidecar.forwarder is not None
        return await sidecar.forwarder.handle(request)

    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def build_admin_app(sidecar: Sidecar) -> web.Application:
    app = AdminRoutes(sidecar).app()
    app.middlewares.append(_json_errors)
    return app


class Running:
    """Both listeners of a started sidecar; `stop()` undoes `start_sidecar`."""

    def __init__(self, sidecar: Sidecar, runners: list[web.AppRunner]):
        self.sidecar = sidecar
        self.runners = runners

    def port(self, which: int) -> int:
        server = self.runners[which].addresses[0]
        return int(server[1])

    @property
    def proxy_port(self) -> int:
        return self.port(0)

    @property
    def admin_port(self) -> int:
        return self.port(1)

    async def stop(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


async def start_sidecar(config: Config) -> Running:
    """Bind both listeners first, then fetch tokens: a sidecar that cannot
    listen must not spend a fetch (for /cgi-bin/token it would invalidate
    the token of the sidecar already holding the port)."""
    sockets: list[socket.socket] = []
    try:
        sockets.append(_bind(config.listen.host, config.listen.port))
        sockets.append(_bind(config.admin.host, config.admin.port))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    sidecar = Sidecar(config)
    runners = [web.AppRunner(build_proxy_app(sidecar), access_log=None, handle_signals=False),
               web.AppRunner(build_admin_app(sidecar), access_log=None, handle_signals=False)]
    for runner, sock in zip(runners, sockets):
        await runner.setup()
        await web.SockSite(runner, sock).start()
    return Running(sidecar, runners)


async def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT; exit code for the command line."""
    try:
        running = await start_sidecar(config)
    except OSError as exc:
        log.error("%s", exc.strerror or exc)
        return 1
    log.info("listening: proxy on %s:%d, admin on %s:%d", config.listen.host, running.proxy_port,
             config.admin.host, running.admin_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await running.stop()
    return 0
