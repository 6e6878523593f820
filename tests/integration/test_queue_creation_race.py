"""Queues are created on first use; replicas creating the same queue at once all get it."""

import asyncio
from uuid import UUID

from app.database import Database
from app.settings import Settings
from app.src.database import queues
from app.src.utils.ids import uuid7


async def ensure(replica: Database, client_id: UUID) -> int:
    async with replica.driver() as conn:
        return (await queues.ensure(conn, client_id=client_id, name="fresh")).id


async def test_concurrent_first_use_of_a_queue_returns_it_everywhere(
    settings: Settings, clean_database: str
) -> None:
    replicas = [Database(settings.model_copy(update={"DB_POOL_SIZE": 1})) for _ in range(6)]
    for replica in replicas:
        await replica.connect()
    try:
        for _ in range(5):
            client_id = uuid7()

            ids = await asyncio.gather(*(ensure(r, client_id) for r in replicas))
            assert len(set(ids)) == 1
    finally:
        for replica in replicas:
            await replica.disconnect()
