"""What tracing costs: gateway CPU per request with tracing off, on at 100 % and at 10 % sampling.

The machine is shared and its load swings throughput by ±20 % between two identical gateways,
so the variants are measured *interleaved in one run*: every gateway is started once, then each
round loads each of them in turn (c=16, non-streaming, through the plain config of
``bench/proxy.py``); the figure is the gateway process's CPU time per request (its export
work included), median over the rounds, and its ratio to tracing off in the same run. The fake
upstream doubles as the OTLP collector (it answers the export POSTs with 200).

``--before DIR`` adds the same three variants run from another checkout (``PYTHONPATH=DIR``),
for a before/after comparison in the same run.

Run: ``nox -s bench -- tracing`` or ``python bench/tracing.py [--rounds 8 --seconds 2]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

import trio
from proxy import (  # bench/proxy.py: the same upstream, load generator and gateway runner
    cpu_seconds,
    free_port,
    load,
    load_average,
    start_gateway,
    wait_port,
)

VARIANTS: dict[str, dict[str, str]] = {
    "off": {},
    "on 100%": {"OTEL_TRACES_SAMPLER": "always_on"},
    "on 10%": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--stream", action="store_true", help="streamed requests (20 events)")
    parser.add_argument("--before", help="a checkout of the code to compare with")
    args = parser.parse_args()

    up_port = free_port()
    upstream = f"http://127.0.0.1:{up_port}/v1"
    bench_dir = os.path.dirname(os.path.abspath(__file__))
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(bench_dir, "proxy.py"), "--upstream", str(up_port)]
        )
    ]
    workdir = tempfile.mkdtemp(prefix="onwards-bench-tracing-")
    config = {"targets": {"bench": {"url": upstream}}}
    collector = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{up_port}"}
    sources = [("", None)] + ([("before ", args.before)] if args.before else [])
    gateways: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    cpu: dict[str, list[float]] = {}
    rps: dict[str, list[float]] = {}
    load_before = load_average()
    try:
        wait_port(up_port)
        for prefix, source in sources:
            for variant, env in VARIANTS.items():
                env = {**env, **(collector if variant != "off" else {})}
                if source is not None:
                    env["PYTHONPATH"] = os.path.abspath(source)
                port = free_port()
                gateway = start_gateway(config, port, ["--no-metrics"], workdir, env)
                procs.append(gateway)
                gateways[prefix + variant] = (gateway, port)

        async def measure() -> None:
            for _gateway, port in gateways.values():  # warm-up: connections, caches
                await load(port, args.concurrency, 1.0, args.stream)
            for r in range(args.rounds):
                names = list(gateways)
                shift = r % len(names)  # rotate the order: no variant always runs first
                for name in names[shift:] + names[:shift]:
                    gateway, port = gateways[name]
                    cpu0 = cpu_seconds(gateway.pid)
                    result = await load(port, args.concurrency, args.seconds, args.stream)
                    used = cpu_seconds(gateway.pid) - cpu0
                    cpu.setdefault(name, []).append(used * 1e6 / max(result["n"], 1))
                    rps.setdefault(name, []).append(result["rps"])

        trio.run(measure)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)

    kind = "streamed (20 events)" if args.stream else "non-streaming"
    print(
        f"\ntracing cost: {kind}, c={args.concurrency}, {args.rounds} interleaved rounds of "
        f"{args.seconds:g} s, load average before {load_before}, after {load_average()}"
    )
    print(f"{'gateway':22} {'CPU µs/req':>10} {'vs off':>7} {'req/s':>7} {'vs off':>7}")
    for prefix, _ in sources:
        off_cpu = statistics.median(cpu[prefix + "off"])
        off_rps = statistics.median(rps[prefix + "off"])
        for variant in VARIANTS:
            name = prefix + variant
            c, q = statistics.median(cpu[name]), statistics.median(rps[name])
            print(f"{name:22} {c:10.0f} {c / off_cpu:7.2f} {q:7.0f} {q / off_rps:7.2f}")
    if args.before:
        print("after vs before (same variant):")
        for variant in VARIANTS:
            a, b = statistics.median(cpu[variant]), statistics.median(cpu["before " + variant])
            print(f"  {variant:20} CPU {a / b:5.2f}x")


if __name__ == "__main__":
    main()
