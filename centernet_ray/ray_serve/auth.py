"""API keys for the endpoint: ``Authorization: Bearer <key>``, checked in constant time.

Keys come from ``serve.api_keys_file`` (one key per line; blank lines and ``#`` comments ignored)
or, when that is empty, from the ``CENTERNET_RAY_API_KEYS`` environment variable (comma-separated).
No keys: the endpoint is open. Keys are never logged, only their count.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os

from centernet_ray import storage
from centernet_ray.errors import UserInputError

log = logging.getLogger(__name__)

API_KEYS_ENV = "CENTERNET_RAY_API_KEYS"


class ApiKeys:
    """The accepted keys, kept as SHA-256 digests (equal lengths for ``hmac.compare_digest``)."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys]

    @classmethod
    def load(cls, keys_file: str = "") -> "ApiKeys":
        if keys_file:
            try:
                lines = storage.read_bytes(keys_file).decode().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise UserInputError(f"serve.api_keys_file: cannot read {keys_file}: "
                                     f"{getattr(exc, 'strerror', None) or exc}") from None
            keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
            if not keys:
                raise UserInputError(f"serve.api_keys_file {keys_file} holds no key (one per line)")
        else:
            keys = [key.strip() for key in os.environ.get(API_KEYS_ENV, "").split(",") if key.strip()]
        if keys:
            log.info("API keys required: %d key(s) from %s", len(keys), "the keys file" if keys_file else API_KEYS_ENV)
        return cls(keys)

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value carries one of the keys (always true without keys)."""
        if not self._digests:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        matched = False
        for known in self._digests:  # every key compared: the time does not tell which one matched
            matched |= hmac.compare_digest(digest, known)
        return matched and scheme.lower() == "bearer"
