"""Chat Completions stream → Anthropic Messages stream (sans-I/O: bytes in, bytes out).

:class:`StreamTranslator` is fed the upstream's body as it arrives, in chunks cut anywhere,
and returns the SSE bytes to send on. It decodes with the gateway's SSE codec and emits
Anthropic's event sequence::

    message_start, ping,
    (content_block_start, content_block_delta*, content_block_stop)*,
    message_delta (stop_reason, stop_sequence, usage), message_stop

with ``thinking_delta`` for reasoning, ``text_delta`` for content and ``input_json_delta`` for
tool arguments (forwarded as the fragments come: no JSON parsing per chunk). Usage arrives
last in a Chat stream, so ``message_start`` says 0 tokens and ``message_delta`` carries the
real counts (the SDK takes them from there).

A stream that breaks — an error object from the upstream, an oversized or unparsable
event, or a body that ends before any ``finish_reason`` — ends with an ``error`` event: the
SDK raises on it, whereas a stream that merely stops looks complete to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from onwards_trio._loop.items import reasoning_text
from onwards_trio._transport.sse import (
    DEFAULT_MAX_EVENT_SIZE,
    SSEDecoder,
    SSEEventTooLarge,
    encode_event,
)

from . import errors
from .response import stop_reason, usage

__all__ = ["CUT_SHORT", "StreamTranslator", "message_events"]

CUT_SHORT = "The upstream stream ended unexpectedly."
_PING = encode_event(b'{"type":"ping"}', event="ping")
_STOP = encode_event(b'{"type":"message_stop"}', event="message_stop")
_THINKING = {"type": "thinking", "thinking": "", "signature": ""}
_TEXT = {"type": "text", "text": ""}


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    return encode_event(orjson.dumps(payload), event=kind)


def _start(message_id: str, model: str) -> bytes:
    message: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }
    return _event("message_start", {"type": "message_start", "message": message}) + _PING


def _block_start(index: int, block: dict[str, Any]) -> bytes:
    return _event(
        "content_block_start",
        {"type": "content_block_start", "index": index, "content_block": block},
    )


def _block_stop(index: int) -> bytes:
    return _event("content_block_stop", {"type": "content_block_stop", "index": index})


# The one event per upstream chunk is written without building a dict: the part of a delta
# event before its string is fixed per block, so it is made once when the block opens.
_DELTA_FIELD = {"thinking": b"thinking_delta", "text": b"text_delta", "tool": b"input_json_delta"}
_DELTA_KEY = {"thinking": b"thinking", "text": b"text", "tool": b"partial_json"}


def _delta_prefix(index: int, kind: str) -> bytes:
    return (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
        b'"delta":{"type":"%s","%s":' % (index, _DELTA_FIELD[kind], _DELTA_KEY[kind])
    )


def _end(reason: str, sequence: str | None, counts: dict[str, int]) -> bytes:
    payload = {
        "type": "message_delta",
        "delta": {"stop_reason": reason, "stop_sequence": sequence},
        "usage": counts,
    }
    return _event("message_delta", payload) + _STOP


class StreamTranslator:
    """One streamed answer. :meth:`feed` per upstream chunk, :meth:`close` at its end,
    :meth:`fail` when the upstream connection breaks; ``done`` once the stream is over."""

    __slots__ = (
        "_decoder",
        "_finish",
        "_index",
        "_matched",
        "_message_id",
        "_model",
        "_open",
        "_prefix",
        "_refusal",
        "_started",
        "_stops",
        "_tool",
        "_tools",
        "_usage",
        "done",
    )

    def __init__(
        self,
        *,
        message_id: str,
        model: str,
        stop_sequences: Sequence[str] = (),
        max_event_size: int = DEFAULT_MAX_EVENT_SIZE,
    ) -> None:
        self._decoder = SSEDecoder(max_event_size)
        self._message_id = message_id
        self._model = model
        self._stops = stop_sequences
        self._started = False
        self._open: str | None = None  # kind of the open content block
        self._index = -1  # index of the open (or last) content block
        self._prefix = b""  # of the open block's delta events
        self._tool: Any = None  # Chat index of the open tool call
        self._tools: set[Any] = set()
        self._finish: Any = None
        self._matched: Any = None
        self._refusal = False
        self._usage: Any = None
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        try:
            events = self._decoder.feed(chunk)
        except SSEEventTooLarge:
            return self.fail("An upstream event exceeded the size limit.")
        out: list[bytes] = []
        for event in events:
            if self._handle(event.data, out):
                break
        return b"".join(out)

    def close(self) -> bytes:
        """The upstream body ended: finish the message, or report it cut short."""
        if self.done:
            return b""
        out: list[bytes] = []
        try:
            for event in self._decoder.close():
                if self._handle(event.data, out):
                    break
        except SSEEventTooLarge:
            return self.fail("An upstream event exceeded the size limit.")
        if not self.done:
            if self._finish is None:
                out.append(self.fail(CUT_SHORT))
            else:
                self._finished(out)
        return b"".join(out)

    def fail(self, message: str, status: int = 500) -> bytes:
        """The ``error`` event that ends the stream."""
        self.done = True
        return errors.error_event(status, message)

    # -- one upstream event ----------------------------------------------------------------

    def _handle(self, data: str, out: list[bytes]) -> bool:
        """Translate one upstream event; ``True`` once the stream is over."""
        if data == "[DONE]":
            self._finished(out)
            return True
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            out.append(self.fail("The upstream sent an event that is not JSON."))
            return True
        if type(chunk) is not dict:
            return False
        if not self._started:
            self._started = True
            out.append(_start(self._message_id, self._model))
        choices = chunk.get("choices")
        if choices:
            choice = choices[0]
            if type(choice) is dict and choice.get("index", 0) == 0:
                delta = choice.get("delta")
                if type(delta) is dict:
                    self._delta(delta, out)
                finish = choice.get("finish_reason")
                if finish is not None:
                    self._finish = finish
                    self._matched = choice.get("stop_reason")
        elif "error" in chunk:
            err = chunk["error"]
            message = err.get("message") if type(err) is dict else None
            out.append(self.fail(message if type(message) is str else CUT_SHORT))
            return True
        counts = chunk.get("usage")
        if counts is not None:
            self._usage = counts
        return self.done  # a tool call the translation cannot follow ends it too

    def _delta(self, delta: dict[str, Any], out: list[bytes]) -> None:
        if "reasoning_content" in delta or "reasoning" in delta or "reasoning_details" in delta:
            thinking = reasoning_text(delta)
            if thinking:
                self._block("thinking", _THINKING, out)
                out.append(self._prefix + orjson.dumps(thinking) + b"}}\n\n")
        text = delta.get("content")
        if type(text) is str and text:
            self._block("text", _TEXT, out)
            out.append(self._prefix + orjson.dumps(text) + b"}}\n\n")
        refusal = delta.get("refusal")
        if type(refusal) is str and refusal:
            self._refusal = True
            self._block("text", _TEXT, out)
            out.append(self._prefix + orjson.dumps(refusal) + b"}}\n\n")
        calls = delta.get("tool_calls")
        if calls:
            for k, call in enumerate(calls):
                if type(call) is dict:
                    self._tool_delta(call, call.get("index", k), out)

    def _tool_delta(self, call: dict[str, Any], index: Any, out: list[bytes]) -> None:
        fn = call.get("function")
        fn = fn if type(fn) is dict else {}
        if self._open != "tool" or index != self._tool:
            if index in self._tools:
                # Anthropic blocks cannot interleave; no Chat server known to us does this.
                out.append(self.fail("The upstream interleaved the arguments of tool calls."))
                return
            self._tools.add(index)
            self._tool = index
            call_id = call.get("id")
            name = fn.get("name")
            block = {
                "type": "tool_use",
                "id": call_id if type(call_id) is str and call_id else f"toolu_{index}",
                "name": name if type(name) is str else "",
                "input": {},
            }
            self._block("tool", block, out)
        arguments = fn.get("arguments")
        if type(arguments) is str and arguments:
            out.append(self._prefix + orjson.dumps(arguments) + b"}}\n\n")

    def _block(self, kind: str, block: dict[str, Any], out: list[bytes]) -> None:
        """Open a content block of ``kind`` unless it is the open one (tools always open)."""
        if self._open == kind and kind != "tool":
            return
        if self._open is not None:
            out.append(_block_stop(self._index))
        self._index += 1
        self._open = kind
        self._prefix = _delta_prefix(self._index, kind)
        out.append(_block_start(self._index, block))

    def _finished(self, out: list[bytes]) -> None:
        if self.done:
            return
        if not self._started:
            self._started = True
            out.append(_start(self._message_id, self._model))
        if self._open is not None:
            out.append(_block_stop(self._index))
            self._open = None
        reason, sequence = stop_reason(self._finish, self._matched, self._stops, bool(self._tools))
        if self._refusal:
            reason = "refusal"
        out.append(_end(reason, sequence, usage(self._usage)))
        self.done = True


def message_events(message: dict[str, Any]) -> bytes:
    """A whole :func:`~.response.to_message` result as a stream (for an upstream that
    answered a streamed request in one JSON body)."""
    out = [_start(message["id"], message["model"])]
    for index, block in enumerate(message["content"]):
        kind = block["type"]
        if kind == "thinking":
            out.append(_block_start(index, _THINKING))
            value = block["thinking"]
        elif kind == "text":
            out.append(_block_start(index, _TEXT))
            value = block["text"]
        else:
            out.append(_block_start(index, {**block, "input": {}}))
            value, kind = orjson.dumps(block["input"]).decode(), "tool"
        out.append(_delta_prefix(index, kind) + orjson.dumps(value) + b"}}\n\n")
        out.append(_block_stop(index))
    out.append(_end(message["stop_reason"], message["stop_sequence"], message["usage"]))
    return b"".join(out)
