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
(choices) in flight at once: more get 429 with Retry-After. ``--api_key`` (one key for
everything) is an admin key of every model. ``name`` is what logs show; a key itself is never
logged.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hmac
import json
import re

from jaxlora.errors import ConfigError

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

    def __post_init__(self):
        where = f"API key {self.name!r}"
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigError(
                f"API key name {self.name!r}: expected 1-64 letters, digits, '.', '_' or '-'"
            )
        if not isinstance(self.key, str) or not self.key or not self.key.isprintable():
            raise ConfigError(f"{where}: key: expected a printable string")
        if not isinstance(self.models, tuple) or not all(
            isinstance(m, str) and m for m in self.models
        ):
            raise ConfigError(f"{where}: models: expected model names or patterns")
        if not isinstance(self.admin, bool):
            raise ConfigError(f"{where}: admin: expected true or false, got {self.admin!r}")
        cap = self.max_in_flight
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ConfigError(f"{where}: max_in_flight: expected an int >= 1, got {cap!r}")

    def allows(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


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
        seen = set()
        for i, key in enumerate(keys):
            value = getattr(key, attribute)
            if value in seen:
                shown = repr(value) if attribute == "name" else "(not shown)"
                raise ConfigError(f"{where}: keys[{i}].{attribute}: {shown} is used twice")
            seen.add(value)


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
        fields = ("name", "key", "models", "admin", "max_in_flight")
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
                )
            )
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    keys = tuple(keys)
    check_keys(keys, path)
    return keys


__all__ = ["ApiKey", "check_keys", "find_key", "load_api_keys"]
