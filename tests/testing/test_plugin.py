"""The pytest plugin, driven the way its users run it: pytester writes a test file, pytest runs
it in a child process, and these tests read the outcome. The inner tests use the official SDKs
against the served gateway."""

from __future__ import annotations

import os
import sys
import textwrap

import orjson
import pytest
import trio

from onwards_trio._transport.asgi import Receive, Scope, Send
from tests.support import serve_app


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """pytest in a child process, as users run it (and no module state shared with ours)."""
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=180)


def assert_shown(result: pytest.RunResult, headline: str, *, removed: str, added: str) -> None:
    """The output names the problem, then a diff line by line: ``removed`` → ``added``."""
    result.stdout.fnmatch_lines(
        [headline, f'*-*"content": "{removed}",', f'*+*"content": "{added}",']
    )


SYNC_OPENAI = """
import openai
import pytest
from onwards_trio.testing import Usage, text

def test_chat(onwards):
    onwards.model(
        "gpt",
        text("Hello there, friend", usage=Usage(11, 3)),
        target={"onwards_key": "sk-upstream-secret"},
    )
    with openai.OpenAI(base_url=onwards.base_url, api_key="k") as client:
        answer = client.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "Say hello"}]
        )
        stream = client.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "Again"}], stream=True
        )
        pieces = [c.choices[0].delta.content for c in stream if c.choices]
    assert answer.choices[0].message.content == "Hello there, friend"
    assert answer.usage.prompt_tokens == 11 and answer.usage.completion_tokens == 3
    assert pieces == ["", "Hello", " there,", " friend", None]
    first, second = onwards.calls("gpt")
    first.assert_body({"messages": [{"role": "user", "content": "Say hello"}]})
    assert second.stream and second.last_user_text == "Again"
    assert first.headers["authorization"] == "<redacted>"  # the gateway's upstream key
    assert "sk-upstream-secret" not in repr(onwards.calls())
"""


def test_sync_openai_client_gets_the_scripted_answer(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(SYNC_OPENAI)
    run(pytester).assert_outcomes(passed=1)


ASYNC_OPENAI = """
import asyncio
import openai
import pytest

@pytest.fixture
def anyio_backend():
    return "asyncio"

@pytest.mark.anyio
async def test_async_chat(onwards):
    asyncio.get_running_loop()  # this really is an asyncio test
    onwards.model("gpt", ["first", "second"])
    async with openai.AsyncOpenAI(base_url=onwards.base_url, api_key="k") as client:
        answers = await asyncio.gather(*(
            client.chat.completions.create(model="gpt", messages=[{"role": "user", "content": q}])
            for q in ("a", "b")
        ))
    assert sorted(a.choices[0].message.content for a in answers) == ["first", "second"]
    assert len(onwards.calls("gpt")) == 2
"""


def test_async_openai_client_under_asyncio(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(ASYNC_OPENAI)
    run(pytester).assert_outcomes(passed=1)


TRIO_LOOP = """
import json
import openai
import pytest
from onwards_trio.testing import call, tool_calls

@pytest.mark.trio
async def test_loop_runs_a_python_tool(onwards_trio):
    @onwards_trio.tool
    def get_weather(city: str) -> dict:
        "Current weather for a city."
        return {"city": city, "sky": "sunny"}

    onwards_trio.model("gpt", [
        tool_calls(call("get_weather", {"city": "Paris"})),
        lambda request: "Sunny in " + json.loads(request.messages[-1]["content"])["city"],
    ])
    async with openai.AsyncOpenAI(base_url=onwards_trio.base_url, api_key="k") as client:
        response = await client.responses.create(model="gpt", input="Weather in Paris?")
    assert response.output_text == "Sunny in Paris"
    [tool] = onwards_trio.tool_calls("get_weather")
    assert tool.arguments == {"city": "Paris"} and tool.output == {"city": "Paris", "sky": "sunny"}
    steps = onwards_trio.steps(response.id)
    assert [(s.kind, s.state) for s in steps] == [
        ("model_call", "completed"), ("tool_call", "completed"), ("model_call", "completed")
    ]
    assert steps[1].tool_name == "get_weather"
    first = onwards_trio.calls("gpt")[0]
    assert first.tool_names == ["get_weather"]
    assert first.body["tools"][0]["function"]["parameters"]["required"] == ["city"]
"""


def test_trio_test_runs_the_loop_with_a_python_tool(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(TRIO_LOOP)
    run(pytester).assert_outcomes(passed=1)


BAD_TOOL_CALLS = """
import openai
import pytest
from onwards_trio.testing import call, tool_calls

@pytest.mark.trio
async def test_bad_arguments_and_a_failing_tool_reach_the_model(onwards_trio):
    @onwards_trio.tool
    def get_weather(city: str) -> dict:
        raise LookupError(f"no station in {city}")

    onwards_trio.model("gpt", [
        tool_calls(call("get_weather", '{"city": "Par')),  # truncated JSON
        tool_calls(call("get_weather", {"city": "Atlantis"})),
        "Sorry, no weather today.",
    ])
    async with openai.AsyncOpenAI(base_url=onwards_trio.base_url, api_key="k") as client:
        response = await client.responses.create(model="gpt", input="Weather?")
    assert response.output_text == "Sorry, no weather today."
    steps = onwards_trio.steps(response.id)
    assert [(s.kind, s.state) for s in steps] == [
        ("model_call", "completed"), ("tool_call", "failed"),
        ("model_call", "completed"), ("tool_call", "failed"),
        ("model_call", "completed"),
    ]
    [failed_run] = onwards_trio.tool_calls("get_weather")  # the bad JSON never reached it
    assert failed_run.error == "LookupError: no station in Atlantis"
    second, third = onwards_trio.calls("gpt")[1:]
    assert "Invalid arguments" in second.messages[-1]["content"]
    assert "no station in Atlantis" in third.messages[-1]["content"]
"""


def test_bad_tool_arguments_and_tool_errors_go_back_to_the_model(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(BAD_TOOL_CALLS)
    run(pytester).assert_outcomes(passed=1)


RETRY = """
import openai
import pytest
from onwards_trio.testing import rate_limited

def test_retry_after_429(onwards):
    onwards.model("gpt", [rate_limited(retry_after=0.2), "made it"])
    with openai.OpenAI(base_url=onwards.base_url, api_key="k", max_retries=2) as client:
        answer = client.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "hi"}]
        )
    assert answer.choices[0].message.content == "made it"
    first, second = onwards.calls("gpt")
    assert first.headers["x-stainless-retry-count"] == "0"
    assert second.headers["x-stainless-retry-count"] == "1"

def test_429_reaches_the_client(onwards):
    onwards.model("gpt", rate_limited(retry_after=7))
    with openai.OpenAI(base_url=onwards.base_url, api_key="k", max_retries=0) as client:
        with pytest.raises(openai.RateLimitError) as raised:
            client.chat.completions.create(
                model="gpt", messages=[{"role": "user", "content": "hi"}]
            )
    assert raised.value.response.headers["retry-after"] == "7"
    assert raised.value.code == "rate_limit_exceeded"
"""


def test_client_retries_after_one_429(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(RETRY)
    run(pytester).assert_outcomes(passed=2)


FAILURES = """
import openai
import pytest
from onwards_trio.testing import error, refusal, text

@pytest.fixture
def client(onwards):
    with openai.OpenAI(base_url=onwards.base_url, api_key="k", max_retries=0) as client:
        yield client

def ask(client, **kw):
    messages = [{"role": "user", "content": "hi"}]
    return client.chat.completions.create(model="gpt", messages=messages, **kw)

def test_error_status_and_body(onwards, client):
    onwards.model("gpt", error(503, "overloaded, come back later"))
    with pytest.raises(openai.InternalServerError) as raised:
        ask(client)
    assert raised.value.status_code == 503
    assert raised.value.message.endswith("overloaded, come back later")

def test_refusal(onwards, client):
    onwards.model("gpt", refusal("I cannot help with that."))
    message = ask(client).choices[0].message
    assert message.refusal == "I cannot help with that." and message.content is None

def test_stream_broken_after_two_chunks(onwards, client):
    onwards.model("gpt", text("one two three four", break_after=2))
    seen = []
    with pytest.raises(openai.APIError, match="ended unexpectedly"):
        for chunk in ask(client, stream=True):
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["", "one"]  # the role chunk, then one word: two chunks

def test_chunks_with_delays(onwards, client):
    onwards.model("gpt", text("abc", chunks=["a", "b", "c"], chunk_delay=0.05))
    stream = ask(client, stream=True)
    assert [c.choices[0].delta.content for c in stream if c.choices] == ["", "a", "b", "c", None]

def test_slow_first_byte_times_the_client_out(onwards, client):
    onwards.model("gpt", text("late", first_byte_delay=30))
    with pytest.raises(openai.APITimeoutError):
        ask(client.with_options(timeout=0.5))
"""


def test_scripted_failures_reach_the_client(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(FAILURES)
    run(pytester).assert_outcomes(passed=5)


MISUSE = """
import openai
from onwards_trio.testing import text

def ask(onwards, content="hi"):
    with openai.OpenAI(base_url=onwards.base_url, api_key="k", max_retries=0) as client:
        try:
            client.chat.completions.create(
                model="gpt", messages=[{"role": "user", "content": content}]
            )
        except openai.APIStatusError:
            pass

def test_script_runs_out(onwards):
    onwards.model("gpt", ["only one"])
    ask(onwards)
    ask(onwards)

def test_body_mismatch_shows_a_diff(onwards):
    onwards.model("gpt", "ok")
    ask(onwards, "what was sent")
    onwards.assert_called("gpt", messages=[{"role": "user", "content": "what was meant"}])
"""


def test_misuse_fails_the_test_with_a_clear_message(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(MISUSE)
    result = run(pytester)
    result.assert_outcomes(failed=2)
    assert_shown(
        result,
        "*model 'gpt' was called 2 times but its script has 1 replies*",
        removed="what was meant",
        added="what was sent",
    )


ANTHROPIC = """
import anthropic
from onwards_trio.testing import Usage, call, text, tool_calls

def test_messages(onwards):
    onwards.model("claude", [
        text("Bonjour !", usage=Usage(7, 2)),
        text("Salut tout le monde", chunks=["Salut", " tout", " le monde"]),
        tool_calls(call("lookup", {"city": "Paris"})),
    ])
    lookup = {
        "name": "lookup",
        "description": "Look a city up.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    with anthropic.Anthropic(base_url=onwards.url, api_key="k", max_retries=0) as client:
        message = client.messages.create(
            model="claude", max_tokens=64, system="Be brief.",
            messages=[{"role": "user", "content": "Say hi in French"}],
        )
        with client.messages.stream(
            model="claude", max_tokens=64, messages=[{"role": "user", "content": "Again"}]
        ) as stream:
            pieces = list(stream.text_stream)
        used = client.messages.create(
            model="claude", max_tokens=64, tools=[lookup],
            messages=[{"role": "user", "content": "Find Paris"}],
        )
    assert message.content[0].text == "Bonjour !" and message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (7, 2)
    assert pieces == ["Salut", " tout", " le monde"]
    assert used.stop_reason == "tool_use"
    assert (used.content[0].name, used.content[0].input) == ("lookup", {"city": "Paris"})
    first, streamed, tooled = onwards.calls("claude")
    first.assert_body({
        "max_tokens": 64,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hi in French"},
        ],
    })
    assert streamed.stream and tooled.tool_names == ["lookup"]
"""


def test_anthropic_sdk_through_v1_messages(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(ANTHROPIC)
    run(pytester).assert_outcomes(passed=1)


REPLAYED = """
import openai
import pytest

@pytest.mark.onwards_cassette("recorded.json")
def test_replay(onwards):
    onwards.recorded("gpt")
    with openai.OpenAI(base_url=onwards.base_url, api_key="k", max_retries=0) as client:
        answer = client.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "How are you?"}]
        )
    assert answer.choices[0].message.content == "Fine."
"""


def test_unmatched_request_fails_showing_the_closest_recorded_one(
    pytester: pytest.Pytester,
) -> None:
    recorded = {
        "version": 1,
        "interactions": [
            {
                "alias": "gpt",
                "request": {
                    "method": "POST",
                    "path": "/v1/chat/completions",
                    "headers": {},
                    "body": {
                        "model": "gpt",
                        "messages": [{"role": "user", "content": "How are you??"}],
                    },
                },
                "response": {"status": 200, "headers": {}, "body": {}},
            }
        ],
    }
    pytester.path.joinpath("recorded.json").write_bytes(orjson.dumps(recorded))
    pytester.makepyfile(REPLAYED)
    result = run(pytester)
    result.assert_outcomes(failed=1)
    assert_shown(
        result,
        "*no recorded interaction in cassette*recorded.json matches this request to 'gpt'*",
        removed="How are you??",
        added="How are you?",
    )


REPLAY_OPTIONS = """
import time
import openai
import pytest

def ask(onwards, **extra):
    with openai.OpenAI(base_url=onwards.base_url, api_key="k", max_retries=0) as client:
        stream = client.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "Hi"}], stream=True, **extra
        )
        return [(time.monotonic(), c.choices[0].delta.content) for c in stream if c.choices]

@pytest.mark.onwards_cassette("stream.json")
def test_ignored_keys_do_not_take_part_in_matching(onwards):
    onwards.recorded("gpt", ignore=["user"])
    assert [text for _, text in ask(onwards, user="someone-else")] == ["Hel", "lo"]

@pytest.mark.onwards_cassette("stream.json")
def test_realtime_replay_keeps_the_recorded_gaps(onwards):
    onwards.recorded("gpt", realtime=True)
    (first, _), (last, _) = ask(onwards, user="someone")
    assert last - first >= 0.35
"""


def _event(at_ms: float, content: str) -> dict[str, object]:
    chunk = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content}}],
    }
    return {"at_ms": at_ms, "data": "data: " + orjson.dumps(chunk).decode() + "\n\n"}


def test_replay_options_ignore_keys_and_keep_timing(pytester: pytest.Pytester) -> None:
    body = {"model": "gpt", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    events = [_event(5.0, "Hel"), _event(405.0, "lo"), {"at_ms": 406.0, "data": "data: [DONE]\n\n"}]
    cassette = {
        "version": 1,
        "interactions": [
            {
                "alias": "gpt",
                "request": {
                    "method": "POST",
                    "path": "/v1/chat/completions",
                    "headers": {},
                    "body": {**body, "user": "someone"},
                },
                "response": {
                    "status": 200,
                    "headers": {"content-type": "text/event-stream"},
                    "events": events,
                },
            }
        ],
    }
    pytester.path.joinpath("stream.json").write_bytes(orjson.dumps(cassette))
    pytester.makepyfile(REPLAY_OPTIONS)
    run(pytester).assert_outcomes(passed=2)


RECORDED = """
import openai

def test_chat(onwards):
    onwards.recorded("gpt")
    with openai.OpenAI(base_url=onwards.base_url, api_key="k", max_retries=0) as client:
        answer = client.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "Hello"}]
        )
        stream = client.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "one two"}], stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream)
    assert answer.choices[0].message.content == "You said: Hello"
    assert streamed == "You said: one two"
"""
REAL_KEY = "sk-real-provider-key-0123456789"


async def _pytest(pytester: pytest.Pytester, *args: str) -> tuple[int, str]:
    """Run pytest on the pytester directory in a child process (the real provider is served by
    this test's Trio run, which must keep running meanwhile)."""
    with trio.fail_after(120):
        done = await trio.run_process(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
            cwd=pytester.path,
            capture_stdout=True,
            check=False,
            env={"REAL_KEY": REAL_KEY, **_environ()},
        )
    return done.returncode, done.stdout.decode()


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}


async def test_record_against_the_provider_then_replay_without_it(
    pytester: pytest.Pytester,
) -> None:
    from onwards_trio._app.demo import demo_upstream

    seen: list[str] = []
    provider = demo_upstream(delay=0.01)

    async def real_provider(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            seen.append(dict(scope["headers"]).get(b"authorization", b"").decode())
        await provider(scope, receive, send)

    pytester.makepyfile(test_app=RECORDED)
    async with trio.open_nursery() as nursery:
        url = await serve_app(nursery, real_provider)
        upstreams = {"gpt": {"url": f"{url}/v1", "key_env": "REAL_KEY"}}
        pytester.path.joinpath("upstreams.json").write_bytes(orjson.dumps(upstreams))
        code, out = await _pytest(
            pytester, "--onwards-record", "--onwards-upstreams=upstreams.json"
        )
        assert code == 0, out
        nursery.cancel_scope.cancel()  # the provider is gone from here on
    assert seen == [f"Bearer {REAL_KEY}"] * 2
    cassette = pytester.path / "cassettes" / "test_app" / "test_chat.json"
    text = cassette.read_text()
    assert REAL_KEY not in text
    recorded = orjson.loads(text)["interactions"]
    assert [i["request"]["body"]["messages"][0]["content"] for i in recorded] == [
        "Hello",
        "one two",
    ]
    events = recorded[1]["response"]["events"]
    assert events[-1]["data"] == "data: [DONE]\n\n"
    assert all(isinstance(e["at_ms"], float) for e in events)
    code, out = await _pytest(pytester)
    assert code == 0, out


def test_a_session_that_uses_no_fixture_never_imports_the_gateway(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        textwrap.dedent(
            """
            import sys

            def test_plain(pytestconfig):
                assert pytestconfig.pluginmanager.has_plugin("onwards_trio")
                assert not [m for m in sys.modules if m.startswith("onwards_trio")]
            """
        )
    )
    run(pytester).assert_outcomes(passed=1)
