"""Automatic certificates (``tls.acme``, RFC 8555) with certbot's ``acme`` library.

``AcmeManager`` keeps one task per domain. Each makes sure the domain has a certificate
that is not due for renewal: one served from ``tls.certificates`` counts, else it loads
the one in storage, else (or when due, ``renew_before`` its expiry) it orders one. An
order answers ``tls.acme.challenge``. HTTP-01: the key authorization of each token goes
into ``store.http01`` (which the plain listener answers at
``/.well-known/acme-challenge/<token>``) and into storage (for the other processes of
a fleet). TLS-ALPN-01: a challenge certificate made from the key authorization
(proxy/acme_tlsalpn.py) is set with ``store.set_challenge``, which the TLS listener
presents to clients offering ``acme-tls/1``. Then the server validates, the
certificate is stored and then installed with ``store.install``: new TLS connections
get it at once, open ones keep theirs. A failed order is logged and retried with
exponential backoff; the old certificate stays in use meanwhile. ``status()`` is
``/status`` ``tls.acme``.

The ``acme`` library is synchronous (requests): its calls run in a thread of the
manager's own executor, never on the event loop; the loop does the storage, the
tokens and the install between them.

With Redis storage, a per-domain lock makes exactly one instance order a domain; the
others wait and load what it stored, and re-read the storage periodically so a renewal
anywhere reaches every instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from acme import challenges, client, crypto_util, messages
from acme import errors as acme_errors
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.b64 import b64encode
from josepy.jwa import ES256
from josepy.jwk import JWKEC

from config import AcmeConfig
from proxy.acme_storage import AcmeStorage
from proxy.acme_tlsalpn import (
    TLS_ALPN_01,
    AlpnChallenges,
    TlsAlpn01Response,
    challenge_token,
    challenge_type,
)
from proxy.tasks import Tasks, cancel_and_wait

log = logging.getLogger("bgproxy.acme")

USER_AGENT = "bgproxy-acme"


class CertificateStore(Protocol):
    """What ACME needs of the TLS listener's certificate store (the SNI store of the TLS
    listener, proxy/certs.py ``CertStore``, implements it)."""

    http01: dict[str, str]  # token -> key authorization, answered by the plain listener

    def install(
        self, names: list[str] | tuple[str, ...], cert_pem: bytes, key_pem: bytes, source: str = ...
    ) -> Any:
        """Serve ``cert_pem`` for ``names`` from the next handshake on."""

    def select(self, server_name: str | None) -> Any:
        """The certificate a handshake for ``server_name`` gets (``.names``,
        ``.not_after``, ``.source``), or None."""

    def set_challenge(self, name: str, cert_pem: bytes, key_pem: bytes) -> None:
        """Present a TLS-ALPN-01 certificate for ``name`` to ``acme-tls/1`` clients."""

    def clear_challenge(self, name: str) -> None: ...


@dataclass
class DomainState:
    """What ``/status`` shows of one domain."""

    state: str = "pending"  # pending | valid | ordering | waiting | failed
    not_after: dt.datetime | None = None
    source: str | None = None  # "acme", or "file" when tls.certificates covers it
    attempts: int = 0  # failed attempts in a row
    last_error: str | None = None
    next_attempt: float | None = None  # unix time
    renew_at: dt.datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "not_after": self.not_after.isoformat() if self.not_after else None,
            "renew_at": self.renew_at.isoformat() if self.renew_at else None,
            "source": self.source,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "next_attempt": self.next_attempt,
        }


@dataclass
class Timing:
    """The waits, separate so tests can shorten them."""

    backoff: tuple[float, float] = (5.0, 3600.0)  # first retry, cap (doubles between)
    recheck: float = 3600.0  # re-read storage (a fleet's renewals) at least this often
    lock_wait: float = 5.0  # while another instance holds the lock
    lock_ttl: float = 120.0
    order_deadline: float = 90.0  # validation and issuance, once the challenges are up
    http_timeout: float = 15.0  # one request to the ACME server


def not_after(chain_pem: bytes) -> dt.datetime:
    return x509.load_pem_x509_certificate(chain_pem).not_valid_after_utc


def _short(exc: BaseException) -> str:
    """An ACME problem's detail, or the exception's class: one line for logs and status."""
    if isinstance(exc, messages.Error):
        return f"{exc.typ.rsplit(':', 1)[-1] if exc.typ else 'error'}: {exc.detail or ''}".strip()
    if isinstance(exc, acme_errors.ValidationError):
        failed = [
            str(c.error.detail or c.error.typ)
            for a in exc.failed_authzrs
            for c in a.body.challenges
            if c.error is not None
        ]
        return "validation failed: " + ("; ".join(failed) or "no detail")
    if isinstance(exc, acme_errors.TimeoutError):
        return "the ACME server did not finish the order in time"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


@dataclass
class _Pending:
    """An order between its two threaded halves."""

    order: messages.OrderResource
    key_pem: bytes
    answers: list[tuple[messages.ChallengeBody, challenges.ChallengeResponse, str, str]] = field(
        default_factory=list
    )  # (challenge, response, http-01 token or tls-alpn-01 domain, key authorization)


class AcmeClient:
    """The synchronous half: an account and orders, run in the manager's executor."""

    def __init__(self, cfg: AcmeConfig, timing: Timing) -> None:
        self.cfg = cfg
        self.timing = timing
        self._client: client.ClientV2 | None = None
        self._key: JWKEC | None = None

    def connect(self, key_pem: bytes | None, regr_json: str | None) -> tuple[bytes, str]:
        """Register (or find) the account of ``key_pem`` (a new key when None); returns
        the key and registration to store."""
        if key_pem is None:
            key = ec.generate_private_key(ec.SECP256R1())
            key_pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        loaded = serialization.load_pem_private_key(key_pem, password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        jwk = JWKEC(key=loaded)
        net = client.ClientNetwork(
            jwk,
            alg=ES256,
            # requests takes a CA bundle path here too (typed bool in acme's stubs).
            verify_ssl=self.cfg.ca_file or True,  # type: ignore[arg-type]
            user_agent=USER_AGENT,
            timeout=int(self.timing.http_timeout),
        )
        assert self.cfg.directory is not None
        directory = client.ClientV2.get_directory(self.cfg.directory, net)
        acme = client.ClientV2(directory, net)
        reg = messages.NewRegistration.from_data(email=self.cfg.email, terms_of_service_agreed=True)
        try:
            regr = acme.new_account(reg)
        except acme_errors.ConflictError as exc:
            # The key has an account already (RFC 8555 §7.3.1): use it.
            regr = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
            net.account = regr
        self._client = acme
        self._key = jwk
        return key_pem, regr.json_dumps()

    def begin(self, domain: str) -> _Pending:
        assert self._client is not None and self._key is not None
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        order = self._client.new_order(crypto_util.make_csr(key_pem, [domain]))
        pending = _Pending(order, key_pem)
        wanted = self.cfg.challenge
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue  # validated recently (servers may reuse authorizations)
            for challb in authz.body.challenges:
                if challenge_type(challb.chall) != wanted:
                    continue
                if wanted == TLS_ALPN_01:
                    # acme 5.x has no class for it: the key authorization by hand
                    # (RFC 8555 §8.1), the identifier it is presented for.
                    thumbprint = b64encode(self._key.thumbprint()).decode()
                    validation = f"{challenge_token(challb.chall)}.{thumbprint}"
                    name = authz.body.identifier.value
                    pending.answers.append((challb, TlsAlpn01Response(), name, validation))
                else:
                    response, validation = challb.response_and_validation(self._key)
                    token = challb.chall.encode("token")
                    pending.answers.append((challb, response, token, validation))
                break
            else:
                raise RuntimeError(f"the ACME server offers no {wanted} challenge for {domain}")
        return pending

    def finish(self, pending: _Pending) -> bytes:
        """Tell the server the challenges are up, wait for issuance: the full chain."""
        assert self._client is not None
        for challb, response, _, _ in pending.answers:
            self._client.answer_challenge(challb, response)
        deadline = dt.datetime.now() + dt.timedelta(seconds=self.timing.order_deadline)
        done = self._client.poll_and_finalize(pending.order, deadline)
        return done.fullchain_pem.encode()


class AcmeManager:
    """Keeps a certificate for each of ``domains``; an async context manager owning its
    tasks, executor and storage."""

    def __init__(
        self,
        cfg: AcmeConfig,
        domains: Sequence[str],
        store: CertificateStore,
        storage: AcmeStorage,
        timing: Timing | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.domains = tuple(domains)
        self.store = store
        self.storage = storage
        self.timing = timing or Timing()
        self._clock = clock
        self.domain_states = {d: DomainState() for d in self.domains}
        self.account: str | None = None  # the account URL, once registered
        self.orders = 0  # certificates obtained by this process
        self._acme = AcmeClient(cfg, self.timing)
        self._connected = False
        self._connect_lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="acme")
        self._tasks = Tasks()
        self._wake: dict[str, asyncio.Event] = {d: asyncio.Event() for d in self.domains}
        self._alpn = AlpnChallenges(store)

    async def __aenter__(self) -> AcmeManager:
        # With TLS-ALPN-01, any instance of a fleet presents the challenge any other set.
        alpn = self._alpn if self.cfg.challenge == TLS_ALPN_01 else None
        self._tasks.spawn(
            self.storage.follow_challenges(self.store.http01, alpn), name="acme-challenges"
        )
        for domain in self.domains:
            self._tasks.spawn(self._keep(domain), name=f"acme:{domain}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._tasks.cancel_all()
        # A thread still waiting on the ACME server ends at its own timeout; nobody waits.
        self._executor.shutdown(wait=False, cancel_futures=True)
        for token in list(self.store.http01):
            self.store.http01.pop(token, None)
        self._alpn.clear()
        await self.storage.close()

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "directory": self.cfg.directory,
            "challenge": self.cfg.challenge,
            "storage": self.storage.kind,
            "account": self.account,
            "domains": {d: s.to_dict() for d, s in self.domain_states.items()},
        }

    def kick(self, domain: str | None = None) -> None:
        """Re-check now (tests; a SIGHUP could too)."""
        for name, event in self._wake.items():
            if domain is None or name == domain:
                event.set()

    # -- one domain -----------------------------------------------------------------------

    async def _keep(self, domain: str) -> None:
        st = self.domain_states[domain]
        delay = self.timing.backoff[0]
        while True:
            try:
                wait = await self._step(domain, st)
                delay = self.timing.backoff[0]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                st.attempts += 1
                st.last_error = _short(exc)
                st.state = "failed"
                # Jitter: a fleet that failed together does not retry together.
                wait = delay * random.uniform(0.8, 1.2)
                delay = min(delay * 2, self.timing.backoff[1])
                log.warning(
                    "ACME: could not get a certificate for %s (attempt %d): %s; retrying in %.0fs",
                    domain, st.attempts, st.last_error, wait,
                )  # fmt: skip
            st.next_attempt = self._clock() + wait
            event = self._wake[domain]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), wait)
            event.clear()

    def _due(self, expires: dt.datetime) -> dt.datetime:
        return expires - dt.timedelta(seconds=self.cfg.renew_before)

    def _seconds_until(self, when: dt.datetime) -> float:
        return when.timestamp() - self._clock()

    async def _step(self, domain: str, st: DomainState) -> float:
        """One look at ``domain``: install or order what it needs; the seconds until the
        next look."""
        served = self.store.select(domain)
        if served is not None and getattr(served, "source", None) == "file":
            names = getattr(served, "names", ())
            if _covers(names, domain) and self._seconds_until(self._due(served.not_after)) > 0:
                st.state, st.source, st.not_after = "valid", "file", served.not_after
                st.renew_at = None
                return min(self.timing.recheck, self._seconds_until(self._due(served.not_after)))
        stored = await self.storage.load_certificate(domain)
        expires = None
        if stored is not None:
            chain, key = stored
            try:
                expires = not_after(chain)
                if st.not_after is None or expires > st.not_after:
                    self.store.install([domain], chain, key, source="acme")
                    st.not_after, st.source = expires, "acme"
            except Exception as exc:  # damaged or mismatched files: order a new one
                log.warning("ACME: the stored certificate of %s is unusable (%s)", domain, exc)
                expires = None
        if expires is not None and self._seconds_until(self._due(expires)) > 0:
            st.state, st.attempts, st.last_error = "valid", 0, None
            st.renew_at = self._due(expires)
            return min(self.timing.recheck, self._seconds_until(st.renew_at))
        if not await self.storage.lock(domain, self.timing.lock_ttl):
            if st.state != "valid":
                st.state = "waiting"  # another instance orders it
            return self.timing.lock_wait
        try:
            # Stored while we waited for the lock (another instance just finished)?
            fresh = await self.storage.load_certificate(domain)
            if fresh is not None and fresh != stored:
                return 0.0  # look again: install it, or order if it is due too
            st.state = "ordering"
            chain, key = await self._order(domain)
            # Stored before the lock goes, so whoever takes it next finds the certificate.
            await self.storage.save_certificate(domain, chain, key)
        finally:
            with contextlib.suppress(Exception):
                await self.storage.unlock(domain)
        self.store.install([domain], chain, key, source="acme")
        expires = not_after(chain)
        self.orders += 1
        st.state, st.source, st.not_after = "valid", "acme", expires
        st.attempts, st.last_error = 0, None
        st.renew_at = self._due(expires)
        log.info("ACME: obtained a certificate for %s, valid until %s", domain, expires)
        wait = self._seconds_until(st.renew_at)
        if wait <= 0:
            # Due at birth: ordering again at once would never end.
            log.warning(
                "ACME: tls.acme.renew_before exceeds the lifetime of %s's certificate "
                "(until %s); not renewing before the next check", domain, expires,
            )  # fmt: skip
            return self.timing.recheck
        return min(self.timing.recheck, wait)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _connect(self) -> None:
        async with self._connect_lock:
            if self._connected:
                return
            found = await self.storage.load_account()
            key_pem, regr = found if found is not None else (None, None)
            key_pem, regr = await self._run(self._acme.connect, key_pem, regr)
            await self.storage.save_account(key_pem, regr)
            if found is None:
                # With Redis, another instance may have registered first: use its account.
                again = await self.storage.load_account()
                if again is not None and again[0] != key_pem:
                    key_pem, regr = await self._run(self._acme.connect, *again)
            self.account = messages.RegistrationResource.json_loads(regr).uri
            self._connected = True

    async def _order(self, domain: str) -> tuple[bytes, bytes]:
        try:
            await self._connect()
            pending = await self._run(self._acme.begin, domain)
        except messages.Error as exc:
            if exc.typ and exc.typ.endswith("accountDoesNotExist"):
                self._connected = False  # the server forgot us: register again next time
            raise
        names = [name for _, _, name, _ in pending.answers]
        try:
            for _, _, name, validation in pending.answers:
                await self._publish(name, validation)
            renew = self._tasks.spawn(self._hold_lock(domain), name=f"acme-lock:{domain}")
            try:
                chain = await self._run(self._acme.finish, pending)
            finally:
                await cancel_and_wait(renew)
        finally:
            for name in names:
                await self._withdraw(name)
        return chain, pending.key_pem

    async def _publish(self, name: str, key_authorization: str) -> None:
        """Put one challenge answer up: ``name`` is an HTTP-01 token or, for
        TLS-ALPN-01, the domain."""
        kind = self.cfg.challenge
        answers = self._alpn if kind == TLS_ALPN_01 else self.store.http01
        answers[name] = key_authorization
        await self.storage.put_challenge(
            name, key_authorization, self.timing.order_deadline, kind
        )

    async def _withdraw(self, name: str) -> None:
        kind = self.cfg.challenge
        answers = self._alpn if kind == TLS_ALPN_01 else self.store.http01
        answers.pop(name, None)
        with contextlib.suppress(Exception):
            await self.storage.drop_challenge(name, kind)

    async def _hold_lock(self, domain: str) -> None:
        while True:
            await asyncio.sleep(self.timing.lock_ttl / 3)
            with contextlib.suppress(Exception):
                await self.storage.renew_lock(domain, self.timing.lock_ttl)


def _covers(names: Sequence[str], domain: str) -> bool:
    for name in names:
        if name == domain:
            return True
        if name.startswith("*.") and domain.partition(".")[2] == name[2:]:
            return True
    return False
