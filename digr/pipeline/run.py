"""The whole pipeline: ingest -> [images -> caption] -> [mine -> label] -> embed -> tokenize -> sft -> evaluate.

Stages in brackets run when their config says `enabled: true`, when a job asks for them by
name, or when the embed stage reads their output (`embed.evidence`: "caption", "intents";
IEID). They are off by default because they are slow on 2 CPU cores.

Each stage is a function `(stage_dir) -> info` run through `Run.stage`, which skips it when
its inputs, config and code are unchanged, and resumes it when it was killed part-way. A
stage's code is the package function it calls, what that can run (`digr.platform.codekey`), and
`run_pipeline` itself.
A stage job (`python -m jobs.sft`) runs the pipeline up to that stage: upstream stages
that are already finished cost nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from digr.data.ingest import IngestConfig
from digr.eval.evaluate import EvalConfig
from digr.evidence.caption import CaptionConfig
from digr.evidence.embed import EmbedConfig
from digr.evidence.images import ImagesConfig
from digr.evidence.label import LabelConfig
from digr.evidence.mine import MineConfig, load_prompt
from digr.platform import storage
from digr.platform.config import ConfigError
from digr.platform.runs import Run, file_hash
from digr.rec.sft import SFTConfig
from digr.rl.grpo import GRPOConfig
from digr.tokenizer.tokenize import TokenizeConfig

STAGES = ("ingest", "images", "caption", "mine", "label", "embed", "tokenize", "sft", "grpo", "evaluate")


@dataclass(frozen=True)
class RayConfig:
    address: str = ""   # "" = $RAY_ADDRESS when set (ray job submit), else start a local Ray
    num_cpus: int = 0   # logical CPUs of a local Ray; 0 = max(4, cores): Data actors, Train workers and
                        # the Train controller each reserve CPUs, and 2 real cores would deadlock them


@dataclass(frozen=True)
class PipelineConfig:
    ingest: IngestConfig = field(default_factory=IngestConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    label: LabelConfig = field(default_factory=LabelConfig)  # runs whenever mine does
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def init_ray(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
    else:
        start_local_ray(cfg.num_cpus or max(4, os.cpu_count() or 1))


def start_local_ray(num_cpus: int, **init_kwargs: Any) -> None:
    """`ray.init` of a new local Ray whose workers query this Ray's own State API.

    Ray Train starts a placement-group cleaner beside every training run that asks the State
    API each second whether the run's controller is alive, and removes the run's placement
    group (killing its workers) when the answer is no. The State API is served by the
    dashboard; a worker of a Ray started without one asks http://127.0.0.1:8265, the default
    dashboard address, and gets either "connection refused" (the cleaner then logs a warning
    a second for the whole run) or, once any other Ray on the machine holds that port
    (another job, the tests, `ray start --head` for `ray job submit`), that Ray's answer: "no
    such actor", and a healthy run is killed (seen: an SFT run killed in epoch 2). A dashboard
    alone is not enough: with two Rays on the machine a worker's client finds both and gives up
    ("Found multiple active Ray instances"). So: a dashboard on loopback at a port picked here,
    and every worker of this job pointed at it (`RAY_API_SERVER_ADDRESS`, which the State API
    client reads before anything else). tests/pipeline/test_pipeline.py checks it with a second Ray up.
    """
    import socket

    import ray

    with socket.socket() as sock:  # a free port now; Ray binds it a moment later
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    runtime_env = {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}
    # address="local": a new Ray even where `ray start` left one (a bare `ray.init()` would join
    # that one, and refuse num_cpus); joining a cluster is `ray.address` / RAY_ADDRESS.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, runtime_env=runtime_env, **init_kwargs)


def run_pipeline(cfg: PipelineConfig, output: str, until: str = "evaluate",
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage up to and including `until` in run directory `output` (local or s3://)."""
    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}; stages are {', '.join(STAGES)}")
    if cfg.evaluate.dense_weight and not cfg.sft.dense_weight:  # checked before hours of training, not after
        raise ConfigError(f"evaluate.dense_weight={cfg.evaluate.dense_weight} ranks with the dense head, "
                         "which only a model trained with sft.dense_weight > 0 has")
    if "image" in cfg.embed.evidence and cfg.tokenize.rqvae.method == "rqkmeans":
        raise ConfigError("embed.evidence includes 'image', whose text-image fusion only the RQ-VAE trains; "
                         "tokenize.rqvae.method='rqkmeans' has none: set tokenize.rqvae.method=rqvae")
    from digr.pipeline import stages

    # Ingest runs on the driver before Ray starts: a missing or malformed data file fails in
    # a second, with its one-line error, not after Ray's start-up.
    inputs = {os.path.basename(p): file_hash(p) for p in stages.ingest_inputs(cfg.ingest)}
    run = Run(output, cfg, log=log, code_context=(run_pipeline,))
    wanted = STAGES[: STAGES.index(until) + 1]
    try:
        run.stage("ingest", cfg.ingest, lambda d: stages.ingest_stage(cfg.ingest, d), inputs=inputs,
                  code=stages.ingest_stage)
        if until != "ingest":
            init_ray(cfg.ray)
        # Evidence stages run when enabled, when a job asks for them, or when embed reads them (IEID).
        needs_caption = "caption" in cfg.embed.evidence and "embed" in wanted
        needs_intents = "intents" in cfg.embed.evidence and "embed" in wanted
        needs_image = "image" in cfg.embed.evidence and "embed" in wanted
        if until in ("images", "caption") or ("images" in wanted and (cfg.images.enabled or needs_caption
                                                                      or needs_image)):
            from digr.evidence.images import LABELS_FILE, images_stage

            # Files the stages read that are not Python (so not in their code key) are inputs.
            run.stage("images", cfg.images, lambda d: images_stage(cfg.images, run.path("ingest"), d),
                      depends=("ingest",), inputs={"imagenet_classes": file_hash(str(LABELS_FILE))},
                      code=images_stage)
        if until == "caption" or ("caption" in wanted and (cfg.caption.enabled or needs_caption)):
            from digr.evidence.caption import caption_stage

            prompts = {"prompt": load_prompt(cfg.caption.prompt).version,
                       "vlm_prompt": load_prompt(cfg.caption.vlm_prompt).version}
            run.stage("caption", cfg.caption,
                      lambda d: caption_stage(cfg.caption, run.path("ingest"), run.path("images"), d),
                      depends=("ingest", "images"), inputs=prompts, code=caption_stage)
        mine_runs = until in ("mine", "label") or ("mine" in wanted and (cfg.mine.enabled or needs_intents))
        if mine_runs:
            from digr.evidence.mine import mine_stage

            # The reply cache sits beside the stage folder, which a changed stage key clears;
            # the prompt's version is an input because the code hash covers *.py files only.
            run.stage("mine", cfg.mine,
                      lambda d: mine_stage(cfg.mine, run.path("ingest"), d, run.path("mine_cache")),
                      depends=("ingest",), inputs={"prompt": load_prompt(cfg.mine.prompt).version}, code=mine_stage)
        if mine_runs and "label" in wanted:
            from digr.evidence.label import label_stage

            judges = {"judge_prompt": load_prompt(cfg.label.judge_prompt).version} if cfg.label.judges else {}
            run.stage("label", cfg.label, lambda d: label_stage(cfg.label, run.path("ingest"), run.path("mine"), d),
                      depends=("ingest", "mine"), inputs=judges, code=label_stage)
        embed_info: dict[str, Any] = {}
        if "embed" in wanted:
            evidence = ((("caption",) if needs_caption else ()) + (("mine", "label") if needs_intents else ())
                        + (("images",) if needs_image else ()))
            embed_info = run.stage("embed", cfg.embed,
                                   lambda d: stages.embed_stage(
                                       cfg.embed, run.path("ingest"), d, run.path("caption") if needs_caption else None,
                                       run.path("mine") if needs_intents else None,
                                       run.path("label") if needs_intents else None,
                                       run.path("images") if needs_image else None),
                                   depends=("ingest", *evidence), code=stages.embed_stage)
        if "tokenize" in wanted:
            image_dim = int(embed_info.get("stats", {}).get("image_dim", 0))
            run.stage("tokenize", cfg.tokenize,
                      lambda d: stages.tokenize_stage(cfg.tokenize, run.path("embed"), d, image_dim),
                      depends=("embed",), code=stages.tokenize_stage)
        if "sft" in wanted:
            run.stage("sft", cfg.sft,
                      lambda d: stages.sft_stage(cfg.sft, run.path("ingest"), run.path("embed"), run.path("tokenize"), d),
                      depends=("ingest", "embed", "tokenize"), code=stages.sft_stage)
        grpo_runs = until == "grpo" or ("grpo" in wanted and cfg.grpo.enabled)
        if grpo_runs:
            if cfg.grpo.max_history != cfg.sft.max_history:
                raise ValueError(f"grpo.max_history={cfg.grpo.max_history} must equal sft.max_history={cfg.sft.max_history}")
            label = mine_runs and "label" in wanted
            run.stage("grpo", cfg.grpo,
                      lambda d: stages.grpo_stage(cfg.grpo, run.path("ingest"), run.path("sft"),
                                                  run.path("label") if label else None, d),
                      depends=("ingest", "sft", *(("label",) if label else ())),
                      code=stages.grpo_stage)
        result: dict[str, Any] = {}
        if "evaluate" in wanted:
            info = run.stage("evaluate", cfg.evaluate,
                             lambda d: stages.evaluate_stage(cfg.evaluate, run.path("ingest"), run.path("tokenize"),
                                                             run.path("sft"), d, cfg.sft.max_history,
                                                             run.path("grpo") if grpo_runs else None),
                             depends=("ingest", "tokenize", "sft", *(("grpo",) if grpo_runs else ())),
                             code=stages.evaluate_stage)
            result = info["metrics"]
            final = "generative_grpo" if grpo_runs else "generative"  # the model the run ends with
            storage.write_json(run.path("metrics.json"), {**result[final], "final_model": final, "models": result})
    finally:
        run.write_manifest()
    if "evaluate" in wanted:
        from digr.eval.report import metrics_table, write_report

        tok = storage.read_json(storage.join(run.path("tokenize"), "tokenizer.json"))
        sft_hist = storage.read_json(storage.join(run.path("sft"), "history.json"))
        path = write_report(run.dir, result, tok["stats"], tok["history"], sft_hist, run.manifest())
        log("\n" + metrics_table(result))
        if "sasrec" in result:
            log(f"sasrec: {cfg.evaluate.sasrec.recipe()}")
        log(f"\nrun directory: {run.dir}\nreport: {path}")
    return result


