"""Fixtures for the CLI tests: the kmock Kubernetes emulator on loopback and a kubeconfig for it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Test modules import the helpers as `ctl_testkit` (a unique name: pytest runs in importlib mode).
sys.path.insert(0, str(Path(__file__).parent))

from ctl_testkit import Emulator, local_run, write_kubeconfig


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    emu = Emulator().start()
    yield emu
    emu.stop()


@pytest.fixture(scope="session")
def kubeconfig(emulator: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_kubeconfig(tmp_path_factory.mktemp("kube") / "config", emulator.url)


@pytest.fixture(scope="session")
def kube_api(kubeconfig: Path) -> Any:
    from kubernetes import config

    return config.new_client_from_config(config_file=str(kubeconfig))


@pytest.fixture
def make_local_run(tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """`make_local_run(stages, name="ux")`: a small local CodaTrainingRun whose data lies under
    this test's tmp_path (ctl_testkit.local_run)."""
    return lambda stages, name="ux": local_run(tmp_path, stages, name)
