"""Shared fixtures: one local Ray for the whole session (starting Ray costs seconds)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SCIENTIFIC = SHARED_DATA / "amazon-scientific"


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 4 logical CPUs on a 2-core machine, so Data actors, Train workers
    and Serve replicas that each reserve a CPU cannot deadlock one another."""
    import ray

    from digr.pipeline.run import start_local_ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    if not ray.is_initialized():  # as the pipeline starts one: its workers query its own State API
        start_local_ray(4, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def scientific_dir() -> Path:
    if not (SCIENTIFIC / "Scientific.inter.json").exists():
        pytest.fail(f"real data missing: {SCIENTIFIC} (../shared/data must sit beside the project)")
    return SCIENTIFIC
