"""``Idempotency-Key`` on ``POST /v1/responses``, ``/v1/chat/completions`` and ``/v1/messages``:
a retried request is answered from the store instead of being billed twice.

The first request under a key (per client key: keys of different clients never meet) is
recorded ``in_flight`` in the durable store and runs; everything it sends is recorded on the
way out, and a complete answer is stored (status, headers, body — for a stream, every event as
sent) for ``idempotency.ttl_secs``. A repeat with the same key:

* and the same request (method, path, ``model-override`` and body, JSON compared as parsed) →
  the stored answer, byte for byte, with ``idempotent-replayed: true``; while the original is
  still running, the repeat waits for it (in this process or any replica on the store) and
  then gets its answer — one upstream call in all;
* with a different request → 422 ``idempotency_key_reused``.

What is not stored: 5xx answers, 408/409/425/429, and answers cut short (the client left, the
process died). The record is dropped, so a retry runs again — these are the failures a retry
is for. An ``in_flight`` record older than ``in_flight_timeout_secs`` (its process died) no
longer blocks its key. Without the header nothing of this happens, at no cost.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import orjson
import trio

from onwards_trio import _errors as errors
from onwards_trio._anthropic import errors as anthropic_errors
from onwards_trio._anthropic.service import client_key
from onwards_trio._errors import HTTPError, error_body
from onwards_trio._stores.base import DurableStore, IdempotencyRecord
from onwards_trio._stores.memory import MemoryDurableStore
from onwards_trio._transport.asgi import (
    ClientDisconnected,
    Message,
    Receive,
    Scope,
    Send,
    send_error,
    watch_disconnect,
)

if TYPE_CHECKING:
    from onwards_trio._app.gateway import Gateway

__all__ = ["IDEMPOTENT_PATHS", "Idempotency", "idempotency_key"]

log = logging.getLogger("onwards_trio.idempotency")

IDEMPOTENT_PATHS = frozenset({"/v1/responses", "/v1/chat/completions", "/v1/messages"})
_HEADER = b"idempotency-key"
_MAX_KEY = 255
_POLL = 0.1  # waiting for an original another replica runs
# Answers not worth keeping: a retry is what the client should do after these.
_RETRYABLE = frozenset({408, 409, 425, 429})
# Response headers that describe one connection or one moment, not the answer.
_NOT_REPLAYED = frozenset(
    {b"date", b"connection", b"keep-alive", b"transfer-encoding", b"set-cookie"}
)
_REPLAYED = (b"idempotent-replayed", b"true")


def idempotency_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The request's ``Idempotency-Key`` header (its last value), if any."""
    found = None
    for name, value in headers:
        if name == _HEADER:
            found = value
    return found


def _fingerprint(scope: Scope, body: bytes) -> str:
    """The request's identity: method, path, ``model-override`` and the body — as parsed JSON
    (key order and spacing do not matter), or the raw bytes when it is not JSON."""
    try:
        canonical = orjson.dumps(orjson.loads(body), option=orjson.OPT_SORT_KEYS)
    except orjson.JSONDecodeError:
        canonical = body
    digest = hashlib.sha256()
    digest.update(scope["method"].encode() + b" " + scope["path"].encode() + b"\n")
    for name, value in scope["headers"]:
        if name == b"model-override":
            digest.update(b"model-override: " + value + b"\n")
    digest.update(canonical)
    return digest.hexdigest()


def _reused() -> HTTPError:
    return HTTPError(
        422,
        error_body(
            "This Idempotency-Key was already used with a different request; use a new key "
            "for a new request.",
            "invalid_request_error",
            "idempotency_key_reused",
            "Idempotency-Key",
        ),
    )


class _Recorder:
    """Wraps ``send``: everything the handler sends goes on to the client and is kept."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.complete = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            self.headers = [
                (bytes(k).lower(), bytes(v))
                for k, v in message.get("headers", [])
                if bytes(k).lower() not in _NOT_REPLAYED
            ]
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")
            if not message.get("more_body", False):
                self.complete = True
        await self._send(message)

    @property
    def storable(self) -> bool:
        status = self.status
        return self.complete and status is not None and status < 500 and status not in _RETRYABLE


class Idempotency:
    """``Idempotency-Key`` for one gateway (the records live in its durable store)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._fallback: DurableStore | None = None
        self._done: dict[tuple[str, str], trio.Event] = {}  # originals running here

    def _store(self) -> DurableStore:
        store = self.gateway.responses.durable()
        if store is None:  # a host gave the service stores of its own: keep keys in memory
            if self._fallback is None:
                self._fallback = MemoryDurableStore()
            store = self._fallback
        return store

    async def handle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: Callable[[Scope, Receive, Send], Awaitable[int]],
    ) -> int:
        """Serve a request that carries an ``Idempotency-Key``: run it once (``route``), or
        replay its stored answer."""
        try:
            key = self._key(scope)
            body = await self.gateway.read_bounded_body(scope, receive)
        except HTTPError as exc:
            await _send_error(scope, send, exc)
            return exc.status
        except ClientDisconnected:
            return 499
        # The client's key (Bearer, or x-api-key for Anthropic clients), as a digest.
        client = hashlib.sha256((client_key(scope["headers"]) or "").encode()).hexdigest()
        fingerprint = _fingerprint(scope, body)
        spec = self.gateway.config.idempotency
        store = self._store()
        owner = secrets.token_hex(12)
        while True:
            record = await store.idempotency_begin(
                client, key, fingerprint, owner, spec.ttl_secs, spec.in_flight_timeout_secs
            )
            if record is None:
                request = (scope, body, receive)
                return await self._original(request, send, route, store, client, key, owner)
            if record.fingerprint != fingerprint:
                reused = _reused()
                await _send_error(scope, send, reused)
                return reused.status
            if record.state == "done":
                return await _replay(record, send)
            # The original is still running: wait for its answer, then replay it. If it ends
            # with nothing stored, the key is free again and this request may run itself.
            done = await self._wait(store, client, key, receive)
            if done is False:
                return 499  # the client left while waiting
            if isinstance(done, IdempotencyRecord) and done.fingerprint == fingerprint:
                return await _replay(done, send)

    def _key(self, scope: Scope) -> str:
        raw = idempotency_key(scope["headers"]) or b""
        text = raw.decode("latin-1").strip()
        if not 0 < len(text) <= _MAX_KEY or not text.isascii() or not text.isprintable():
            raise errors.invalid_request(
                f"The Idempotency-Key header must be 1 to {_MAX_KEY} visible ASCII characters.",
                "Idempotency-Key",
            )
        return text

    async def _original(
        self,
        request: tuple[Scope, bytes, Receive],
        send: Send,
        route: Callable[[Scope, Receive, Send], Awaitable[int]],
        store: DurableStore,
        client: str,
        key: str,
        owner: str,
    ) -> int:
        """Run the request (its body already read) and store what it answered."""
        scope, body, receive = request
        recorder = _Recorder(send)
        done = self._done[(client, key)] = trio.Event()
        body_sent = False

        async def replay_receive() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            return await route(scope, replay_receive, recorder)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                try:
                    if recorder.storable:
                        assert recorder.status is not None
                        await store.idempotency_finish(
                            client,
                            key,
                            owner,
                            recorder.status,
                            recorder.headers,
                            bytes(recorder.body),
                        )
                    else:
                        await store.idempotency_abandon(client, key, owner)
                except Exception:
                    log.exception("could not store the answer to an idempotent request")
            self._done.pop((client, key), None)
            done.set()

    async def _wait(
        self, store: DurableStore, client: str, key: str, receive: Receive
    ) -> IdempotencyRecord | bool | None:
        """Wait until the original under ``key`` has ended: its stored record (``done``),
        ``None`` when it stored nothing (the key is free), ``False`` when our client left."""
        result: IdempotencyRecord | bool | None = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_disconnect, receive, nursery.cancel_scope)
            while True:
                local = self._done.get((client, key))
                if local is not None:
                    await local.wait()  # running here: woken the moment it ends
                else:
                    await trio.sleep(_POLL)  # running in another replica
                record = await store.idempotency_get(client, key)
                if record is None or record.state == "done":
                    result = record
                    break
            nursery.cancel_scope.cancel()
        return result


async def _send_error(scope: Scope, send: Send, exc: HTTPError) -> None:
    """An error in the route's own envelope (Anthropic's for ``/v1/messages``)."""
    if scope["path"] == "/v1/messages":
        exc = anthropic_errors.from_http_error(exc)
    await send_error(send, exc)


async def _replay(record: IdempotencyRecord, send: Send) -> int:
    status = record.status or 200
    headers = [*record.headers, _REPLAYED]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": record.body, "more_body": False})
    return status
