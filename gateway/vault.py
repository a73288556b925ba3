"""Credentials the gateway keeps: encrypted when it must use them later, hashed when it only
needs to recognise them.

- A queued transcript's API key is needed to submit it upstream later (and to reconcile it
  until it ends): it is stored encrypted with Fernet (AES-128-CBC + HMAC-SHA256, from the
  ``cryptography`` library) under the deployment's secret key, and deleted once the job ends.
- To check that a request for a job comes from the key that created it, only a keyed hash
  (HMAC-SHA256) of the key is stored, compared in constant time.

The secret key comes from ``AAI_GATEWAY_SECRET_KEY`` (``aai-gateway gen-key`` prints a new
one). Every instance sharing a Redis must have the same key. With the embedded store and no
variable set, a key is generated once and kept in ``<data_dir>/secret.key`` (mode 0600).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

ENV = "AAI_GATEWAY_SECRET_KEY"
KNOWN_KEYS = 4096  # fingerprints remembered (then forgotten all at once and relearnt)


class SecretError(RuntimeError):
    """The secret key is missing or wrong; the message says what to do."""


def generate_key() -> str:
    return Fernet.generate_key().decode()


class Vault:
    def __init__(self, key: str) -> None:
        try:
            self._fernet = Fernet(key.encode() if isinstance(key, str) else key)
        except (ValueError, TypeError) as exc:
            raise SecretError(
                f"{ENV} is not a valid key (32 url-safe base64 bytes; see `aai-gateway gen-key`)"
            ) from exc
        self._mac_key = hashlib.sha256(b"aai-gateway key fingerprint:" + key.encode()).digest()
        # Every proxied request names its key's fingerprint (pools, queue shares): the few
        # keys a deployment sees are hashed once each, not on every request (~1.8 us).
        self._known: dict[str, str] = {}

    def encrypt(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode("utf-8", "surrogateescape")).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode("utf-8", "surrogateescape")
        except InvalidToken as exc:
            raise SecretError(
                f"a stored credential does not decrypt: is {ENV} the same on every instance?"
            ) from exc

    def fingerprint(self, secret: str) -> str:
        """A keyed hash of a client's key: recognisable, not reversible."""
        known = self._known.get(secret)
        if known is None:
            # Any header value (aiohttp keeps bytes that are not UTF-8 as surrogates): never an error.
            known = hmac.new(
                self._mac_key, secret.encode("utf-8", "surrogateescape"), hashlib.sha256
            ).hexdigest()
            if len(self._known) >= KNOWN_KEYS:
                self._known.clear()  # a client cycling made-up keys costs it the hashing only
            self._known[secret] = known
        return known

    @staticmethod
    def same(a: str, b: str) -> bool:
        return hmac.compare_digest(a.encode("utf-8", "surrogateescape"), b.encode("utf-8", "surrogateescape"))

    def __repr__(self) -> str:
        return "Vault(<secret>)"


def load_vault(
    *,
    shared: bool,
    data_dir: Path | None,
    environ: dict[str, str] | None = None,
    derive_from: str | None = None,
) -> Vault:
    """The deployment's vault: from the environment; else, in managed mode (``derive_from``:
    the account's key, which every instance has), derived from the account key; else
    (embedded store only) a key file."""
    env = os.environ if environ is None else environ
    key = env.get(ENV)
    if key:
        return Vault(key)
    if derive_from:
        digest = hashlib.sha256(b"aai-gateway vault key:" + derive_from.encode()).digest()
        return Vault(base64.urlsafe_b64encode(digest).decode())
    if shared or data_dir is None:
        raise SecretError(
            f"{ENV} must be set when instances share Redis (the same value on every instance); "
            "generate one with `aai-gateway gen-key`"
        )
    path = data_dir / "secret.key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(generate_key())
    return Vault(path.read_text().strip())
