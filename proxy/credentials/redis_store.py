"""One token per credential for a whole cluster, kept in Redis.

Keys (all under `key_prefix`; `{...}` is a Redis Cluster hash tag, so every
key of one credential lives in one slot and each script touches one slot):
  token:{<key>}           hash {value, fetched_at, expires_at (Redis's clock, epoch s), rejected};
                          expires with the token (a relative PEXPIRE)
  lock:{<key>}            owner id; a short lease renewed while its owner fetches
  fetches:{<key>}:<day>   token fetches made by the cluster that day (China time)
  value:{<key>}           a small named value (a platform's component_verify_ticket)
  value_at:{<key>}        its stamp (the push's CreateTime), when it only moves forward
  seen:{<key>}            a push already taken (replay memory), expiring with the push's window
  short:{<key>}           a short-lived value (a push's reply, for WeChat's retries)
  registry:{<name>}       hash appid -> refresh token: a platform's authorizers
  events                  pub/sub channel: "new <key> <fp>" / "rejected <key> <fp>" / "removed <key> -"

Events use classic pub/sub in every mode: in a Redis Cluster a PUBLISH
reaches the subscribers of every node (the cluster bus forwards it), so one
subscription on any node hears the whole fleet. Sharded pub/sub would need a
subscription per slot a sidecar's credentials hash to; events are rare (one
per rotation per credential), so the broadcast costs nothing that matters.
Scripts name the channel as an argument, not a key, so they stay in one slot.

A server (`url`), a Sentinel-managed master (`sentinel`: redis-py's own
Sentinel client finds the master and follows a failover) or a Redis Cluster
(`cluster: true`: redis-py's cluster client) are one store to the rest.
After the connection comes back (an outage, a failover, a server restarted
empty) every sidecar writes back the tokens it holds, each only where the
store has none or an older one (`seed`), so a write lost in a failover
rewinds nobody and an empty Redis is refilled without a fetch.

Sidecars serve from their local copy; Redis is read only when a token is
due, missing or refused, so a request never waits on Redis while the local
copy is good. No replica's wall clock is the truth of a token's life (an NTP
step, a paused VM, a node hours off): a token's life crosses processes as a
duration (its age and what is left of it, from the local monotonic clock),
turned into times on Redis's own clock (TIME, inside the script that writes
or reads) and back; the key's expiry is relative (PEXPIRE).
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from typing import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..config import Sentinel as SentinelConfig
from .policy import Token
from .store import (
    DEFAULT_DAILY_FETCH_CAP,
    Accept,
    FetchCapReached,
    FetchFn,
    StoreUnavailable,
    Watchers,
    fingerprint,
    quota_day,
)

log = logging.getLogger("proxy.store")

# The fetch lock's lease: short, and renewed while the fetch runs, so a
# sidecar that dies holding it blocks the others for seconds, not the minute
# a fixed 60 s lease costs.
LOCK_LEASE_S = 3.0
LOCK_RENEW_S = 1.0

# While another sidecar fetches, the others wait for its "new" (or "unlocked")
# event, and look in Redis at least this often in case an event is missed or
# the fetcher died (its lease then runs out: LOCK_LEASE_S).
POLL_S = 0.5

# Credentials that came with hash-tagged keys: no untagged copy to look for.
NO_LEGACY = ("authorizer:", "component:")

# Connections one sidecar keeps to a single Redis server for commands (the
# event subscription has one more).
MAX_CONNECTIONS = 4

# Every Redis call fails fast: an outage must not stall token decisions.
REDIS_TIMEOUT_S = 1.0

# Resubscribing to events after Redis went away: backoff bounds.
RESUBSCRIBE_MIN_S, RESUBSCRIBE_MAX_S = 0.2, 5.0

_REJECT = """
if redis.call('HGET', KEYS[1], 'value') == ARGV[1] and redis.call('HGET', KEYS[1], 'rejected') ~= '1' then
  redis.call('HSET', KEYS[1], 'rejected', '1')
  redis.call('PUBLISH', ARGV[3], ARGV[2])
  return 1
end
return 0
"""

# Now on Redis's clock, in seconds, inside a script (scripts replicate their
# effects, so TIME is allowed). Every time stored is on this clock.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# Store a fetched token and tell everyone. ARGV: value, age (ms), life left
# (ms), channel, message: durations, never a replica's wall clock.
_SAVE = _NOW + """
local fetched = string.format('%.3f', now - tonumber(ARGV[2]) / 1000)
local expires = string.format('%.3f', now + tonumber(ARGV[3]) / 1000)
redis.call('HSET', KEYS[1], 'value', ARGV[1], 'fetched_at', fetched, 'expires_at', expires, 'rejected', '0')
redis.call('PEXPIRE', KEYS[1], math.max(1, tonumber(ARGV[3])) + 1000)
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

# Write a held token back only where the store has none, or an older one
# (a failover lost the write, or the server restarted empty). Same ARGV.
_SEED = _NOW + """
local fetched = now - tonumber(ARGV[2]) / 1000
local stored = redis.call('HGET', KEYS[1], 'fetched_at')
if stored and tonumber(stored) >= fetched - 0.001 then return 0 end
redis.call('HSET', KEYS[1], 'value', ARGV[1], 'fetched_at', string.format('%.3f', fetched),
           'expires_at', string.format('%.3f', now + tonumber(ARGV[3]) / 1000), 'rejected', '0')
redis.call('PEXPIRE', KEYS[1], math.max(1, tonumber(ARGV[3])) + 1000)
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

# A token's hash and Redis's clock, read together on the key's own node.
_LOAD = """
local t = redis.call('TIME')
return {redis.call('HGETALL', KEYS[1]), t[1], t[2]}
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# Release the fetch lock if still ours, and wake the sidecars waiting on it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""

# Count one fetch unless the cap is reached; returns the new count or -1.
_COUNT = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= tonumber(ARGV[1]) then return -1 end
n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], 172800)
return n
"""


# Replace a refresh token only if the stored one is still the one used.
_CAS = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""

# Drop a credential's token and tell every sidecar (an authorizer removed).
_DROP = """
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""

# Store a value unless the stored one is newer (by its stamp). KEYS: value, stamp.
_SET_IF_NEWER = """
local stored = redis.call('GET', KEYS[2])
if stored and tonumber(stored) > tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
return 1
"""

# Store a value unconditionally (an operator's), its stamp cleared.
_SET_VALUE = """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""

# Authorizers imported per Redis round trip.
IMPORT_BATCH = 1000


def _safe(exc: BaseException) -> str:
    """A Redis error for a log line: its class and message (never the URL)."""
    return f"{exc.__class__.__name__}: {exc}"[:200]


class RedisStore(Watchers):
    def __init__(self, url: str = "", key_prefix: str = "wts:",
                 daily_fetch_cap: int = DEFAULT_DAILY_FETCH_CAP,
                 wait_budget_s: float = 20.0,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, *,
                 cluster: bool = False, sentinel: SentinelConfig | None = None):
        self.prefix = key_prefix
        self.daily_fetch_cap = daily_fetch_cap
        self.wait_budget_s = wait_budget_s
        self.clock, self.wall = clock, wall
        self.cluster, self.sentinel_config = cluster, sentinel
        self.sentinel = None           # redis-py's Sentinel client, with store.sentinel
        common = {"socket_timeout": REDIS_TIMEOUT_S, "socket_connect_timeout": REDIS_TIMEOUT_S,
                  "decode_responses": True}
        if sentinel is not None:
            from redis.asyncio.sentinel import Sentinel
            self.sentinel = Sentinel(
                list(sentinel.hosts), sentinel_kwargs={**common, "password": sentinel.sentinel_password or None},
                **common)
            self.redis = self.sentinel.master_for(
                sentinel.service, username=sentinel.username, password=sentinel.password or None, db=sentinel.db,
                ssl=sentinel.tls, retry_on_timeout=False)
        elif cluster:
            from redis.asyncio.cluster import RedisCluster
            self.redis = RedisCluster.from_url(url, **common)
        else:
            # A few connections are plenty (each command takes well under a
            # millisecond); a bounded pool keeps a fleet of 1,000 pods under
            # Redis's default maxclients (10,000). Callers beyond it wait.
            pool = aioredis.BlockingConnectionPool.from_url(
                url, max_connections=MAX_CONNECTIONS, timeout=REDIS_TIMEOUT_S, retry_on_timeout=False,
                health_check_interval=10, **common)
            self.redis = aioredis.Redis(connection_pool=pool)
        self.owner_prefix = f"{socket.gethostname()}:{os.getpid()}"
        self.channel = f"{key_prefix}events"
        Watchers.__init__(self)
        self._listener: asyncio.Task[None] | None = None
        self.errors = 0
        self.reconnects = 0            # the events subscription came back after a break
        self.failovers = 0             # ... to another master than before (Sentinel)
        self._master: tuple[str, int] | None = None
        self._news: dict[str, asyncio.Event] = {}     # keys a fetch waits on, woken by their events
        # Called after a reconnect: the holders write back what they hold (seed).
        self.on_reconnect: list[Callable[[], Awaitable[None]]] = []

    # ------------------------------------------------------------ keys, time

    def _k(self, kind: str, key: str) -> str:
        """A key of one credential (or registry): hash-tagged by the credential."""
        return f"{self.prefix}{kind}:{{{key}}}"

    async def _call(self, what: str, coro):  # type: ignore[no-untyped-def]
        try:
            return await coro
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self.errors += 1
            raise StoreUnavailable(f"redis {what}: {_safe(exc)}") from None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="store-events")

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except (asyncio.CancelledError, Exception):
                pass
        try:
            await self.redis.aclose()
        except (RedisError, OSError):
            pass


    async def _listen(self) -> None:
        """Follow the events channel; resubscribe with backoff after an outage,
        then have the holders write back what they hold."""
        delay = RESUBSCRIBE_MIN_S
        broken = False
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                await self._note_master()
                delay = RESUBSCRIBE_MIN_S
                if broken:
                    broken = False
                    self.reconnects += 1
                    log.info("store reachable again: writing back the tokens held",
                             extra={"event": "store_reconnected"})
                    for callback in self.on_reconnect:
                        await callback()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    self._dispatch(str(message.get("data", "")))
            except asyncio.CancelledError:
                await _quiet_close(pubsub)
                raise
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                self.errors += 1
                broken = True
                log.warning("store events: %s; resubscribing in %.1f s", _safe(exc), delay,
                            extra={"event": "store_error"})
            await _quiet_close(pubsub)
            await asyncio.sleep(delay)
            delay = min(RESUBSCRIBE_MAX_S, delay * 2)

    async def _note_master(self) -> None:
        """Sentinel: which master we follow; a new one is a failover followed."""
        if self.sentinel is None or self.sentinel_config is None:
            return
        try:
            master = await self.sentinel.discover_master(self.sentinel_config.service)
        except (RedisError, OSError, asyncio.TimeoutError):
            return
        if self._master is not None and master != self._master:
            self.failovers += 1
            log.warning("store: Sentinel failed over to a new master; following it",
                        extra={"event": "store_failover"})
        self._master = master

    def _dispatch(self, data: str) -> None:
        parts = data.split(" ")
        if len(parts) != 3:
            return
        event, key, fp = parts
        waiting = self._news.get(key)
        if waiting is not None:
            waiting.set()
        self.tell(key, event, fp)

    # ------------------------------------------------------------ tokens

    async def load(self, key: str) -> Token | None:
        data, redis_now = await self._load(self._k("token", key))
        if not data and not self.cluster and not key.startswith(NO_LEGACY):
            # Written before keys were hash-tagged (an upgrade under way).
            data, redis_now = await self._load(f"{self.prefix}token:{key}")
        if not data or data.get("rejected") == "1" or not data.get("value"):
            return None
        try:
            # Times on Redis's clock, made local: how long ago, how long left.
            now = self.clock()
            return Token(value=data["value"], fetched_at=now - (redis_now - float(data["fetched_at"])),
                         expires_at=now + (float(data["expires_at"]) - redis_now))
        except (KeyError, ValueError):
            return None

    async def _load(self, redis_key: str) -> tuple[dict[str, str], float]:
        fields, seconds, micros = await self._call("load", self.redis.eval(_LOAD, 1, redis_key))
        return dict(zip(fields[::2], fields[1::2])), int(seconds) + int(micros) / 1_000_000

    def _token_args(self, key: str, token: Token) -> list[str]:
        now = self.clock()
        age_ms = max(0, int((now - token.fetched_at) * 1000))
        life_ms = int((token.expires_at - now) * 1000)
        return [token.value, str(age_ms), str(life_ms), self.channel, f"new {key} {fingerprint(token.value)}"]

    async def _save(self, key: str, token: Token) -> None:
        await self._call("save", self.redis.eval(_SAVE, 1, self._k("token", key), *self._token_args(key, token)))

    async def seed(self, key: str, token: Token) -> bool:
        """Write back a token held locally where the store has none or an older one."""
        return bool(await self._call("seed", self.redis.eval(
            _SEED, 1, self._k("token", key), *self._token_args(key, token))))

    async def reject(self, key: str, bad_value: str) -> bool:
        done = await self._call("reject", self.redis.eval(
            _REJECT, 1, self._k("token", key), bad_value, f"rejected {key} {fingerprint(bad_value)}", self.channel))
        return bool(done)

    async def fetches_today(self, key: str) -> int | None:
        value = await self._call("count", self.redis.get(self._fetches_key(key)))
        return int(value or 0)

    def _fetches_key(self, key: str) -> str:
        return f"{self._k('fetches', key)}:{quota_day(self.wall())}"

    # ------------------------------------------------------------ values and registries

    async def get_value(self, key: str) -> str | None:
        return await self._call("get", self.redis.get(self._k("value", key)))

    async def set_value(self, key: str, value: str) -> None:
        await self._call("set", self.redis.eval(_SET_VALUE, 2, self._k("value", key), self._k("value_at", key),
                                                value))

    async def set_value_if_newer(self, key: str, value: str, stamp: int) -> bool:
        return bool(await self._call("set", self.redis.eval(
            _SET_IF_NEWER, 2, self._k("value", key), self._k("value_at", key), value, str(int(stamp)))))

    async def claim_once(self, key: str, ttl_s: float) -> bool:
        return bool(await self._call("claim", self.redis.set(self._k("seen", key), "1", nx=True,
                                                             px=max(1, int(ttl_s * 1000)))))

    async def release_claim(self, key: str) -> None:
        await self._call("claim", self.redis.delete(self._k("seen", key)))

    async def set_value_ttl(self, key: str, value: str, ttl_s: float) -> None:
        await self._call("set", self.redis.set(self._k("short", key), value, px=max(1, int(ttl_s * 1000))))

    async def get_value_ttl(self, key: str) -> str | None:
        return await self._call("get", self.redis.get(self._k("short", key)))

    async def registry_get(self, registry: str, appid: str) -> str | None:
        return await self._call("registry", self.redis.hget(self._k("registry", registry), appid))

    async def registry_put(self, registry: str, entries: dict[str, str]) -> None:
        items = list(entries.items())
        for start in range(0, len(items), IMPORT_BATCH):
            await self._call("registry", self.redis.hset(self._k("registry", registry),
                                                         mapping=dict(items[start:start + IMPORT_BATCH])))

    async def registry_cas(self, registry: str, appid: str, old: str, new: str) -> bool:
        return bool(await self._call("registry", self.redis.eval(
            _CAS, 1, self._k("registry", registry), appid, old, new)))

    async def registry_remove(self, registry: str, appid: str, token_key: str) -> bool:
        # Two steps (the registry and the token live in different slots):
        # gone from the registry first, so nobody fetches it again.
        removed = await self._call("registry", self.redis.hdel(self._k("registry", registry), appid))
        await self._call("registry", self.redis.eval(_DROP, 1, self._k("token", token_key), self.channel,
                                                     f"removed {token_key} -"))
        return bool(removed)

    async def registry_page(self, registry: str, cursor: int, count: int) -> tuple[int, list[str]]:
        cursor, found = await self._call("registry", self.redis.hscan(
            self._k("registry", registry), cursor, count=count))
        return int(cursor), sorted(found)

    async def registry_count(self, registry: str) -> int:
        return int(await self._call("registry", self.redis.hlen(self._k("registry", registry))))

    # ------------------------------------------------------------ the one fetcher

    async def fetch_exclusive(self, key: str, fetch: FetchFn, accept: Accept) -> tuple[Token, bool]:
        """Return an acceptable token from Redis, or fetch one while holding the
        cluster-wide lock. Waits for another sidecar's fetch rather than
        fetching in parallel; takes over if that sidecar's lease runs out."""
        lock = self._k("lock", key)
        deadline = self.clock() + self.wait_budget_s
        while True:
            token = await self.load(key)
            if token is not None and accept(token):
                return token, False
            owner = f"{self.owner_prefix}:{uuid.uuid4().hex[:12]}"
            if await self._call("lock", self.redis.set(lock, owner, nx=True, px=int(LOCK_LEASE_S * 1000))):
                return await self._fetch_locked(key, lock, owner, fetch, accept)
            if self.clock() > deadline:
                raise StoreUnavailable(f"waited {self.wait_budget_s:g} s for another sidecar's token fetch")
            await self._wait_for_news(key)

    async def _wait_for_news(self, key: str) -> None:
        """Until an event about `key` (a new token, the lock released) or POLL_S."""
        event = self._news.get(key)
        if event is None:
            event = self._news[key] = asyncio.Event()
        try:
            await asyncio.wait_for(event.wait(), timeout=POLL_S)
        except asyncio.TimeoutError:
            pass
        finally:
            if self._news.get(key) is event:
                del self._news[key]

    async def _fetch_locked(self, key: str, lock: str, owner: str, fetch: FetchFn,
                            accept: Accept) -> tuple[Token, bool]:
        renew = asyncio.create_task(self._renew(lock, owner))
        try:
            token = await self.load(key)          # someone may have finished just before us
            if token is not None and accept(token):
                return token, False
            count = await self._call("count", self.redis.eval(_COUNT, 1, self._fetches_key(key), self.daily_fetch_cap))
            if int(count) < 0:
                raise FetchCapReached(f"daily fetch cap of {self.daily_fetch_cap} reached for the cluster "
                                      f"(store.daily_fetch_cap)")
            token = await fetch()
            await self._save(key, token)
            return token, True
        finally:
            renew.cancel()
            try:
                await self.redis.eval(_RELEASE, 1, lock, owner, self.channel, f"unlocked {key} -")
            except (RedisError, OSError, asyncio.TimeoutError):
                pass  # the lease runs out by itself

    async def _renew(self, lock: str, owner: str) -> None:
        while True:
            await asyncio.sleep(LOCK_RENEW_S)
            try:
                await self.redis.eval(_RENEW, 1, lock, owner, int(LOCK_LEASE_S * 1000))
            except (RedisError, OSError, asyncio.TimeoutError):
                pass


async def _quiet_close(pubsub) -> None:  # type: ignore[no-untyped-def]
    try:
        await pubsub.aclose()
    except (RedisError, OSError, asyncio.TimeoutError, AttributeError):
        pass
