"""Every code block of README.md and docs/*.md is checked, so the docs cannot drift.

How to write a block that this test accepts (the convention for everyone writing docs):

* A ``python`` block runs as a script in a fresh interpreter and must exit 0 within 60 s
  (print what a reader would like to see; ``assert`` what must hold). Its working directory is
  a temporary one holding ``config.json``: the alias ``demo`` on the built-in demo upstream
  (served on loopback for the test; it echoes ``You said: <text>`` and offers the server-side
  ``get_weather`` tool), in Open Responses adapter mode, with the ``memory`` store. So
  ``load_config("config.json")`` and requests for model ``demo`` work offline.
* A ``json`` block is a config: it must load with ``parse_config`` without a warning.
* ``<!-- fragment -->`` on the line before the opening fence (blank lines between are fine)
  marks a block that is not meant to run or load as it stands: an excerpt, a signature, a
  request body, part of a config. It is invisible on GitHub. Use it sparingly: a runnable
  example is one the docs test keeps true.
* ``<!-- interrupt -->`` marks a ``python`` block that serves until Ctrl-C: the test waits for
  its first line on stdout, sends SIGINT, and expects exit 0 and no traceback.
* A ``python`` block whose first line is ``# test_<name>.py`` is a pytest file: the test of
  its own page runs it (``tests/testing/test_docs_testing.py`` for docs/testing.md), not this.
* Blocks in other languages (``sh``, ``text``, ``promql``, ...) are not checked.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import orjson
import pytest
import trio

from onwards_trio import parse_config
from onwards_trio._app.demo import WEATHER_TOOL, demo_upstream
from tests.support import serve_app

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_TIMEOUT = 60.0

_FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\s*$")
_MARK = re.compile(r"^\s*<!--\s*(?P<mark>fragment|interrupt)\b.*-->\s*$")


@attrs.frozen
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    mark: str | None  # "fragment", "interrupt" or None
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> Iterator[Block]:
    """The fenced blocks of a Markdown file, each with the marker comment before it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        indent = len(fence["indent"])
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and not re.match(r"^ *```\s*$", lines[i]):
            line = lines[i]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
            i += 1
        i += 1  # the closing fence
        before = start - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        mark = _MARK.match(lines[before]) if before >= 0 else None
        yield Block(path, start + 1, fence["lang"], mark["mark"] if mark else None, "\n".join(body))


ALL = [b for path in DOCS for b in blocks(path)]
_PYTEST_FILE = re.compile(r"# test_\w+\.py\n")
PYTHON = [
    b
    for b in ALL
    if b.lang == "python" and b.mark != "fragment" and not _PYTEST_FILE.match(b.code + "\n")
]
CONFIGS = [b for b in ALL if b.lang == "json" and b.mark != "fragment"]


def test_the_docs_have_blocks_to_check() -> None:
    assert PYTHON and CONFIGS  # a broken parser must not pass by finding nothing


@pytest.mark.parametrize("block", CONFIGS, ids=[b.id for b in CONFIGS])
def test_a_config_block_loads(block: Block) -> None:
    config = parse_config(block.code)
    assert config.warnings == (), f"{block.id}: {config.warnings}"


@pytest.fixture
async def workdir(nursery: trio.Nursery, tmp_path: Path) -> Path:
    """A working directory with ``config.json`` for the demo upstream (see the module doc)."""
    upstream = await serve_app(nursery, demo_upstream(delay=0.0))
    config = {
        "targets": {"demo": {"url": f"{upstream}/v1", "open_responses": {"adapter": True}}},
        "tools": {"get_weather": {"url": f"{upstream}/tools/get_weather", **WEATHER_TOOL}},
        "store": {"kind": "memory"},
    }
    (tmp_path / "config.json").write_bytes(orjson.dumps(config, option=orjson.OPT_INDENT_2))
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
async def test_a_python_block_runs(block: Block, workdir: Path) -> None:
    argv = [sys.executable, "-c", block.code]
    if block.mark == "interrupt":
        output = await _run_then_interrupt(argv, workdir)
    else:
        with trio.fail_after(RUN_TIMEOUT):
            done = await trio.run_process(
                argv, cwd=workdir, capture_stdout=True, capture_stderr=True, check=False
            )
        output = (done.returncode, done.stdout.decode(), done.stderr.decode())
    code, out, err = output
    assert code == 0, f"{block.id} exited {code}\n--- stdout\n{out}\n--- stderr\n{err}"
    assert "Traceback" not in err, f"{block.id}\n{err}"


async def _run_then_interrupt(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    proc = await trio.lowlevel.open_process(
        argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    out = b""
    err = bytearray()
    try:
        async with trio.open_nursery() as nursery:

            async def drain_stderr() -> None:
                assert proc.stderr is not None
                async for chunk in proc.stderr:
                    err.extend(chunk)

            nursery.start_soon(drain_stderr)
            with trio.fail_after(RUN_TIMEOUT):
                async for chunk in proc.stdout:
                    out += chunk
                    if b"\n" in out:
                        break
                proc.send_signal(signal.SIGINT)
                async for chunk in proc.stdout:
                    out += chunk
                code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.move_on_after(10):
                await proc.wait()
    return code, out.decode(), err.decode()
