"""Reasoning effort, translated per provider (onwards 0.35's idea, for every route).

Clients ask for reasoning in three dialects — Chat's ``reasoning_effort``, Responses'
``reasoning.effort`` and Anthropic's ``thinking.budget_tokens`` — and upstreams take it in
three ways: the standard ``reasoning_effort``, a vendor field (``chat_template_kwargs.…``,
``reasoning.effort``), or an absolute token budget (``thinking_token_budget``). The ingress
layers all reduce a request to a Chat body with ``reasoning_effort`` (plus the absolute budget,
when the client gave one, on :attr:`ProxyRequest.reasoning_budget`); a provider with a
``reasoning`` config then rewrites that per attempt, so one alias can fail over between
providers that spell reasoning differently. Providers without one get the body untouched
(zero cost).
"""

from __future__ import annotations

from typing import Any

from onwards_trio import _errors as errors
from onwards_trio._config import REASONING_EFFORTS, ReasoningSpec

__all__ = ["DEFAULT_BUDGETS", "ReasoningMap", "effort_for_budget"]

_KNOWN = frozenset(REASONING_EFFORTS)
# Token budgets for providers that take one, when the client named an effort (not a budget).
DEFAULT_BUDGETS: dict[str, Any] = {
    "none": 0,
    "minimal": 1024,
    "low": 2048,
    "medium": 8192,
    "high": 16384,
    "xhigh": 32768,
    "max": 65536,
}


def effort_for_budget(budget: int) -> str:
    """The effort a thinking budget amounts to (inverse of :data:`DEFAULT_BUDGETS` for the
    efforts every reasoning model knows: low, medium, high)."""
    if budget < 4096:
        return "low"
    if budget < 16384:
        return "medium"
    return "high"


def _set(body: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set a dotted field, copying the objects on the way (the request's JSON is shared by
    every attempt)."""
    node = body
    for key in path[:-1]:
        child = node.get(key)
        child = dict(child) if type(child) is dict else {}
        node[key] = child
        node = child
    node[path[-1]] = value


class ReasoningMap:
    """One provider's ``reasoning`` config, ready for the hot path."""

    __slots__ = ("_budget", "_efforts", "_path")

    def __init__(self, spec: ReasoningSpec) -> None:
        self._budget = spec.style == "thinking_token_budget"
        default = "thinking_token_budget" if self._budget else "reasoning_effort"
        self._path = tuple((spec.field or default).split("."))
        efforts = spec.efforts
        self._efforts = dict(efforts) if efforts is not None else None
        if self._budget and self._efforts is None:
            self._efforts = DEFAULT_BUDGETS

    def value_for(self, effort: Any) -> Any:
        """What this provider is sent for ``effort`` (``None``: send nothing); 400 for an
        effort it does not take."""
        if type(effort) is not str or effort not in _KNOWN:
            raise errors.invalid_request(
                f"'reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)}.",
                "reasoning_effort",
            )
        if self._efforts is None:
            return effort
        if effort not in self._efforts:
            raise errors.invalid_request(
                f"The reasoning effort '{effort}' is not supported by this model.",
                "reasoning_effort",
            )
        return self._efforts[effort]

    def apply(self, body: dict[str, Any], budget: int | None) -> dict[str, Any]:
        """``body`` with its reasoning request spelled the provider's way (a new dict when
        anything changes)."""
        effort = body.get("reasoning_effort")
        if effort is None and budget is None:
            return body
        if self._budget and budget is not None:
            value: Any = budget
        elif effort is None:
            return body
        else:
            value = self.value_for(effort)
        out = dict(body)
        out.pop("reasoning_effort", None)
        if value is not None:
            _set(out, self._path, value)
        return out
