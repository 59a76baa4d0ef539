"""Developer sessions: ``nox`` runs lint, typecheck and tests; ``nox -s bench`` measures."""

from __future__ import annotations

import nox

nox.needs_version = ">=2024.10"
nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_venv = "yes"
nox.options.default_venv_backend = "venv"

PYTHON = "3.11"
PYPROJECT = nox.project.load_toml("pyproject.toml")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite (real servers on loopback; Postgres/Redis tests skip without one)."""
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "test"))
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "typecheck"))
    session.run("mypy")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Throughput and added latency of the gateway, the loop's per-step overhead, and the cost
    of sanitisation/strict mode per streamed chunk. ``nox -s bench -- proxy`` runs one."""
    session.install("-e", ".")
    chosen = set(session.posargs) or {"proxy", "loop", "strict"}
    for name in ("proxy", "loop", "strict"):
        if name in chosen:
            session.run("python", f"bench/{name}.py")
