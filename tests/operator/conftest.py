"""Fixtures of the operator tests (the kit itself is in operator_testkit.py)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import kmock
import pytest_asyncio

sys.path.insert(0, str(Path(__file__).parent))

from operator_testkit import (
    RESOURCES,
    TRAINER_SERVICE_ACCOUNT,
    Cluster,
    Emulator,
    OperatorTask,
)


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[Cluster]:
    emulator = Emulator()
    for key, info in RESOURCES.items():
        emulator.resources[key] = kmock.ResourceInfo(**info)
    async with emulator, kmock.Server(emulator) as server:
        c = Cluster(emulator, server)
        await c.create("serviceaccounts", TRAINER_SERVICE_ACCOUNT)
        try:
            yield c
        finally:
            await c.close()


@pytest_asyncio.fixture
async def operator(cluster: Cluster) -> AsyncIterator[OperatorTask]:
    op = OperatorTask(cluster.url)
    await op.start()
    try:
        yield op
    finally:
        await op.stop_gracefully()
