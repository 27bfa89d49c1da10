"""Delivering a verified, decrypted push to the app (DESIGN.md, "Pushes from
WeChat to apps"): one POST to `push.deliver_to` with the `X-WeChat-*`
headers; the app's 2xx body is its passive reply. An app that is down or
answers 5xx gets the message again, same id, with backoff, for up to
REDELIVER_FOR_S; each app's queue is bounded, and what overflows or expires
is counted and logged by id (never its content).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

log = logging.getLogger("proxy.push")

# WeChat gives up on a push after its third retry (about 15 s); the sidecar
# keeps trying an app that is down for longer: a deploy or a restart should
# not lose a message. Ten minutes, then the message is dropped (counted).
REDELIVER_FOR_S = 600.0

# Redelivery backoff: 1 s, 2 s, 4 s ... up to a minute between tries.
BACKOFF_BASE_S, BACKOFF_CAP_S = 1.0, 60.0

# Messages waiting for an app that is down, per app. A busy account sends a
# few messages a second; a thousand is minutes of them, bounded in memory
# (a message is at most 1 MiB, most are under 2 KiB).
MAX_QUEUE = 1000

# One delivery attempt may take this long (the app's own work); WeChat's
# answer does not wait for it past push.reply_within_s.
ATTEMPT_TIMEOUT_S = 30.0


@dataclass
class Message:
    app: str
    appid: str                   # the account: the app's, or an authorizer's
    msg_id: str
    body: bytes                  # what WeChat encrypted (or sent in plaintext), unchanged
    is_json: bool
    deliver_to: str
    received_at: float = field(default_factory=time.monotonic)
    attempts: int = 0

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json" if self.is_json else "text/xml; charset=utf-8",
                "X-WeChat-App": self.app, "X-WeChat-Appid": self.appid, "X-WeChat-Message-Id": self.msg_id}


class Failed(Exception):
    """The app did not take the message (down, 5xx, timed out): why, for the log."""


@dataclass
class AppState:
    """One app's deliveries under way: its queue, what was dropped, the last
    failure. Never content. (Results are counted once, in wts_pushes_total.)"""
    queue: collections.deque[Message] = field(default_factory=collections.deque)
    dropped: dict[str, int] = field(default_factory=dict)
    last_failure: str | None = None
    last_failure_at: float | None = None
    task: asyncio.Task[None] | None = None

    def status(self, now: float, results: dict[str, int]) -> dict[str, Any]:
        """With the app's counts by result (wts_pushes_total's)."""
        return {"delivered": results.get("delivered", 0) + results.get("redelivered", 0),
                "queued": len(self.queue), "results": results, "dropped": dict(self.dropped),
                "last_failure": self.last_failure,
                "last_failure_s_ago": round(now - self.last_failure_at, 1) if self.last_failure_at else None}


class Delivery:
    def __init__(self, count: Callable[[str, str], None], clock: Callable[[], float] = time.monotonic):
        self.apps: dict[str, AppState] = {}
        self.count = count                   # (app, result) -> wts_pushes_total
        self.clock = clock
        self.session: aiohttp.ClientSession | None = None
        self._closing = False

    def state(self, app: str) -> AppState:
        state = self.apps.get(app)
        if state is None:
            state = self.apps[app] = AppState()
        return state

    async def start(self) -> None:
        # The app is beside the sidecar: no proxy, no cookies, bytes as they are.
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=ATTEMPT_TIMEOUT_S), auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(), connector=aiohttp.TCPConnector(limit=64))

    async def close(self) -> None:
        self._closing = True
        for state in self.apps.values():
            if state.task is not None:
                state.task.cancel()
        for state in self.apps.values():
            if state.task is not None:
                try:
                    await state.task
                except (asyncio.CancelledError, Exception):
                    pass
        if self.session is not None:
            await self.session.close()

    async def attempt(self, message: Message) -> bytes:
        """One delivery: the app's 2xx body (its passive reply), or Failed."""
        assert self.session is not None
        message.attempts += 1
        try:
            async with self.session.post(message.deliver_to, data=message.body, headers=message.headers,
                                         allow_redirects=False) as resp:
                body = await resp.content.read(64 * 1024)
                status = resp.status
        except asyncio.TimeoutError:
            raise Failed(f"the app did not answer within {ATTEMPT_TIMEOUT_S:g} s") from None
        except aiohttp.ClientError as exc:
            raise Failed(f"cannot reach the app ({exc.__class__.__name__})") from None
        if status >= 500 or status == 429:
            raise Failed(f"the app answered HTTP {status}")
        if status >= 300:
            # 4xx: the app refused this message; sending it again changes nothing.
            log.warning("push %s refused by the app: HTTP %d; not delivered again", message.msg_id, status,
                        extra={"event": "push_rejected", "app": message.app, "status": status})
            self.count(message.app, "rejected")
            return b""
        return body

    def failed(self, message: Message, why: str) -> None:
        state = self.state(message.app)
        state.last_failure, state.last_failure_at = why, self.clock()

    def enqueue(self, message: Message) -> None:
        """The app is down: try again with backoff, in order, for up to REDELIVER_FOR_S."""
        state = self.state(message.app)
        if len(state.queue) >= MAX_QUEUE:
            self._drop(state, message, "queue_full")
            return
        state.queue.append(message)
        self.count(message.app, "queued")
        if state.task is None or state.task.done():
            state.task = asyncio.create_task(self._redeliver(message.app), name=f"push-redelivery:{message.app}")

    def _drop(self, state: AppState, message: Message, reason: str) -> None:
        state.dropped[reason] = state.dropped.get(reason, 0) + 1
        log.error("push %s for app %s dropped (%s) after %d attempt(s)", message.msg_id, message.app, reason,
                  message.attempts, extra={"event": "push_dropped", "app": message.app, "reason": reason})

    async def _redeliver(self, app: str) -> None:
        state = self.state(app)
        failures = 0
        while state.queue and not self._closing:
            message = state.queue[0]
            if self.clock() - message.received_at > REDELIVER_FOR_S:
                state.queue.popleft()
                self._drop(state, message, "expired")
                continue
            delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** failures)
            await asyncio.sleep(delay)
            try:
                await self.attempt(message)          # WeChat was answered long ago: a reply has nowhere to go
            except Failed as exc:
                failures += 1
                self.failed(message, str(exc))
                continue
            failures = 0
            state.queue.popleft()
            self.count(app, "redelivered")
            log.info("push %s delivered after %d attempts", message.msg_id, message.attempts,
                     extra={"event": "push_redelivered", "app": app})
