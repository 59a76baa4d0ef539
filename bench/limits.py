"""What governance costs per request: token limits and budgets off / in-process / shared
through Redis, and (``--before DIR``) the same rows for another checkout in the same run.

Each row is the traffic-control config of ``proxy.py`` (auth, key and pool rate and
concurrency limits, two providers, routing rules, metrics) at c=16, non-streaming, with:

* ``off``: no token limit, no budget;
* ``local tokens``: token limits on the pool and the key (in-process);
* ``local tokens+budget``: and a key budget with a price (new code only);
* ``shared``: the rate/concurrency limits through Redis (``shared_limits``), no token limit;
* ``shared tokens`` / ``shared tokens+budget``: the same as the local rows, through Redis.

Rows are interleaved (A, B, A, B) so a change in the machine's load hits both sides. Besides
req/s and gateway CPU ms per request, the shared rows report Redis round trips per request
(``INFO commandstats`` deltas: EVALSHA/EVAL calls) and Redis server CPU ms per request.

Run: ``python bench/limits.py --redis redis://... [--before /path/to/old/checkout]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from typing import Any

import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from proxy import (
    cpu_seconds,
    free_port,
    load,
    machine_state,
    start_gateway,
    traffic_control,
    wait_port,
)

GENEROUS_TOKENS = {"tokens": 10**12, "window_secs": 60}


def config(upstream: str, mode: str, redis: str | None, prefix: str) -> dict[str, Any]:
    tokens = GENEROUS_TOKENS if "tokens" in mode else None
    cfg: dict[str, Any] = traffic_control(upstream, tokens)
    if "budget" in mode:  # budgets and prices exist only in the new code
        cfg["targets"]["bench"]["pricing"] = {"input": 1, "output": 2}
        cfg["auth"]["key_definitions"]["bench"]["budget"] = {"amount": 10**9, "window": "day"}
    if mode.startswith("shared"):
        cfg["shared_limits"] = {"redis_url": redis, "key_prefix": prefix, "timeout_ms": 500}
    return cfg


async def redis_stats(url: str) -> tuple[int, float]:
    """(script calls so far, Redis server CPU seconds so far)."""
    import coredis

    client: Any = coredis.Redis.from_url(url, decode_responses=True)
    async with client:
        stats = await client.info("commandstats")
        cpu = await client.info("cpu")
    calls = sum(
        int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")
    )
    return calls, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--redis", default=os.environ.get("ONWARDS_TEST_REDIS_URL"))
    parser.add_argument("--before", help="another checkout to compare with (PYTHONPATH)")
    args = parser.parse_args()
    up_port = free_port()
    upstream = f"http://127.0.0.1:{up_port}/v1"
    here = os.path.dirname(os.path.abspath(__file__))
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(here, "proxy.py"), "--upstream", str(up_port)]
        )
    ]
    workdir = tempfile.mkdtemp(prefix="onwards-bench-limits-")
    modes = ["off", "local tokens", "local tokens+budget"]
    if args.redis:
        modes += ["shared", "shared tokens", "shared tokens+budget"]
    sides = [("after", None)] + ([("before", args.before)] if args.before else [])
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    load_before = machine_state()
    try:
        wait_port(up_port)
        for r in range(args.rounds):
            for mode in modes:
                for side, path in sides if r % 2 == 0 else list(reversed(sides)):
                    if side == "before" and "budget" in mode:
                        continue
                    env = {"PYTHONPATH": path} if path else None
                    prefix = f"bench-{os.getpid()}-{r}-{side}"
                    cfg = config(upstream, mode, args.redis, prefix)
                    port = free_port()
                    gw = start_gateway(
                        cfg, port, ["--metrics-port", str(free_port())], workdir, env
                    )
                    try:
                        trio.run(load, port, 16, 1.0, False)  # warm-up
                        shared = mode.startswith("shared")
                        calls0, rcpu0 = trio.run(redis_stats, args.redis) if shared else (0, 0.0)
                        cpu0 = cpu_seconds(gw.pid)
                        via = trio.run(load, port, 16, args.seconds, False)
                        cpu_ms = (cpu_seconds(gw.pid) - cpu0) * 1000 / max(via["n"], 1)
                        row = {"rps": via["rps"], "cpu_ms": cpu_ms, "n": via["n"]}
                        if shared:
                            calls1, rcpu1 = trio.run(redis_stats, args.redis)
                            row["redis_calls"] = (calls1 - calls0) / via["n"]
                            row["redis_cpu_ms"] = (rcpu1 - rcpu0) * 1000 / via["n"]
                        results.setdefault((mode, side), []).append(row)
                    finally:
                        gw.terminate()
                        gw.wait(timeout=10)
        print(
            f"\ngovernance cost at c=16, non-streaming ({os.cpu_count()} cores, "
            f"{args.seconds:.0f}s x {args.rounds} rounds per row, machine before: "
            f"{load_before}, machine after: {machine_state()})"
        )
        print(
            f"{'row':32} {'req/s':>8} {'CPU ms/req':>10} {'Redis calls/req':>15} "
            f"{'Redis CPU ms/req':>16}"
        )
        for (mode, side), rows in results.items():

            def mean(k: str, rows: list[dict[str, float]] = rows) -> float:
                vals = [x[k] for x in rows if k in x]
                return sum(vals) / len(vals) if vals else float("nan")

            print(
                f"{mode + ' (' + side + ')':32} {mean('rps'):8.0f} {mean('cpu_ms'):10.3f} "
                f"{mean('redis_calls'):15.2f} {mean('redis_cpu_ms'):16.3f}"
            )
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


if __name__ == "__main__":
    main()
