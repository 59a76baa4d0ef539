"""Operations: what an operator watches and steers.

Prometheus metrics (``metrics``), structured logging with secret redaction and the access line
(``logs``), config hot reload and graceful shutdown (``reload``), and, with the ``otel`` extra,
traces (``telemetry`` decides, ``tracing`` records, ``otlp`` encodes and sends them).

Layer: above ``_transport`` (the metrics listener is an ASGI app); imported by every layer above
it, so the proxy and the loop can note what they do. It never imports them at run time.
"""
