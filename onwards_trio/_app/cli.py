"""The ``onwards-trio`` command: serve a config file, or the offline demo."""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import trio
from hypercorn.trio import serve as hypercorn_serve

from onwards_trio._app.demo import demo_config, demo_upstream
from onwards_trio._app.gateway import Gateway, hypercorn_config
from onwards_trio._app.workers import (
    METRICS_FILE_ENV,
    share_limits,
    supervise,
    watch_parent,
    worker_count,
)
from onwards_trio._config import Config, load_config
from onwards_trio._errors import ConfigError
from onwards_trio._loop.steps import StoreError
from onwards_trio._ops.logs import configure_logging, protect
from onwards_trio._ops.metrics import Metrics, install_metrics, serve_metrics
from onwards_trio._ops.reload import (
    ConfigWatcher,
    GracefulShutdown,
    config_secrets,
    reload_on_sighup,
)

__all__ = ["main"]

log = logging.getLogger("onwards_trio")


def _port(text: str) -> int:
    """An argparse type: a TCP port (0 asks the OS for a free one)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (use 0-65535)")
    return port


def _workers(text: str) -> int:
    """An argparse type: a worker count (1 to 64)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"{n} workers: use 1 to 64")
    return n


def _without_workers(argv: Sequence[str]) -> list[str]:
    """The command line a worker runs: the parent's, less ``--workers``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def _parser() -> argparse.ArgumentParser:
    from onwards_trio import __version__

    p = argparse.ArgumentParser(
        prog="onwards-trio",
        description="A Trio-native, OpenAI-compatible LLM gateway.",
        epilog="onwards command lines (-f, -p, -w, -m, --metrics-port, --metrics-prefix) work "
        "unchanged. `onwards-trio demo` starts the gateway on a built-in offline demo upstream.",
        # Prefix matching would make `--metrics` ambiguous and every new flag a breaking change.
        allow_abbrev=False,
    )
    p.add_argument(
        "command",
        nargs="?",
        choices=["serve", "demo", "hash-key"],
        default="serve",
        help="serve: serve the config file given with -f (the default); "
        "demo: serve a built-in offline demo upstream (no config file, no API key); "
        "hash-key: print the sha256:<hex> form of each client key read from stdin (one a line), "
        "to put in the config instead of the key",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "-f", "--targets", "--config", dest="config", metavar="FILE", help="config JSON file"
    )
    p.add_argument("-p", "--port", type=_port, default=3000, help="listen port (default 3000)")
    p.add_argument("--host", default=None, help="listen address (default 0.0.0.0; demo: 127.0.0.1)")
    p.add_argument("--metrics-port", type=_port, default=9090, help="metrics port (default 9090)")
    p.add_argument("--metrics-prefix", default="onwards", help="metric name prefix")
    # onwards' `-w`/`-m` are flags that can only switch on what is already on; accepted so an
    # onwards systemd unit or Helm values work unchanged. --no-watch/--no-metrics switch off.
    p.add_argument(
        "-w", "--watch", action="store_true", help="hot-reload the config file (the default)"
    )
    p.add_argument("--no-watch", action="store_true", help="do not hot-reload the config file")
    p.add_argument(
        "-m", "--metrics", action="store_true", help="serve Prometheus metrics (the default)"
    )
    p.add_argument("--no-metrics", action="store_true", help="do not serve Prometheus metrics")
    p.add_argument(
        "--server",
        choices=["onwards", "hypercorn"],
        default="onwards",
        help="HTTP server: the built-in HTTP/1.1 one (default, fastest) or hypercorn (HTTP/2)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish after SIGTERM (default 30)",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="run N gateway processes on one port under a supervising parent (default 1; "
        "docs/operations.md says what limits mean across workers)",
    )
    p.add_argument(
        "--log-level",
        default=None,
        help="log level (debug, info, warning, error); default from ONWARDS_LOG or info. "
        "debug adds the routing table at start and every failed upstream attempt",
    )
    return p


class ListenError(OSError):
    """A listener could not bind; the message names what, where, and why."""


async def _listen(
    what: str,
    nursery: trio.Nursery,
    start: Callable[..., Awaitable[Any]],
    host: str,
    port: int,
    *args: Any,
) -> Any:
    """``nursery.start(start, *args, host, port)``, with a bind failure as one clear error.

    The servers bind inside nurseries of their own, so the ``OSError`` arrives wrapped in
    exception groups; unwrap it and name the address (9090 is also Prometheus' default).
    """
    try:
        return await nursery.start(start, *args, host, port)
    except (OSError, BaseExceptionGroup) as exc:
        leaves = _leaves(exc)
        if not all(isinstance(e, OSError) for e in leaves):
            raise
        reason = "; ".join(str(getattr(e, "strerror", None) or e) for e in leaves)
        raise ListenError(f"cannot listen on {host}:{port} ({what}): {reason}") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _describe(gateway: Gateway) -> None:
    """At debug level: the routing table as loaded (origins only; never a key)."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    for alias, pool in gateway.targets.table.pools.items():
        origins = ", ".join(
            f"{p.scheme.decode()}://{p.host.decode()}"
            + (f":{p.port}" if p.port is not None else "")
            + f" (weight {p.weight})"
            for p in pool.providers
        )
        log.debug(
            "alias %r: %s; strategy %s, fallback %s, %s, %s",
            alias,
            origins or "no provider",
            pool.strategy,
            "on" if pool.fallback is not None and pool.fallback.enabled else "off",
            "public" if pool.keys is None else f"{len(pool.keys)} key(s)",
            "Open Responses adapter" if pool.adapter else "passthrough",
        )


async def _run(args: argparse.Namespace) -> None:
    async with trio.open_nursery() as nursery:
        # The first SIGTERM/Ctrl-C drains (stop accepting, let requests finish for the grace
        # period), the second stops at once; either way the process exits with no traceback.
        shutdown = GracefulShutdown(grace=args.shutdown_grace)
        await nursery.start(shutdown.watch_signals, nursery.cancel_scope)
        if args.command == "demo":
            upstream = await nursery.start(
                hypercorn_serve,
                demo_upstream(),
                hypercorn_config("127.0.0.1", 0),
            )
            config: Config = demo_config(upstream[0])
            log.info("demo upstream on %s (model %r, no API key needed)", upstream[0], "demo")
        else:
            config = load_config(args.config)
            n = len(config.targets)
            log.info("config %s: %d alias%s", args.config, n, "" if n == 1 else "es")
        protect(config_secrets(config))
        workers = worker_count()
        if workers is not None:  # one of N workers: enforce this worker's share of each limit
            config = share_limits(config, workers)
            await nursery.start(watch_parent, nursery.cancel_scope)
        gateway = Gateway(config)
        _describe(gateway)
        host = args.host or ("127.0.0.1" if args.command == "demo" else "0.0.0.0")
        open_to_all = not gateway.targets.table.protected and not _is_loopback(host)
        if args.command == "serve" and open_to_all:
            # onwards' default (0.0.0.0, no keys) is kept; say what it means, once.
            log.warning(
                "no client key is configured: anyone who can reach %s:%d can use the "
                "upstream keys in %s (set auth.global_keys or a target's keys, "
                "or listen on --host 127.0.0.1)",
                host,
                args.port,
                args.config,
            )
        if any(pool.adapter for pool in gateway.targets.table.pools.values()):
            await gateway.responses.check_store()
        if not args.no_metrics and workers is not None:
            # A worker's metrics go to its parent, which serves them merged on the port.
            metrics = install_metrics(gateway, Metrics(args.metrics_prefix))
            url = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)
            await trio.Path(os.environ[METRICS_FILE_ENV]).write_text(url)
        elif not args.no_metrics:
            metrics = install_metrics(gateway, Metrics(args.metrics_prefix))
            try:
                metrics_url = await _listen(
                    "metrics", nursery, serve_metrics, host, args.metrics_port, metrics
                )
                log.info("metrics on %s/metrics", metrics_url)
            except ListenError as exc:
                if args.command != "demo":
                    raise
                log.warning("demo: no metrics listener (%s)", exc)
        if args.command != "demo":
            share = workers or 1

            def update(new: Config) -> None:
                gateway.update_config(share_limits(new, share))

            watcher = ConfigWatcher(args.config, update, current=config, metrics=gateway.metrics)
            await nursery.start(reload_on_sighup, watcher)
            if not args.no_watch:
                await nursery.start(watcher.run)
        serve = partial(gateway.serve, server=args.server, reuse_port=workers is not None)
        info = await _listen("gateway", nursery, shutdown.serve, host, args.port, serve)
        # What is alive once the gateway listens (modules, config, routing table) lives as
        # long as the process: out of the cyclic collector's reach, the full collections
        # traffic sets off do not walk it again each time (docs/benchmarks.md, bench/cpu.py).
        gc.freeze()
        if args.command == "demo":
            print(
                f"onwards-trio demo ready: try\n"
                f"  curl -s {info.url}/v1/chat/completions -H 'content-type: application/json' "
                f"""-d '{{"model":"demo","messages":[{{"role":"user","content":"hello"}}]}}'""",
                flush=True,
            )


def _hash_keys(parser: argparse.ArgumentParser) -> int:
    """Print each stdin line's key hash. Read from stdin, not argv, so the key never lands in
    shell history or a process listing."""
    from onwards_trio._proxy.auth import key_id

    keys = [line.rstrip("\r\n") for line in sys.stdin]
    keys = [k for k in keys if k]
    if not keys:
        parser.error("hash-key reads the key(s) from stdin, one a line; got none")
    for key in keys:
        print(key_id(key))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "hash-key":
        return _hash_keys(parser)
    try:
        configure_logging(args.log_level)
        Metrics(args.metrics_prefix)  # a bad prefix is a usage error, not a crash later
    except ValueError as exc:
        parser.error(str(exc))
    if args.command == "serve" and not args.config:
        parser.error("-f/--targets CONFIG is required (or run `onwards-trio demo`)")
    if args.command == "demo" and args.config:
        parser.error("demo serves its own built-in config; use `serve -f FILE` for a config file")
    if args.workers > 1 and worker_count() is None:
        if args.command == "demo":
            parser.error("--workers serves a config file (`serve -f FILE --workers N`)")
        if args.server == "hypercorn":
            parser.error("--workers needs the built-in server (not --server hypercorn)")
        host = args.host or "0.0.0.0"
        metrics_port = None if args.no_metrics else args.metrics_port
        run = partial(
            supervise,
            _without_workers(sys.argv[1:] if argv is None else argv),
            args.workers,
            host,
            args.port,
            host,
            metrics_port,
            args.shutdown_grace,
        )
        try:
            trio.run(run)
        except (Exception, KeyboardInterrupt) as exc:
            return _exit_code(exc)
        return 0
    try:
        trio.run(_run, args)
    except (Exception, KeyboardInterrupt) as exc:
        return _exit_code(exc)
    return 0


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _exit_code(exc: BaseException) -> int:
    """Known failures become one clear line and an exit code; anything else is a bug."""
    leaves = _leaves(exc)
    if all(isinstance(e, KeyboardInterrupt) for e in leaves):
        return 130
    known = [e for e in leaves if isinstance(e, ConfigError | OSError | StoreError)]
    if len(known) != len(leaves):
        raise exc
    for e in known:
        what = "the response store: " if isinstance(e, StoreError) else ""
        print(f"onwards-trio: {what}{e}", file=sys.stderr)
    return 2 if any(isinstance(e, ConfigError) for e in known) else 1
