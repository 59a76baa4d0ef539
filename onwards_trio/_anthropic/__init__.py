"""``/v1/messages``: the Anthropic Messages API over any Chat Completions upstream.

Pure, sans-I/O translators — the request (``request``), the whole answer (``response``), the
streamed answer (``stream``) — and Anthropic's error envelope (``errors``); ``service`` is the
HTTP handler that runs the translated call through the proxy pipeline.

Layer: above ``_responses`` (it reuses the model-call header policy); below ``_app``, which
routes ``/v1/messages`` here.
"""
