"""`make bench`: Taskgate as users run it, beside pgqueuer and the ceiling of its own SQL, in one run.

Every system uses the same embedded PostgreSQL (default, durable settings), one fresh database per
run. Each number is the median of RUNS runs with min-max; compared systems run interleaved, round
by round, and their ratio is the median of the per-round ratios. The table, with every target of
the performance issue and whether it is met, is printed and written as JSON under bench/results/
(latest.json for a full run at the default sizes, else a timestamped file only).

Sections (--only):
  drain            serve and split (bench/deployments.py) draining --tasks over HTTPS, and pgqueuer
                   in a process of its own at each of --pgqueuer-batches (its best per round counts)
  ceiling          pgbench running the worker's own claim and completion statements (bench/ceiling.py)
  drain-inprocess  the earlier drains: a worker inside the benchmark process, a table loaded by SQL
  enqueue          POST /api/tasks under wrk beside bare Quart endpoints; batch enqueue
  latency          enqueue-to-start latency at 200 tasks/s (bench/latency.py)
  history          split draining --tasks with --history finished tasks in the table vs none
  memory           the `worker` process's peak RSS draining --memory-tasks loaded by SQL
  soak             --soak-rate tasks/s in and out for --soak-minutes (bench/soak.py)
  scale-out, limited, console, remote, flow, fanout: the earlier features' own measurements
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg

from bench import ceiling, deployments, flow, http_enqueue, remote_drain, soak
from bench.server import ROOT, BenchServer, run_json

RESULTS = ROOT / "bench" / "results"


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def repeat(runs: int, measure: Callable[[], float]) -> dict[str, float]:
    return summary([measure() for _ in range(runs)])


def inprocess_drain(
    server: BenchServer, system: str, n: int, *extra: str, field: str = "tasks_per_s"
) -> float:
    uri = server.fresh_database(f"drain_{system}")
    prepare = ["--prepare"] if system == "taskgate" else []
    return float(run_json(["-m", "bench.drain", system, uri, str(n), *prepare, *extra])[field])


def scale_out(server: BenchServer, workers: int, n: int) -> float:
    """n tasks in a paused queue, `workers` processes up, then resume: tasks/s until all are done."""
    uri = server.fresh_database("scale_out")
    from bench.drain import prepare_taskgate

    asyncio.run(prepare_taskgate(uri, n, paused=True))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.drain", "taskgate", uri, str(n), "--barrier"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(workers)
    ]
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("a worker did not start")

    async def resume_and_time() -> float:
        conn = await asyncpg.connect(uri)
        started = time.perf_counter()
        await conn.execute("UPDATE queues SET paused = false; NOTIFY taskgate_available")
        while await conn.fetchval("SELECT count(*) FROM tasks WHERE status = 'completed'") < n:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        await conn.close()
        return n / elapsed

    rate = asyncio.run(resume_and_time())
    for proc in procs:
        proc.wait(timeout=60)
    return rate


def latency(server: BenchServer, system: str, seconds: float) -> dict[str, float]:
    uri = server.fresh_database(f"latency_{system}")
    return run_json(["-m", "bench.latency", system, uri, "--seconds", str(seconds)])


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


# The sizes `make bench` uses; --quick and the size options make smaller runs (never latest.json)
FULL = {
    "tasks": 50_000,
    "pgqueuer_batches": [10, 50, 100, 200, 500, 1000],
    "ceiling_tasks": 200_000,
    "ceiling_clients": [1, 2, 4],
    "history": 10_000_000,
    "memory_tasks": 1_000_000,
    "soak_minutes": 10,
    "soak_rate": 2000.0,
}
QUICK = {**FULL, "tasks": 10_000, "ceiling_tasks": 50_000, "history": 1_000_000, "memory_tasks": 100_000,
         "soak_minutes": 2}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", "--rounds", type=int, default=int(os.environ.get("BENCH_RUNS", 3)))
    parser.add_argument("--quick", action="store_true", help="smaller sizes and shorter runs (a smoke test)")
    parser.add_argument(
        "--only",
        type=lambda text: [part.strip() for part in text.split(",") if part.strip()],
        default=list(SECTIONS),
        help=f"comma-separated sections to run (default: all): {','.join(SECTIONS)}",
    )
    parser.add_argument("--tasks", type=int, help=f"tasks per black-box drain (default {FULL['tasks']:,})")
    parser.add_argument(
        "--pgqueuer-batches", type=_ints, help="pgqueuer batch sizes, its best per round is its figure"
    )
    parser.add_argument("--ceiling-tasks", type=int, help="tasks preloaded per pgbench run of the ceiling")
    parser.add_argument(
        "--ceiling-clients", type=_ints, help="pgbench client counts; the best is the ceiling"
    )
    parser.add_argument("--history", type=int, help="finished tasks in the table for the history drain")
    parser.add_argument("--memory-tasks", type=int, help="tasks the worker drains for its peak RSS")
    parser.add_argument("--soak-minutes", type=int)
    parser.add_argument("--soak-rate", type=float, help="tasks/s in (and out) during the soak")
    args = parser.parse_args()
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    sizes = {key: getattr(args, key) if getattr(args, key) is not None else value
             for key, value in (QUICK if args.quick else FULL).items()}  # fmt: skip
    runs = args.runs
    seconds = 3 if args.quick else 10
    server = BenchServer().start()
    started = time.monotonic()
    r: dict[str, Any] = {}

    def step(name: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {name}", file=sys.stderr, flush=True)

    run_sections(args.only, r, server, runs=runs, sizes=sizes, seconds=seconds, quick=args.quick, step=step)
    full = set(args.only) == set(SECTIONS) and sizes == FULL
    r["meta"] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "runs": runs,
        "sizes": sizes,
        "cpus": os.cpu_count(),
        "seconds": round(time.monotonic() - started, 1),
        "quick": args.quick,
        "sections": args.only,
        "full": full,
    }
    r["targets"] = targets(r)
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(r, indent=2, default=str)
    stamp = r["meta"]["when"].replace(":", "")
    if full:
        (RESULTS / "latest.json").write_text(text)
    else:  # a partial or smaller run never replaces the full one
        stamp += (
            "-"
            + ("+".join(args.only) if set(args.only) != set(SECTIONS) else "all")
            + ("" if sizes == FULL else "-small")
        )
    (RESULTS / f"{stamp}.json").write_text(text)
    print(table(r))


SECTIONS = (
    "drain",
    "ceiling",
    "drain-inprocess",
    "enqueue",
    "latency",
    "history",
    "memory",
    "soak",
    "scale-out",
    "limited",
    "console",
    "remote",
    "flow",
    "fanout",
)


def run_sections(
    only: list[str],
    r: dict[str, Any],
    server: BenchServer,
    *,
    runs: int,
    sizes: dict[str, Any],
    seconds: int,
    quick: bool,
    step: Callable[[str], None],
) -> None:
    n = sizes["tasks"]
    if "drain" in only:
        batches = sizes["pgqueuer_batches"]
        step(f"drain of {n:,} over HTTPS: serve, split, pgqueuer batch {', '.join(map(str, batches))}")
        rounds = deployments.versus_pgqueuer(server, runs, n, batches)
        r["drain"] = {
            "tasks": n,
            "serve": summary([x["tasks_per_s"] for x in rounds["serve"]]),
            "split": summary([x["tasks_per_s"] for x in rounds["split"]]),
            "pgqueuer_best": summary([x["tasks_per_s"] for x in rounds["pgqueuer_best"]]),
            "pgqueuer_best_batch": rounds["pgqueuer_best_batch"],
            **{f"pgqueuer_batch{b}": summary([x["tasks_per_s"] for x in rounds[f"pgqueuer_batch{b}"]]) for b in batches},
            "serve_vs_pgqueuer": summary(rounds["serve_vs_pgqueuer"]),
            "split_vs_pgqueuer": summary(rounds["split_vs_pgqueuer"]),
            "serve_vs_split": summary(rounds["serve_vs_split"]),
            # CPU per task moves less with the machine's load than tasks/s does
            "serve_cpu_us_per_task": summary([x["cpu_us_per_task"] for x in rounds["serve"]]),
            "split_cpu_us_per_task": summary([x["cpu_us_per_task"] for x in rounds["split"]]),
            "rounds": rounds,
        }  # fmt: skip
    if "ceiling" in only:
        clients = sizes["ceiling_clients"]
        step(f"ceiling of the product's own SQL: pgbench, batch {ceiling.BATCH_SIZE}, clients {clients}")

        def pgbench(clients: int) -> float:
            return float(ceiling.run(server, tasks=sizes["ceiling_tasks"], clients=clients)["tasks_per_s"])

        measured = {k: repeat(runs, lambda k=k: pgbench(k)) for k in clients}  # type: ignore[misc]
        best = max(clients, key=lambda k: measured[k]["median"])
        r["ceiling"] = {
            "batch": ceiling.BATCH_SIZE,
            "tasks": sizes["ceiling_tasks"],
            **{f"clients_{k}": measured[k] for k in clients},
            "best_clients": best,
            "tasks_per_s": measured[best]["median"],
        }
    if "drain-inprocess" in only:
        step("in-process drain: taskgate, pgqueuer (batch 10, 50), procrastinate (concurrency 10)")
        m = 5_000 if quick else 20_000
        r["drain_inprocess"] = {
            "tasks": m,
            "taskgate": repeat(runs, lambda: inprocess_drain(server, "taskgate", m)),
            "pgqueuer_batch10": repeat(runs, lambda: inprocess_drain(server, "pgqueuer", m, "--batch-size", "10")),
            "pgqueuer_batch50": repeat(runs, lambda: inprocess_drain(server, "pgqueuer", m, "--batch-size", "50")),
            "procrastinate_c10": repeat(
                runs, lambda: inprocess_drain(server, "procrastinate", max(1000, m // 4), "--concurrency", "10")
            ),
        }  # fmt: skip
    if "enqueue" in only:
        step("enqueue over HTTPS (wrk, 32 connections) and batch enqueue")
        enqueue_runs = [http_enqueue.run(server, seconds=seconds) for _ in range(runs)]
        r["enqueue"] = {
            key: summary([run[key]["requests_per_s"] for run in enqueue_runs])
            for key in ("taskgate_single", "bare_json", "bare_insert")
        }
        r["enqueue"]["taskgate_single_p50_ms"] = summary(
            [run["taskgate_single"]["p50_ms"] for run in enqueue_runs]
        )
        r["enqueue"]["taskgate_single_p99_ms"] = summary(
            [run["taskgate_single"]["p99_ms"] for run in enqueue_runs]
        )
        r["enqueue"]["single_vs_bare_json"] = summary([run["single_vs_bare_json"] for run in enqueue_runs])
        r["enqueue"]["taskgate_batch_tasks_per_s"] = summary(
            [run["taskgate_batch_tasks_per_s"] for run in enqueue_runs]
        )
    if "latency" in only:
        step("start latency at 200 tasks/s")
        r["latency"] = {}
        for system in ("taskgate", "pgqueuer", "procrastinate"):
            samples = [latency(server, system, seconds) for _ in range(runs)]
            r["latency"][system] = {
                "p50_ms": summary([s["p50_ms"] for s in samples]),
                "p99_ms": summary([s["p99_ms"] for s in samples]),
            }
    if "history" in only:
        history = sizes["history"]
        step(f"drain of {n:,} (split) with {history:,} finished tasks in the table vs an empty history")
        rounds = deployments.history_vs_empty(server, runs, n, history)
        r["history"] = {
            "history": history,
            "tasks": n,
            "with_history": summary([x["tasks_per_s"] for x in rounds["a"]]),
            "empty": summary([x["tasks_per_s"] for x in rounds["b"]]),
            "ratio": summary(rounds["ratio"]),
            "rounds": rounds,
        }
    if "memory" in only:
        m = sizes["memory_tasks"]
        step(f"worker process (split) peak RSS draining {m:,} tasks loaded by SQL")
        drains = [deployments.drain(server, "split", m, load="sql")]
        r["memory"] = {
            "tasks": m,
            "worker_peak_rss_mb": summary([d["peak_rss_mb"][1] for d in drains]),  # [api+scheduler, worker]
            "tasks_per_s": summary([d["tasks_per_s"] for d in drains]),
        }
    if "soak" in only:
        minutes, rate = sizes["soak_minutes"], sizes["soak_rate"]
        step(
            f"soak: {rate:,.0f} tasks/s in and out for {minutes} minutes (retention {soak.RETENTION_S:.0f} s)"
        )
        r["soak"] = soak.run(server, minutes=minutes, rate=rate)
    if "scale-out" in only:
        step("scale-out: 1 vs 2 worker processes (in-process drains, table loaded by SQL)")
        m = 5_000 if quick else 20_000
        r["scale_out"] = {
            "workers_1": repeat(runs, lambda: scale_out(server, 1, 2 * m)),
            "workers_2": repeat(runs, lambda: scale_out(server, 2, 2 * m)),
        }
    if "limited" in only:
        step("drain over HTTPS: a queue with max_concurrency 50 vs an unlimited one (serve)")
        r["limited"] = deployment_summary(deployments.limited_vs_unlimited(server, runs, n))
    if "console" in only:
        step("console pages with 100k tasks in a queue")
        r["console"] = run_json(["-m", "bench.console", server.fresh_database("console"),
                                 "--tasks", str(20_000 if quick else 100_000)])  # fmt: skip
    if "remote" in only:
        step("remote-worker drain: an SDK Worker over HTTPS")
        m = 5_000 if quick else 20_000
        r["remote"] = {"sdk_worker": repeat(runs, lambda: remote_drain.run(server, m)["tasks_per_s"])}
    if "flow" in only:
        step("flow control: drain over 10,000 keys vs keyless; fairness of 50 small keys beside a big one")
        r["flow"] = flow.run(server, runs, quick=quick)
    if "fanout" in only:
        step("fan-out/fan-in: one parent spawns 10,000 children and gathers them")
        children = 2_000 if quick else 10_000
        samples = [
            run_json(["-m", "bench.fanout", server.fresh_database("fanout"), str(children)])
            for _ in range(runs)
        ]
        if any(s["gathered"] != children for s in samples):
            raise RuntimeError(f"fan-out did not gather every child: {samples}")
        r["fanout"] = {
            "children": children,
            "seconds": summary([s["seconds"] for s in samples]),
            "tasks_per_s": summary([s["tasks_per_s"] for s in samples]),
        }


def deployment_summary(rounds: dict[str, list[Any]]) -> dict[str, Any]:
    """Medians of A and B (tasks/s) and of the per-round ratios, with every round kept."""
    return {
        "a": summary([run["tasks_per_s"] for run in rounds["a"]]),
        "b": summary([run["tasks_per_s"] for run in rounds["b"]]),
        "ratio": summary(rounds["ratio"]),
        "a_cpu_us_per_task": summary([run["cpu_us_per_task"] for run in rounds["a"]]),
        "b_cpu_us_per_task": summary([run["cpu_us_per_task"] for run in rounds["b"]]),
        "rounds": rounds,
    }


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of the performance issue (issue 18), then the earlier features' own; a target
    whose measurement did not run in this run is listed as not run."""
    d, c, e, lat = r.get("drain"), r.get("ceiling"), r.get("enqueue"), r.get("latency")
    h, mem, s = r.get("history"), r.get("memory"), r.get("soak")
    n = d["tasks"] if d else None
    checks: list[tuple[str, float | None, str, float | None]] = [
        (f"drain, serve >= 2x pgqueuer's best ({n or 'n'} tasks)", d and d["serve_vs_pgqueuer"]["median"], ">=", 2),
        (f"drain, split >= 2x pgqueuer's best ({n or 'n'} tasks)", d and d["split_vs_pgqueuer"]["median"], ">=", 2),
        ("drain, serve >= 0.7x the ceiling of its own SQL",
         d and c and d["serve"]["median"] / c["tasks_per_s"], ">=", 0.7),
        ("drain, split >= 0.7x the ceiling of its own SQL",
         d and c and d["split"]["median"] / c["tasks_per_s"], ">=", 0.7),
        ("serve (every role) >= 0.9x split", d and d["serve_vs_split"]["median"], ">=", 0.9),
        ("start latency p99 at 200/s <= 5 ms", lat and lat["taskgate"]["p99_ms"]["median"], "<=", 5),
        ("start latency p99 at 200/s <= pgqueuer's (ms)", lat and lat["taskgate"]["p99_ms"]["median"], "<=",
         lat and lat["pgqueuer"]["p99_ms"]["median"]),
        ("single enqueue >= 70% of bare Quart JSON", e and e["single_vs_bare_json"]["median"], ">=", 0.7),
        ("batch enqueue >= 40,000 tasks/s", e and e["taskgate_batch_tasks_per_s"]["median"], ">=", 40_000),
        (f"drain with {h['history']:,} finished tasks >= 0.9x empty history" if h else
         "drain with 10,000,000 finished tasks >= 0.9x empty history", h and h["ratio"]["median"], ">=", 0.9),
        (f"soak ({s['minutes']} min): size at the end <= 1.2x after minute 1" if s else
         "soak: size at the end <= 1.2x after minute 1",
         s["end_vs_minute_1"] if s and s["minutes"] > 1 else None, "<=", 1.2),  # one minute compares nothing
        (f"worker RSS <= 120 MB draining {mem['tasks']:,}" if mem else "worker RSS <= 120 MB draining 1,000,000",
         mem and mem["worker_peak_rss_mb"]["median"], "<=", 120),
    ]  # fmt: skip
    if "limited" in r:
        checks.append(
            ("max_concurrency 50 queue drain >= 0.8x unlimited", r["limited"]["ratio"]["median"], ">=", 0.8)
        )
    if "console" in r:
        checks.append(
            ("slowest console page <= 1000 ms", max(p["max_ms"] for p in r["console"].values()), "<=", 1000)
        )
    if "flow" in r:
        checks.append(("drain over 10,000 keys >= 0.8x keyless", r["flow"]["ratio"]["median"], ">=", 0.8))
        checks.append(
            ("fairness: 50 small keys start before the big key's 200th task",
             r["flow"]["fairness_big_before"]["max"], "<=", 199)
        )  # fmt: skip
    if "remote" in r:
        checks.append(
            ("remote-worker drain >= 5,000 tasks/s", r["remote"]["sdk_worker"]["median"], ">=", 5_000)
        )
    return [
        {
            "target": name,
            "value": None if value is None else round(value, 3),
            "limit": None if limit is None else round(limit, 3),
            "met": None
            if value is None or limit is None
            else (value >= limit if op == ">=" else value <= limit),
        }
        for name, value, op, limit in checks
    ]


def _cell(s: dict[str, float], fmt: str = "{:,.0f}") -> str:
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"


def _per_round(values: list[float], fmt: str = "{:,.0f}") -> str:
    return " · ".join(fmt.format(v) for v in values)


def table(r: dict[str, Any]) -> str:
    rows = ["| measurement | result: median (min-max) | ratio |", "|---|---|---|"]
    ceiling_tps = r["ceiling"]["tasks_per_s"] if "ceiling" in r else None
    if "drain" in r:
        d = r["drain"]
        n = d["tasks"]
        for key, label in (
            ("serve", "`serve` (every role)"),
            ("split", "split: `serve --roles api,scheduler` + `worker`"),
        ):
            share = f", x{d[key]['median'] / ceiling_tps:.2f} of the SQL ceiling" if ceiling_tps else ""
            rows.append(
                f"| Drain of {n:,} over HTTPS, {label}, tasks/s | {_cell(d[key])} | "
                f"x{d[f'{key}_vs_pgqueuer']['median']:.2f} of pgqueuer's best per round{share} |"
            )
        rows.append(
            f"| ... per round: serve / split / pgqueuer best (batch) | {_per_round([x['tasks_per_s'] for x in d['rounds']['serve']])} / "
            f"{_per_round([x['tasks_per_s'] for x in d['rounds']['split']])} / "
            f"{_per_round([x['tasks_per_s'] for x in d['rounds']['pgqueuer_best']])} "
            f"({_per_round(d['pgqueuer_best_batch'], '{}')}) | serve/split {_cell(d['serve_vs_split'], '{:.2f}')} |"
        )
        for key in sorted(
            (k for k in d if k.startswith("pgqueuer_batch")),
            key=lambda k: int(k.removeprefix("pgqueuer_batch")),
        ):
            rows.append(
                f"| Drain of {n:,}, pgqueuer {key.removeprefix('pgqueuer_').replace('batch', 'batch ')} (own process), tasks/s | {_cell(d[key])} | |"
            )
        rows.append(f"| ... pgqueuer's best batch size per round, tasks/s | {_cell(d['pgqueuer_best'])} | |")
        rows.append(
            f"| ... CPU per task, µs (all processes): serve / split | {_cell(d['serve_cpu_us_per_task'])} / {_cell(d['split_cpu_us_per_task'])} | |"
        )
    if "ceiling" in r:
        c = r["ceiling"]
        for key in (k for k in c if k.startswith("clients_")):
            best = "the ceiling" if key == f"clients_{c['best_clients']}" else ""
            rows.append(
                f"| Ceiling of the product's SQL (pgbench: claim + complete + attempt record, batch {c['batch']}), "
                f"{key.removeprefix('clients_')} client(s), tasks/s | {_cell(c[key])} | {best} |"
            )
    if "drain_inprocess" in r:
        d = r["drain_inprocess"]
        tg = d["taskgate"]["median"]
        for key, label in (
            ("taskgate", "Taskgate (worker inside the benchmark process, table loaded by SQL)"),
            ("pgqueuer_batch10", "pgqueuer batch 10"),
            ("pgqueuer_batch50", "pgqueuer batch 50"),
            ("procrastinate_c10", "procrastinate concurrency 10"),
        ):
            rows.append(
                f"| In-process drain of {d['tasks']:,}, {label}, tasks/s | {_cell(d[key])} | Taskgate x{tg / d[key]['median']:.2f} |"
            )
    if "enqueue" in r:
        e = r["enqueue"]
        rows.append(
            f"| Enqueue POST /api/tasks (HTTPS, auth, validation), req/s | {_cell(e['taskgate_single'])} | {_cell(e['single_vs_bare_json'], '{:.0%}')} of bare JSON |"
        )
        rows.append(
            f"| ... latency p50 / p99, ms | {_cell(e['taskgate_single_p50_ms'], '{:.1f}')} / {_cell(e['taskgate_single_p99_ms'], '{:.1f}')} | |"
        )
        rows.append(f"| Bare Quart JSON endpoint (same uvicorn + TLS), req/s | {_cell(e['bare_json'])} | |")
        rows.append(f"| Bare Quart endpoint with one insert, req/s | {_cell(e['bare_insert'])} | |")
        rows.append(
            f"| Batch enqueue over HTTPS (1000/request), tasks/s | {_cell(e['taskgate_batch_tasks_per_s'])} | |"
        )
    for system in ("taskgate", "pgqueuer", "procrastinate") if "latency" in r else ():
        lat = r["latency"][system]
        rows.append(
            f"| Start latency at 200/s, {system}, p50 / p99 ms | {_cell(lat['p50_ms'], '{:.1f}')} / {_cell(lat['p99_ms'], '{:.1f}')} | |"
        )
    if "history" in r:
        h = r["history"]
        rows.append(
            f"| Drain of {h['tasks']:,} (split) with {h['history']:,} finished tasks in the table, tasks/s | {_cell(h['with_history'])} | {_cell(h['ratio'], '{:.2f}')} of empty per round |"
        )
        rows.append(f"| Drain of {h['tasks']:,} (split), empty history, tasks/s | {_cell(h['empty'])} | |")
    if "memory" in r:
        mem = r["memory"]
        rows.append(
            f"| `worker` process peak RSS draining {mem['tasks']:,} (loaded by SQL), MB | {_cell(mem['worker_peak_rss_mb'], '{:.0f}')} | at {_cell(mem['tasks_per_s'])} tasks/s |"
        )
    if "soak" in r:
        s = r["soak"]
        rows.append(
            f"| Soak {s['rate']:,.0f}/s for {s['minutes']} min (retention {s['retention_s']:.0f} s, prune every {s['prune_interval_s']:.0f} s): task tables, MB after minute 1 / at the end | {s['size_minute_1_mb']:,} / {s['size_end_mb']:,} | x{s['end_vs_minute_1']:.2f} |"
        )
        rows.append(
            f"| ... start latency p99 per minute, ms | {_per_round([m.get('start_p99_ms', float('nan')) for m in s['per_minute']], '{:.1f}')} | |"
        )
        rows.append(
            f"| ... task tables per minute, MB | {_per_round([m['total_bytes'] / 2**20 for m in s['per_minute']])} | |"
        )
    if "scale_out" in r:
        s = r["scale_out"]
        rows.append(f"| Drain with 1 worker process (in-process), tasks/s | {_cell(s['workers_1'])} | |")
        rows.append(
            f"| Drain with 2 worker processes (in-process), tasks/s | {_cell(s['workers_2'])} | x{s['workers_2']['median'] / s['workers_1']['median']:.2f} |"
        )
    if "limited" in r:
        x = r["limited"]
        rows.append(
            f"| Drain over HTTPS, a queue with max_concurrency 50 (`serve`), tasks/s | {_cell(x['a'])} | {_cell(x['ratio'], '{:.2f}')} per round |"
        )
        rows.append(f"| Drain over HTTPS, an unlimited queue (`serve`), tasks/s | {_cell(x['b'])} | |")
    for page, timing in r.get("console", {}).items():
        rows.append(
            f"| Console page with 100k tasks: {page}, ms median / max | {timing['median_ms']} / {timing['max_ms']} | |"
        )
    if "flow" in r:
        f = r["flow"]
        rows.append(
            f"| Drain over {f['keys']:,} keys (key_concurrency {flow.KEY_CONCURRENCY}), tasks/s | {_cell(f['keyed'])} | {_cell(f['ratio'], '{:.2f}')} of keyless per round |"
        )
        rows.append(f"| Drain of the same tasks without keys, tasks/s | {_cell(f['keyless'])} | |")
        rows.append(
            f"| Fairness: last of 50 one-task keys starts after, ms / big-key tasks started by then | {_cell(f['fairness_delay_ms'])} / {_cell(f['fairness_big_before'])} | |"
        )
    if "remote" in r:
        rows.append(
            f"| Remote-worker drain (SDK Worker, HTTPS claim/complete), tasks/s | {_cell(r['remote']['sdk_worker'])} | |"
        )
    if "fanout" in r:
        f = r["fanout"]
        rows.append(
            f"| Fan-out/fan-in of {f['children']:,} children (spawn, run, gather), s | {_cell(f['seconds'], '{:,.2f}')} | |"
        )
        rows.append(
            f"| Fan-out/fan-in of {f['children']:,} children, tasks/s | {_cell(f['tasks_per_s'])} | |"
        )
    rows.append("")
    rows.append("| target | value | limit | met |")
    rows.append("|---|---|---|---|")
    for t in r["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:,}"
        limit = "-" if t["limit"] is None else f"{t['limit']:,}"
        met = "not run" if t["met"] is None else ("met" if t["met"] else "MISSED")
        rows.append(f"| {t['target']} | {value} | {limit} | {met} |")
    rows.append("")
    meta = r["meta"]
    rows.append(
        f"{meta['runs']} runs each, {meta['cpus']} CPUs, {meta['seconds']} s in all, {meta['when']}"
        + (
            ""
            if meta["full"]
            else f"; NOT a full run: sections {','.join(meta['sections'])}, sizes {json.dumps(meta['sizes'])}"
        )
    )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
