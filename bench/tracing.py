"""What tracing costs: gateway CPU per request with tracing off, on at 100 %, 10 % and 0 %
sampling (0 %: ``always_off``, the cost of tracing being on for a trace nobody records).

The machine is shared and its load swings throughput by ±20 % between two identical gateways,
so the figure is a *paired* one: every gateway is started once, then each round sends each of
them the same fixed number of requests (c=16, non-streaming, through the plain config of
``bench/proxy.py``), in an order rotated each round. A gateway's cost in a round is its own CPU
time (all its threads, from ``/proc/<pid>/task/*/schedstat``: nanoseconds, not clock ticks)
per request; a ratio is the median over the rounds of the round's figure against the same
round's tracing-off figure (the load drifts less within a round than across the run), with
its quartiles, and the ratio of the run's totals. The fake upstream doubles as the OTLP
collector (it answers the export POSTs with 200).

``--callgrind N`` measures instructions instead (valgrind's callgrind, off and 100 % only):
each gateway runs under callgrind with counting off, is warmed up, then counts exactly
``N`` requests. That figure does not depend on the machine's load, so it shows a change of a
few per cent that CPU time on a shared machine cannot; the export interval is set long so
that spans go out in full batches, as under steady traffic.

``--together SECONDS`` loads all the gateways at the same time instead (each its own
connections), in rounds of that length: on a busy machine the load then hits every gateway
alike at each instant; each gateway's figure is still its own CPU time per request.

``--before DIR`` adds the same variants run from another checkout (``PYTHONPATH=DIR``),
for a before/after comparison in the same run.

Run: ``nox -s bench -- tracing`` or ``python bench/tracing.py [--rounds 24 --requests 2000]``
or ``python bench/tracing.py --callgrind 400``.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import trio
from proxy import (  # bench/proxy.py: the same upstream, load generator and gateway runner
    build_request,
    cpu_ns,
    free_port,
    machine_state,
    paired,
    send_count,
    start_gateway,
    start_upstream,
    together,
    wait_port,
)

VARIANTS: dict[str, dict[str, str]] = {
    "off": {},
    "on 100%": {"OTEL_TRACES_SAMPLER": "always_on"},
    "on 10%": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
    "on 0%": {"OTEL_TRACES_SAMPLER": "always_off"},  # the unsampled path alone
}


async def send(port: int, concurrency: int, requests: int, stream: bool) -> float:
    """``requests`` requests over ``concurrency`` keep-alive connections; the seconds taken."""
    return await send_count(port, build_request(port, stream), concurrency, requests)


async def rounds(
    gateways: dict[str, tuple[subprocess.Popen[bytes], int]],
    count: int,
    requests: int,
    concurrency: int,
    stream: bool,
) -> dict[str, list[tuple[float, float]]]:
    """Per gateway and round: (CPU µs per request, requests per second)."""
    for _, port in gateways.values():  # warm-up: connections, caches, a first export
        await send(port, concurrency, requests, stream)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in gateways}
    names = list(gateways)
    for r in range(count):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            proc, port = gateways[name]
            before = cpu_ns(proc.pid)
            seconds = await send(port, concurrency, requests, stream)
            used = cpu_ns(proc.pid) - before
            results[name].append((used / 1000 / requests, requests / seconds))
    return results


def callgrind(
    sources: list[tuple[str, str | None]], requests: int, concurrency: int, workdir: str
) -> None:
    upstream_proc, up_port = start_upstream()
    config = Path(workdir) / "config.json"
    config.write_text(f'{{"targets": {{"bench": {{"url": "http://127.0.0.1:{up_port}/v1"}}}}}}')
    runs = []
    try:
        for prefix, source in sources:
            for variant in ("off", "on 100%"):
                env = {**os.environ, **VARIANTS[variant]}
                if variant != "off":
                    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{up_port}"
                    env["OTEL_BSP_SCHEDULE_DELAY"] = "3600000"  # full batches only
                if source is not None:
                    env["PYTHONPATH"] = os.path.abspath(source)
                port = free_port()
                out = Path(workdir) / f"callgrind-{port}.out"
                cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
                cmd += [f"--callgrind-out-file={out}", sys.executable, "-m", "onwards_trio"]
                cmd += ["-f", str(config), "--port", str(port), "--host", "127.0.0.1"]
                cmd += ["--no-watch", "--no-metrics"]
                with open(Path(workdir) / f"gateway-{port}.log", "wb") as log:
                    proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=workdir, env=env)
                runs.append((prefix + variant, proc, port, out))
        for _, _, port, _ in runs:
            wait_port(port, 600)

        async def control(pid: int, *what: str) -> None:
            await trio.run_process(["callgrind_control", *what, str(pid)], capture_stdout=True)

        async def measure(proc: subprocess.Popen[bytes], port: int) -> None:
            await send(port, concurrency, 200, False)  # warm-up, uncounted
            await control(proc.pid, "-i", "on")
            await send(port, concurrency, requests, False)
            await control(proc.pid, "-i", "off")
            await control(proc.pid, "-d")

        async def all_runs() -> None:
            async with trio.open_nursery() as nursery:
                for _, proc, port, _ in runs:
                    nursery.start_soon(measure, proc, port)

        trio.run(all_runs)
    finally:
        for _, proc, _, _ in runs:
            proc.terminate()
        for _, proc, _, _ in runs:
            proc.wait(timeout=60)
        upstream_proc.terminate()
    counted: dict[str, float] = {}
    for name, _, _, out in runs:
        total = 0
        for path in glob.glob(f"{out}*"):
            for line in Path(path).read_text(errors="replace").splitlines():
                if line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
        counted[name] = total / requests
    print(
        f"\ntracing cost: instructions per request (callgrind), {requests} requests, "
        f"c={concurrency}"
    )
    for prefix, _ in sources:
        off, on = counted[prefix + "off"], counted[prefix + "on 100%"]
        print(
            f"{prefix or 'this '}off {off / 1000:8.0f} k   100 % {on / 1000:8.0f} k   "
            f"{on / off:.3f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--requests", type=int, default=2000, help="per gateway and round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--stream", action="store_true", help="streamed requests (20 events)")
    parser.add_argument("--before", help="a checkout of the code to compare with")
    parser.add_argument("--only", help="comma-separated variants (default: all)")
    parser.add_argument("--callgrind", type=int, metavar="N", help="instructions per request")
    parser.add_argument(
        "--together",
        type=float,
        metavar="SECONDS",
        help="load every gateway at the same time, rounds of SECONDS (c=concurrency each)",
    )
    args = parser.parse_args()
    sources = [("", None)] + ([("before ", args.before)] if args.before else [])
    workdir = tempfile.mkdtemp(prefix="onwards-bench-tracing-")
    if args.callgrind:
        callgrind(sources, args.callgrind, min(args.concurrency, 4), workdir)
        return
    variants = args.only.split(",") if args.only else list(VARIANTS)
    if "off" not in variants:
        variants.insert(0, "off")

    upstream_proc, up_port = start_upstream()
    upstream = f"http://127.0.0.1:{up_port}/v1"
    procs = [upstream_proc]
    config = {"targets": {"bench": {"url": upstream}}}
    collector = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{up_port}"}
    gateways: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    load_before = machine_state()
    try:
        for prefix, source in sources:
            for variant in variants:
                env = {**VARIANTS[variant], **(collector if variant != "off" else {})}
                if source is not None:
                    env["PYTHONPATH"] = os.path.abspath(source)
                port = free_port()
                gateway = start_gateway(config, port, ["--no-metrics"], workdir, env)
                procs.append(gateway)
                gateways[prefix + variant] = (gateway, port)
        if args.together:
            results = trio.run(
                together, gateways, args.rounds, args.together, args.concurrency, args.stream
            )
        else:
            results = trio.run(
                rounds, gateways, args.rounds, args.requests, args.concurrency, args.stream
            )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)

    cpu = {name: [c for c, _ in r] for name, r in results.items()}
    rps = {name: [q for _, q in r] for name, r in results.items()}
    kind = "streamed (20 events)" if args.stream else "non-streaming"
    how = (
        f"{args.rounds} rounds of {args.together:g} s, all gateways loaded together"
        if args.together
        else f"{args.rounds} interleaved rounds of {args.requests} requests per gateway"
    )
    print(
        f"\ntracing cost: {kind}, c={args.concurrency}, {how}, machine before: "
        f"{load_before}, machine after: {machine_state()}"
    )
    print(
        "ratios: median over the rounds of this round's figure / the other's [quartiles]; "
        "total: the ratio of the run's sums"
    )
    print(
        f"{'gateway':16} {'CPU µs/req':>10} {'CPU vs off':>19} {'total':>6} "
        f"{'req/s':>6} {'req/s vs off':>19}"
    )
    for prefix, _ in sources:
        off = prefix + "off"
        for variant in variants:
            name = prefix + variant
            print(
                f"{name:16} {statistics.median(cpu[name]):10.1f} {paired(cpu, name, off):>19} "
                f"{sum(cpu[name]) / sum(cpu[off]):6.3f} "
                f"{statistics.median(rps[name]):6.0f} {paired(rps, name, off):>19}"
            )
    if args.before:
        print("after vs before, the same variant:")
        for variant in variants:
            print(f"  {variant:14} CPU {paired(cpu, variant, 'before ' + variant)}")


if __name__ == "__main__":
    main()
