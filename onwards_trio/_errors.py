"""The OpenAI-style error envelope and the onwards error catalogue.

Every error the gateway itself produces is ``{"error": {"message", "type", "param", "code"}}``
(all four keys, key order as written) with ``content-type: application/json``. The bodies are
pre-serialised where they are constant, so the error path costs nothing.

Exception tree::

    OnwardsError                 base of everything raised by onwards_trio
    ├── ConfigError              invalid config (message names the JSON path)
    └── HTTPError                an error answer for an HTTP caller (status + envelope)
"""

from __future__ import annotations

import orjson

__all__ = [
    "ConfigError",
    "HTTPError",
    "OnwardsError",
    "bad_gateway",
    "bodies_over_budget",
    "budget_exceeded",
    "concurrency_limited",
    "error_body",
    "forbidden",
    "gateway_timeout",
    "internal_error",
    "invalid_request",
    "missing_model",
    "model_not_found",
    "not_found",
    "payload_too_large",
    "rate_limited",
    "request_timeout",
    "service_unavailable",
    "too_deeply_nested",
    "too_many_json_values",
    "unauthenticated",
]

INTERNAL_MESSAGE = "An internal error occurred. Please try again later."


class OnwardsError(Exception):
    """Base class of the library's exceptions."""


class ConfigError(OnwardsError):
    """The config could not be loaded; ``problems`` holds one line per bad value."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid config:\n  - " + "\n  - ".join(problems))


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


class HTTPError(OnwardsError):
    """An answer the gateway gives instead of an upstream response.

    ``headers`` are extra response headers (``retry-after`` for limits).
    """

    def __init__(
        self,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers or []
        super().__init__(f"HTTP {status}")

    @property
    def code(self) -> str | None:
        err = orjson.loads(self.body).get("error") or {}
        code = err.get("code")
        return code if isinstance(code, str) else None


_MISSING_MODEL = error_body(
    "Could not parse onwards model from request. 'model' parameter must be supplied in either "
    "the body or in the Model-Override header.",
    "invalid_request_error",
    "bad_request",
    "model",
)
_UNAUTHENTICATED = error_body(
    "Please supply an authentication token to access this resource",
    "invalid_request_error",
    "unauthenticated",
)
_INVALID_KEY = error_body(
    "Invalid authentication token.", "invalid_request_error", "invalid_api_key"
)
_FORBIDDEN = error_body("Forbidden", "invalid_request_error", "forbidden")
_RATE_LIMITED = error_body(
    "You are sending requests too quickly. Please slow down.", "rate_limit_error", "rate_limit"
)
_CONCURRENCY = error_body(
    "Too many concurrent requests. Please wait for some requests to complete before sending more.",
    "rate_limit_error",
    "concurrency_limit_exceeded",
)
_INTERNAL = error_body(INTERNAL_MESSAGE, "internal_error", "internal_error")
_UNAVAILABLE = error_body(INTERNAL_MESSAGE, "internal_error", "service_unavailable")
_TIMEOUT = error_body(
    "The upstream service took too long to respond. Please try again.",
    "internal_error",
    "gateway_timeout",
)


def missing_model() -> HTTPError:
    return HTTPError(400, _MISSING_MODEL)


def invalid_request(message: str, param: str | None = None, status: int = 400) -> HTTPError:
    return HTTPError(status, error_body(message, "invalid_request_error", "bad_request", param))


def unauthenticated(invalid: bool = False) -> HTTPError:
    """401: no token (``unauthenticated``) or a token no pool knows (``invalid_api_key``)."""
    return HTTPError(401, _INVALID_KEY if invalid else _UNAUTHENTICATED)


def forbidden() -> HTTPError:
    return HTTPError(403, _FORBIDDEN)


def model_not_found(alias: str) -> HTTPError:
    return HTTPError(
        404,
        error_body(
            f"The model `{alias}` does not exist or you do not have access to it.",
            "invalid_request_error",
            "model_not_found",
        ),
    )


def not_found(path: str) -> HTTPError:
    return HTTPError(
        404, error_body(f"Unknown route: {path}", "invalid_request_error", "not_found")
    )


def payload_too_large(limit: int) -> HTTPError:
    return HTTPError(
        413,
        error_body(
            f"Request body too large: the maximum allowed size is {limit} bytes.",
            "invalid_request_error",
            "payload_too_large",
        ),
    )


def rate_limited(
    retry_after: float | None = None, extra: list[tuple[bytes, bytes]] | None = None
) -> HTTPError:
    headers = list(extra or ())
    if retry_after is not None:
        # Retry-After takes whole seconds; round up so a client that obeys it is let in.
        secs = max(1, int(-(-retry_after // 1)))
        headers.append((b"retry-after", str(secs).encode()))
    return HTTPError(429, _RATE_LIMITED, headers)


_WINDOW_NAMES = {"day": "daily (UTC day)", "month": "monthly (UTC month)", "total": "total"}


def budget_exceeded(
    window: str, scope: str, extra: list[tuple[bytes, bytes]] | None = None
) -> HTTPError:
    """402 ``budget_exceeded``: the spend budget cannot cover the request's estimated cost.

    402, not 429: waiting a moment will not help (the budget starts again with its calendar
    window), and the SDKs retry a 429 on their own — a 402 reaches the caller at once.
    ``scope`` is ``key`` (the key's own budget) or ``label`` (a budget of a group of keys).
    """
    whose = "this key's" if scope == "key" else "a shared"
    message = (
        f"Budget exceeded: {whose} {_WINDOW_NAMES.get(window, window)} budget cannot cover "
        "the estimated cost of this request (budget_exceeded)."
    )
    return HTTPError(402, error_body(message, "insufficient_quota", "budget_exceeded"), extra)


def concurrency_limited() -> HTTPError:
    return HTTPError(429, _CONCURRENCY)


def internal_error() -> HTTPError:
    return HTTPError(500, _INTERNAL)


def bad_gateway() -> HTTPError:
    return HTTPError(502, _INTERNAL)


def service_unavailable() -> HTTPError:
    return HTTPError(503, _UNAVAILABLE)


def gateway_timeout() -> HTTPError:
    return HTTPError(504, _TIMEOUT)


def request_timeout() -> HTTPError:
    return HTTPError(
        408,
        error_body(
            "The request body took too long to arrive.", "invalid_request_error", "request_timeout"
        ),
    )


def bodies_over_budget() -> HTTPError:
    """503: the gateway is buffering as many request bodies as it allows; retry shortly."""
    return HTTPError(
        503,
        error_body(
            "The gateway is receiving too many request bodies at once. Please retry shortly.",
            "internal_error",
            "service_unavailable",
        ),
        [(b"retry-after", b"1")],
    )


def too_deeply_nested(limit: int) -> HTTPError:
    return invalid_request(f"The JSON body is nested too deeply: at most {limit} levels.")


def too_many_json_values(limit: int) -> HTTPError:
    return invalid_request(f"The JSON body has too many objects and arrays: at most {limit}.")
