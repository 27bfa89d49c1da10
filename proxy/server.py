"""App factory: everything built from the config object, resources opened and
closed in one place (`cleanup_ctx`), two listeners (proxy and admin)."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import time
from dataclasses import replace
from typing import Awaitable, Callable

import aiohttp
from aiohttp import web

from .config import App, Config, ConfigError, Merchant
from .credentials import MemoryStore, TokenManager, TokenStore, make_fetcher
from .credentials.fetchers import TicketFetcher
from .credentials.kinds import KINDS
from .credentials.kinds import store_key as credential_key
from .credentials.pay import CertificateFetcher, PayMerchant, certificates_app
from .credentials.platform import (
    AuthorizerFetcher,
    ComponentFetcher,
    Platform,
    authorizer_key,
)
from .http.egress import Egress, EgressSession
from .http.server import HttpServer, Reply, Request
from .inbound.component_push import COMPONENT_EVENT_PATH, ComponentPushes
from .inbound.delivery import Delivery
from .inbound.listener import CallbacksListener
from .inbound.messages import MessageIntake
from .inbound.pay_notify import PayNotifications
from .ops.admin import AdminRoutes, admin_error
from .ops.logs import AccessLog
from .ops.metrics import Metrics
from .outbound.forward import NOTED_HEADERS, Forwarder
from .outbound.pay_calls import PayCalls
from .outbound.pools import Pools

log = logging.getLogger("proxy.server")

# The admin port's parser (aiohttp) refuses with a bare 400 beyond these.
PARSER_MAX_LINE = 2 * 8192
PARSER_MAX_HEADERS = 256


def make_store(cfg: Config) -> TokenStore:
    if cfg.store.kind == "redis":
        from .credentials.redis_store import RedisStore
        # Wait for another sidecar's fetch at most as long as a fetch may take.
        return RedisStore(cfg.store.url, cfg.store.key_prefix, cfg.store.daily_fetch_cap,
                          wait_budget_s=cfg.upstream.timeout_s + 5, cluster=cfg.store.cluster,
                          sentinel=cfg.store.sentinel)
    return MemoryStore(cfg.store.daily_fetch_cap)


class Sidecar:
    """The live resources of one running sidecar."""

    def __init__(self, config: Config):
        self.config = config
        self.session: aiohttp.ClientSession | None = None
        self.store: TokenStore | None = None
        self.managers: dict[str, TokenManager] = {}
        self.platforms: dict[str, Platform] = {}     # Open Platform apps, by name
        self._observers: dict[str, tuple[Callable[[str], None], Callable[[str], None]]] = {}
        self.forwarder: Forwarder | None = None
        self.metrics = Metrics()
        # Every connection to WeChat goes out through one egress: the proxy,
        # the CAs and the fallback hosts (token fetches and business calls alike).
        up = config.upstream
        self.egress = Egress(up.base_url, up.fallback, up.proxy, up.ca_file)
        self.pools = Pools(up.timeout_s, self.egress)   # business calls, by upstream base URL
        # Pushes from WeChat (the callbacks listener): their delivery to apps.
        self.delivery = Delivery(self.count_push)
        self.metrics.delivery = self.delivery
        self.metrics.merchants = lambda: self.merchants
        self.component_pushes: ComponentPushes | None = None
        self.merchants: dict[str, PayMerchant] = {}          # WeChat Pay merchants, by name
        self.pay_notifications: PayNotifications | None = None
        self.intake: MessageIntake | None = None
        self.access = AccessLog(config.log.format, on=config.log.access)
        self._retired: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        cfg = self.config
        timeout = aiohttp.ClientTimeout(sock_connect=cfg.upstream.timeout_s,
                                        sock_read=cfg.upstream.timeout_s)
        self.metrics.egress = self.egress
        self.session = EgressSession(  # type: ignore[assignment]
            self.egress,
            timeout=timeout,
            auto_decompress=False,              # bytes pass through as WeChat sent them
            cookie_jar=aiohttp.DummyCookieJar(),  # apps' cookies are not ours to keep
        )
        await self.delivery.start()
        self.store = make_store(cfg)
        if hasattr(self.store, "on_reconnect"):
            self.store.on_reconnect.append(self.reseed)
        await self.store.start()
        self.managers = {app.name: self._manager(app) for app in cfg.apps}
        self.platforms = {app.name: self._platform(app, self.managers[app.name])
                          for app in cfg.apps if app.token_api == "component"}
        self.metrics.watch(self.managers, self.store, self.platforms)
        self.merchants = {m.name: self._merchant(m) for m in cfg.merchants}
        self.forwarder = self._forwarder(cfg, self.managers, self.platforms)
        for manager in self.managers.values():
            manager.start()

    def _forwarder(self, cfg: Config, managers: dict[str, TokenManager], platforms: dict[str, Platform]) -> Forwarder:
        """The proxy port's calls; a platform's push intake (inbound) is
        reached there at /sidecar/component/event, and with the callbacks
        listener's message intake on that port."""
        pushes = self.component_pushes = ComponentPushes(platforms)
        assert self.store is not None
        self.intake = MessageIntake(cfg, self.store, self.delivery, pushes, self.count_push)
        pay = PayCalls(cfg, self.merchants, self.pools) if self.merchants else None
        self.pay_notifications = (PayNotifications(self.merchants, self.store, lambda: self.delivery.session,
                                                   self.count_push) if self.merchants else None)
        return Forwarder(cfg, managers, self.pools, self.metrics, self.access, platforms,
                         push_answers={COMPONENT_EVENT_PATH: pushes.handle}, pay=pay)

    def _merchant(self, merchant: Merchant) -> PayMerchant:
        """A merchant's keys, and its platform certificates as a credential of
        the engine: fetched at start, or beside a public key only when a
        serial it does not know turns up (lazy)."""
        assert self.session is not None and self.store is not None
        pay = PayMerchant(merchant)
        manager = TokenManager(certificates_app(merchant), CertificateFetcher(pay, self.session,
                                                                              self.config.upstream.timeout_s),
                               self.store, role=self.config.store.role, on_store_down=self.config.store.on_store_down,
                               key=f"paycerts:{merchant.mchid}", name=f"{merchant.name}/certificates")
        m = self.metrics
        manager.on_fetch = lambda result: m.fetches.labels(merchant.name, "pay_certificates", result).inc()
        pay.certificates = manager
        if merchant.public_key_pem is None:
            manager.start()
        else:
            manager.lazy = True
        return pay

    def _manager(self, app: App) -> TokenManager:
        assert self.session is not None and self.store is not None
        if app.token_api == "component":
            fetcher = ComponentFetcher(app, self.session, self.config.upstream.timeout_s, self.store)
        else:
            fetcher = make_fetcher(app, self.session, self.config.upstream.timeout_s)
        manager = TokenManager(app, fetcher, self.store, role=self.config.store.role,
                               on_store_down=self.config.store.on_store_down)
        m = self.metrics
        manager.on_refresh = lambda reason: m.refreshes.labels(app.name, reason).inc()
        manager.on_fetch = lambda result: m.fetches.labels(app.name, app.token_api, result).inc()
        manager.on_rotated = lambda: m.rotated.labels(app.name).inc()
        manager.on_ip_refused = lambda ip: m.ip_refused(app.name, ip)
        manager.make_dependent = self._credential_manager
        return manager

    def _credential_manager(self, token: TokenManager, kind: str) -> TokenManager:
        """The manager of one of an app's credentials (credentials.KINDS),
        fetched with the app's token: made when first asked for."""
        assert self.session is not None and self.store is not None
        app, spec = token.app, KINDS[kind]

        async def current_token() -> str:
            return (await token.get()).value

        fetcher = TicketFetcher(app, self.session, self.config.upstream.timeout_s, api=kind, path=spec.path,
                                query=spec.query, token=current_token, invalidate=token.invalidate)
        manager = TokenManager(app, fetcher, self.store, role=self.config.store.role,
                               on_store_down=self.config.store.on_store_down,
                               key=credential_key(kind, app), name=f"{app.name}/{kind}")
        m = self.metrics
        manager.on_refresh = lambda reason: m.refreshes.labels(manager.name, reason).inc()
        manager.on_fetch = lambda result: m.fetches.labels(app.name, kind, result).inc()
        manager.on_ip_refused = lambda ip: m.ip_refused(app.name, ip)
        return manager

    def _platform(self, app: App, component: TokenManager) -> Platform:
        assert self.session is not None and self.store is not None
        return Platform(app, component, self.store, self.session, self.config.upstream.timeout_s,
                        self._authorizer_manager)

    def _authorizer_manager(self, platform: Platform, appid: str) -> TokenManager:
        """An authorizer's token: a lazy credential of the platform app,
        fetched with the component token and the stored refresh token.
        Counted per platform, never per authorizer (no label per account)."""
        assert self.session is not None and self.store is not None
        app = platform.app
        fetcher = AuthorizerFetcher(app, self.session, self.config.upstream.timeout_s, authorizer_appid=appid,
                                    store=self.store, component=platform.component)
        manager = TokenManager(app, fetcher, self.store, role=self.config.store.role,
                               on_store_down=self.config.store.on_store_down,
                               key=authorizer_key(app, appid), name=f"{app.name}/{appid}")
        manager.on_refresh, manager.on_fetch = self._authorizer_observers(app.name)
        return manager

    def _authorizer_observers(self, platform: str) -> tuple[Callable[[str], None], Callable[[str], None]]:
        """The metrics observers every authorizer of one platform shares
        (made once: thousands of managers need no closures of their own)."""
        made = self._observers.get(platform)
        if made is not None:
            return made
        m = self.metrics

        def on_refresh(reason: str) -> None:
            m.refreshes.labels(f"{platform}/authorizers", reason).inc()

        def on_fetch(result: str) -> None:
            m.fetches.labels(platform, "authorizer", result).inc()

        made = self._observers[platform] = (on_refresh, on_fetch)
        return made

    def reload(self, new: Config) -> list[str]:
        """Apply a new config without dropping calls: apps (and their secrets),
        refresh_errcodes, pass_token_errors and admin.token take effect; what
        needs new sockets or a new store is kept and reported. A change to
        the egress (upstream.proxy, ca_file, fallback) refuses the whole
        reload: ConfigError."""
        old = self.config
        # DESIGN.md, "Egress": these take effect at start, and a reload that
        # changes them is refused whole (the caller logs it): egress half
        # applied would be neither the old way out nor the new one.
        at_start = [name for name, same in (("upstream.proxy", old.upstream.proxy == new.upstream.proxy),
                                            ("upstream.ca_file", old.upstream.ca_file == new.upstream.ca_file),
                                            ("upstream.fallback", old.upstream.fallback == new.upstream.fallback))
                    if not same]
        if at_start:
            raise ConfigError(new.source, ", ".join(at_start),
                              "changed, and it takes effect only at start: restart the sidecar to apply it "
                              "(nothing of this reload was applied)")
        kept: list[str] = []
        for name, same in (("listen", old.listen == new.listen),
                           ("admin host/port", (old.admin.host, old.admin.port) == (new.admin.host, new.admin.port)),
                           ("store", old.store == new.store),
                           ("upstream.timeout_s", old.upstream.timeout_s == new.upstream.timeout_s),
                           ("max_body_bytes", old.max_body_bytes == new.max_body_bytes)):
            if not same:
                kept.append(name)
        effective = replace(new, listen=old.listen, store=old.store, max_body_bytes=old.max_body_bytes,
                            admin=replace(new.admin, host=old.admin.host, port=old.admin.port),
                            upstream=replace(new.upstream, timeout_s=old.upstream.timeout_s))
        managers: dict[str, TokenManager] = {}
        started: list[TokenManager] = []
        for app in effective.apps:
            current = self.managers.get(app.name)
            if current is not None and current.app == app:
                managers[app.name] = current          # unchanged: keep its token
            else:
                managers[app.name] = self._manager(app)
                started.append(managers[app.name])
        retired = [m for name, m in self.managers.items() if managers.get(name) is not m]
        platforms = {app.name: (self.platforms[app.name] if managers[app.name] not in started
                                else self._platform(app, managers[app.name]))
                     for app in effective.apps if app.token_api == "component"}
        retired_platforms = [p for name, p in self.platforms.items() if platforms.get(name) is not p]
        merchants = {m.name: (self.merchants[m.name] if self.merchants.get(m.name) is not None
                              and self.merchants[m.name].merchant == m else self._merchant(m))
                     for m in effective.merchants}
        retired_platforms += [p for name, p in self.merchants.items() if merchants.get(name) is not p]  # type: ignore
        self.merchants = merchants
        self.config = effective
        self.managers = managers
        self.platforms = platforms
        self.metrics.watch(managers, self.store, platforms)  # type: ignore[arg-type]
        assert self.session is not None
        self.forwarder = self._forwarder(effective, managers, platforms)
        for manager in started:
            manager.start()
        for manager in [*retired, *retired_platforms]:
            # Calls in flight may still hold it: close it after the grace.
            task = asyncio.create_task(self._retire(manager))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)
        log.info("config reloaded: %d app(s), %d new or changed, %d retired", len(managers),
                 len(started), len(retired), extra={"event": "reload"})
        if kept:
            log.warning("changed in the config but needing a restart (running values kept): %s",
                        ", ".join(kept), extra={"event": "reload"})
        return kept

    async def _retire(self, manager: TokenManager | Platform) -> None:
        await asyncio.sleep(self.config.shutdown_grace_s)
        await manager.close()

    def count_push(self, app: str, result: str) -> None:
        self.metrics.pushes.labels(app, result).inc()

    def push_status(self, name: str) -> dict[str, object] | None:
        """An app's pushes for /admin/apps: counts and the last failure, never content."""
        app = self.config.app(name)
        if app is None or app.push is None:
            return None
        results = {result: int(n) for (app_name, result), n in self.metrics.pushes.values.items() if app_name == name}
        return self.delivery.state(name).status(time.monotonic(), results)

    async def close(self) -> None:
        for task in list(self._retired):
            task.cancel()
        if self.intake is not None:
            await self.intake.close()
        await self.delivery.close()
        for platform in self.platforms.values():
            await platform.close()
        for merchant in self.merchants.values():
            await merchant.close()
        for manager in self.managers.values():
            await manager.close()
        if self.store is not None:
            await self.store.close()
        self.pools.close()
        self.access.flush()
        if self.session is not None:
            await self.session.close()

    def holders(self) -> list[TokenManager]:
        """Every manager holding a credential now: apps, their tickets, cached authorizers."""
        out: list[TokenManager] = []
        for manager in self.managers.values():
            out.append(manager)
            out.extend(manager.dependents.values())
        for platform in self.platforms.values():
            out.extend(platform.managers.values())
        return out

    async def reseed(self) -> None:
        """The store is back: each holder writes back what it holds (where
        the store has nothing, or something older), so no fetch is needed."""
        for manager in self.holders():
            await manager.reseed()

    def waiting_for_ticket(self, name: str) -> bool:
        """A platform app that has never had a verify ticket: it is ready to
        take the push that brings one (its pod must be ready to get it)."""
        platform = self.platforms.get(name)
        return platform is not None and platform.waiting_for_ticket

    async def wait_ready(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if all(m.current() is not None or self.waiting_for_ticket(name) for name, m in self.managers.items()):
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
        return admin_error(exc.status, exc.reason.lower())
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return admin_error(500, "internal error")


def build_proxy_server(sidecar: Sidecar) -> HttpServer:
    """The proxy port: our own HTTP/1.1 server (httpserver.py) with the
    forwarder as its only handler. Every request goes to the forwarder, routed
    or not (CONNECT and absolute-form targets get its JSON refusal)."""
    cfg = sidecar.config

    def handle(request: Request) -> Awaitable[Reply]:
        # The forwarder is looked up per call: a reload replaces it. An
        # exception becomes a logged JSON 500 in httpserver.py. A plain
        # function handing on the forwarder's coroutine: no coroutine of its own.
        assert sidecar.forwarder is not None
        return sidecar.forwarder.handle(request)

    # idle_timeout also closes a connection that never completes a request (slowloris).
    return HttpServer(handle, idle_timeout=cfg.client_timeout_s, body_timeout=cfg.client_timeout_s,
                      send_timeout=cfg.client_timeout_s,
                      max_body=cfg.max_body_bytes, noted=NOTED_HEADERS)


def build_admin_app(sidecar: Sidecar) -> web.Application:
    # /metrics lives in admin.py with the other admin routes.
    app = AdminRoutes(sidecar).app()
    app.middlewares.append(_json_errors)
    return app


class Running:
    """The listeners of a started sidecar; `stop()` undoes `start_sidecar`."""

    def __init__(self, sidecar: Sidecar, proxy: HttpServer, admin: web.BaseRunner,
                 callbacks: web.BaseRunner | None = None):
        self.sidecar = sidecar
        self.proxy = proxy
        self.admin_runner = admin
        self.callbacks_runner = callbacks

    @property
    def callbacks_port(self) -> int | None:
        if self.callbacks_runner is None:
            return None
        return int(self.callbacks_runner.addresses[0][1])

    @property
    def proxy_port(self) -> int:
        return self.proxy.port

    @property
    def admin_port(self) -> int:
        return int(self.admin_runner.addresses[0][1])

    async def stop(self) -> None:
        # Both listeners stop accepting; in-flight calls finish (up to the
        # grace); then the sidecar's resources close.
        if self.callbacks_runner is not None:
            await self.callbacks_runner.cleanup()
        await self.admin_runner.cleanup()
        await self.proxy.shutdown(self.sidecar.config.shutdown_grace_s)
        await self.sidecar.close()


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
        if config.callbacks is not None:
            sockets.append(_bind(config.callbacks.host, config.callbacks.port))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    sidecar = Sidecar(config)
    await sidecar.open()
    proxy = build_proxy_server(sidecar)
    await proxy.start(sockets[0])
    admin = web.AppRunner(build_admin_app(sidecar), access_log=None, handle_signals=False,
                          shutdown_timeout=min(config.shutdown_grace_s, 1.0),
                          keepalive_timeout=config.client_timeout_s, max_line_size=PARSER_MAX_LINE,
                          max_field_size=PARSER_MAX_LINE, max_headers=PARSER_MAX_HEADERS)
    await admin.setup()
    await web.SockSite(admin, sockets[1]).start()
    callbacks = None
    if config.callbacks is not None:
        listener = CallbacksListener(lambda: sidecar.intake, lambda: sidecar.component_pushes,  # type: ignore
                                     lambda: sidecar.platforms, sidecar.count_push,
                                     lambda: sidecar.pay_notifications)
        callbacks = web.AppRunner(listener.app(), access_log=None, handle_signals=False,
                                  shutdown_timeout=min(config.shutdown_grace_s, 1.0),
                                  keepalive_timeout=config.client_timeout_s, max_line_size=PARSER_MAX_LINE,
                                  max_field_size=PARSER_MAX_LINE, max_headers=PARSER_MAX_HEADERS)
        await callbacks.setup()
        await web.SockSite(callbacks, sockets[2]).start()
    return Running(sidecar, proxy, admin, callbacks)


FileStamp = tuple[int, int, int] | None


def file_stamps(paths: tuple[str, ...]) -> dict[str, FileStamp]:
    """What identifies each file's content without reading it. stat() follows
    symlinks, so a Kubernetes ConfigMap or Secret update (an atomic swap of
    the `..data` link) shows as a new inode."""
    stamps: dict[str, FileStamp] = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps[path] = None
        else:
            stamps[path] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return stamps


async def watch_files(files: Callable[[], tuple[str, ...]], on_change: Callable[[str], Awaitable[None]],
                      interval: float) -> None:
    """Call `on_change(path)` when one of `files()` changes; checks every `interval` s."""
    seen = file_stamps(files())
    while True:
        await asyncio.sleep(interval)
        now = file_stamps(files())
        changed = [path for path in now if now[path] != seen.get(path)]
        if changed:
            # Remember this state whatever the reload makes of it: a broken
            # file is reported once, not every interval.
            seen = now
            await on_change(changed[0])
            seen = file_stamps(files())       # the reload may have named other files


async def serve(config: Config, reload_config: Callable[[], Config] | None = None) -> int:
    """Run until SIGTERM or SIGINT (exit 0); SIGHUP, or a change to the config
    file or a secret file (checked every `reload_poll_s`), reloads the config."""
    try:
        running = await start_sidecar(config)
    except OSError as exc:
        log.error("%s", exc.strerror or exc, extra={"event": "listen_failed"})
        return 1
    # What start-up made (modules, config, clients) lives as long as the
    # process: out of the collector's sight, a full collection no longer
    # walks it (it paused the proxy for ~45 ms with store: redis).
    gc.freeze()
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    log.info("listening: proxy on %s:%d, admin on %s:%d (event loop: %s)", config.listen.host,
             running.proxy_port, config.admin.host, running.admin_port, loop_name,
             extra={"event": "listening"})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    reloading = asyncio.Lock()
    tasks: set[asyncio.Task[None]] = set()

    async def reload(why: str) -> None:
        """Read the config and its files off the event loop (a slow or odd
        file must never stop the proxy or /healthz), one reload at a time."""
        if reload_config is None:
            return
        async with reloading:
            log.info("reloading the config (%s)", why, extra={"event": "reload"})
            try:
                new = await asyncio.to_thread(reload_config)
                running.sidecar.reload(new)
            except ConfigError as exc:
                log.error("config reload refused, the running config stays: %s", exc, extra={"event": "reload"})

    def on_sighup() -> None:
        task = asyncio.create_task(reload("SIGHUP"))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    watcher = None
    if reload_config is not None and config.reload_poll_s > 0:
        watcher = asyncio.create_task(watch_files(
            lambda: running.sidecar.config.watched_files(),
            lambda path: reload(f"{path} changed"), config.reload_poll_s))
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    log.info("stopping: no new connections; in-flight calls get up to %.0f s",
             running.sidecar.config.shutdown_grace_s, extra={"event": "stopping"})
    await running.stop()
    log.info("stopped", extra={"event": "stopped"})
    return 0
