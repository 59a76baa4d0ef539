"""The proxy pipeline: what happens to one request between client and upstream.

The routing table (``targets``), client auth and routing rules (``auth``), local and shared
(Redis) rate, concurrency and token limits (``limits``, ``shared_limits``), the price table
(``pricing``), spend budgets (``budgets``), every limit of a request in one place
(``admission``), token usage read from bodies (``usage``), provider selection and
failover (``balance``), the pipeline itself (``pipeline``: resolve → admit → attempts →
filters → relay) and the response filters: sanitisation (``sanitize``) and strict mode
(``strict``, ``strict_schemas``).

Layer: above ``_transport`` and ``_ops``; below the loop, which it knows nothing about.
"""
