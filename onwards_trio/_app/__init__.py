"""The application: everything assembled.

``Gateway``, the ASGI app that routes to the proxy and the Responses service and owns the
service nursery (``gateway``); the ``onwards-trio`` command (``cli``); the offline demo upstream
(``demo``).

Layer: the top of the private layers; nothing below imports it (``_responses`` names
``Gateway`` for type checking only).
"""
