"""Developer sessions: ``nox`` runs lint, typecheck and tests; ``nox -s bench`` measures."""

from __future__ import annotations

import contextlib
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
    bench/cpu.py --before DIR`` adds another checkout to the same rounds), of stored
    ``/v1/responses`` against ``store: false`` (``responses``, interleaved, ``--before DIR``
    too). The machine's load average and a reference loop's CPU time are printed before and
    after: figures from a loaded or slow machine are not comparable.
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
        "responses",
    )
    chosen = set(session.posargs) or set(names)
    session.run("python", "bench/proxy.py", "--machine")  # load average + reference loop
    for name in names:
        if name in chosen:
            session.run("python", f"bench/{name}.py")
    session.run("python", "bench/proxy.py", "--machine")


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
    "access": _functions("_ops.access", "logfmt", "xǁAccessWriterǁpush", "xǁAccessWriterǁ_line"),
    "asgi": ("onwards_trio._transport.asgi.*",),
    "stores_base": ("onwards_trio._stores.base.*",),
    "strict": _functions(
        "_proxy.strict", "validate_request", "check_content_type", "_unprocessable"
    ),
    "client": _functions("_transport.client", "xǁ_Parserǁ*", "_runs_to_close", "xǁResponseǁ*"),
    "pipeline": _functions(
        "_proxy.pipeline",
        "xǁProxyǁ_shared_provider",
        "xǁProxyǁ_usage_tap",
        "_read_limited",
        "_aclose_shielded",
    ),
    "admission": ("onwards_trio._proxy.admission.*",),
    "budgets": ("onwards_trio._proxy.budgets.*",),
    "ledger": _functions(
        "_proxy.ledger",
        "cost_of",
        "xǁUsageQueryǁmatches",
        "xǁUsageLedgerǁnote",
        "xǁUsageLedgerǁdrop",
        "xǁUsageLedgerǁflush",
        "xǁUsageLedgerǁaclose",
        "xǁLedgerNoteǁ*",
    ),
    "server": _functions(
        "_transport.server",
        "_refusal",
        "xǁ_Parserǁ*",
        "xǁ_Connectionǁ_receive",
        "xǁ_Connectionǁ_next_request",
    ),
    "stores_memory": ("onwards_trio._stores.memory.*",),
    # What admits, refuses, holds and gives back; not the client set-up, the background
    # renew / reap / adjust loops or the outage warnings (plumbing whose failure the Redis
    # tests see as a wrong count).
    "shared_limits": _functions(
        "_proxy.shared_limits",
        "xǁSharedPermitǁ*",
        "xǁSharedTokenReservationǁ*",
        "xǁSharedBudgetReservationǁ*",
        "xǁSharedLimitsǁreserve_tokens",
        "xǁSharedLimitsǁ_budget_key",
        "xǁSharedLimitsǁ_gate",
        "xǁSharedLimitsǁ_admit",
        "xǁSharedLimitsǁacquire_rate",
        "xǁSharedLimitsǁacquire_slot",
        "xǁSharedLimitsǁ_release",
        "xǁSharedLimitsǁ_give_back",
        "xǁSharedLimitsǁadmit",
        "xǁSharedLimitsǁrate",
        "xǁSharedLimitsǁprovider_slot",
        "_locally",
    ),
    "loop": _functions(
        "_loop.run",
        "_all_cancelled",
        "_aclose",
        "xǁ_Runǁ_run",
        "xǁ_Runǁ_run_step",
        "xǁ_Runǁ_snapshot",
        "xǁ_Runǁ_clean_up",
    ),
    # What goes into a span's attributes (never a key or a prompt unless record_content, a
    # client-chosen alias bounded), and the trace headers only an opted-in upstream is sent
    "telemetry": _functions(
        "_ops.tracing",
        "_built",
        "_request_parts_of",
        "_attempt_parts_of",
        "_content",
        "xǁAttemptSpanǁtrace_headers",
        "xǁAttemptSpanǁend",
        "xǁTelemetryǁend_request",
        "xǁTelemetryǁstart_response",
        "xǁTelemetryǁend_response",
        "xǁTelemetryǁstart_step",
        "xǁTelemetryǁend_step",
    ),
}


# The tests that guard a module, for the modules listed: such a module is mutated in its own
# copy of the tree, .mutation/<module>/, whose mutmut config mutates that module's file only and
# records the test map (which tests reach each function) over these tests only: a few minutes
# instead of the whole selection's 10-25, and no other module's mutated functions slowing the
# tests. A mutant these tests miss may be killed by another test, so the score over them is a
# lower bound. Modules not listed share mutants/ and the whole selection in [tool.mutmut].
MUTATION_TESTS: dict[str, tuple[str, ...]] = {
    "auth": (
        "tests/proxy/test_traffic.py",
        "tests/proxy/test_hashed_keys.py",
        "tests/proxy/test_proxy.py",
        "tests/app/test_request_limits.py",
        "tests/anthropic/test_messages.py",
    ),
    "limits": (
        "tests/proxy/test_limits.py",
        "tests/proxy/test_limit_edges.py",
        "tests/proxy/test_token_limits.py",
        "tests/proxy/test_token_counter.py",
        "tests/proxy/test_token_counter_results.py",
        "tests/proxy/test_traffic.py",
        "tests/proxy/test_budgets.py",
        "tests/proxy/test_budget_refusals.py",
        "tests/app/test_request_limits.py",
        "tests/ops/test_reload_http.py::test_concurrency_limit_counts_a_request_from_before_the_swap",
    ),
    "shared_limits": (
        "tests/proxy/test_limits_redis.py",
        "tests/proxy/test_limits_while_redis_is_down.py",
        "tests/proxy/test_shared_provider_slots.py",
        "tests/proxy/test_budgets.py",
        "tests/proxy/test_traffic.py",
    ),
    "admission": (
        "tests/proxy/test_limits.py",
        "tests/proxy/test_limit_edges.py",
        "tests/proxy/test_token_limits.py",
        "tests/proxy/test_token_counter.py",
        "tests/proxy/test_traffic.py",
        "tests/proxy/test_budgets.py",
        "tests/proxy/test_budget_edges.py",
        "tests/proxy/test_budget_refusals.py",
        "tests/proxy/test_provider_limit_refusals.py",
        "tests/proxy/test_limits_redis.py",
        "tests/proxy/test_provider_limits_are_per_provider.py",
        "tests/proxy/test_budget_headers.py",
        "tests/app/test_request_limits.py",
        "tests/ops/test_rejection_metrics.py",
    ),
    "pipeline": (
        "tests/proxy/test_proxy.py",
        "tests/proxy/test_traffic.py",
        "tests/proxy/test_deep_upstream_json.py",
        "tests/proxy/test_budgets.py",
        "tests/proxy/test_ledger.py",
        "tests/proxy/test_usage_http.py",
        "tests/proxy/test_limits_redis.py",
        "tests/proxy/test_failed_answer_reading.py",
        "tests/proxy/test_stream_answered_as_json.py",
        "tests/ops/test_unsampled_request_usage.py",
        "tests/ops/test_request_observer_tokens.py",
        "tests/ops/test_telemetry_http.py::test_streamed_request_has_time_to_first_chunk_and_usage",
        "tests/proxy/test_shared_provider_slots.py",
    ),
    "budgets": (
        "tests/proxy/test_budgets.py",
        "tests/proxy/test_budget_edges.py",
        "tests/proxy/test_budget_refusals.py",
        "tests/proxy/test_limits_redis.py",
    ),
    "asgi": (
        "tests/transport",
        "tests/app/test_body_limit_edges.py",
        "tests/app/test_body_memory.py",
        "tests/app/test_request_limits.py",
        "tests/app/test_idempotency.py",
        "tests/app/test_idempotent_request_bounds.py",
        "tests/app/test_demo_upstream_bodies.py",
        "tests/app/test_client_gone_before_the_body.py",
        "tests/app/test_hypercorn_lifespan_handshake.py",
        "tests/app/test_body_budget_edges.py",
        "tests/proxy/test_proxy.py",
        "tests/proxy/test_strict_http.py",
    ),
    "server": (
        "tests/transport",
        "tests/app/test_body_limit_edges.py",
        "tests/app/test_client_gone_before_the_body.py",
    ),
    "client": (
        "tests/transport",
        "tests/app/test_body_limit_edges.py",
        "tests/app/test_upstream_interim_answers.py",
        "tests/app/test_upstream_cut_short_reason.py",
        "tests/app/test_request_limits.py",
        "tests/ops/test_span_export_failure_reasons.py",
    ),
    "strict": (
        "tests/proxy/test_strict_http.py",
        "tests/proxy/test_strict_error_envelopes.py",
        "tests/proxy/test_strict_schemas.py",
        "tests/proxy/test_sanitize_http.py",
    ),
    "ledger": (
        "tests/proxy/test_ledger.py",
        "tests/app/test_usage_ledger.py",
        "tests/app/test_usage_rows.py",
        "tests/stores/test_usage_store.py",
    ),
    "logs": ("tests/ops", "--ignore=tests/ops/test_tracing_durable.py"),
    "access": ("tests/ops", "--ignore=tests/ops/test_tracing_durable.py"),
    "stores_base": (
        "tests/stores",
        "tests/app/test_idempotency.py",
        "tests/app/test_usage_ledger.py",
    ),
    "stores_memory": (
        "tests/stores",
        "tests/loop",
        "tests/app/test_idempotency.py",
        "tests/app/test_usage_ledger.py",
    ),
    # the fast, deterministic loop tests (10 s; with tests/responses, 90 s, each survivor of
    # _Run.run / _run cost minutes), and the two span tests that read a step's outcome
    "loop": (
        "tests/loop",
        "tests/ops/test_failed_step_span.py",
        "tests/ops/test_telemetry_http.py::test_responses_loop_spans_nest_as_the_steps_do",
    ),
    "telemetry": (
        "tests/ops/test_telemetry.py",
        "tests/ops/test_telemetry_http.py",
        "tests/ops/test_tracing_export.py",
        "tests/ops/test_tracing_sampler.py",
        "tests/ops/test_tracing_reload.py",
        "tests/ops/test_failed_step_span.py",
        "tests/ops/test_unsampled_request_usage.py",
        "tests/ops/test_loop_span_attributes.py",
        "tests/ops/test_request_span_client_strings.py",
        "tests/ops/test_failed_attempt_spans.py",
        "tests/ops/test_span_queue_bound.py",
    ),
}


@nox.session
def mutation(session: nox.Session) -> None:
    """Mutation testing (mutmut) of the modules that guard users, one module at a time, each
    within a time budget; prints killed / total per module and lists the survivors. Not a
    default session: it takes tens of minutes. ``nox -s mutation -- auth limits`` picks
    modules (names: ``MUTATION_TARGETS``); ``--budget=SECONDS`` is the wall-clock budget per
    module (default 240; recording which tests reach each function is outside it),
    ``--jobs=N`` the mutants run at once (default 2). Results stay in ``mutants/`` (or
    ``.mutation/<module>/mutants/``): a second run goes on with the mutants the budget left
    unrun (``--rerun`` runs them all again), ``--report`` prints the scores without running,
    and ``--survivors`` runs the survivors not accepted in docs/testing-quality.md (after
    adding tests).
    Export ``ONWARDS_TEST_REDIS_URL`` / ``ONWARDS_TEST_POSTGRES_DSN`` for the shared limits
    and stores tests to run rather than skip."""
    budget, jobs, report_only, survivors, rerun = 240, 2, False, False, False
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
        elif arg == "--rerun":
            rerun = True
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
            fresh = _prepare_workdir(name)
            if not fresh and not rerun and _stale(name):
                # Let mutmut mutate the changed source now: it keeps the results of the
                # functions whose code did not change and marks the others not run.
                subprocess.run(
                    [session.bin + "/python", "-c", _GENERATE_MUTANTS],
                    env=_mutmut_env(session),
                    cwd=_workdir(name),
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
            names = _to_run(name, rerun=rerun or fresh, survivors=survivors)
            if not names:
                session.log(f"mutation: {name}: every mutant has a result (--rerun runs them)")
                continue
            session.log(f"mutation: {name} (budget {budget} s, in {_workdir(name)})")
            # mutmut stops cleanly on SIGINT (KeyboardInterrupt: it stops its workers and keeps
            # every result so far). A background job of a non-interactive shell starts with
            # SIGINT ignored, which Python then leaves ignored, so mutmut gets the default
            # back; its own process group lets the stop reach its fork server and workers.
            proc = subprocess.Popen(
                [session.bin + "/mutmut", "run", f"--max-children={jobs}", *names],
                env=_mutmut_env(session),
                cwd=_workdir(name),
                process_group=0,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
            try:
                code = _wait_within_budget(proc, budget, _workdir(name))
            except KeyboardInterrupt:
                _stop(proc)
                raise
            if code is None:
                session.warn(f"mutation: {name} over budget, stopping it")
                _stop(proc)
            elif code != 0:
                failed.append(name)
            session.log(f"mutation: {name} took {time.monotonic() - started:.0f} s")
    for name in chosen:
        session.log(_mutation_score(name))
    if failed:
        session.error(f"mutation: mutmut failed on {', '.join(failed)} (output above)")


# What `mutmut run` does first (mutmut 3.8.1's own functions): copy the tree into mutants/ and
# mutate the changed files, keeping the result of every mutant whose function is unchanged.
_GENERATE_MUTANTS = """
from mutmut.__main__ import copy_also_copy_files, copy_src_dir, create_mutants
from mutmut.__main__ import setup_source_paths
from mutmut.mutation.trampoline import set_mutant_under_test
set_mutant_under_test("mutant_generation")
copy_src_dir(); copy_also_copy_files(); setup_source_paths(); create_mutants(1)
"""


def _mutmut_env(session: nox.Session) -> dict[str, str]:
    return {**os.environ, "PATH": session.bin + os.pathsep + os.environ["PATH"]}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop mutmut as Ctrl-C would (results so far kept); its whole group if it hangs."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # a worker left behind


def _source_file(name: str) -> Path:
    """The file a target mutates, from its first pattern."""
    module = MUTATION_TARGETS[name][0].split(".x")[0].removesuffix(".*")
    return Path(*module.split(".")).with_suffix(".py")


def _workdir(name: str) -> Path:
    return Path(".mutation", name) if name in MUTATION_TESTS else Path()


def _prepare_workdir(name: str) -> bool:
    """Lay out ``.mutation/<module>/`` for a module with its own tests: the package, the tests
    and the plugin linked, and pyproject.toml with a ``[tool.mutmut]`` that mutates only the
    module's file and selects only its tests. True when that table changed (or is new): the
    old results, if any, no longer hold, so every mutant runs."""
    if name not in MUTATION_TESTS:
        return False
    work = _workdir(name)
    work.mkdir(parents=True, exist_ok=True)
    for entry in ("onwards_trio", "tests", "pytest_onwards_trio.py"):
        if not (work / entry).is_symlink():
            (work / entry).symlink_to(Path("..", "..", entry))
    text = Path("pyproject.toml").read_text()
    head, _, rest = text.partition("[tool.mutmut]\n")
    config = {
        "source_paths": ["onwards_trio"],
        "only_mutate": [str(_source_file(name))],
        "also_copy": ["pytest_onwards_trio.py"],
        "pytest_add_cli_args_test_selection": list(MUTATION_TESTS[name]),
        "pytest_add_cli_args": ["-p", "no:cacheprovider"],
    }
    # JSON strings and arrays are TOML too.
    table = "".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items())
    toml = head + "[tool.mutmut]\n" + table + rest[rest.index("\n[") :]
    target = work / "pyproject.toml"
    before = target.read_text() if target.exists() else ""
    if before != toml:
        target.write_text(toml)
    return table not in before


def _to_run(name: str, *, rerun: bool, survivors: bool) -> list[str]:
    """What mutmut runs: every mutant of the target (its patterns) on a first run, a rerun
    or when the source changed since the mutants were made; else the ones not run yet (a
    budget stopped the last run), and with ``survivors`` also the unaccepted survivors.
    (mutmut runs every mutant it is given by name or pattern, so resuming means naming
    only the unrun ones.)"""
    results = _results(name)
    if results is None or rerun or _stale(name):
        return list(MUTATION_TARGETS[name])
    unrun = sorted(k for k, v in results.items() if v is None)
    return unrun + (_not_killed(name) if survivors else [])


def _stale(name: str) -> bool:
    """True when the module's source changed since mutmut last mutated it."""
    made = _workdir(name) / "mutants" / _source_file(name)
    return not made.exists() or made.stat().st_mtime < _source_file(name).stat().st_mtime


def _wait_within_budget(proc: subprocess.Popen[bytes], budget: float, work: Path) -> int | None:
    """Wait for mutmut; ``None`` once ``budget`` seconds of mutants have run. The clock starts
    when mutmut has its test map (``mutmut-stats.json`` written): recording it runs the whole
    selection once after the tests change, which no module's budget should pay for."""
    started = time.time()
    stats = work / "mutants" / "mutmut-stats.json"
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
    meta = _workdir(name) / "mutants" / _source_file(name).with_suffix(".py.meta")
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
