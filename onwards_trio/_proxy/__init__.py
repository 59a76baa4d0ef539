"""The proxy pipeline: what happens to one request between client and upstream.

The routing table (``targets``), client auth and routing rules (``auth``), local and shared
(Redis) rate and concurrency limits (``limits``, ``shared_limits``), provider selection and
failover (``balance``), the pipeline itself (``pipeline``: resolve → admit → attempts →
filters → relay) and the response filters: sanitisation (``sanitize``) and strict mode
(``strict``, ``strict_schemas``).

Layer: above ``_transport`` and ``_ops``; below the loop, which it knows nothing about.
"""
