"""Developer sessions: ``nox`` runs lint, typecheck and tests; ``nox -s bench`` measures."""

from __future__ import annotations

import platform
import sys

import nox
from packaging.specifiers import SpecifierSet

nox.needs_version = ">=2024.10"
nox.options.sessions = ["lint", "typecheck", "tests", "examples"]
nox.options.reuse_venv = "yes"
nox.options.default_venv_backend = "venv"
# A session whose interpreter is missing is an error, never a silent skip (a green run that
# ran no test would hide everything).
nox.options.error_on_missing_interpreters = True

PYPROJECT = nox.project.load_toml("pyproject.toml")

# Sessions have no `python=`: they run on the interpreter that runs nox, any version the package
# supports, so the README command works wherever `python3` is new enough (a pinned version
# would be skipped, and nox exit 0, on a machine without it). An older one fails loudly here.
_SUPPORTED = SpecifierSet(PYPROJECT["project"]["requires-python"])
if platform.python_version() not in _SUPPORTED:
    sys.exit(
        f"noxfile: Python {platform.python_version()} ({sys.executable}) is not supported: "
        f"onwards-trio needs Python {_SUPPORTED}; run nox with a newer interpreter"
    )


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (real servers on loopback; Postgres/Redis tests skip without one)."""
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "test"))
    session.run("pytest", *session.posargs)


@nox.session
def examples(session: nox.Session) -> None:
    """The example application's own tests (examples/triage), written with the
    onwards_trio.testing pytest plugin, run as a user project would run them."""
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "examples"))
    session.run("pytest", "examples/triage", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "typecheck"))
    session.run("mypy")


@nox.session
def compliance(session: nox.Session) -> None:
    """The official Open Responses compliance suite against the gateway, on both servers.
    Needs npm (it installs the suite's runtime, bun and zod, into a temporary directory) and
    the suite in ``$ONWARDS_OPENRESPONSES_DIR`` (default ``../shared/openresponses``), so it
    is not a default session; ``.ci/run`` runs it."""
    session.install("-e", ".")
    session.run("python", "compliance/openresponses.py")


@nox.session
def bench(session: nox.Session) -> None:
    """Throughput, CPU per request and added latency of the gateway (plain, traffic control,
    access log on/off, 1 vs 2 workers, stored vs unstored /v1/responses), many long streams,
    the loop's per-step overhead, the cost of sanitisation/strict mode per streamed chunk, of
    the Anthropic Messages translation per streamed event, of lease renewal of background
    responses, and of tracing (``tracing``: off, 100 % and 10 % sampled, interleaved). The
    machine's load average is printed before and after: figures from a loaded machine are not
    comparable. ``nox -s bench -- proxy`` runs one."""
    session.install("-e", ".[otel]")  # the tracing rows need the SDK
    names = ("proxy", "streams", "loop", "strict", "anthropic", "durable", "tracing")
    chosen = set(session.posargs) or set(names)
    session.log(f"load average before: {_load_average()}")
    for name in names:
        if name in chosen:
            session.run("python", f"bench/{name}.py")
    session.log(f"load average after: {_load_average()}")


def _load_average() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])
