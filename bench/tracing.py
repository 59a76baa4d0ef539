"""What tracing costs: gateway CPU per request with tracing off, on at 100 %, 10 % and 0 %
sampling (0 %: ``always_off``, the cost of tracing being on for a trace nobody records).

The machine is shared and its load swings throughput by ±20 % between two identical gateways,
so the variants are measured *interleaved in one run*: every gateway is started once, then each
round loads each of them in turn (c=16, non-streaming, through the plain config of
``bench/proxy.py``), in an order rotated each round. The figure is the gateway process's CPU
time per request (its export work included); a ratio is the median over the rounds of the
round's figure against the same round's tracing-off figure (the load drifts less within a round
than across the run), with its quartiles. The fake upstream doubles as the OTLP collector (it
answers the export POSTs with 200).

``--before DIR`` adds the same variants run from another checkout (``PYTHONPATH=DIR``),
for a before/after comparison in the same run.

Run: ``nox -s bench -- tracing`` or ``python bench/tracing.py [--rounds 8 --seconds 2]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile

import trio
from proxy import (  # bench/proxy.py: the same upstream, load generator and gateway runner
    free_port,
    interleave,
    load_average,
    start_gateway,
    start_upstream,
)

VARIANTS: dict[str, dict[str, str]] = {
    "off": {},
    "on 100%": {"OTEL_TRACES_SAMPLER": "always_on"},
    "on 10%": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
    "on 0%": {"OTEL_TRACES_SAMPLER": "always_off"},  # the unsampled path alone
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--stream", action="store_true", help="streamed requests (20 events)")
    parser.add_argument("--before", help="a checkout of the code to compare with")
    args = parser.parse_args()

    upstream_proc, up_port = start_upstream()
    upstream = f"http://127.0.0.1:{up_port}/v1"
    procs = [upstream_proc]
    workdir = tempfile.mkdtemp(prefix="onwards-bench-tracing-")
    config = {"targets": {"bench": {"url": upstream}}}
    collector = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{up_port}"}
    sources = [("", None)] + ([("before ", args.before)] if args.before else [])
    gateways: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    cpu: dict[str, list[float]] = {}
    user: dict[str, list[float]] = {}
    system: dict[str, list[float]] = {}
    rps: dict[str, list[float]] = {}
    load_before = load_average()
    try:
        for prefix, source in sources:
            for variant, env in VARIANTS.items():
                env = {**env, **(collector if variant != "off" else {})}
                if source is not None:
                    env["PYTHONPATH"] = os.path.abspath(source)
                port = free_port()
                gateway = start_gateway(config, port, ["--no-metrics"], workdir, env)
                procs.append(gateway)
                gateways[prefix + variant] = (gateway, port)

        results = trio.run(
            interleave, gateways, args.rounds, args.seconds, args.concurrency, args.stream
        )
        for name, rounds in results.items():
            cpu[name] = [r["cpu_us"] for r in rounds]
            user[name] = [r["user_us"] for r in rounds]
            system[name] = [r["system_us"] for r in rounds]
            rps[name] = [r["rps"] for r in rounds]
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
    print("ratios: median over the rounds of this round's figure / the other's [quartiles]")
    print(
        f"{'gateway':16} {'CPU µs/req':>10} {'user':>5} {'sys':>4} {'CPU vs off':>19} "
        f"{'user vs off':>19} {'req/s':>6} {'req/s vs off':>19}"
    )
    for prefix, _ in sources:
        off = prefix + "off"
        for variant in VARIANTS:
            name = prefix + variant
            print(
                f"{name:16} {statistics.median(cpu[name]):10.0f} "
                f"{statistics.median(user[name]):5.0f} {statistics.median(system[name]):4.0f} "
                f"{_paired(cpu, name, off):>19} {_paired(user, name, off):>19} "
                f"{statistics.median(rps[name]):6.0f} {_paired(rps, name, off):>19}"
            )
    if args.before:
        print("after vs before, the same variant:")
        for variant in VARIANTS:
            print(f"  {variant:14} CPU {_paired(cpu, variant, 'before ' + variant)}")


def _paired(figures: dict[str, list[float]], name: str, base: str) -> str:
    """The median of per-round ratios (each against the same round's ``base``: the load
    drifts less within a round than across the run), with the quartiles."""
    ratios = [a / b for a, b in zip(figures[name], figures[base], strict=True)]
    q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return f"{q2:.2f} [{q1:.2f}-{q3:.2f}]"


if __name__ == "__main__":
    main()
