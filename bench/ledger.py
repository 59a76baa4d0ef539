"""What the usage ledger costs on the proxy's hot path: gateway CPU per request at c=16, ledger
off vs on (SQLite store), in one run.

Both gateways run side by side and take turns (off, on, on, off, …) so that a change in the
machine's load hits both alike; the figure is the median over the rounds of CPU ms per
request, and the ratio on/off. Two configurations: a plain pool (the cheapest request, where
the ledger's share is largest) and the traffic-control config of ``bench/proxy.py`` (auth,
limits, balancing, metrics).

Run: ``nox -s bench -- ledger`` or ``python bench/ledger.py [--seconds 3] [--rounds 4]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import trio
from proxy import (
    cpu_seconds,
    free_port,
    load,
    load_average,
    start_gateway,
    traffic_control,
    wait_port,
)


async def interleave(
    gateways: dict[str, tuple[subprocess.Popen[bytes], int]],
    rounds: int,
    seconds: float,
    cpu: dict[str, list[float]],
    rps: dict[str, list[float]],
) -> None:
    """``rounds`` loads of each gateway, taking turns (off, on, on, off, …)."""
    for _, port in gateways.values():
        await load(port, 16, 1.0, False)  # warm-up
    for i in range(rounds):
        order = ("off", "on") if i % 2 == 0 else ("on", "off")
        for label in order:
            proc, port = gateways[label]
            cpu0 = cpu_seconds(proc.pid)
            got = await load(port, 16, seconds, False)
            cpu[label].append((cpu_seconds(proc.pid) - cpu0) * 1000 / got["n"])
            rps[label].append(got["rps"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    up_port = free_port()
    upstream = f"http://127.0.0.1:{up_port}/v1"
    proxy_script = str(Path(__file__).with_name("proxy.py"))
    procs = [subprocess.Popen([sys.executable, proxy_script, "--upstream", str(up_port)])]
    workdir = tempfile.mkdtemp(prefix="onwards-bench-ledger-")
    load_before = load_average()
    results: list[tuple[str, float, float, float, float]] = []
    try:
        wait_port(up_port)
        for name, base, extra in (
            ("plain", {"targets": {"bench": {"url": upstream}}}, ["--no-metrics"]),
            ("auth+limits+LB+metrics", traffic_control(upstream), ["--metrics-port", "0"]),
        ):
            ledger = {
                **base,
                "store": {"kind": "sqlite", "path": str(Path(workdir) / f"{len(results)}.db")},
                "usage": {"ledger": True},
            }
            gateways = {}
            for label, config in (("off", base), ("on", ledger)):
                port = free_port()
                metrics = ["--metrics-port", str(free_port())] if "--metrics-port" in extra else []
                flags = metrics or extra
                gateways[label] = (start_gateway(config, port, flags, workdir), port)
                procs.append(gateways[label][0])
            cpu: dict[str, list[float]] = {"off": [], "on": []}
            rps: dict[str, list[float]] = {"off": [], "on": []}
            trio.run(interleave, gateways, args.rounds, args.seconds, cpu, rps)
            off, on = statistics.median(cpu["off"]), statistics.median(cpu["on"])
            results.append(
                (name, off, on, statistics.median(rps["off"]), statistics.median(rps["on"]))
            )
            for proc, _ in gateways.values():
                proc.terminate()
                proc.wait(timeout=10)
        print(
            f"\nusage ledger cost, non-streaming c=16, median of {args.rounds} interleaved rounds "
            f"of {args.seconds:.0f}s (load average before {load_before}, after {load_average()})"
        )
        print(
            f"{'config':26} {'CPU ms/req off':>14} {'on':>8} {'on/off':>7} "
            f"{'req/s off':>10} {'on':>8}"
        )
        for name, off, on, rps_off, rps_on in results:
            print(f"{name:26} {off:14.3f} {on:8.3f} {on / off:7.3f} {rps_off:10.0f} {rps_on:8.0f}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait(timeout=10)


if __name__ == "__main__":
    main()
