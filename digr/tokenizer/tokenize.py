"""The tokenize stage: RQ-VAE on Ray Train -> Semantic IDs (codes + collision suffix).

The maths lives in `digr.tokenizer.rqvae` (model, losses, training loop) and `digr.tokenizer.sids` (suffix,
statistics); this module only wires them into a `TorchTrainer`: every worker gets the
same embeddings, trains with DDP (gloo on CPU, NCCL on GPU), rank 0 prints progress and
writes the final checkpoint, and the driver assigns the codes from that checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from digr.platform import storage
from digr.platform.scaling import ScalingConfig, say
from digr.tokenizer.rqvae import RQVAE, RQVAEConfig, assign_codes, check_embeddings, train_rqvae
from digr.tokenizer.sids import add_collision_suffix, codebook_usage, codebook_version, collision_rate, prefix_labels

_MODEL = "rqvae.pt"
_META = "meta.json"
LABELS = ("residual", "prefix")


@dataclass(frozen=True)
class TokenizeConfig:
    rqvae: RQVAEConfig = field(default_factory=RQVAEConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    # Epochs between rank-0 progress lines and Ray Train metric reports; 0: only the final
    # one. Not every epoch: a report is a barrier across workers that cost 1-2 s in Ray
    # 2.58 on 2 CPU cores (an RQ-VAE epoch takes ~0.4 s); the full per-epoch history
    # travels in the final checkpoint anyway.
    report_every: int = 10
    # "residual": a SID's level-l code is the RQ-VAE's (TIGER). "prefix": every level after the
    # first is relabelled by its whole prefix (`digr.tokenizer.sids.prefix_labels`): same tree, no token
    # shared across parents, a vocabulary of about levels x N_items tokens. Items cannot be
    # added at serving time with "prefix" (a new prefix has no token).
    labels: str = "residual"

    def __post_init__(self) -> None:
        if self.report_every < 0:
            raise ValueError(f"TokenizeConfig.report_every must be >= 0, got {self.report_every}")
        if self.labels not in LABELS:
            raise ValueError(f"tokenize.labels must be one of {LABELS}, got {self.labels!r}")


@dataclass
class TokenizeResult:
    """sids: (N, levels + 1) int64, row = item_idx, last column the collision suffix, labelled as
    `TokenizeConfig.labels` says; codebook_size: the SIDs' codes per RQ level (the RQ-VAE's, or
    more with labels="prefix"); model_state: the RQ-VAE state dict (CPU tensors); history:
    per-epoch metrics; stats: collision_rate, usage_per_level, suffix_size, max_suffix,
    unique_sids, codebook_version (of these SIDs), ...; checkpoint_path: where Ray Train
    persisted the final checkpoint."""

    sids: np.ndarray
    codebook_size: int
    model_state: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    stats: dict[str, Any]
    checkpoint_path: str


def progress_line(rec: dict[str, Any], epochs: int) -> str:
    """`tokenize epoch 10/50 loss 0.5123 (recon 0.4821 quant 0.0302) unique 93.1% 0.6 s/epoch ETA 24 s`."""
    per_epoch = rec["seconds"] / rec["epoch"]
    eta = (epochs - rec["epoch"]) * per_epoch
    return (
        f"tokenize epoch {rec['epoch']}/{epochs} loss {rec['loss']:.4f} (recon {rec['recon_loss']:.4f} "
        f"quant {rec['quant_loss']:.4f}) unique {100 * rec['unique_sid_rate']:.1f}% "
        f"{per_epoch:.1f} s/epoch ETA {eta:.0f} s"
    )


def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: train on the shared embeddings; every rank reports every
    `report_every` epochs (report is a barrier all ranks must reach), rank 0 alone prints
    and attaches the final checkpoint."""
    import ray
    import ray.train

    cfg: TokenizeConfig = config["cfg"]
    emb: np.ndarray = ray.get(config["emb"])
    torch.set_num_threads(cfg.scaling.torch_threads)
    rank = ray.train.get_context().get_world_rank()
    device = None
    if cfg.scaling.use_gpu:
        import ray.train.torch  # CUDA only: imported where a GPU worker needs it

        device = ray.train.torch.get_device()
    epochs = 1 if cfg.rqvae.method == "rqkmeans" else cfg.rqvae.epochs  # residual k-means: one fit, one record

    def on_epoch(rec: dict[str, Any]) -> None:
        if rec["epoch"] == epochs or not cfg.report_every or rec["epoch"] % cfg.report_every:
            return  # the last epoch is reported below, with the checkpoint
        if rank == 0:
            say(progress_line(rec, epochs))
        ray.train.report(rec)

    model, history = train_rqvae(emb, cfg.rqvae, on_epoch=on_epoch, device=device, image_dim=config["image_dim"])
    last = history[-1]
    if rank != 0:
        ray.train.report(last, checkpoint=None)
        return
    if cfg.report_every:
        say(progress_line(last, epochs))
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, os.path.join(tmp, _MODEL))
        with open(os.path.join(tmp, _META), "w") as f:
            json.dump({"input_dim": model.input_dim, "image_dim": model.image_dim, "rqvae": cfg.rqvae.to_dict(),
                       "history": history}, f)
        ray.train.report(last, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def sid_stats(codes: np.ndarray, sids: np.ndarray, model_state: dict, codebook_size: int) -> dict[str, Any]:
    """codes: (N, L) before the suffix, sids: (N, L + 1) after it -> the stage's statistics."""
    max_suffix = int(sids[:, -1].max())
    return {
        "n_items": int(len(codes)),
        "collision_rate": collision_rate(codes),
        "unique_prefixes": int(np.unique(codes, axis=0).shape[0]),
        "unique_sids": int(np.unique(sids, axis=0).shape[0]),
        "usage_per_level": codebook_usage(codes, codebook_size),
        "max_suffix": max_suffix,
        "suffix_size": max_suffix + 1,
        "codebook_version": codebook_version(model_state, sids),
    }


def run_tokenize(emb: np.ndarray, cfg: TokenizeConfig, storage_dir: str, name: str | None = None,
                 image_dim: int = 0) -> TokenizeResult:
    """Train the RQ-VAE with Ray Train on emb: (N, D) float (row i = item_idx i) and return
    the items' SIDs. image_dim > 0: rows are `digr.tokenizer.fusion.pack_image` rows and the RQ-VAE
    fuses text and image (W_v, W_f) before quantising. `storage_dir` (local or s3://) holds Ray Train's run `name` (default:
    a fresh timestamped name, because a finished RQ-VAE is cheaper to retrain than to resume).
    """
    import ray
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchTrainer

    check_embeddings(emb)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if cfg.scaling.num_workers > len(emb):
        raise ValueError(f"tokenize.scaling.num_workers={cfg.scaling.num_workers} exceeds the {len(emb)} items")
    name = name or f"tokenize_{time.strftime('%Y%m%d-%H%M%S')}_{os.urandom(3).hex()}"
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg, "emb": ray.put(emb), "image_dim": image_dim},
        scaling_config=cfg.scaling.to_ray(),
        run_config=RunConfig(
            storage_path=storage.absolute(storage_dir), name=name, checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=cfg.scaling.failure_config(),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"tokenize run {name!r} under {storage_dir} finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt:
        state = torch.load(os.path.join(ckpt, _MODEL), map_location="cpu")
        with open(os.path.join(ckpt, _META)) as f:
            meta = json.load(f)
    model = RQVAE(meta["input_dim"], cfg.rqvae, meta.get("image_dim", 0))
    model.load_state_dict(state)
    codes = assign_codes(model, emb)
    sids, codebook_size = add_collision_suffix(codes), cfg.rqvae.codebook_size
    if cfg.labels == "prefix":
        sids, codebook_size = prefix_labels(sids)
    return TokenizeResult(
        sids=sids,
        codebook_size=codebook_size,
        model_state=state,
        history=meta["history"],
        stats=sid_stats(codes, sids, state, cfg.rqvae.codebook_size),
        checkpoint_path=result.checkpoint.path,
    )
