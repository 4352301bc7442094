"""API keys for tenants: each key may use some models only (--api_keys_file).

A platform that serves each customer's fine-tune gives each customer a key that reaches its
own adapters and nothing else. The file is JSON::

    {"keys": [
        {"name": "acme", "key": "sk-acme-...", "models": ["acme-*"]},
        {"name": "ops", "key": "sk-ops-...", "models": ["*"], "admin": true}
    ]}

``models`` are model names (the base model's served name or adapters') or shell-style patterns
(``fnmatch``: ``*``, ``?``, ``[...]``). To a key, a model it may not use does not exist: a
request for it is the unknown model's 404 and ``GET /v1/models`` does not list it. ``admin``
keys may also load and unload adapters and reset the prefix cache (others get 403). Stored
Responses belong to the key that created them. ``max_in_flight`` caps a key's generations
(choices) in flight at once: more get 429 with Retry-After; ``max_tokens_per_minute`` its
tokens a minute (prompt and max_tokens of each generation, the unused max_tokens given back at
its end). ``priority`` is a key's tier under
--scheduling_policy=priority: its requests run at that priority or a less urgent one they ask
for. ``--api_key`` (one key for
everything) is an admin key of every model. ``name`` is what logs show; a key itself is never
logged.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hmac
import json
import logging
import os
import re
import threading
import time

from jaxlora.errors import ConfigError

log = logging.getLogger("jaxlora.server")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclasses.dataclass(frozen=True)
class ApiKey:
    name: str
    key: str = dataclasses.field(repr=False)
    models: tuple[str, ...] = ("*",)
    admin: bool = False
    # Most generations (choices) of this key in flight at once; more get 429 (None: no cap).
    # The engine's queue is every key's: a cap keeps one customer's burst from filling it.
    max_in_flight: int | None = None
    # Under --scheduling_policy=priority: the key's requests run at this priority (lower is
    # served first), and one that asks for a lower (more urgent) one gets this instead: a tier.
    priority: int | None = None
    # Tokens a minute (each generation's prompt and max_tokens taken when it is submitted, the
    # max_tokens it did not use given back when it ends); more get 429 (None: no limit).
    max_tokens_per_minute: int | None = None

    def __post_init__(self):
        where = f"API key {self.name!r}"
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigError(
                f"API key name {self.name!r}: expected 1-64 letters, digits, '.', '_' or '-'"
            )
        if (
            not isinstance(self.key, str)
            or not self.key
            or not self.key.isascii()
            or not self.key.isprintable()
            or self.key != self.key.strip()
        ):
            # (an HTTP client sends ASCII headers only, and the Bearer value arrives stripped:
            # another key could never be sent)
            raise ConfigError(
                f"{where}: key: expected printable ASCII without surrounding whitespace"
            )
        if not isinstance(self.models, tuple) or not all(
            isinstance(m, str) and m for m in self.models
        ):
            raise ConfigError(f"{where}: models: expected model names or patterns")
        if not isinstance(self.admin, bool):
            raise ConfigError(f"{where}: admin: expected true or false, got {self.admin!r}")
        cap = self.max_in_flight
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ConfigError(f"{where}: max_in_flight: expected an int >= 1, got {cap!r}")
        budget = self.max_tokens_per_minute
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, int) or budget < 1
        ):
            raise ConfigError(
                f"{where}: max_tokens_per_minute: expected an int >= 1, got {budget!r}"
            )
        tier = self.priority
        if tier is not None and (isinstance(tier, bool) or not isinstance(tier, int)):
            raise ConfigError(f"{where}: priority: expected an int, got {tier!r}")

    def priority_of(self, asked: int | None) -> int:
        """A request's priority under the priority policy: what it asked for (None: not
        given), never more urgent than the key's tier."""
        if self.priority is None:
            return asked or 0
        return self.priority if asked is None else max(asked, self.priority)

    def allows(self, model: str) -> bool:
        return any(model_matches(model, pattern) for pattern in self.models)


def model_matches(model: str, pattern: str) -> bool:
    """Whether a key's ``models`` entry names model: the name itself (an adapter's name may
    hold ``[``, ``?`` or ``*``), or a shell pattern (``fnmatch``) that matches it."""
    return model == pattern or fnmatch.fnmatchcase(model, pattern)


def with_server_key(tenants: tuple[ApiKey, ...], api_key: str | None) -> tuple[ApiKey, ...]:
    """Every key a server takes: the tenants' and its own ``--api_key`` (an admin of every
    model, named "api_key"; none when None)."""
    own = () if api_key is None else (_ServerKey("api_key", api_key, ("*",), True),)
    return (*tenants, *own)


@dataclasses.dataclass(frozen=True)
class _ServerKey(ApiKey):
    """The server's own ``--api_key`` (with_server_key): not an entry of the keys file."""


def _entry(keys: tuple[ApiKey, ...], i: int) -> str:
    return "--api_key" if isinstance(keys[i], _ServerKey) else f"keys[{i}]"


def find_key(keys: tuple[ApiKey, ...], given: str) -> ApiKey | None:
    """The key whose secret is ``given`` (every key compared, in constant time each)."""
    found = None
    for key in keys:
        if hmac.compare_digest(given.encode(), key.key.encode()):
            found = key
    return found


def check_keys(keys: tuple[ApiKey, ...], where: str) -> None:
    """Names and secrets are each used once."""
    for attribute in ("name", "key"):
        seen: dict[str, int] = {}
        for i, key in enumerate(keys):
            value = getattr(key, attribute)
            if value in seen:
                shown = repr(value) if attribute == "name" else "(not shown)"
                raise ConfigError(
                    f"{where}: keys[{i}].{attribute}: {shown} is used twice (by "
                    f"{_entry(keys, seen[value])} and {_entry(keys, i)})"
                )
            seen[value] = i


def load_api_keys(path: str) -> tuple[ApiKey, ...]:
    """The keys of an --api_keys_file (see the module's docstring)."""
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the API keys file ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a JSON file ({e})") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f'{path}: expected {{"keys": [{{"name", "key", "models"}}, ...]}}')
    keys = []
    for i, entry in enumerate(entries):
        where = f"{path}: keys[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected an object, got {entry!r}")
        fields = (
            "name",
            "key",
            "models",
            "admin",
            "max_in_flight",
            "priority",
            "max_tokens_per_minute",
        )
        unknown = sorted(set(entry) - set(fields))
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown field (expected {', '.join(fields)})")
        for field in ("name", "key", "models"):
            if field not in entry:
                raise ConfigError(f"{where}.{field}: missing")
        secret = entry["key"]
        if not isinstance(secret, str) or len(secret) < 16:
            raise ConfigError(f"{where}.key: expected a string of 16 characters or more")
        models = entry["models"]
        if not isinstance(models, list) or not models:
            raise ConfigError(f"{where}.models: expected a non-empty list of names or patterns")
        try:
            keys.append(
                ApiKey(
                    entry["name"],
                    secret,
                    tuple(models),
                    entry.get("admin", False),
                    entry.get("max_in_flight"),
                    entry.get("priority"),
                    entry.get("max_tokens_per_minute"),
                )
            )
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    keys = tuple(keys)
    check_keys(keys, path)
    return keys


class TokenBucket:
    """A key's tokens a minute: full at first, refilled at the per-minute rate; ``take``
    empties it by a request's tokens or says how long until they are there."""

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.capacity = per_minute
        self._rate = per_minute / 60.0
        self._clock = clock
        self._level = float(per_minute)
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._at) * self._rate)
        self._at = now

    def take(self, tokens: int) -> float | None:
        """None: taken. Otherwise the seconds until ``tokens`` are there (nothing taken)."""
        self._refill()
        if tokens > self._level:
            return (tokens - self._level) / self._rate
        self._level -= tokens
        return None

    def give_back(self, tokens: int) -> None:
        self._refill()
        self._level = min(self.capacity, self._level + tokens)


class KeysFile:
    """An --api_keys_file read again when it changes (looked at no more than once every
    ``check_every_s`` seconds, by the requests that need a key), so that customers are added
    and removed without a restart. A file that no longer loads keeps the keys read last, and
    says why in the log; requests in flight are never touched."""

    def __init__(self, path: str, *, check_every_s: float = 1.0, check=None):
        """check(keys): raises ConfigError for keys that cannot serve beside the others (the
        server's own --api_key)."""
        self.path = path
        self.check_every_s = check_every_s
        self._check = check or (lambda keys: None)
        self._stamp = self._stamp_now()
        self.keys = load_api_keys(path)
        self._check(self.keys)
        self._checked_at = time.monotonic()
        self._lock = threading.Lock()

    def _stamp_now(self):
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def current(self) -> tuple[ApiKey, ...]:
        now = time.monotonic()
        if now - self._checked_at < self.check_every_s or not self._lock.acquire(blocking=False):
            return self.keys
        try:
            self._checked_at = now
            stamp = self._stamp_now()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    keys = load_api_keys(self.path)
                    self._check(keys)
                except ConfigError as e:
                    log.error(
                        "API keys not reloaded, the %d read before stay: %s", len(self.keys), e
                    )
                else:
                    self.keys = keys
                    log.info("API keys reloaded from %s: %d keys", self.path, len(keys))
        finally:
            self._lock.release()
        return self.keys


__all__ = [
    "ApiKey",
    "KeysFile",
    "TokenBucket",
    "check_keys",
    "find_key",
    "load_api_keys",
    "model_matches",
    "with_server_key",
]
