"""The sweep: its pure parts on hand-made spaces, and one real Tune grid on a small slice."""

from __future__ import annotations

import json

import pytest

from digr.pipeline.sweep import METRIC, grid, parse_space, pick_best, run_sweep, trial_overrides
from digr.platform.config import ConfigError


def test_space_parses_to_a_grid_in_key_order() -> None:
    space = parse_space("sft.lr: [0.001, 0.003]\nsft.model.dropout: [0.1, 0.2, 0.3]\n")
    combos = grid(space)
    assert len(combos) == 6
    assert combos[0] == {"sft.lr": 0.001, "sft.model.dropout": 0.1}
    assert combos[-1] == {"sft.lr": 0.003, "sft.model.dropout": 0.3}


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "non-empty mapping"),
    ("", "non-empty mapping"),
    ("sft.lr: 0.001", "sft.lr must map to a non-empty list"),
    ("sft.lr: []", "sft.lr must map to a non-empty list"),
    ("sft.lr: [0.1\n", "not valid YAML"),
])
def test_bad_spaces_give_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_space(text, "--space s.yaml")


def test_overrides_render_lists_and_bools_as_the_config_parser_reads_them() -> None:
    assert trial_overrides({"sft.lr": 0.001, "embed.evidence": ["intents", "captions"], "images.enabled": True}) == [
        "sft.lr=0.001", "embed.evidence=[intents,captions]", "images.enabled=true"]


def test_best_is_the_highest_valid_score_first_among_ties_and_failures_never_win() -> None:
    trials = [{"params": {"a": 1}, METRIC: 0.2}, {"params": {"a": 2}, METRIC: None},
              {"params": {"a": 3}, METRIC: 0.3}, {"params": {"a": 4}, METRIC: 0.3}]
    assert pick_best(trials)["params"] == {"a": 3}
    with pytest.raises(RuntimeError, match="no trial"):
        pick_best([{"params": {}, METRIC: None}])


def test_a_bad_value_in_the_space_fails_before_any_trial(tmp_path) -> None:
    with pytest.raises(ConfigError, match="sft.epochs"):
        run_sweep(None, [], {"sft.epochs": [2, "many"]}, str(tmp_path / "sweep"))
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_sweep_picks_on_valid_and_reads_test_once(ray_local, scientific_dir, tmp_path) -> None:
    base = [f"ingest.path={scientific_dir}", "ingest.source=inter-json", "ingest.name=Scientific",
            "ingest.max_users=300", "tokenize.rqvae.epochs=20", "tokenize.rqvae.codebook_size=16",
            "sft.epochs=2", "sft.batch_size=64", "sft.valid_users=100", "sft.model.d_model=32", "sft.model.d_kv=8",
            "sft.model.d_ff=64", "sft.model.num_heads=4", "evaluate.baselines=[popularity]"]
    out = tmp_path / "sweep"
    logs: list[str] = []
    summary = run_sweep(None, base, {"sft.lr": [0.0001, 0.003]}, str(out), log=logs.append)

    assert [t["params"] for t in summary["trials"]] == [{"sft.lr": 0.0001}, {"sft.lr": 0.003}]
    scores = [t[METRIC] for t in summary["trials"]]
    assert all(s is not None for s in scores), summary["trials"]
    assert summary["best"]["params"] == summary["trials"][scores.index(max(scores))]["params"]
    # Trials reuse the base run's stages; only the best trial reaches evaluate (test).
    for t in summary["trials"]:
        manifest = json.loads((out / "trials" / t["run_dir"].split("/")[-1] / "manifest.json").read_text())
        assert manifest["stages"]["tokenize"]["skipped"] and not manifest["stages"]["sft"]["skipped"]
        assert "evaluate" not in manifest["stages"]
    best = json.loads((out / "best" / "manifest.json").read_text())
    assert best["stages"]["sft"]["skipped"] and "evaluate" in best["stages"]
    assert set(summary["test"]) == {"generative", "popularity"}
    assert json.loads((out / "sweep.json").read_text())["best"]["params"] == summary["best"]["params"]
