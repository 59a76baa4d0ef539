"""A WebSocket client that sends its first frame in the same write as the upgrade request,
over a real loopback socket: the built-in server keeps the bytes read past the head and the
app receives that message."""

from __future__ import annotations

import os

import trio
import wsproto
import wsproto.events

from tests.transport.test_websocket import echo_app, start


def masked_text_frame(text: bytes) -> bytes:
    """One final, masked text frame (RFC 6455 §5.2), as a client writes it."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(text))
    return bytes([0x81, 0x80 | len(text)]) + mask + masked


async def test_a_frame_sent_with_the_upgrade_request_reaches_the_app(
    nursery: trio.Nursery,
) -> None:
    url = await start(nursery, echo_app([]))
    client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    upgrade = client.send(wsproto.events.Request(host="h", target="/"))
    texts: list[str] = []
    async with await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1])) as s:
        await s.send_all(upgrade + masked_text_frame(b"early"))
        with trio.fail_after(10):
            while not texts:
                client.receive_data(await s.receive_some())
                for event in client.events():
                    if isinstance(event, wsproto.events.TextMessage):
                        texts.append(event.data)
    assert texts == ["EARLY"]
