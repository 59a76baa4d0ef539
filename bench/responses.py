"""Stored against unstored ``/v1/responses``, interleaved in one run (issue 19, part B).

One gateway per checkout (``--before DIR`` adds another checkout), each with the default
SQLite store and one target translated by the Open Responses adapter to the fake upstream's
Chat Completions (``bench/proxy.py``). Each round loads every (gateway, ``store``) pair in
turn at c=16, the order rotated each round, so that the machine's load hits them alike: req/s
and the gateway's own CPU time per response. Figures are medians over the rounds; the ratios
(stored over unstored, after over before) are medians of each round's own ratio, since the
load drifts less within a round than across a run.

``--calls N`` instead counts the Python function calls per response in each gateway (a figure
the machine's load cannot move): the gateway runs under cProfile switched on for N requests at
c=16 after a warm-up, once stored and once unstored.

``--writes K`` measures the write alone, without HTTP: the CPU per finished response (and the
Trio thread's share of it) through the SQLite backend's ``write_finished``, K responses
written concurrently per round (so one group commit of K, after a first lone call that
starts the writer), with a response shaped like the bench's own (~3.5 KB of rows), into a
store that already holds 20,000 responses.

``--together SECONDS`` loads stored and unstored at the same time instead, each in a gateway
of its own (per checkout: one gateway that gets only stored requests, one only ``store:
false``), every gateway with ``--concurrency`` connections, in rounds of that length: the
machine's speed drifts by tens of per cent within minutes, and loaded together the gateways
meet the same drift at each instant. The figure is CPU per response; its per-round ratio
(``store: false`` over stored) is the share of stored throughput a CPU-bound gateway would
reach against unstored (the goal's 0.6 or more), steadier than the req/s ratio taken in turn.

Run: ``nox -s bench -- responses`` or
``python bench/responses.py [--rounds 6 --seconds 2 --before DIR --calls 2000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from proxy import (  # bench/proxy.py: the upstream, the load generator, the gateway runner
    build_request,
    cpu_seconds,
    free_port,
    load,
    machine_state,
    send_count,
    start_gateway,
    start_upstream,
    together,
    wait_port,
)

# Run in a checkout under ``--writes``: the CPU of SqliteBackend.write_finished per response.
WRITES = """
import os, sys, tempfile, time, secrets
import trio
from onwards_trio._loop.steps import ChainStep, ResponseRecord, ResponseStatus, StepKind, StepState
from onwards_trio._stores import memory
from onwards_trio._stores.base import FinishedResponse, StoredResponse
from onwards_trio._stores.sqlite import SqliteBackend
k, n, prefill = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
new_id = getattr(memory, "new_response_id", lambda: "resp_" + secrets.token_hex(24))
text = [{"type": "text", "text": "hello " * 20}]
chat = {"model": "bench", "messages": [{"role": "user", "content": text}]}
answer = "ok " * 40
completion = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 40, "total_tokens": 60}}
def finished():
    rid, sid = new_id(), memory.new_step_id()
    output = [{"type": "message", "id": "msg_" + sid, "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": answer, "annotations": [],
                                              "logprobs": []}], "phase": "final_answer"}]
    response = {"id": rid, "object": "response", "created_at": 1, "model": "bench",
                "tools": [], "tool_choice": "auto", "parallel_tool_calls": True,
                "output": output, "usage": {"input_tokens": 10, "output_tokens": 40,
                "total_tokens": 50, "input_tokens_details": {"cached_tokens": 0,
                "cache_write_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}},
                "error": None, "incomplete_details": None, "background": False,
                "completed_at": 1, "instructions": None, "max_output_tokens": None,
                "max_tool_calls": None, "previous_response_id": None,
                "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
                "store": True, "temperature": 1.0, "text": {"format": {"type": "text"}},
                "top_logprobs": 0, "top_p": 1.0, "truncation": "disabled", "user": None,
                "metadata": {}, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "safety_identifier": None, "prompt_cache_key": None, "status": "completed"}
    items = [{"type": "message", "role": "user", "id": "msg_" + secrets.token_hex(16),
              "content": [{"type": "input_text", "text": "hello " * 20}], "status": "completed"}]
    step = ChainStep(sid, StepKind.MODEL_CALL, StepState.COMPLETED, 1, None, None, chat, completion)
    return FinishedResponse(StoredResponse(rid, response, items), True,
                            [ResponseRecord(rid, ResponseStatus.COMPLETED, chat, dict(response))],
                            [(rid, step)])
async def main():
    backend = SqliteBackend(os.path.join(tempfile.mkdtemp(), "w.sqlite3"))
    for _ in range(prefill // 128):  # a store in use: its indexes span many pages
        async with trio.open_nursery() as nursery:
            for f in [finished() for _ in range(128)]:
                nursery.start_soon(backend.write_finished, f)
    todo = [[finished() for _ in range(k)] for _ in range(n // k)]
    cpu, own = time.process_time(), time.thread_time()
    for batch in todo:
        async with trio.open_nursery() as nursery:
            for f in batch:
                nursery.start_soon(backend.write_finished, f)
    print((time.process_time() - cpu) / n * 1e6, (time.thread_time() - own) / n * 1e6)
    await backend.aclose()
trio.run(main)
"""

# Run as the gateway under ``--calls``: cProfile on at SIGUSR1, stats dumped at SIGUSR2.
PROFILED_GATEWAY = """
import cProfile, runpy, signal, sys
prof, out = cProfile.Profile(), sys.argv.pop(1)
signal.signal(signal.SIGUSR1, lambda *_: prof.enable())
def dump(*_):
    prof.disable()
    prof.dump_stats(out)
signal.signal(signal.SIGUSR2, dump)
sys.argv[0] = "onwards_trio"
runpy.run_module("onwards_trio", run_name="__main__", alter_sys=True)
"""


def config(upstream: str, workdir: str, name: str) -> dict[str, object]:
    return {
        "store": {"kind": "sqlite", "path": str(Path(workdir) / f"{name}.sqlite3")},
        "targets": {"bench": {"url": upstream, "open_responses": {"adapter": True}}},
    }


async def requests(port: int, concurrency: int, total: int, store: bool) -> None:
    """Exactly ``total`` requests over ``concurrency`` keep-alive connections."""
    await send_count(port, build_request(port, False, store), concurrency, total)


def count_calls(source: str | None, upstream: str, workdir: str, n: int) -> dict[str, float]:
    """Python function calls per response, stored and unstored, in a gateway run from
    ``source`` (a checkout; None: this one)."""
    out: dict[str, float] = {}
    cwd = os.path.abspath(source) if source else str(Path(__file__).resolve().parent.parent)
    for store in (False, True):
        port = free_port()
        stats = Path(workdir) / f"calls-{port}.prof"
        cfg = Path(workdir) / f"calls-{port}.json"
        cfg.write_text(json.dumps(config(upstream, workdir, f"calls-{port}")))
        cmd = [sys.executable, "-c", PROFILED_GATEWAY, str(stats), "-f", str(cfg)]
        cmd += ["--port", str(port), "--host", "127.0.0.1", "--no-watch", "--no-metrics"]
        with open(Path(workdir) / f"gateway-{port}.log", "wb") as log:
            proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=log)
        try:
            wait_port(port)
            trio.run(requests, port, 16, 300, store)  # warm-up
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
            trio.run(requests, port, 16, n, store)
            proc.send_signal(signal.SIGUSR2)
            for _ in range(200):
                if stats.exists():
                    break
                time.sleep(0.1)
            time.sleep(0.5)
            calls = pstats.Stats(str(stats)).total_calls  # type: ignore[attr-defined]
            out["stored" if store else "unstored"] = calls / n
        finally:
            proc.terminate()
            proc.wait(30)
    return out


def count_writes(sources: list[tuple[str, str | None]], k: int, rounds: int) -> None:
    """CPU µs per finished response through ``write_finished`` in each checkout, the
    checkouts interleaved round by round; medians and the after / before ratio."""
    got: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in sources}
    for _ in range(rounds):
        for name, source in sources:
            root = os.path.abspath(source) if source else str(Path(__file__).resolve().parents[1])
            out = subprocess.run(
                [sys.executable, "-c", WRITES, str(k), str(k * 400), "20000"],
                env={**os.environ, "PYTHONPATH": root},
                capture_output=True,
                check=True,
                text=True,
            ).stdout.split()
            got[name].append((float(out[0]), float(out[1])))
    for name, runs in got.items():
        total = statistics.median(r[0] for r in runs)
        trio_thread = statistics.median(r[1] for r in runs)
        print(f"{name}: {total:.0f} µs CPU per write, {trio_thread:.0f} in the Trio thread")
    if len(got) == 2:
        per = sorted(a[0] / b[0] for a, b in zip(got["after"], got["before"], strict=True))
        print(f"after / before, CPU per write: {statistics.median(per):.2f}")


def _store(key: tuple[str, bool]) -> bool:
    """A (checkout, store) gateway's ``store`` setting: what its requests ask for."""
    return key[1]


def run_together(
    sources: list[tuple[str, str | None]],
    upstream: str,
    workdir: str,
    args: argparse.Namespace,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    """``--together``: start the gateways (added to ``procs``), load them, print the figures."""
    gateways: dict[tuple[str, bool], tuple[subprocess.Popen[bytes], int]] = {}
    for name, source in sources:
        root = os.path.abspath(source) if source else str(Path(__file__).resolve().parents[1])
        for store in (False, True):
            port = free_port()
            cfg = config(upstream, workdir, f"{name}-{store}")
            gateway = start_gateway(cfg, port, ["--no-metrics"], workdir, {"PYTHONPATH": root})
            procs.append(gateway)
            gateways[(name, store)] = (gateway, port)
    load_before = machine_state()
    got = trio.run(together, gateways, args.rounds, args.together, args.concurrency, False, _store)
    print(f"machine before: {load_before}, machine after: {machine_state()}")
    print(
        f"{len(gateways)} gateways loaded together, c={args.concurrency} each, "
        f"{args.rounds} rounds of {args.together:g} s, medians over rounds"
    )
    print(f"{'gateway':<22}{'req/s':>8}{'CPU µs/resp':>13}")
    for (name, store), rows in got.items():
        label = f"{name}, {'stored' if store else 'store:false'}"
        rps = statistics.median(r[1] for r in rows)
        cpu = statistics.median(r[0] for r in rows)
        print(f"{label:<22}{rps:>8.0f}{cpu:>13.0f}")

    def ratio(a: tuple[str, bool], b: tuple[str, bool]) -> str:
        per = sorted(y[0] / x[0] for x, y in zip(got[a], got[b], strict=True))
        q = statistics.quantiles(per, n=4) if len(per) > 1 else [per[0]] * 3
        return f"{statistics.median(per):.3f} [{q[0]:.3f}-{q[2]:.3f}]"

    for name, _ in sources:
        pair = ratio((name, True), (name, False))
        print(f"{name}: store:false / stored, CPU per response {pair}")
    if len(sources) == 2:
        for store in (False, True):
            label = "stored" if store else "store:false"
            pair = ratio(("after", store), ("before", store))
            print(f"before / after, {label}, CPU per response: {pair}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--before", help="a checkout of the code to compare with")
    parser.add_argument("--calls", type=int, help="count function calls over N responses")
    parser.add_argument("--writes", type=int, help="time the write alone, K at a time")
    parser.add_argument(
        "--together",
        type=float,
        metavar="SECONDS",
        help="load stored and unstored gateways at the same time, rounds of SECONDS",
    )
    args = parser.parse_args()
    if args.writes:
        sources_w: list[tuple[str, str | None]] = [("after", None)]
        if args.before:
            sources_w.append(("before", args.before))
        print(f"machine before: {machine_state()}")
        count_writes(sources_w, args.writes, args.rounds)
        print(f"machine after: {machine_state()}")
        return

    upstream_proc, up_port = start_upstream()
    procs = [upstream_proc]
    upstream = f"http://127.0.0.1:{up_port}/v1"
    workdir = tempfile.mkdtemp(prefix="onwards-bench-responses-")
    sources: list[tuple[str, str | None]] = [("after", None)]
    if args.before:
        sources.append(("before", args.before))
    load_before = machine_state()
    try:
        if args.together:
            run_together(sources, upstream, workdir, args, procs)
            return
        if args.calls:
            for name, source in sources:
                got = count_calls(source, upstream, workdir, args.calls)
                print(
                    f"{name}: Python calls per response, unstored {got['unstored']:.0f}, "
                    f"stored {got['stored']:.0f}"
                )
            return
        gateways: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        for name, source in sources:
            root = os.path.abspath(source) if source else str(Path(__file__).resolve().parents[1])
            env = {"PYTHONPATH": root}
            port = free_port()
            cwd_cfg = config(upstream, workdir, name)
            gateway = start_gateway(cwd_cfg, port, ["--no-metrics"], workdir, env)
            procs.append(gateway)
            gateways[name] = (gateway, port)
        runs = [(name, store) for name in gateways for store in (False, True)]
        results: dict[tuple[str, bool], list[dict[str, float]]] = {run: [] for run in runs}

        async def rounds() -> None:
            for _, port in gateways.values():  # warm-up
                await load(port, args.concurrency, 1.0, False, True)
                await load(port, args.concurrency, 1.0, False, False)
            for r in range(args.rounds):
                shift = r % len(runs)
                for name, store in runs[shift:] + runs[:shift]:
                    proc, port = gateways[name]
                    cpu0 = cpu_seconds(proc.pid)
                    got = await load(port, args.concurrency, args.seconds, False, store)
                    got["cpu_us"] = (cpu_seconds(proc.pid) - cpu0) * 1e6 / max(got["n"], 1)
                    results[(name, store)].append(got)

        trio.run(rounds)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
    print(f"machine before: {load_before}, machine after: {machine_state()}")
    print(f"{args.rounds} rounds of {args.seconds} s, c={args.concurrency}, medians over rounds")
    print(f"{'gateway':<22}{'req/s':>8}{'CPU µs/resp':>13}{'p50 ms':>8}")
    for name, store in runs:
        rs = results[(name, store)]
        label = f"{name}, {'stored' if store else 'store:false'}"
        rps = statistics.median(x["rps"] for x in rs)
        cpu = statistics.median(x["cpu_us"] for x in rs)
        p50 = statistics.median(x["p50_ms"] for x in rs)
        print(f"{label:<22}{rps:>8.0f}{cpu:>13.0f}{p50:>8.1f}")

    def ratio(a: tuple[str, bool], b: tuple[str, bool], key: str) -> str:
        per = sorted(x[key] / y[key] for x, y in zip(results[a], results[b], strict=True))
        q = statistics.quantiles(per, n=4) if len(per) > 1 else [per[0]] * 3
        return f"{statistics.median(per):.2f} [{q[0]:.2f}-{q[2]:.2f}]"

    for name, _ in sources:
        print(
            f"{name}: stored / store:false, req/s {ratio((name, True), (name, False), 'rps')}, "
            f"CPU {ratio((name, True), (name, False), 'cpu_us')}"
        )
    if args.before:
        for store in (False, True):
            label = "stored" if store else "store:false"
            pair = (("after", store), ("before", store))
            print(
                f"after / before, {label}: req/s {ratio(*pair, 'rps')}, "
                f"CPU {ratio(*pair, 'cpu_us')}"
            )


if __name__ == "__main__":
    main()
