"""The ``onwards-trio`` command line as a newcomer (or an onwards unit file) uses it."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.app.test_reload_cli import gateway_process, write

pytestmark = pytest.mark.slow


def run_cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command line that is expected to end by itself."""
    return subprocess.run(
        [sys.executable, "-m", "onwards_trio", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port some other program is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    write(path, {"targets": {"gpt-4o": {"url": "http://127.0.0.1:9/v1", "keys": ["sk-c"]}}})
    return path


def test_version_prints_the_package_version() -> None:
    import onwards_trio

    done = run_cli("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"onwards-trio {onwards_trio.__version__}"


def test_help_explains_the_sub_command() -> None:
    done = run_cli("--help")
    assert done.returncode == 0
    assert "demo: serve a built-in offline demo upstream" in " ".join(done.stdout.split())


@pytest.mark.parametrize("flag", ["-p", "--metrics-port"])
def test_a_port_out_of_range_is_a_usage_error(config: Path, flag: str) -> None:
    done = run_cli("-f", str(config), flag, "99999")
    assert done.returncode == 2
    assert "99999 is not a port" in done.stderr


def test_demo_refuses_a_config_file_instead_of_ignoring_it(config: Path) -> None:
    done = run_cli("demo", "-f", str(config))
    assert done.returncode == 2
    assert "demo serves its own built-in config" in done.stderr


def test_address_in_use_names_the_address(config: Path, taken_port: int) -> None:
    done = run_cli("-f", str(config), "--host", "127.0.0.1", "-p", str(taken_port), "--no-metrics")
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{taken_port} (gateway)" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unwritable_store_fails_at_start(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    config = tmp_path / "config.json"
    write(
        config,
        {
            "targets": {"m": {"url": "http://127.0.0.1:9/v1", "open_responses": {"adapter": True}}},
            "store": {"kind": "sqlite", "path": str(tmp_path / "not-a-dir" / "x.sqlite3")},
        },
    )
    done = run_cli("-f", str(config), "--host", "127.0.0.1", "-p", "0", "--no-metrics")
    assert done.returncode == 1
    assert "onwards-trio: the response store:" in done.stderr
    assert "Traceback" not in done.stderr


async def test_onwards_flags_work_unchanged(config: Path, nursery: trio.Nursery) -> None:
    # What an onwards systemd unit passes (`-f`/`--targets`, `-p`, `-w`, `-m`, the metrics pair)
    flags = ("--targets", str(config), "-p", "0", "-w", "-m", "--metrics-prefix", "edge")
    async with (
        gateway_process(nursery, config, *flags) as gw,
        httpx.AsyncClient(timeout=10) as client,
    ):
        models = await client.get(f"{gw.url}/v1/models", headers={"authorization": "Bearer sk-c"})
        metrics = await client.get(f"{gw.metrics_url}/metrics")
    assert [m["id"] for m in models.json()["data"]] == ["gpt-4o"]
    assert "edge_http_requests_total" in metrics.text


async def test_serving_without_client_keys_to_the_network_warns(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    keyless = tmp_path / "keyless.json"
    write(keyless, {"targets": {"gpt-4o": {"url": "http://127.0.0.1:9/v1"}}})
    async with gateway_process(nursery, keyless, "--host", "0.0.0.0") as gw:
        line = await gw.wait_for_line("no client key is configured")
    assert "0.0.0.0" in line


async def test_serving_with_client_keys_does_not_warn(config: Path, nursery: trio.Nursery) -> None:
    async with gateway_process(nursery, config, "--host", "0.0.0.0") as gw:
        pass
    assert not any("no client key" in line for line in gw.lines)


async def test_debug_level_shows_the_routing_table(config: Path, nursery: trio.Nursery) -> None:
    async with gateway_process(nursery, config, "--log-level", "debug") as gw:
        line = await gw.wait_for_line("alias 'gpt-4o'")
    assert "http://127.0.0.1:9" in line and "1 key(s)" in line
    assert "sk-c" not in "\n".join(gw.lines)


async def test_demo_goes_on_without_metrics_when_the_metrics_port_is_taken(
    taken_port: int,
) -> None:
    argv = [
        sys.executable, "-m", "onwards_trio", "demo", "-p", "0",
        "--metrics-port", str(taken_port),
    ]  # fmt: skip
    proc = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE)
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        with trio.fail_after(30):
            async for chunk in proc.stderr:
                lines.extend(chunk.decode().splitlines())
                if any("listening on" in ln for ln in lines):
                    break
    finally:
        proc.kill()
        with trio.move_on_after(10):
            await proc.wait()
    text = "\n".join(lines)
    assert f"demo: no metrics listener (cannot listen on 127.0.0.1:{taken_port}" in text
    assert "listening on http://127.0.0.1:" in text
