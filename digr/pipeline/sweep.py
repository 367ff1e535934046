"""Config search on the valid split, on Ray Tune: a user's new dataset gets its own settings
without editing YAML, and test is read once, by the chosen config only.

A search space is a YAML mapping of dotted config keys to the values to try, e.g.

    sft.lr: [0.001, 0.003]
    sft.model.dropout: [0.1, 0.2]
    tokenize.rqvae.codebook_size: [128, 256]

Every combination (a grid, `tune.grid_search`) is a Tune trial that runs the pipeline up to
sft in its own run directory and reports the SFT model's best valid NDCG@10 (the score SFT
early-stops on; sft.valid_users rows of the valid split). Trials start from a copy of a
shared base run directory, so stages a trial does not change (ingest, embed, and tokenize
when only sft.* keys vary) are reused through the run directory's stage keys, not recomputed.
The best trial by valid NDCG@10 is then run to the end (evaluate) in <output>/best: the only
time any trial's test split is scored.

Pure core: `parse_space`, `trial_overrides`, `pick_best`. Ray wrapper: `run_sweep` (Tune).
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from digr.pipeline.run import PipelineConfig, run_pipeline
from digr.platform.config import ConfigError, load

METRIC = "valid_ndcg@10"


def parse_space(text: str, source: str = "search space") -> dict[str, list[Any]]:
    """YAML text -> {dotted key: non-empty list of values}. One-line errors name the bad entry."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {e}") from e
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{source} must be a non-empty mapping of config keys to lists of values")
    space = {}
    for key, values in data.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: {key} must map to a non-empty list of values, got {values!r}")
        space[str(key)] = values
    return space


def grid(space: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, in key order: [{key: value}, ...]."""
    keys = list(space)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(space[k] for k in keys))]


def trial_overrides(params: dict[str, Any]) -> list[str]:
    """{"sft.lr": 0.001, "embed.evidence": ["intents"]} -> ["sft.lr=0.001", "embed.evidence=[intents]"]."""
    out = []
    for key, value in params.items():
        text = "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(value).lower() \
            if isinstance(value, bool) else str(value)
        out.append(f"{key}={text}")
    return out


def check_space(config: str | None, base: list[str], space: dict[str, list[Any]]) -> None:
    """Every combination must make a valid PipelineConfig: fail before any trial starts."""
    for params in grid(space):
        try:
            load(PipelineConfig, config, [*base, *trial_overrides(params)])
        except (ConfigError, ValueError, TypeError) as e:
            raise ConfigError(f"search space: {params} gives an invalid config: {e}") from e


def pick_best(results: list[dict[str, Any]]) -> dict[str, Any]:
    """results: [{"params": {...}, METRIC: float | None, ...}] -> the best by METRIC (first among
    ties: the grid's order). Trials without a score (failed) never win."""
    scored = [r for r in results if r.get(METRIC) is not None]
    if not scored:
        raise RuntimeError("sweep: no trial reported a valid score (all failed); see the trial logs")
    return max(scored, key=lambda r: r[METRIC])


def sft_score(run_dir: Path) -> dict[str, Any]:
    """A finished run up to sft -> {METRIC, "best_epoch", "epochs_run"} from its manifest."""
    stats = json.loads((run_dir / "manifest.json").read_text())["stages"]["sft"]["stats"]
    return {METRIC: stats["best_valid_ndcg@10"], "best_epoch": stats["best_epoch"], "epochs_run": stats["epochs_run"]}


def run_sweep(config: str | None, base: list[str], space: dict[str, list[Any]], output: str,
              concurrency: int = 1, trial_cpus: float = 1.0, evaluate_best: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the grid as Tune trials, then the best trial to the end. Returns {"trials": [...],
    "best": {...}, "test": metrics of the best config or None}. output: a local directory."""
    from ray import tune

    from digr.pipeline.run import init_ray

    check_space(config, base, space)
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base_dir = out / "base"
    cfg = load(PipelineConfig, config, base)
    init_ray(cfg.ray)
    log(f"sweep: {len(grid(space))} trials over {', '.join(space)}; shared stages in {base_dir}")
    run_pipeline(cfg, str(base_dir), until="tokenize", log=log)  # what every trial starts from

    def trial(params: dict[str, Any]) -> None:
        overrides = trial_overrides(params)
        name = "trial-" + "-".join(o.replace("/", "_") for o in overrides)
        trial_dir = out / "trials" / name
        if not trial_dir.exists():
            shutil.copytree(base_dir, trial_dir)
        run_pipeline(load(PipelineConfig, config, [*base, *overrides]), str(trial_dir), until="sft",
                     log=lambda m: None)
        tune.report({**sft_score(trial_dir), "run_dir": str(trial_dir)})

    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": trial_cpus}),
        param_space={k: tune.grid_search(v) for k, v in space.items()},
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name="sweep", storage_path=str(out / "tune"), verbose=0),
    )
    grid_results = tuner.fit()
    trials = []
    for result in grid_results:
        row = {"params": {k: result.config[k] for k in space}, METRIC: None, "error": None}
        if result.error is not None:
            row["error"] = str(result.error).splitlines()[0][:300]
        elif result.metrics:
            row.update({k: result.metrics.get(k) for k in (METRIC, "best_epoch", "epochs_run", "run_dir")})
        trials.append(row)
    order = {json.dumps(p, sort_keys=True, default=str): i for i, p in enumerate(grid(space))}
    trials.sort(key=lambda r: order.get(json.dumps(r["params"], sort_keys=True, default=str), len(order)))
    best = pick_best(trials)
    log("\nsweep trials (valid split):")
    for r in trials:
        score = f"{r[METRIC]:.4f} (epoch {r['best_epoch']})" if r[METRIC] is not None else f"FAILED: {r['error']}"
        log(f"  {' '.join(trial_overrides(r['params']))}: {METRIC} {score}")
    log(f"best: {' '.join(trial_overrides(best['params']))} ({METRIC} {best[METRIC]:.4f})")
    summary: dict[str, Any] = {"space": space, "base_overrides": base, "trials": trials, "best": best, "test": None}
    if evaluate_best:
        best_dir = out / "best"
        if not best_dir.exists():
            shutil.copytree(best["run_dir"], best_dir)
        summary["test"] = run_pipeline(load(PipelineConfig, config, [*base, *trial_overrides(best["params"])]),
                                       str(best_dir), log=log)
    (out / "sweep.json").write_text(json.dumps(summary, indent=1, default=str))
    log(f"sweep summary: {out / 'sweep.json'}")
    return summary
