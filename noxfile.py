"""Developer sessions: ``nox`` runs lint, typecheck and tests; ``nox -s bench`` measures."""

from __future__ import annotations

import fnmatch
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    responses, of tracing (``tracing``: off, 100 % and 10 % sampled, interleaved), of the
    usage ledger (``ledger``: off, memory, SQLite, interleaved), of token limits and budgets
    (``limits``: off / local / shared through ONWARDS_TEST_REDIS_URL) and CPU per proxied
    request (``cpu``: plain, access log off, traffic control, interleaved; ``python
    bench/cpu.py --before DIR`` adds another checkout to the same rounds). The machine's load
    average is printed before and after: figures from a loaded machine are not comparable.
    ``nox -s bench -- proxy`` runs one."""
    session.install("-e", ".[otel,redis]")  # the tracing rows need the SDK, limits coredis
    names = (
        "proxy",
        "cpu",
        "streams",
        "loop",
        "strict",
        "anthropic",
        "durable",
        "tracing",
        "ledger",
        "limits",
    )
    chosen = set(session.posargs) or set(names)
    session.log(f"load average before: {_load_average()}")
    for name in names:
        if name in chosen:
            session.run("python", f"bench/{name}.py")
    session.log(f"load average after: {_load_average()}")


# The modules that guard users, smallest first, as mutmut name patterns (module.function or
# module.xǁClassǁmethod). Where a whole module is too big for the budget, only its guarding
# functions are listed (docs/testing-quality.md says which and why).


def _functions(module: str, *names: str) -> tuple[str, ...]:
    """mutmut name patterns for some functions of a module (``name`` or ``xǁClassǁmethod``)."""
    return tuple(
        f"onwards_trio.{module}.{n}__mutmut_*"
        if "ǁ" in n
        else f"onwards_trio.{module}.x_{n}__mutmut_*"
        for n in names
    )


MUTATION_TARGETS: dict[str, tuple[str, ...]] = {
    "auth": ("onwards_trio._proxy.auth.*",),
    "limits": ("onwards_trio._proxy.limits.*",),
    "logs": _functions(
        "_ops.logs", "redact", "collect_secrets", "xǁSecretSetǁ*", "xǁRedactionFilterǁ*"
    ),
    "access": _functions("_ops.access", "logfmt", "xǁAccessWriterǁpush"),
    "asgi": ("onwards_trio._transport.asgi.*",),
    "stores_base": ("onwards_trio._stores.base.*",),
    "strict": _functions(
        "_proxy.strict", "validate_request", "check_content_type", "_unprocessable"
    ),
    "client": _functions("_transport.client", "xǁ_Parserǁ*", "_runs_to_close", "xǁResponseǁ*"),
    "pipeline": _functions(
        "_proxy.pipeline",
        "xǁProxyǁ_admit",
        "xǁProxyǁ_admit_shared",
        "xǁProxyǁ_shared_provider",
        "_read_limited",
        "_aclose_shielded",
    ),
    "server": _functions(
        "_transport.server",
        "_refusal",
        "xǁ_Parserǁ*",
        "xǁ_Connectionǁ_receive",
        "xǁ_Connectionǁ_next_request",
    ),
    "stores_memory": ("onwards_trio._stores.memory.*",),
    "shared_limits": ("onwards_trio._proxy.shared_limits.*",),
    "loop": _functions(
        "_loop.run",
        "_all_cancelled",
        "_aclose",
        "xǁ_Runǁrun",
        "xǁ_Runǁ_snapshot",
        "xǁ_Runǁ_clean_up",
    ),
}


@nox.session
def mutation(session: nox.Session) -> None:
    """Mutation testing (mutmut) of the modules that guard users, one module at a time, each
    within a time budget; prints killed / total per module and lists the survivors. Not a
    default session: it takes tens of minutes. ``nox -s mutation -- auth limits`` picks
    modules (names: ``MUTATION_TARGETS``); ``--budget=SECONDS`` is the wall-clock budget per
    module (default 240; a first run also records which tests reach each function, outside
    the budget), ``--jobs=N`` the mutants run at once (default 2). Results stay in
    ``mutants/``, so ``nox -s mutation -- --report`` prints the scores again without running,
    and ``--survivors`` runs only the survivors not accepted in docs/testing-quality.md (after
    adding tests).
    Export ``ONWARDS_TEST_REDIS_URL`` / ``ONWARDS_TEST_POSTGRES_DSN`` for the shared limits
    and stores tests to run rather than skip."""
    budget, jobs, report_only, survivors = 240, 2, False, False
    chosen: list[str] = []
    failed: list[str] = []
    for arg in session.posargs:
        if arg.startswith("--budget="):
            budget = int(arg.partition("=")[2])
        elif arg.startswith("--jobs="):
            jobs = int(arg.partition("=")[2])
        elif arg == "--report":
            report_only = True
        elif arg == "--survivors":
            survivors = True
        elif arg in MUTATION_TARGETS:
            chosen.append(arg)
        else:
            session.error(f"unknown module {arg!r}; known: {', '.join(MUTATION_TARGETS)}")
    chosen = chosen or list(MUTATION_TARGETS)
    if not report_only:
        session.install(
            ".", "mutmut==3.8.1", *nox.project.dependency_groups(PYPROJECT, "test"), silent=True
        )
        for name in chosen:
            started = time.monotonic()
            names = _not_killed(name) if survivors else list(MUTATION_TARGETS[name])
            if not names:
                continue
            session.log(f"mutation: {name} (budget {budget} s)")
            # mutmut stops cleanly on SIGINT and keeps every result it has so far.
            proc = subprocess.Popen(
                [session.bin + "/mutmut", "run", f"--max-children={jobs}", *names],
                env={**os.environ, "PATH": session.bin + os.pathsep + os.environ["PATH"]},
            )
            if _wait_within_budget(proc, budget) is None:
                session.warn(f"mutation: {name} over budget, stopping it")
                proc.send_signal(signal.SIGINT)
                proc.wait()
            elif proc.returncode != 0:
                failed.append(name)
            session.log(f"mutation: {name} took {time.monotonic() - started:.0f} s")
    for name in chosen:
        session.log(_mutation_score(name))
    if failed:
        session.error(f"mutation: mutmut failed on {', '.join(failed)} (output above)")


def _wait_within_budget(proc: subprocess.Popen[bytes], budget: float) -> int | None:
    """Wait for mutmut; ``None`` once ``budget`` seconds of mutants have run. The clock starts
    when mutmut has its test map (``mutmut-stats.json`` written): recording it runs the whole
    selection once after the tests change, which no module's budget should pay for."""
    started = time.time()
    stats = Path("mutants/mutmut-stats.json")
    clock: float | None = None
    while (code := proc.poll()) is None:
        if clock is None and stats.exists() and stats.stat().st_mtime >= started:
            clock = time.monotonic()
        if clock is not None and time.monotonic() - clock > budget:
            return None
        time.sleep(2)
    return code


def _results(name: str) -> dict[str, int | None] | None:
    """mutmut's exit code per mutant of one target (``None``: not run yet)."""
    patterns = MUTATION_TARGETS[name]
    module = patterns[0].split(".x")[0].removesuffix(".*")
    meta = Path("mutants", *module.split(".")).with_suffix(".py.meta")
    if not meta.exists():
        return None
    codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
    return {k: v for k, v in codes.items() if any(fnmatch.fnmatch(k, p) for p in patterns)}


def _not_killed(name: str) -> list[str]:
    """The survivors of a target's last run that are not accepted, to run after new tests."""
    accepted = _accepted_survivors()
    return sorted(
        k
        for k, v in (_results(name) or {}).items()
        if v in (0, 5, 33) and not any(fnmatch.fnmatch(k, p) for p in accepted)
    )


def _mutation_score(name: str) -> str:
    """killed / total for one target from mutmut's result files, with the survivors (those
    accepted in docs/testing-quality.md marked so, with their reason)."""
    picked = _results(name)
    if picked is None:
        return f"{name}: not run"
    killed = [k for k, v in picked.items() if v in (1, 3, 24, -24, 36, 152, 255)]
    missed = sorted(k for k, v in picked.items() if v in (0, 5, 33))
    unchecked = sum(1 for v in picked.values() if v is None)
    checked = len(picked) - unchecked
    accepted = _accepted_survivors()
    reasons = {
        k: next((r for p, r in accepted.items() if fnmatch.fnmatch(k, p)), "") for k in missed
    }
    explained = sum(1 for k in missed if reasons[k])

    def pct(n: int) -> str:
        return f"{100 * n / checked:.0f}%" if checked else "-"

    lines = [
        f"{name}: {len(killed)} / {checked} killed ({pct(len(killed))}); "
        f"{len(missed)} not killed, {explained} of them accepted "
        f"({pct(len(killed) + explained)} killed or accepted); {unchecked} not run (budget)"
    ]
    for k in missed:
        how = "survived" if picked[k] == 0 else "no test reaches it"
        lines.append(f"  {how}: {k}" + (f"  [accepted: {reasons[k]}]" if reasons[k] else ""))
    return "\n".join(lines)


def _accepted_survivors() -> dict[str, str]:
    """Mutant name (or pattern) -> reason, from the table in docs/testing-quality.md."""
    text = Path("docs/testing-quality.md").read_text()
    table = text.partition("## Accepted survivors")[2]
    found = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`onwards_trio."):
            found[cells[0].strip("`")] = cells[1]
    return found


def _load_average() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])
