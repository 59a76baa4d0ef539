"""The ``onwards-trio`` command: serve a config file, or the offline demo."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from functools import partial

import trio
from hypercorn.trio import serve as hypercorn_serve

from onwards_trio._app.demo import demo_config, demo_upstream
from onwards_trio._app.gateway import Gateway, hypercorn_config
from onwards_trio._config import Config, load_config
from onwards_trio._errors import ConfigError
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="onwards-trio",
        description="A Trio-native, OpenAI-compatible LLM gateway.",
        epilog="`onwards-trio demo` starts the gateway on a built-in offline demo upstream.",
    )
    p.add_argument("command", nargs="?", choices=["serve", "demo"], default="serve")
    p.add_argument("-f", "--targets", "--config", dest="config", help="config JSON file")
    p.add_argument("-p", "--port", type=int, default=3000, help="listen port (default 3000)")
    p.add_argument("--host", default=None, help="listen address (default 0.0.0.0; demo: 127.0.0.1)")
    p.add_argument("--metrics-port", type=int, default=9090, help="metrics port (default 9090)")
    p.add_argument("--metrics-prefix", default="onwards", help="metric name prefix")
    p.add_argument("--no-watch", action="store_true", help="do not hot-reload the config file")
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
        "--log-level",
        default=None,
        help="log level (debug, info, warning, error); default from ONWARDS_LOG or info",
    )
    return p


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
        for warning in config.warnings:
            log.warning("config: %s", warning)
        protect(config_secrets(config))
        gateway = Gateway(config)
        host = args.host or ("127.0.0.1" if args.command == "demo" else "0.0.0.0")
        if not args.no_metrics:
            metrics = install_metrics(gateway, Metrics(args.metrics_prefix))
            try:
                metrics_url = await nursery.start(serve_metrics, metrics, host, args.metrics_port)
                log.info("metrics on %s/metrics", metrics_url)
            except OSError as exc:
                if args.command != "demo":
                    raise
                log.warning("demo: no metrics listener (%s)", exc.strerror or exc)
        if args.command != "demo":
            watcher = ConfigWatcher(
                args.config, gateway.update_config, current=config, metrics=gateway.metrics
            )
            await nursery.start(reload_on_sighup, watcher)
            if not args.no_watch:
                await nursery.start(watcher.run)
        serve = partial(gateway.serve, server=args.server)
        info = await nursery.start(shutdown.serve, serve, host, args.port)
        if args.command == "demo":
            print(
                f"onwards-trio demo ready: try\n"
                f"  curl -s {info.url}/v1/chat/completions -H 'content-type: application/json' "
                f"""-d '{{"model":"demo","messages":[{{"role":"user","content":"hello"}}]}}'""",
                flush=True,
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        configure_logging(args.log_level)
        Metrics(args.metrics_prefix)  # a bad prefix is a usage error, not a crash later
    except ValueError as exc:
        parser.error(str(exc))
    if args.command == "serve" and not args.config:
        parser.error("-f/--targets CONFIG is required (or run `onwards-trio demo`)")
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
    known = [e for e in leaves if isinstance(e, ConfigError | OSError)]
    if len(known) != len(leaves):
        raise exc
    for e in known:
        print(f"onwards-trio: {e}", file=sys.stderr)
    return 2 if any(isinstance(e, ConfigError) for e in known) else 1
