"""Gateway CPU per proxied request, measured interleaved in one run.

The machine is shared, and its load moves throughput and even CPU time per request by tens of
percent between two runs of one gateway, so the variants are compared *in one run*: every
gateway is started once, then each round loads each of them in turn (the order rotates), and
each figure is the median over the rounds. Variants (the configs of ``bench/proxy.py``, access
log on and written to a file unless said otherwise):

* ``plain``: one target, no keys, no metrics;
* ``plain, access log off``: the same at ``--log-level warning`` (what the access line costs);
* ``traffic control``: auth (global and defined keys), key and pool rate and concurrency
  limits, a routing rule, two weighted providers with fallback, Prometheus metrics.

Each round loads a gateway at c=16 (CPU µs per request from the gateway process's own CPU
time, and req/s), then at c=1 (median latency), and the fake upstream directly at c=1: the
added p50 is the gateway's median minus the direct one of the same round.

``--together SECONDS`` measures the c=16 CPU figures with every gateway loaded at the same time
(each its own ``--concurrency`` connections, default 8) in rounds of that length: the machine's
speed drifts by tens of per cent within minutes, and loaded together every gateway meets the
same drift at each instant, so the per-round ratios (access log on vs off, after vs before) are
far steadier than figures taken in turn. Latency at c=1 is still measured in turn.

``--before DIR`` adds the same variants run from another checkout (``PYTHONPATH=DIR``) to the
same rounds, for a before/after comparison in one run.

Run: ``nox -s bench -- cpu`` or ``python bench/cpu.py [--rounds 6 --seconds 2 --before DIR]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import trio
from proxy import (  # bench/proxy.py: the upstream, the load generator, the gateway runner
    Gateways,
    free_port,
    interleave,
    machine_state,
    paired,
    start_gateway,
    start_upstream,
    together,
    traffic_control,
)

VARIANTS = ("plain", "plain, access log off", "traffic control")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--before", help="a checkout of the code to compare with")
    parser.add_argument(
        "--together",
        type=float,
        metavar="SECONDS",
        help="c=16 figures: load every gateway at the same time, rounds of SECONDS",
    )
    parser.add_argument("--concurrency", type=int, default=8, help="per gateway, with --together")
    args = parser.parse_args()

    upstream_proc, up_port = start_upstream()
    procs = [upstream_proc]
    upstream = f"http://127.0.0.1:{up_port}/v1"
    workdir = tempfile.mkdtemp(prefix="onwards-bench-cpu-")
    sources = [("", None)] + ([("before: ", args.before)] if args.before else [])
    gateways: Gateways = {}
    load_before = machine_state()
    try:
        for prefix, source in sources:
            env = {"PYTHONPATH": os.path.abspath(source)} if source is not None else None
            for variant in VARIANTS:
                if variant == "traffic control":
                    config = traffic_control(upstream)
                    extra = ["--metrics-port", str(free_port())]
                else:
                    config = {"targets": {"bench": {"url": upstream}}}
                    extra = ["--no-metrics"]
                    if variant == "plain, access log off":
                        extra += ["--log-level", "warning"]
                port = free_port()
                gateway = start_gateway(config, port, extra, workdir, env)
                procs.append(gateway)
                gateways[prefix + variant] = (gateway, port)
        if args.together:
            loaded = trio.run(
                together, gateways, args.rounds, args.together, args.concurrency, False
            )
            busy = {n: [{"cpu_us": c, "rps": q} for c, q in r] for n, r in loaded.items()}
        else:
            busy = trio.run(interleave, gateways, args.rounds, args.seconds)
        # c=1: the upstream directly takes its turn too, for the latency each gateway adds
        with_direct: Gateways = {"direct": (upstream_proc, up_port), **gateways}
        alone = trio.run(interleave, with_direct, args.rounds, args.seconds / 2, 1)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)

    how = (
        f"c={args.concurrency} each, all gateways loaded together in {args.rounds} rounds of "
        f"{args.together:g} s; c=1 in turn"
        if args.together
        else f"{args.rounds} interleaved rounds of {args.seconds:g} s"
    )
    print(
        f"\ngateway CPU per proxied request: non-streaming, {how}, machine before: "
        f"{load_before}, machine after: {machine_state()}"
    )
    busy_c = args.concurrency if args.together else 16
    print(f"{'gateway':32} {'CPU µs/req c=' + str(busy_c):>15} {'req/s':>10} {'added p50 c=1':>14}")
    direct = [r["p50_ms"] for r in alone["direct"]]
    cpu = {name: statistics.median(r["cpu_us"] for r in rows) for name, rows in busy.items()}
    for name, rows in busy.items():
        rps = statistics.median(r["rps"] for r in rows)
        added = statistics.median(r["p50_ms"] - d for r, d in zip(alone[name], direct, strict=True))
        print(f"{name:32} {cpu[name]:15.0f} {rps:10.0f} {added * 1000:11.0f} µs")
    # per-round ratios (median [quartiles]): each round's figure against the same round's
    per_round = {name: [r["cpu_us"] for r in rows] for name, rows in busy.items()}
    for prefix, _ in sources:
        ratio = paired(per_round, prefix + "plain", prefix + "plain, access log off")
        print(f"{prefix}access log on vs off: CPU {ratio}")
    if args.before:
        print("after vs before (same variant, CPU per request):")
        for variant in VARIANTS:
            print(f"  {variant:30} {paired(per_round, variant, 'before: ' + variant)}")


if __name__ == "__main__":
    main()
