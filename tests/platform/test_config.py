"""Config loading: YAML fills frozen dataclasses; bad keys and types name themselves."""

from __future__ import annotations

import pytest

from digr.pipeline.run import PipelineConfig
from digr.platform.config import ConfigError, config_hash, load, parse_overrides


def test_defaults_are_the_embedded_movielens_job() -> None:
    cfg = load(PipelineConfig)
    assert cfg.ingest.source == "movielens-100k"
    assert cfg.evaluate.beam_size == 20


def test_yaml_then_overrides(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("ingest:\n  source: inter-json\n  path: /data\n  name: Scientific\nsft:\n  epochs: 7\n")
    cfg = load(PipelineConfig, str(path), ["sft.epochs=3", "sft.model.d_model=64", "evaluate.ks=5,10"])
    assert (cfg.ingest.source, cfg.ingest.name, cfg.sft.epochs, cfg.sft.model.d_model) == ("inter-json", "Scientific", 3, 64)
    assert cfg.evaluate.ks == (5, 10)


@pytest.mark.parametrize(
    "override, message",
    [
        ("sft.epoch=3", "unknown config key sft.epoch"),
        ("sft.epochs=ten", "sft.epochs: expected an int"),
        ("evaluate.exclude_seen=maybe", "evaluate.exclude_seen: expected a bool"),
        ("ingest.source=parquet", "source"),
        ("nonsense", "not key=value"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(PipelineConfig, None, [override])


def test_missing_file_and_bad_yaml(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load(PipelineConfig, str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load(PipelineConfig, str(bad))


def test_overrides_are_typed_by_the_field() -> None:
    cfg = load(PipelineConfig, None, ["ingest.name=0123", "sft.epochs=3", "evaluate.exclude_seen=false", "evaluate.ks=10"])
    assert (cfg.ingest.name, cfg.sft.epochs, cfg.evaluate.exclude_seen, cfg.evaluate.ks) == ("0123", 3, False, (10,))
    assert parse_overrides(["a.b=3"]) == {"a": {"b": "3"}}


def test_config_hash_changes_with_any_field() -> None:
    a = load(PipelineConfig)
    b = load(PipelineConfig, None, ["sft.lr=0.002"])
    assert config_hash(a) == config_hash(load(PipelineConfig))
    assert config_hash(a) != config_hash(b)


def test_hybrid_ranking_without_a_trained_dense_head_fails_before_any_stage(tmp_path) -> None:
    from digr.pipeline.run import run_pipeline

    cfg = load(PipelineConfig, None, ["evaluate.dense_weight=0.5"])
    with pytest.raises(ValueError, match="sft.dense_weight > 0"):
        run_pipeline(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="dense_weight"):
        load(PipelineConfig, None, ["evaluate.dense_weight=2"])


def test_image_evidence_with_rqkmeans_fails_before_any_stage(tmp_path) -> None:
    from digr.pipeline.run import run_pipeline

    cfg = load(PipelineConfig, None, ["embed.evidence=[image]", "tokenize.rqvae.method=rqkmeans"])
    with pytest.raises(ValueError, match="tokenize.rqvae.method=rqvae"):
        run_pipeline(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="method"):
        load(PipelineConfig, None, ["tokenize.rqvae.method=kmeans"])
