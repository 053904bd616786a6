"""Fixtures of the operator tests (the kit itself is in operator_testkit.py)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

sys.path.insert(0, str(Path(__file__).parent))

from operator_testkit import Cluster, OperatorTask, emulated_cluster


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with emulated_cluster() as c:
        yield c


@pytest_asyncio.fixture
async def operator(cluster: Cluster) -> AsyncIterator[OperatorTask]:
    op = OperatorTask(cluster.url)
    await op.start()
    try:
        yield op
    finally:
        await op.stop_gracefully()
