"""API keys: loaded once at start-up, each mapped to a trainer name, compared in constant time.

With no keys configured, authentication is off and every caller is the trainer
`anonymous`. Trainer names are the only values of the `trainer` metric label, so its
cardinality is bounded by the configuration.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import yaml

from service.config import ServiceSettings
from service.errors import ConfigError, Unauthorized

ANONYMOUS = "anonymous"


def _parse_inline(text: str) -> dict[str, str]:
    keys = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, sep, key = entry.partition(":")
        if not sep or not name or not key:
            raise ConfigError("ALARM_API_KEYS entries must look like 'trainer:key'")
        keys[name] = key
    return keys


def _parse_file(path: Path) -> dict[str, str]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read api_keys_file {path}: {exc}") from exc
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in data.items()
    ):
        raise ConfigError(f"api_keys_file {path} must map trainer names to non-empty keys")
    return data


def _sendable(key: str) -> bool:
    """A key an `Authorization` header can carry as written: visible ASCII, no spaces.
    Servers read header bytes as latin-1, so any other key could never match."""
    return key.isascii() and key.isprintable() and not any(c.isspace() for c in key)


class Authenticator:
    def __init__(self, keys_by_trainer: dict[str, str]) -> None:
        if len(set(keys_by_trainer.values())) != len(keys_by_trainer):
            raise ConfigError("two trainers share one API key")
        unsendable = sorted(name for name, key in keys_by_trainer.items() if not _sendable(key))
        if unsendable:  # the trainers are named, never their keys
            raise ConfigError(
                f"API keys of {unsendable} must be visible ASCII without spaces, "
                "or no request could present them"
            )
        self._keys = [(name, key.encode()) for name, key in keys_by_trainer.items()]

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> Authenticator:
        keys: dict[str, str] = {}
        if settings.api_keys_file is not None:
            keys.update(_parse_file(settings.api_keys_file))
        if settings.api_keys is not None:
            keys.update(_parse_inline(settings.api_keys.get_secret_value()))
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def trainers(self) -> list[str]:
        return [name for name, _ in self._keys] or [ANONYMOUS]

    def trainer_for(self, authorization: str | None) -> str:
        """The trainer a `Bearer <key>` header belongs to, or Unauthorized."""
        if not self.enabled:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        presented = token.strip().encode()
        match = None
        for name, key in self._keys:  # compare with every key: timing reveals nothing
            if hmac.compare_digest(presented, key):
                match = name
        if match is None:
            raise Unauthorized("invalid API key")
        return match
