"""A remote claim's answer carrying durable state, sent by the real server over HTTPS to a worker
that stops reading it, and to one that reads it."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import aiohttp

from app.src.api.models.auth import IssuedKey
from tests.conftest import bearer
from tests.e2e.conftest import start_server, wait_ready
from tests.task_harness import eventually, fetch

METRICS_TOKEN = "claim-answers-metrics-token-0123456789"
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
WORKER = {"name": "slow-host:1", "version": "1.0.0"}
STEPS = 12  # of 1 MiB each, per task: an answer of 24 MiB, far past what socket buffers hold
MIB = 1024 * 1024


async def held_state(https: aiohttp.ClientSession) -> float:
    async with https.get("/metrics", headers=bearer(METRICS_TOKEN)) as response:
        text = await response.text()
    (line,) = [x for x in text.splitlines() if x.startswith("taskgate_remote_claim_state_bytes ")]
    return float(line.split()[1])


async def test_an_unread_claim_answer_holds_its_state_until_its_lease_then_its_tasks_are_handed_back(
    clean_database: str, tmp_path: Path, api_client: IssuedKey
) -> None:
    """The loaded state of a claim's durable tasks counts against the API process's budget until
    its answer is sent, not merely built: a worker that stops reading kept the whole answer in the
    server's buffers, uncounted, for as long as it held the connection (up to 64 MiB a claim, a
    thousand connections). The answer now goes out in pieces as the connection takes them; one
    not taken within the lease is abandoned, its share given back and its tasks available again at
    once with their attempt not spent. A worker that reads gets them whole."""
    server = start_server(
        clean_database, tmp_path / "server", env={"LEASE_SECONDS": "3", "METRICS_TOKEN": METRICS_TOKEN}
    )
    headers = bearer(api_client.api_key)
    try:
        connector = aiohttp.TCPConnector(ssl=server.ssl_context())
        async with aiohttp.ClientSession(base_url=server.base_url, connector=connector) as https:
            await wait_ready(https)
            body = {"payload_schema": SCHEMA}
            async with https.put("/api/catalog/kinds/big.state", json=body, headers=headers) as response:
                assert response.status in (200, 201), await response.text()
            ids = []
            for n in range(2):
                task = {"kind": "big.state", "payload": {"n": n}}
                async with https.post("/api/tasks", json=task, headers=headers) as response:
                    assert response.status == 201, await response.text()
                    ids.append(uuid.UUID((await response.json())["id"]))
            await fetch(  # steps a remote worker stored on earlier attempts, and their count
                clean_database,
                "INSERT INTO task_steps (task_id, name, result, wait) "
                "SELECT t, 'step-' || g, jsonb_build_object('blob', repeat('x', $2)), false "
                "FROM unnest($1::uuid[]) t, generate_series(1, $3) g",
                ids,
                MIB - 64,
                STEPS,
            )
            await fetch(
                clean_database,
                "UPDATE tasks SET durable = true, state_bytes = (SELECT sum(octet_length(s.result::text)) "
                "FROM task_steps s WHERE s.task_id = tasks.id) WHERE id = ANY($1::uuid[])",
                ids,
            )

            # a worker that sends its claim and reads no more than the head of the answer
            port = int(server.base_url.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=server.ssl_context(), server_hostname="localhost"
            )
            claim = json.dumps({"kinds": ["big.state"], "wait_s": 0, "max": 2, "worker": WORKER}).encode()
            request_head = (
                "POST /api/workers/claim HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {api_client.api_key}\r\nContent-Length: {len(claim)}\r\n\r\n"
            )
            writer.write(request_head.encode() + claim)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            assert head.startswith(b"HTTP/1.1 200 "), head
            # while its answer is not sent, the states it loaded stay counted
            assert await held_state(https) >= 2 * STEPS * (MIB - 64)

            # past the lease the server gives up on it: nothing held, the tasks available again at
            # once, their attempt not spent (before: running, and left to the lease rescuer)
            async def handed_back() -> bool:
                rows = await fetch(
                    clean_database, "SELECT status, attempts FROM tasks WHERE id = ANY($1::uuid[])", ids
                )
                tasks = [(r["status"], r["attempts"]) for r in rows]
                return tasks == [("available", 0)] * 2 and await held_state(https) == 0

            await eventually(handed_back, timeout=20, interval=0.2)
            writer.close()

            # a worker that reads its answer gets both tasks, whole
            claim_body = {"kinds": ["big.state"], "wait_s": 0, "max": 2, "worker": WORKER}
            async with https.post("/api/workers/claim", json=claim_body, headers=headers) as response:
                assert response.status == 200
                answer = await response.json()
            assert sorted(item["id"] for item in answer["items"]) == sorted(str(i) for i in ids)
            for item in answer["items"]:
                assert item["attempt"] == 1
                assert len(item["steps"]) == STEPS
                assert {len(step["blob"]) for step in item["steps"].values()} == {MIB - 64}
            assert answer["lease_s"] == 3.0
            assert await held_state(https) == 0
    finally:
        server.stop()
