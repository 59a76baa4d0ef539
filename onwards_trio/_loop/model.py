"""The model transport seam: how the loop reaches a chat-completions upstream.

The loop only needs "POST these bytes, give me status, headers and the body as it arrives", so
that is all a transport is. :class:`HttpModelTransport` posts to one URL (onwards'
``UpstreamTarget``); the gateway supplies a transport that runs the payload through the whole
proxy pipeline. Leaving the context manager closes the upstream stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import attrs
import httpx

__all__ = ["HttpModelTransport", "ModelResponse", "ModelTransport"]


@attrs.frozen
class ModelResponse:
    status: int
    headers: list[tuple[bytes, bytes]]  # lower-case names
    body: AsyncIterator[bytes]  # raw upstream bytes as they arrive


class ModelTransport(Protocol):
    def open(
        self, payload: bytes, *, stream: bool
    ) -> AbstractAsyncContextManager[ModelResponse]: ...


class HttpModelTransport:
    """POST chat-completions JSON to ``url`` with an optional bearer key.

    The client is borrowed, not owned: its pool, limits and timeouts are the caller's choice
    (httpx's read timeout applies per chunk, which is the right inter-token idle timeout).
    """

    def __init__(self, url: str, api_key: str | None, client: httpx.AsyncClient) -> None:
        self.url = url
        self.client = client
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._headers = headers
        self._stream_headers = {**headers, "accept": "text/event-stream"}

    @asynccontextmanager
    async def open(self, payload: bytes, *, stream: bool) -> AsyncIterator[ModelResponse]:
        request = self.client.build_request(
            "POST",
            self.url,
            content=payload,
            headers=self._stream_headers if stream else self._headers,
        )
        response = await self.client.send(request, stream=True)
        try:
            yield ModelResponse(
                status=response.status_code,
                headers=[(k.lower(), v) for k, v in response.headers.raw],
                body=response.aiter_bytes(),
            )
        finally:
            await response.aclose()
