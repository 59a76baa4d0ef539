"""The default Open Responses transition function: model call → server-side tools → model
call … → complete, so a standalone gateway needs no host code for the standard agent loop.

A transition is a pure function of a :class:`ScopeView` (the response row, the scope's parent
step and chain, the tools the loop can run) to a :class:`~onwards_trio._loop.steps.NextAction`. The
stores read the view and call it; hosts can pass their own.

The response row's ``request`` is a Chat Completions request (the ``/v1/responses`` adapter
converts to it, and lists the server tools it wants offered in ``tools``). Then:

* empty chain → one model step with that request;
* last step a completed model step whose first choice asks for tools: if every tool is
  server-side (known to the loop's executor) → one tool step per call, carrying the model's
  ``call_id``; otherwise → ``Complete`` with the function_call items, for the client to answer;
* last step a tool step → the next model step: previous messages + each assistant message +
  one ``role: tool`` message per tool output (a failed tool's error text is the output, so the
  model sees invalid arguments and tool errors and can recover);
* a failed model step → ``Fail`` (the gateway's transport already retried / failed over); a
  canceled one (a resumed response) → the same model request again;
* otherwise → ``Complete`` with the output items of the whole chain and the summed usage.

Sub-agent scopes (an ``AGENT`` tool step's sub-loop) start from the top-level request's model
and tools, a system message with the tool's description and a user message with the call's
``input`` argument (or the raw arguments); they complete with the final assistant text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import attrs
import orjson

from onwards_trio._loop.items import (
    completion_items,
    completion_status,
    function_call_output_item,
    responses_usage,
    sum_usage,
    tool_call_id,
)
from onwards_trio._loop.steps import (
    AppendSteps,
    ChainStep,
    Complete,
    Fail,
    NextAction,
    ResponseRecord,
    StepDescriptor,
    StepKind,
    StepState,
)
from onwards_trio._loop.tools import ToolSchema

__all__ = [
    "LOOP_CONTROL",
    "ScopeView",
    "Transition",
    "capped_result",
    "open_responses_transition",
    "step_error_text",
]

# The key of the recorded request that carries the loop's own limits (never sent upstream):
# ``allowed_tools`` (names the model may call; any other call is suppressed) and
# ``max_tool_calls`` (server-side tool calls per response; once reached the model is offered
# no tools, and further calls are suppressed).
LOOP_CONTROL = "onwards_loop_control"
# ``incomplete_details.reason`` of a response the loop's iteration cap ended: the closest
# reason the official SDK declares (the cap bounds the model turns of one response).
CAPPED_REASON = "max_messages"


@attrs.frozen
class ScopeView:
    request_id: str
    scope_parent: str | None
    response: ResponseRecord | None
    parent_step: ChainStep | None
    chain: Sequence[ChainStep]
    tools: Mapping[str, ToolSchema]


Transition: TypeAlias = Callable[[ScopeView], NextAction]


def _first_message(completion: Any) -> tuple[Mapping[str, Any], Any]:
    if isinstance(completion, Mapping):
        choices = completion.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
            message = choices[0].get("message")
            if isinstance(message, Mapping):
                return message, choices[0].get("finish_reason")
    return {}, None


def step_error_text(step: ChainStep) -> str:
    """A failed step's error as text for the model (``detail``, else ``message``)."""
    err = step.error
    if isinstance(err, Mapping):
        for key in ("detail", "message"):
            if isinstance(err.get(key), str):
                return str(err[key])
    if isinstance(err, str):
        return err
    return orjson.dumps(err).decode()


def _call_id(step: ChainStep) -> str:
    p = step.request_payload
    given = p.get("call_id") if isinstance(p, Mapping) else None
    return given if isinstance(given, str) and given else f"call_{step.id}"


def _model_call_id(step: ChainStep, n: int, call: Mapping[str, Any]) -> str:
    """The ``call_id`` of a model step's ``n``-th tool call: the model's id, or the same
    stand-in its ``function_call`` item carries (:func:`tool_call_id`) when it sent none."""
    index = call.get("index", n)
    return tool_call_id(step.id, index if isinstance(index, int) else n, call.get("id"))


def _tool_output(step: ChainStep) -> tuple[str, str]:
    """(output text, item status) of a tool step."""
    if step.state is StepState.COMPLETED:
        out = step.response_payload
        return (out if isinstance(out, str) else orjson.dumps(out).decode()), "completed"
    if step.state is StepState.FAILED:
        return f"Error: {step_error_text(step)}", "incomplete"
    return "Error: the tool call did not finish", "incomplete"


def _control(view: ScopeView) -> Mapping[str, Any]:
    top = view.response.request if view.response is not None else None
    control = top.get(LOOP_CONTROL) if isinstance(top, Mapping) else None
    return control if isinstance(control, Mapping) and view.scope_parent is None else {}


def _base_request(view: ScopeView) -> dict[str, Any] | None:
    top = view.response.request if view.response is not None else None
    if not isinstance(top, Mapping) or not isinstance(top.get("messages"), list):
        return None
    if view.scope_parent is None:
        base = dict(top)
        base.pop(LOOP_CONTROL, None)
        return base
    parent = view.parent_step
    payload = parent.request_payload if parent is not None else None
    if not isinstance(payload, Mapping):
        return None
    name = payload.get("name")
    schema = view.tools.get(name) if isinstance(name, str) else None
    if "args" in payload:
        args: Any = payload["args"]
        raw = orjson.dumps(args).decode()
    else:
        raw = str(payload.get("arguments") or "{}")
        try:
            args = orjson.loads(raw)
        except orjson.JSONDecodeError:
            args = None
    text = (
        args["input"] if isinstance(args, Mapping) and isinstance(args.get("input"), str) else raw
    )
    messages: list[dict[str, Any]] = []
    if schema is not None and schema.description:
        messages.append({"role": "system", "content": schema.description})
    messages.append({"role": "user", "content": text})
    sub: dict[str, Any] = {"model": top.get("model"), "messages": messages}  # no control key
    if top.get("tools"):
        sub["tools"] = top["tools"]
    return sub


def _model_request(base: Mapping[str, Any], messages: list[Any]) -> dict[str, Any]:
    req = {**base, "messages": messages}
    if req.get("stream") is True:
        opts = req.get("stream_options")
        req["stream_options"] = {
            **(opts if isinstance(opts, Mapping) else {}),
            "include_usage": True,
        }
    return req


def _messages(base: Mapping[str, Any], chain: Sequence[ChainStep]) -> list[Any]:
    messages = list(base["messages"])
    for step in chain:
        if step.kind is StepKind.MODEL_CALL:
            if step.state is not StepState.COMPLETED:
                continue
            message, _ = _first_message(step.response_payload)
            assistant: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
            calls = message.get("tool_calls")
            if isinstance(calls, list) and calls:
                assistant["tool_calls"] = [
                    {
                        "id": _model_call_id(step, n, c),
                        "type": c.get("type") or "function",
                        "function": {
                            "name": (c.get("function") or {}).get("name"),
                            "arguments": (c.get("function") or {}).get("arguments") or "",
                        },
                    }
                    for n, c in enumerate(calls)
                    if isinstance(c, Mapping)
                ]
            messages.append(assistant)
        else:
            output, _ = _tool_output(step)
            messages.append({"role": "tool", "tool_call_id": _call_id(step), "content": output})
    return messages


def _final(view: ScopeView, suppressed: bool = False) -> Any:
    chain = view.chain
    last_message, _ = _first_message(chain[-1].response_payload)
    if view.scope_parent is not None:
        content = last_message.get("content")
        return content if isinstance(content, str) else ""
    result = _chain_result(chain)
    if suppressed:
        # The last model step's calls were not run: they stay in the output, marked so.
        for item in result["output"]:
            if item["type"] == "function_call" and item["id"].startswith(f"fc_{chain[-1].id}"):
                item["status"] = "incomplete"
    return result


def capped_result(chain: Sequence[ChainStep]) -> dict[str, Any]:
    """What a response the iteration cap stopped produced: ``incomplete`` with all its
    output so far (function calls it did not get to run marked ``incomplete``)."""
    result = _chain_result(chain)
    answered = {i["call_id"] for i in result["output"] if i["type"] == "function_call_output"}
    for item in result["output"]:
        if item["type"] == "function_call" and item["call_id"] not in answered:
            item["status"] = "incomplete"
    result["status"] = "incomplete"
    result["incomplete_details"] = {"reason": CAPPED_REASON}
    return result


def _chain_result(chain: Sequence[ChainStep]) -> dict[str, Any]:
    items: list[dict[str, Any]] = []
    usages = []
    for step in chain:
        if step.kind is StepKind.MODEL_CALL:
            if step.state is StepState.COMPLETED:
                items.extend(completion_items(step.response_payload, step.id))
                payload = step.response_payload
                if isinstance(payload, Mapping):
                    usages.append(responses_usage(payload.get("usage")))
        else:
            output, status = _tool_output(step)
            items.append(function_call_output_item(step.id, _call_id(step), output, status))
    status, details = (
        completion_status(chain[-1].response_payload) if chain else ("completed", None)
    )
    return {
        "status": status,
        "incomplete_details": details,
        "output": items,
        "usage": sum_usage(usages),
    }


_TOOL_KEYS = frozenset({"tools", "tool_choice", "parallel_tool_calls"})


def open_responses_transition(view: ScopeView) -> NextAction:
    base = _base_request(view)
    if base is None:
        return Fail(
            {
                "code": "invalid_request",
                "message": "no chat completions request recorded for this response",
            }
        )
    chain = view.chain
    control = _control(view)
    cap = control.get("max_tool_calls")
    used = sum(1 for step in chain if step.kind is StepKind.TOOL_CALL)
    budget = cap - used if isinstance(cap, int) else None
    if budget is not None and budget <= 0:
        # max_tool_calls reached: the model is offered no more tools.
        base = {k: v for k, v in base.items() if k not in _TOOL_KEYS}
    if not chain:
        return AppendSteps(
            [StepDescriptor.model_call(_model_request(base, list(base["messages"])))]
        )
    last = chain[-1]
    if last.kind is StepKind.TOOL_CALL:
        return AppendSteps(
            [StepDescriptor.model_call(_model_request(base, _messages(base, chain)))]
        )
    if last.state is StepState.CANCELED:
        # Cancelled (or interrupted and closed on resume): ask the model again.
        return AppendSteps(
            [StepDescriptor.model_call(_model_request(base, _messages(base, chain)))]
        )
    if last.state is not StepState.COMPLETED:
        message = (
            step_error_text(last)
            if last.state is StepState.FAILED
            else f"model step ended {last.state.value}"
        )
        # A refused model call: rate limited (the gateway's or the upstream's 429) or not.
        code = "rate_limit_exceeded" if "HTTP 429" in message else "server_error"
        return Fail({"code": code, "message": message})
    last_message, _ = _first_message(last.response_payload)
    calls = last_message.get("tool_calls")
    if isinstance(calls, list) and calls:
        names = [
            (c.get("function") or {}).get("name") if isinstance(c, Mapping) else None for c in calls
        ]
        allowed = control.get("allowed_tools")
        if (isinstance(allowed, list) and any(n not in allowed for n in names)) or (
            budget is not None and all(n in view.tools for n in names) and budget < len(names)
        ):
            # A call outside allowed_tools, or past max_tool_calls: suppressed, not run.
            return Complete(_final(view, suppressed=True))
        if all(isinstance(n, str) and n in view.tools for n in names):
            steps = []
            for n, c in enumerate(calls):
                fn = c.get("function") or {}
                payload = {
                    "name": fn.get("name"),
                    "arguments": fn.get("arguments") or "{}",
                    "call_id": _model_call_id(last, n, c),
                }
                steps.append(StepDescriptor(StepKind.TOOL_CALL, payload))
            return AppendSteps(steps)
    return Complete(_final(view))
