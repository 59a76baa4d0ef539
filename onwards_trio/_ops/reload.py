"""Process lifecycle: config hot reload (a Trio-native file poller, SIGHUP) and graceful shutdown.

Reload
    :class:`ConfigWatcher` polls ``os.stat`` of the config path every ``interval`` seconds and
    compares ``(st_mtime_ns, st_size, st_ino)``. ``os.stat`` follows symlinks, so this catches an
    in-place write, an editor's write-new-then-rename (new inode) and a Kubernetes ConfigMap
    ``..data`` symlink swap alike -- the cases an inotify watch on the file path misses (onwards
    only reacted to *modify* events). A change is debounced (re-stat after ``settle`` seconds
    until two stats agree) so a half-written file is not parsed, then read, parsed, validated and
    handed to ``apply`` (``Gateway.update_config`` / ``Targets.update``: one atomic swap of the
    whole table). An invalid file is rejected with one log line naming the problem and the old
    config stays. No thread and no dependency: ``trio.sleep`` is the only wait, so tests drive it
    with ``autojump_clock``. Reading a config file of a few KB once per change is done
    synchronously on purpose (microseconds; a thread hop would make the tests nondeterministic).

Shutdown
    :class:`GracefulShutdown` turns the first SIGTERM/SIGINT into a *drain*: the HTTP server stops
    accepting (its ``shutdown_trigger`` is :meth:`GracefulShutdown.wait`), in-flight requests get
    ``grace`` seconds to finish, then everything left is cancelled (background response loops
    persist themselves as cancelled in their shielded ``finally``). A second signal cancels at
    once.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from onwards_trio._config import Config, parse_config
from onwards_trio._errors import ConfigError
from onwards_trio._ops.logs import collect_secrets, protect, redact

if TYPE_CHECKING:
    from onwards_trio._ops.metrics import Metrics

__all__ = [
    "ConfigWatcher",
    "FileSignature",
    "GracefulShutdown",
    "file_signature",
    "reload_on_sighup",
]

log = logging.getLogger("onwards_trio.reload")

FileSignature = tuple[int, int, int]


def file_signature(path: str | os.PathLike[str]) -> FileSignature | None:
    """``(st_mtime_ns, st_size, st_ino)`` of the file ``path`` resolves to; ``None`` if absent."""
    try:
        st = os.stat(path)  # follows symlinks: a swapped link target is a new signature
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _read_or_none(path: str) -> bytes | None:
    """A config file is a few KB: read it in place (a thread hop would cost more)."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return None


class ConfigWatcher:
    """Watch one config file and apply every valid new version of it.

    ``apply`` receives the new :class:`~onwards_trio.Config`; if it raises, the reload counts as
    failed and the previous table stays (``Targets.update`` builds the new table before it swaps).
    ``current`` is the config in effect when watching starts; it lets the watcher warn about
    settings a reload cannot change (``http_pool``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        apply: Callable[[Config], None],
        *,
        current: Config | None = None,
        metrics: Metrics | None = None,
        interval: float = 1.0,
        settle: float = 0.1,
    ) -> None:
        if interval <= 0 or settle < 0:
            raise ValueError("interval must be > 0 and settle >= 0")
        self.path = os.fspath(path)
        self.apply = apply
        self.current = current
        self.metrics = metrics
        self.interval = interval
        self.settle = settle
        self.signature: FileSignature | None = None
        self.reloads_ok = 0
        self.reloads_failed = 0
        self._missing_logged = False
        self._applied: bytes | None = None  # the bytes behind the config in effect, if known

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll until cancelled. ``task_status.started()`` once the baseline is taken."""
        self.signature = file_signature(self.path)
        if self.current is not None:
            self._applied = _read_or_none(self.path)  # so that a `touch` is not a reload
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            await self.check()

    async def check(self) -> bool | None:
        """One poll: ``None`` if unchanged, else whether the new version was applied."""
        seen = file_signature(self.path)
        if seen == self.signature:
            return None
        # Debounce: a writer may still be writing; wait until two stats agree.
        while self.settle:
            await trio.sleep(self.settle)
            again = file_signature(self.path)
            if again == seen:
                break
            seen = again
        if seen is None:
            # Deleted (or mid-swap): keep serving the old config; say so once, not every second.
            self.signature = None
            if not self._missing_logged:
                self._missing_logged = True
                log.warning("config file %s is gone; keeping the current config", self.path)
            return False
        self._missing_logged = False
        self.signature = seen
        return self.reload_now()

    def reload_now(self) -> bool:
        """Read, validate and apply the file now (also for SIGHUP). ``True`` if applied."""
        secrets: set[str] = set()
        if self.current is not None:
            secrets |= config_secrets(self.current)
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            return self._rejected(f"cannot read the file: {exc.strerror or type(exc).__name__}", ())
        if data == self._applied:
            log.debug("config file %s touched but unchanged", self.path)
            return True
        try:
            secrets |= collect_secrets(data)
            config = parse_config(data)
            self.apply(config)
        except ConfigError as exc:
            return self._rejected("; ".join(exc.problems), secrets)
        except Exception as exc:  # a table that cannot be built: keep the old one
            return self._rejected(f"{type(exc).__name__}: {exc}", secrets)
        previous, self.current = self.current, config
        self._applied = data
        protect(config_secrets(config))
        self.reloads_ok += 1
        if self.metrics is not None:
            self.metrics.reload(ok=True)
        n = len(config.targets)
        log.info("config reloaded from %s: %d alias%s", self.path, n, "" if n == 1 else "es")
        for warning in config.warnings:
            log.warning("config: %s", redact(warning, secrets))
        if previous is not None and previous.http_pool != config.http_pool:
            log.warning("config: http_pool changes take effect after a restart")
        if previous is not None and _tracer_settings(previous) != _tracer_settings(config):
            log.warning("config: telemetry changes (but stream_usage) take effect after a restart")
        return True

    def _rejected(self, problem: str, secrets: Iterable[str]) -> bool:
        self.reloads_failed += 1
        if self.metrics is not None:
            self.metrics.reload(ok=False)
        log.error(
            "config reload rejected, keeping the current config: %s: %s",
            self.path,
            redact(problem, secrets),
        )
        return False


def _tracer_settings(config: Config) -> object:
    """The part of ``telemetry`` read once, at start: all but ``stream_usage``, which each
    request reads from the routing table. The tracer is built from it together with the
    ``OTEL_*`` environment (which a reload cannot change either): its exporter, queue, sampler
    and resource live in the export task for the process's life, and in-flight traces stay on
    the tracer they started with."""
    return attrs.evolve(config.telemetry, stream_usage=False)


def config_secrets(config: Config) -> set[str]:
    """Every key a config holds (client keys and upstream keys), for log redaction."""
    out: set[str] = set()
    auth = config.auth
    names = auth.key_definitions if auth is not None else {}
    if auth is not None:
        out.update(auth.global_keys or ())
        out.update(d.key for d in auth.key_definitions.values())
    for pool in config.targets.values():
        # A key definition's name is not a secret (masking it would garble unrelated words).
        out.update(k for k in pool.keys or () if k not in names)
        out.update(p.onwards_key for p in pool.providers if p.onwards_key)
    for tool in config.tools.values():
        out.update(tool.headers.values())
    return out


async def reload_on_sighup(
    watcher: ConfigWatcher, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Reload the config whenever the process gets SIGHUP (the Unix daemon convention)."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            log.info("SIGHUP: reloading %s", watcher.path)
            watcher.signature = file_signature(watcher.path)
            watcher.reload_now()


class GracefulShutdown:
    """A one-shot drain: stop accepting, give in-flight requests ``grace`` seconds, then cancel.

    Pass :meth:`wait` as hypercorn's ``shutdown_trigger`` (and ``grace`` as its
    ``graceful_timeout``); run :meth:`watch_signals` beside the server so a signal starts the
    drain and a cancel follows when the server is done or the grace period is over.
    """

    def __init__(self, grace: float = 30.0) -> None:
        if grace < 0:
            raise ValueError("grace must be >= 0")
        self.grace = grace
        self._requested = trio.Event()
        self._finished = trio.Event()

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    def request(self) -> None:
        """Start the drain (idempotent)."""
        self._requested.set()

    def finished(self) -> None:
        """The server has stopped (drained or cancelled); nothing is left to wait for."""
        self._finished.set()

    async def wait(self) -> None:
        """Return when a drain is requested: hypercorn's ``shutdown_trigger``."""
        await self._requested.wait()

    async def serve(
        self,
        serve: Callable[..., Awaitable[Any]],
        *args: Any,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run ``serve(*args, shutdown_trigger=self.wait, grace=self.grace)`` and mark the end."""
        try:
            await serve(
                *args, shutdown_trigger=self.wait, grace=self.grace, task_status=task_status
            )
        finally:
            self.finished()

    async def cancel_after_drain(self, scope: trio.CancelScope) -> None:
        """Once a drain is requested, cancel ``scope`` when the server finished or after grace."""
        await self._requested.wait()
        # A small margin: the server's own grace deadline fires first and cancels cleanly.
        with trio.move_on_after(self.grace + 1.0):
            await self._finished.wait()
        scope.cancel()

    async def watch_signals(
        self,
        scope: trio.CancelScope,
        signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM),
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """First signal: drain (then cancel ``scope``); second signal: cancel ``scope`` now."""
        with trio.open_signal_receiver(*signals) as received:
            task_status.started()
            async with trio.open_nursery() as nursery:
                async for signum in received:
                    name = signal.Signals(signum).name
                    if not self.requested:
                        log.info(
                            "received %s: draining (up to %.0f s); send it again to stop now",
                            name,
                            self.grace,
                        )
                        self.request()
                        nursery.start_soon(self._then_cancel, scope, nursery.cancel_scope)
                    else:
                        log.warning("received %s again: stopping now", name)
                        scope.cancel()
                        nursery.cancel_scope.cancel()
                        return

    async def _then_cancel(self, scope: trio.CancelScope, mine: trio.CancelScope) -> None:
        await self.cancel_after_drain(scope)
        mine.cancel()
