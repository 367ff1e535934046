"""How many Ray Train workers a training stage uses (shared by tokenize, SFT and GRPO), and
`say`, their workers' progress lines."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # ray is imported lazily so pure-core users do not pay for it
    import ray.train


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Worker-group restarts after a worker or its node dies (Ray Train's FailureConfig): each
    # restart resumes from the run's latest checkpoint, on whatever nodes are left or added.
    max_failures: int = 3

    def __post_init__(self) -> None:
        if self.max_failures < -1:
            raise ValueError(f"ScalingConfig.max_failures must be >= -1 (-1 = no limit), got {self.max_failures}")
        if self.num_workers < 1:
            raise ValueError(f"ScalingConfig.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"ScalingConfig.cpus_per_worker must be > 0, got {self.cpus_per_worker}")

    @property
    def torch_threads(self) -> int:
        """Intra-op threads per worker: one per reserved CPU. More threads than reserved
        cores make small-tensor training several times slower on a shared machine."""
        return max(1, int(self.cpus_per_worker))

    def to_ray(self) -> ray.train.ScalingConfig:
        import ray.train

        resources: dict[str, float] = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = 1.0
        return ray.train.ScalingConfig(
            num_workers=self.num_workers, use_gpu=self.use_gpu, resources_per_worker=resources
        )


    def failure_config(self) -> ray.train.FailureConfig:
        import ray.train

        return ray.train.FailureConfig(max_failures=self.max_failures)


def say(line: str) -> None:
    """Print one progress line from a Ray Train worker, once.

    Ray Train replaces `print` in its workers with one that both prints (Ray wraps a worker's
    stdout) and logs through the root logger, and the driver shows both: every line twice.
    Written to stdout directly, it shows once, still prefixed with the worker's name and pid.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
