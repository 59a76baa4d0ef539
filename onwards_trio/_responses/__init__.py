"""``/v1/responses``: the loop's public face over any Chat Completions upstream.

Request validation and translation to chat (``input``), the HTTP service with stored,
background and resumable responses (``service``), server-side tools declared in the config
(``config_tools``), MCP servers as tools — the SDK client, per-response sessions and the
tool-list cache (``mcp_client``), a request's ``type: "mcp"`` tools with their items, events
and approvals (``mcp_tools``) — and the proxy pipeline as the loop's model transport
(``model_transport``).

Layer: above ``_loop`` and ``_stores``; below ``_app``, which routes requests here.
"""
