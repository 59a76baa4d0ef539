"""The ``onwards-trio demo`` command as a newcomer runs it: starts fast, answers, stops cleanly."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import httpx


def test_demo_starts_answers_and_exits_cleanly_on_ctrl_c() -> None:
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "onwards_trio", "demo", "--port", "0", "--no-metrics"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = None
        assert proc.stdout is not None
        while url is None and time.monotonic() - started < 30:
            line = proc.stdout.readline()
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                url = match.group(1)
        assert url is not None, "the gateway never said where it listens"
        ready = time.monotonic() - started
        chat = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "demo", "messages": [{"role": "user", "content": "hello"}]},
            timeout=10,
        )
        assert chat.status_code == 200
        assert chat.json()["choices"][0]["message"]["content"] == "You said: hello"
        with httpx.stream(
            "POST",
            f"{url}/v1/chat/completions",
            json={
                "model": "demo",
                "stream": True,
                "messages": [{"role": "user", "content": "a b"}],
            },
            timeout=10,
        ) as stream:
            text = "".join(stream.iter_text())
        assert text.rstrip().endswith("data: [DONE]") and '"content":" b"' in text
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert "Traceback" not in out
    # Python's own start-up is part of this; the gateway itself adds little.
    assert ready < 10


def test_the_hypercorn_server_option_serves_the_same_gateway() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "onwards_trio", "demo", "--port", "0", "--server", "hypercorn"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = None
        deadline = time.monotonic() + 30
        while url is None and time.monotonic() < deadline:
            match = re.search(r"listening on (http://\S+)", proc.stdout.readline())
            url = match.group(1) if match else None
        assert url is not None
        chat = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        assert chat.json()["choices"][0]["message"]["content"] == "You said: hi"
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
