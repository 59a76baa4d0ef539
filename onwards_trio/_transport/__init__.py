"""HTTP transport: bytes on sockets, no gateway policy.

The lean HTTP/1.1 server for ASGI apps (``server``), the upstream client connection
(``client``) and its per-origin keep-alive pool (``pool``), socket calls that yield only when
they must wait (``sockio``), typed ASGI helpers (``asgi``) and the sans-I/O SSE codec (``sse``).

Layer: the lowest above the foundation (``_errors``, ``_config``); it imports nothing else of
the package. Routing knowledge stays out: the pool sees an upstream as an ``Origin``.
"""
