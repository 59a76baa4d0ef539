"""The config file poller, driven by ``autojump_clock`` (no real sleeps, no sockets)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from onwards_trio import Config, Targets, parse_config
from onwards_trio._ops.metrics import Metrics
from onwards_trio._ops.reload import ConfigWatcher, file_signature

SECRET = "sk-upstream-secret-0123456789"


def doc(*aliases: str, **extra: Any) -> dict[str, Any]:
    return {"targets": {a: {"url": f"https://{a}.example/v1"} for a in aliases}, **extra}


def write(path: Path, data: dict[str, Any] | bytes) -> None:
    path.write_bytes(data if isinstance(data, bytes) else orjson.dumps(data))


def replace(path: Path, data: dict[str, Any] | bytes) -> None:
    """What editors do on save: write a new file beside the old one, rename it over."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp, data)
    os.replace(tmp, path)


def load(path: Path) -> Config:
    return parse_config(path.read_bytes())


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """Where the watched config file lives."""
    return tmp_path / "config.json"


async def start(
    nursery: trio.Nursery, path: Path, initial: dict[str, Any] | None = None, **kw: Any
) -> tuple[Targets, ConfigWatcher, Metrics]:
    """Write ``initial`` (if given) to ``path``, load it and watch the file."""
    if initial is not None:
        write(path, initial)
    config = load(path)
    targets = Targets(config)
    metrics = Metrics()
    watcher = ConfigWatcher(path, targets.update, current=config, metrics=metrics, **kw)
    await nursery.start(watcher.run)
    return targets, watcher, metrics


def reloads(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value("onwards_config_reloads_total", {"result": result})
    return value or 0.0


async def test_in_place_edit_is_applied(
    path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    targets, _, _ = await start(nursery, path, doc("a"))
    write(path, doc("a", "bigger-b"))
    await trio.sleep(2)
    assert sorted(targets.table.pools) == ["a", "bigger-b"]


async def test_same_size_edit_is_caught_by_mtime(
    path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    targets, _, _ = await start(nursery, path, doc("a"))
    before = os.stat(path)
    write(path, doc("b"))  # same length, same inode
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    assert os.stat(path).st_ino == before.st_ino
    await trio.sleep(2)
    assert list(targets.table.pools) == ["b"]


async def test_replace_by_rename_is_applied(
    path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    targets, _, _ = await start(nursery, path, doc("a"))
    replace(path, doc("renamed"))
    await trio.sleep(2)
    assert list(targets.table.pools) == ["renamed"]


async def test_symlink_swap_is_applied(
    tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Kubernetes ConfigMaps: the watched path is a symlink whose target is swapped."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    write(one, doc("a"))
    write(two, doc("from-two"))
    link = tmp_path / "config.json"
    link.symlink_to(one)
    targets, _, _ = await start(nursery, link)
    tmp_link = tmp_path / "config.json.new"
    tmp_link.symlink_to(two)
    os.replace(tmp_link, link)
    await trio.sleep(2)
    assert list(targets.table.pools) == ["from-two"]


async def test_invalid_file_keeps_old_config_then_valid_file_applies(
    path: Path,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    targets, watcher, metrics = await start(nursery, path, doc("a"))
    old_table = targets.table
    with caplog.at_level(logging.INFO, logger="onwards_trio"):
        write(path, {"targets": {"a": {"url": "not-a-url", "onwards_key": SECRET}}})
        await trio.sleep(2)
        assert targets.table is old_table
        assert (reloads(metrics, "failed"), reloads(metrics, "ok")) == (1, 0)
        rejected = [r for r in caplog.records if "rejected" in r.getMessage()]
        assert len(rejected) == 1
        assert "$.targets.a" in rejected[0].getMessage()
        write(path, doc("a", "now-valid"))
        await trio.sleep(2)
    assert sorted(targets.table.pools) == ["a", "now-valid"]
    assert (reloads(metrics, "failed"), reloads(metrics, "ok")) == (1, 1)
    assert (watcher.reloads_failed, watcher.reloads_ok) == (1, 1)


async def test_rejection_log_line_never_contains_a_key(
    path: Path,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await start(nursery, path, doc("a"))
    # A key pasted into the url field: the validator echoes the value back. This key has no
    # recognisable shape, so only the exact-secret guard (keys collected from the file) masks it.
    plain_key = "tok3n-ABCDEF-private"
    bad = {
        "targets": {
            "a": {"url": plain_key},
            "b": {"url": "https://b.example", "onwards_key": plain_key},
        }
    }
    with caplog.at_level(logging.INFO, logger="onwards_trio"):
        write(path, bad)
        await trio.sleep(2)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "url must start with" in text
    assert plain_key not in text


async def test_broken_json_is_rejected(
    path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    targets, _, metrics = await start(nursery, path, doc("a"))
    write(path, b'{"targets": {"a": ')
    await trio.sleep(2)
    assert list(targets.table.pools) == ["a"]
    assert reloads(metrics, "failed") == 1


@pytest.mark.parametrize("saved", [False, True], ids=["untouched", "saved-unchanged"])
async def test_unchanged_content_is_not_reloaded(
    path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, saved: bool
) -> None:
    targets, watcher, _ = await start(nursery, path, doc("a"))
    table = targets.table
    if saved:
        replace(path, doc("a"))  # same bytes, new inode (an editor saving without changes)
    await trio.sleep(30)
    assert targets.table is table
    assert (watcher.reloads_ok, watcher.reloads_failed) == (0, 0)


async def test_deleted_file_keeps_config_and_a_recreated_one_applies(
    path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    targets, watcher, _ = await start(nursery, path, doc("a"))
    os.remove(path)
    await trio.sleep(5)
    assert list(targets.table.pools) == ["a"]
    assert watcher.reloads_failed == 0  # absence is not counted every poll
    write(path, doc("back"))
    await trio.sleep(2)
    assert list(targets.table.pools) == ["back"]


async def test_debounce_waits_for_a_stable_file(
    path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A file still being written is not parsed until two stats agree."""
    write(path, doc("a"))
    applied: list[Config] = []
    watcher = ConfigWatcher(path, applied.append, interval=1.0, settle=0.1)
    watcher.signature = file_signature(path)
    half = orjson.dumps(doc("a", "b"))

    async def writer() -> None:
        write(path, half[:10])  # a torn write
        await trio.sleep(0.05)
        write(path, half)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.sleep(0.01)
        result = await watcher.check()
    assert result is True
    assert [sorted(c.targets) for c in applied] == [["a", "b"]]


async def test_failed_apply_keeps_the_old_config(
    path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    write(path, doc("a"))

    def boom(_config: Config) -> None:
        raise RuntimeError("cannot build")

    watcher = ConfigWatcher(path, boom)
    await nursery.start(watcher.run)
    write(path, doc("a", "b"))
    await trio.sleep(2)
    assert (watcher.reloads_ok, watcher.reloads_failed) == (0, 1)


async def test_rate_limit_state_survives_an_unrelated_reload(
    path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    limited = {"url": "https://a.example/v1", "rate_limit": {"requests_per_second": 0.001}}
    targets, _, _ = await start(nursery, path, {"targets": {"a": limited}})
    bucket = targets.table.pools["a"].providers[0].rate
    assert bucket is not None and bucket.try_acquire() is None  # the one token is spent
    write(path, {"targets": {"a": limited, "other": {"url": "https://o.example"}}})
    await trio.sleep(2)
    assert "other" in targets.table.pools
    after = targets.table.pools["a"].providers[0].rate
    assert after is not None and after.try_acquire() is not None  # still empty: no bypass


async def test_changed_rate_limit_gets_a_fresh_bucket(
    path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    spec = {"url": "https://a.example/v1", "rate_limit": {"requests_per_second": 0.001}}
    targets, _, _ = await start(nursery, path, {"targets": {"a": spec}})
    bucket = targets.table.pools["a"].providers[0].rate
    assert bucket is not None and bucket.try_acquire() is None
    changed = {**spec, "rate_limit": {"requests_per_second": 0.001, "burst_size": 3}}
    write(path, {"targets": {"a": changed}})
    await trio.sleep(2)
    after = targets.table.pools["a"].providers[0].rate
    assert after is not None and after is not bucket and after.burst == 3
    assert after.try_acquire() is None


async def test_in_flight_counts_survive_a_reload(
    path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    spec = {"url": "https://a.example/v1", "concurrency_limit": {"max_concurrent_requests": 1}}
    targets, _, _ = await start(nursery, path, {"targets": {"a": spec}})
    permit = targets.table.pools["a"].providers[0].concurrency.try_acquire()
    assert permit is not None
    write(path, {"targets": {"a": spec, "b": {"url": "https://b.example"}}})
    await trio.sleep(2)
    provider = targets.table.pools["a"].providers[0]
    assert "b" in targets.table.pools
    assert provider.concurrency.active == 1
    assert provider.concurrency.try_acquire() is None  # the limit still counts the old request
    permit.release()
    assert provider.concurrency.active == 0
