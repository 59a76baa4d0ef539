"""Run the official Open Responses compliance suite against the gateway (``nox -s compliance``).

The suite (``suite/``, the spec repository's CLI) and its runtime pins (``runtime/``: bun and
zod) live in a read-only directory, ``$ONWARDS_OPENRESPONSES_DIR`` (default
``../shared/openresponses`` next to the checkout, where CI keeps it). They are copied to a
temporary directory, the runtime is installed there with ``npm ci``, and the CLI runs against
a gateway started here: the built-in demo upstream (a deterministic Chat Completions model that
calls an offered tool when the prompt is about it and otherwise answers from the conversation;
it never looks for the suite's wording) behind an alias in adapter mode, with the SQLite store.
It runs once on each server (the built-in one and hypercorn), since WebSocket mode depends on
the server. Exit status 0 only when every test passed (none failed or skipped).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import orjson
import trio

from onwards_trio import Gateway
from onwards_trio._app.demo import demo_config, demo_upstream
from onwards_trio._transport.server import serve as serve_http

ROOT = Path(__file__).resolve().parent.parent
SUITE_TIMEOUT = 300.0  # seconds for one run of the whole suite


def _source() -> Path:
    given = os.environ.get("ONWARDS_OPENRESPONSES_DIR")
    source = Path(given) if given else ROOT.parent / "shared" / "openresponses"
    if not (source / "suite" / "bin" / "compliance-test.ts").is_file():
        sys.exit(f"compliance: no Open Responses suite in {source} (set ONWARDS_OPENRESPONSES_DIR)")
    return source


def _install(source: Path, work: Path) -> Path:
    """Copy the suite and its runtime to ``work`` (writable), install the runtime; the bun
    executable."""
    for name in ("suite", "runtime"):
        shutil.copytree(source / name, work / name, symlinks=True)
        for path in [work / name, *(work / name).rglob("*")]:
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o200)
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=work / "runtime",
        check=True,
    )
    (work / "suite" / "node_modules").symlink_to(work / "runtime" / "node_modules")
    return work / "runtime" / "node_modules" / ".bin" / "bun"


async def _run_suite(
    bun: Path, suite: Path, store: Path, server: Literal["onwards", "hypercorn"]
) -> dict[str, Any]:
    async with trio.open_nursery() as nursery:
        upstream = await nursery.start(serve_http, demo_upstream(delay=0.0), "127.0.0.1", 0)
        gateway = Gateway(demo_config(upstream[0], store_path=str(store)))
        info = await nursery.start(
            lambda task_status: gateway.serve(
                "127.0.0.1", 0, server=server, task_status=task_status
            )
        )
        with trio.fail_after(SUITE_TIMEOUT):
            done = await trio.run_process(
                [
                    str(bun),
                    "run",
                    "bin/compliance-test.ts",
                    "--base-url",
                    f"{info.url}/v1",
                    "--api-key",
                    "sk-compliance",
                    "--model",
                    "demo",
                    "--json",
                ],
                cwd=suite,
                capture_stdout=True,
                check=False,
            )
        nursery.cancel_scope.cancel()
    try:
        report: dict[str, Any] = orjson.loads(done.stdout)
    except orjson.JSONDecodeError:
        sys.exit(f"compliance: the suite printed no JSON report:\n{done.stdout.decode()}")
    return report


def main() -> int:
    source = _source()
    servers: list[Literal["onwards", "hypercorn"]] = ["onwards", "hypercorn"]
    failed = False
    with tempfile.TemporaryDirectory(prefix="onwards-compliance-") as tmp:
        work = Path(tmp)
        bun = _install(source, work)
        for server in servers:
            report = trio.run(_run_suite, bun, work / "suite", work / f"{server}.sqlite3", server)
            summary = report["summary"]
            print(
                f"Open Responses compliance ({server} server): {summary['passed']} passed, "
                f"{summary['failed']} failed, {summary['skipped']} skipped, "
                f"{summary['total']} total"
            )
            for result in report["results"]:
                if result["status"] != "passed":
                    print(f"  {result['status']}: {result['id']}")
                    for error in result.get("errors") or []:
                        print(f"    - {error}")
            if summary["failed"] or summary["skipped"] or not summary["passed"]:
                failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
