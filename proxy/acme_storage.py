"""Where ACME keeps what must outlive a restart: the account, and each domain's
certificate and key; and, for a fleet, who is ordering which domain.

Two implementations behind one protocol:

- ``FileStorage`` (``tls.acme.storage``, a directory): ``account.key``,
  ``account.json``, ``certs/<domain>/{fullchain.pem,key.pem}`` and
  ``challenges/<token>``. Written atomically (temporary file, then rename), keys
  0600. One process per directory orders; the lock is a no-op.
- ``RedisStorage`` (``state.backend: redis``): the same under ``{prefix}:acme:*``, so
  every instance serves the certificate one of them obtained. Challenges are
  published there too (HTTP-01 by token, TLS-ALPN-01 by domain under ``alpn:*``, each
  with its own channel), since the ACME server may validate through any instance.
  The per-domain lock is ``SET NX PX`` with this instance's id, renewed while the
  order runs and released only by its holder: a fleet orders each domain once, and a
  dead holder's lock expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import uuid
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

from redis.asyncio import Redis

log = logging.getLogger("bgproxy.acme")

HTTP_01 = "http-01"  # challenge kinds: HTTP-01 answers are keyed by token,
TLS_ALPN_01 = "tls-alpn-01"  # TLS-ALPN-01 answers by domain

# KEYS: lock. ARGV: holder. Deletes the lock only if we still hold it.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: lock. ARGV: holder, ttl ms. Extends the lock only if we still hold it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class AcmeStorage(Protocol):
    kind: str

    async def load_account(self) -> tuple[bytes, str | None] | None:
        """The account key (PEM) and its registration (JSON), or None."""

    async def save_account(self, key_pem: bytes, regr_json: str | None) -> None: ...

    async def load_certificate(self, domain: str) -> tuple[bytes, bytes] | None:
        """The domain's full chain and key (PEM), or None."""

    async def save_certificate(self, domain: str, chain_pem: bytes, key_pem: bytes) -> None: ...

    async def lock(self, domain: str, ttl: float) -> bool:
        """Take the right to order ``domain`` for ``ttl`` seconds; False if taken."""

    async def renew_lock(self, domain: str, ttl: float) -> bool: ...

    async def unlock(self, domain: str) -> None: ...

    async def put_challenge(
        self, name: str, key_authorization: str, ttl: float, kind: str = HTTP_01
    ) -> None:
        """Publish an answer: ``name`` is the token (HTTP-01) or the domain (TLS-ALPN-01)."""

    async def drop_challenge(self, name: str, kind: str = HTTP_01) -> None: ...

    async def get_challenge(self, name: str, kind: str = HTTP_01) -> str | None: ...

    async def follow_challenges(
        self, answers: MutableMapping[str, str], alpn: MutableMapping[str, str] | None = None
    ) -> None:
        """Keep ``answers`` (HTTP-01) and ``alpn`` (TLS-ALPN-01) in step with the
        challenges any process publishes, until cancelled: the ACME server may validate
        through any instance of a fleet."""

    async def close(self) -> None: ...


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def safe_token(token: str) -> bool:
    """An ACME token is base64url (RFC 8555 §8.1): never a path of its own."""
    return 0 < len(token) <= 256 and all(c.isalnum() or c in "-_" for c in token)


_DNS_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")


def safe_name(name: str, kind: str) -> bool:
    """A token for HTTP-01, a DNS name for TLS-ALPN-01 (the config checked ours)."""
    if kind == TLS_ALPN_01:
        return 0 < len(name) <= 253 and _DNS_CHARS.issuperset(name)
    return safe_token(name)


class FileStorage:
    kind = "file"

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)

    def _cert_dir(self, domain: str) -> Path:
        return self.dir / "certs" / domain

    async def load_account(self) -> tuple[bytes, str | None] | None:
        try:
            key = (self.dir / "account.key").read_bytes()
        except FileNotFoundError:
            return None
        try:
            regr: str | None = (self.dir / "account.json").read_text()
        except FileNotFoundError:
            regr = None
        return key, regr

    async def save_account(self, key_pem: bytes, regr_json: str | None) -> None:
        _write_atomic(self.dir / "account.key", key_pem, 0o600)
        if regr_json is not None:
            _write_atomic(self.dir / "account.json", regr_json.encode())

    async def load_certificate(self, domain: str) -> tuple[bytes, bytes] | None:
        where = self._cert_dir(domain)
        try:
            return (where / "fullchain.pem").read_bytes(), (where / "key.pem").read_bytes()
        except FileNotFoundError:
            return None

    async def save_certificate(self, domain: str, chain_pem: bytes, key_pem: bytes) -> None:
        where = self._cert_dir(domain)
        # The key first: a crash between the two leaves the old chain with a new key,
        # which the loader refuses as a mismatch and orders again.
        _write_atomic(where / "key.pem", key_pem, 0o600)
        _write_atomic(where / "fullchain.pem", chain_pem)

    async def lock(self, domain: str, ttl: float) -> bool:
        return True

    async def renew_lock(self, domain: str, ttl: float) -> bool:
        return True

    async def unlock(self, domain: str) -> None:
        return None

    async def put_challenge(
        self, name: str, key_authorization: str, ttl: float, kind: str = HTTP_01
    ) -> None:
        # On disk too, so that another process on this host (--workers) can answer it.
        # A TLS-ALPN-01 answer is only ever presented by the process that ordered.
        if kind == HTTP_01 and safe_token(name):
            _write_atomic(self.dir / "challenges" / name, key_authorization.encode())

    async def drop_challenge(self, name: str, kind: str = HTTP_01) -> None:
        if kind == HTTP_01 and safe_token(name):
            with contextlib.suppress(FileNotFoundError):
                (self.dir / "challenges" / name).unlink()

    async def get_challenge(self, name: str, kind: str = HTTP_01) -> str | None:
        if kind != HTTP_01 or not safe_token(name):
            return None
        try:
            return (self.dir / "challenges" / name).read_text()
        except FileNotFoundError:
            return None

    async def follow_challenges(
        self, answers: MutableMapping[str, str], alpn: MutableMapping[str, str] | None = None
    ) -> None:
        return None  # one process per directory: its own answers are all there are

    async def close(self) -> None:
        return None


class RedisStorage:
    kind = "redis"

    def __init__(self, url: str, prefix: str, op_timeout: float = 2.0) -> None:
        self._redis: Redis = Redis.from_url(
            url, socket_timeout=op_timeout, socket_connect_timeout=op_timeout
        )
        self._prefix = f"{prefix}:acme"
        self.holder = uuid.uuid4().hex  # this instance, in the locks it takes
        self._unlock = self._redis.register_script(_UNLOCK)
        self._renew = self._redis.register_script(_RENEW)

    def _key(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    async def load_account(self) -> tuple[bytes, str | None] | None:
        raw = await self._redis.get(self._key("account"))
        if raw is None:
            return None
        data = json.loads(raw)
        return data["key"].encode(), data.get("regr")

    async def save_account(self, key_pem: bytes, regr_json: str | None) -> None:
        data = {"key": key_pem.decode(), "regr": regr_json}
        # NX: two instances registering at once keep the first account, and the second
        # reloads it (see AcmeManager._account).
        await self._redis.set(self._key("account"), json.dumps(data), nx=True)

    async def load_certificate(self, domain: str) -> tuple[bytes, bytes] | None:
        raw: Any = await self._redis.get(self._key("cert", domain))
        if raw is None:
            return None
        data = json.loads(raw)
        return data["chain"].encode(), data["key"].encode()

    async def save_certificate(self, domain: str, chain_pem: bytes, key_pem: bytes) -> None:
        data = {"chain": chain_pem.decode(), "key": key_pem.decode()}
        await self._redis.set(self._key("cert", domain), json.dumps(data))

    async def lock(self, domain: str, ttl: float) -> bool:
        got = await self._redis.set(
            self._key("lock", domain), self.holder, nx=True, px=int(ttl * 1000)
        )
        return bool(got)

    async def renew_lock(self, domain: str, ttl: float) -> bool:
        done = await self._renew(
            keys=[self._key("lock", domain)], args=[self.holder, int(ttl * 1000)]
        )
        return bool(done)

    async def unlock(self, domain: str) -> None:
        await self._unlock(keys=[self._key("lock", domain)], args=[self.holder])

    # Where each kind lives: (key part, channel). HTTP-01's predate TLS-ALPN-01's.
    _PLACES: ClassVar[dict[str, tuple[str, str]]] = {
        HTTP_01: ("challenge", "challenges"),
        TLS_ALPN_01: ("alpn", "alpn-challenges"),
    }

    async def put_challenge(
        self, name: str, key_authorization: str, ttl: float, kind: str = HTTP_01
    ) -> None:
        part, channel = self._PLACES[kind]
        await self._redis.set(self._key(part, name), key_authorization, px=int(ttl * 1000))
        await self._redis.publish(self._key(channel), f"+{name} {key_authorization}")

    async def drop_challenge(self, name: str, kind: str = HTTP_01) -> None:
        part, channel = self._PLACES[kind]
        await self._redis.delete(self._key(part, name))
        await self._redis.publish(self._key(channel), f"-{name}")

    async def follow_challenges(
        self, answers: MutableMapping[str, str], alpn: MutableMapping[str, str] | None = None
    ) -> None:
        boards = {HTTP_01: answers} if alpn is None else {HTTP_01: answers, TLS_ALPN_01: alpn}
        by_channel = {self._key(self._PLACES[kind][1]).encode(): kind for kind in boards}
        delay = 0.1
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*by_channel)
                # Those published before we listened (a restart mid-order).
                for kind, board in boards.items():
                    pattern = self._key(self._PLACES[kind][0], "*")
                    async for key in self._redis.scan_iter(match=pattern):
                        name = key.decode().rsplit(":", 1)[-1]  # neither kind has a colon
                        value = await self.get_challenge(name, kind)
                        if value is not None:
                            board[name] = value
                delay = 0.1
                while True:
                    msg = await pubsub.get_message(timeout=5.0)
                    if msg is None:
                        continue
                    kind = by_channel.get(msg["channel"], HTTP_01)
                    board = boards[kind]
                    text = msg["data"].decode()
                    if text.startswith("+"):
                        name, _, value = text[1:].partition(" ")
                        if safe_name(name, kind):
                            board[name] = value
                    elif text.startswith("-"):
                        board.pop(text[1:], None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: listen again once it is back
                log.warning("ACME: lost the challenge channel (%s); retrying", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def get_challenge(self, name: str, kind: str = HTTP_01) -> str | None:
        if not safe_name(name, kind):
            return None
        raw = await self._redis.get(self._key(self._PLACES[kind][0], name))
        return raw.decode() if isinstance(raw, bytes) else raw

    async def close(self) -> None:
        await self._redis.aclose()
