"""What the usage ledger costs on the proxy's hot path: gateway CPU per request at c=16, ledger
off vs on (rows kept in memory: the request path alone; in SQLite: with the writes), in one run.

The three gateways run side by side and take turns (in a rotating order) so that a change in
the machine's load hits them alike; the figure is the median over the rounds of CPU ms per
request, and its ratio to "off". Two configurations: a plain pool (the cheapest request, where
the ledger's share is largest) and the traffic-control config of ``bench/proxy.py`` (auth,
limits, balancing, metrics).

Run: ``nox -s bench -- ledger`` or ``python bench/ledger.py [--seconds 3] [--rounds 6]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import trio
from proxy import (
    free_port,
    interleave,
    machine_state,
    start_gateway,
    start_upstream,
    traffic_control,
)

LABELS = ("off", "on (memory)", "on (SQLite)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()

    upstream_proc, up_port = start_upstream()
    upstream = f"http://127.0.0.1:{up_port}/v1"
    procs = [upstream_proc]
    workdir = tempfile.mkdtemp(prefix="onwards-bench-ledger-")
    load_before = machine_state()
    results: list[tuple[str, dict[str, float], dict[str, float]]] = []
    try:
        for name, base, metrics in (
            ("plain", {"targets": {"bench": {"url": upstream}}}, False),
            ("auth+limits+LB+metrics", traffic_control(upstream), True),
        ):
            sqlite = {"kind": "sqlite", "path": str(Path(workdir) / f"{len(results)}.db")}
            configs = {
                "off": base,
                "on (memory)": {**base, "store": {"kind": "memory"}, "usage": {"ledger": True}},
                "on (SQLite)": {**base, "store": sqlite, "usage": {"ledger": True}},
            }
            gateways = {}
            for label, config in configs.items():
                flags = ["--metrics-port", str(free_port())] if metrics else ["--no-metrics"]
                port = free_port()
                gateways[label] = (start_gateway(config, port, flags, workdir), port)
                procs.append(gateways[label][0])
            rounds = trio.run(interleave, gateways, args.rounds, args.seconds)
            cpu = {label: [r["cpu_us"] / 1000 for r in got] for label, got in rounds.items()}
            rps = {label: [r["rps"] for r in got] for label, got in rounds.items()}
            results.append(
                (
                    name,
                    {k: statistics.median(v) for k, v in cpu.items()},
                    {k: statistics.median(v) for k, v in rps.items()},
                )
            )
            for proc, _ in gateways.values():
                proc.terminate()
                proc.wait(timeout=10)
        print(
            f"\nusage ledger cost, non-streaming c=16, median of {args.rounds} interleaved rounds "
            f"of {args.seconds:.0f}s (machine before: {load_before}, "
            f"machine after: {machine_state()})"
        )
        print(f"{'config':24} {'ledger':12} {'CPU ms/req':>10} {'vs off':>7} {'req/s':>7}")
        for name, cpu_ms, rates in results:
            for label in LABELS:
                ratio = cpu_ms[label] / cpu_ms["off"]
                print(
                    f"{name:24} {label:12} {cpu_ms[label]:10.3f} {ratio:7.3f} {rates[label]:7.0f}"
                )
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait(timeout=10)


if __name__ == "__main__":
    main()
