"""Training-stage scaling: worker counts, CPU reservations and worker-failure restarts."""

from __future__ import annotations

import pytest

from digr.platform.scaling import ScalingConfig


def test_failure_config_restarts_from_the_latest_checkpoint_by_default() -> None:
    assert ScalingConfig().failure_config().max_failures == 3
    assert ScalingConfig(max_failures=-1).failure_config().max_failures == -1  # no limit
    assert ScalingConfig(cpus_per_worker=2).torch_threads == 2


@pytest.mark.parametrize("field, value", [("num_workers", 0), ("cpus_per_worker", 0), ("max_failures", -2)])
def test_bad_settings_name_the_field(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"ScalingConfig.{field}"):
        ScalingConfig(**{field: value})
