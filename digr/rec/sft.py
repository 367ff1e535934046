"""SFT: teach the T5 to generate the next item's Semantic ID from a user's history.

TIGER (Rajput et al. 2023): history SID tokens -> next item's SID tokens, cross-entropy on
the `sid_len` target tokens, AdamW with warmup + cosine decay. Model selection by valid
NDCG@10 from constrained beam search (`digr.rec.decode`), early stopping on it.

Ray wrapper: one Ray Train V2 `TorchTrainer` run. Every epoch rank 0 reports a checkpoint
(model, optimizer, scheduler, loop state and the best model so far). Re-running `run_sft`
with the same `storage_dir`/`name` resumes: Ray Train V2 reloads its checkpoint-manager
snapshot from `<storage_dir>/<name>` and hands the latest checkpoint to
`ray.train.get_checkpoint()`; a finished run resumes into a no-op and returns its result.

Artifacts of the best model: `save_model` / `load_model` (a transformers directory for the
T5, `encoder_inputs.pt` for the history embedding, vocab.json + the item SID codes), local or `s3://`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from transformers import T5ForConditionalGeneration, get_cosine_schedule_with_warmup

from digr.platform import storage
from digr.platform.scaling import ScalingConfig, say
from digr.rec.seqmodel import ModelConfig, SidRecommender, SidVocab
from digr.rec.sft_data import Examples, SidCollate, SidDataset, select_examples, target_weights, vocab_for

KEEP_CHECKPOINTS = 2  # the latest is enough to resume; one spare in case the latest write was cut
_VALID_BATCH = 128  # histories per validation batch (beam search holds B * beam hypotheses)
_TRAIN_STATE, _BEST_MODEL, _META = "train_state.pt", "best_model.pt", "meta.json"
_ENCODER_INPUTS = "encoder_inputs.pt"  # SidRecommender state outside the T5 (SID table, item embedding, content)


@dataclass(frozen=True)
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping
    # Exponential moving average of the weights (torch.optim.swa_utils), updated every step with
    # this decay; validation, early stopping and the saved best model then use the averaged
    # weights. 0 = off (the raw weights).
    ema_decay: float = 0.0
    max_history: int = 20  # items fed to the encoder
    max_train_examples_per_user: int = 0  # 0 = all sliding-window targets; else each user's last N
    # Loss weight of an example = count(its target among training targets)^-power, mean 1
    # (`sft_data.target_weights`); 0 = plain mean. Raises rarely-seen targets against popular ones.
    target_weight_power: float = 0.0
    # LIGER-style dense head (Yang et al. 2024): adds dense_weight x the cross-entropy over all
    # items of the decoder's start-position output against every item's input vector
    # (`SidRecommender.dense_logits`); 0 = generative loss only. Ranking with it: evaluate.dense_weight.
    dense_weight: float = 0.0
    eval_every: int = 1  # epochs between validations (the last epoch always validates)
    patience: int = 5  # validations without a better valid NDCG@10 before stopping
    valid_users: int = 2000  # validate on at most this many valid rows (seeded subset)
    valid_beam: int = 20
    valid_exclude_seen: bool = True  # rank as evaluate does by default: no item from the history
    seed: int = 0
    threads_per_worker: int = 0  # torch.set_num_threads in each worker (0 = leave Ray's default)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "eval_every", "patience", "valid_users", "max_history")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"sft.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "max_train_examples_per_user", "threads_per_worker", "target_weight_power",
                     "dense_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"sft.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(
                f"sft: need lr > 0, weight_decay >= 0, grad_clip >= 0; got {self.lr}, {self.weight_decay}, {self.grad_clip}"
            )
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"sft.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.valid_beam < 10:
            raise ValueError(f"sft.valid_beam must be >= 10 (validation ranks the top 10), got {self.valid_beam}")


@dataclass(frozen=True, eq=False)
class SFTResult:
    """model_state: the best epoch's `SidRecommender` state_dict (CPU tensors); history: one dict per epoch."""

    model_state: dict[str, torch.Tensor]
    model_config: dict[str, Any]
    vocab: SidVocab
    history: list[dict[str, Any]]
    best_epoch: int
    stopped_early: bool
    checkpoint_path: str = ""

    def model(self) -> SidRecommender:
        return SidRecommender.from_state(self.vocab, ModelConfig(**self.model_config), self.model_state).eval()


# ---------------------------------------------------------------- pure pieces


def sft_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], dense_weight: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the batch's (B, sid_len) target tokens (`SidRecommender.forward`,
    possibly DDP-wrapped), weighted per example when the batch has "weights" (B,), plus
    dense_weight x the dense head's item cross-entropy."""
    return model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch.get("weights"),
                 batch["targets"], dense_weight)


def seen_items(histories: list[list[int]], n_items: int) -> torch.Tensor:
    """(B, n_items) bool, True where the item is in that row's history."""
    mask = torch.zeros((len(histories), n_items), dtype=torch.bool)
    rows = [r for r, h in enumerate(histories) for _ in h]
    mask[rows, [i for h in histories for i in h]] = True
    return mask


@torch.no_grad()
def validate(
    model: SidRecommender,
    trie: Any,
    valid: Examples,
    max_history: int,
    beam_size: int,
    exclude_seen: bool,
    device: torch.device | str = "cpu",
    dense_weight: float = 0.0,
) -> dict[str, float]:
    """Teacher-forced loss (the training loss, dense term included) and beam-search HR@10 /
    NDCG@10 on `valid` rows.

    Returns {"loss", "hr@10", "ndcg@10"}.
    """
    from digr.data.metrics import hr_ndcg
    from digr.rec.decode import recommend

    was_training = model.training
    model.eval()
    sid_tokens = model.sid_tokens.cpu()
    collate = SidCollate(sid_tokens, max_history, model.cfg.encoder_input)
    dataset = SidDataset(valid)
    loss_sum, ranked = 0.0, []
    for start in range(0, len(dataset), _VALID_BATCH):
        rows = [dataset[i] for i in range(start, min(start + _VALID_BATCH, len(dataset)))]
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        loss_sum += float(sft_step(model, batch, dense_weight)) * len(rows)
        # Seen items come from the kept history: the same input the model saw.
        exclude = seen_items([h[-max_history:] for h, _ in rows], sid_tokens.shape[0]) if exclude_seen else None
        out = recommend(model, trie, [h for h, _ in rows], max_history, beam_size=beam_size, top_k=10,
                        exclude=exclude.to(device) if exclude is not None else None)
        ranked.append(out.items.cpu().numpy())
    model.train(was_training)
    metrics = hr_ndcg(np.concatenate(ranked), valid.targets, ks=(10,))
    return {"loss": loss_sum / len(dataset), "hr@10": metrics["hr@10"], "ndcg@10": metrics["ndcg@10"]}


def progress_line(epoch: int, epochs: int, step: int, row: dict[str, Any], best: float, best_epoch: int,
                  seconds: list[float]) -> str:
    """`sft epoch 3/30 step 480 loss 2.31 valid ndcg@10 0.0213 (best 0.0230 @2) 41 s/epoch ETA 18 min`."""
    ndcg = row.get("valid_ndcg@10")
    valid = f"{ndcg:.4f}" if ndcg is not None else "-"
    per_epoch = sum(seconds) / len(seconds)
    eta = (epochs - epoch) * per_epoch / 60
    return (f"sft epoch {epoch}/{epochs} step {step} loss {row['train_loss']:.2f} valid ndcg@10 {valid} "
            f"(best {max(best, 0.0):.4f} @{best_epoch}) {per_epoch:.0f} s/epoch ETA {eta:.0f} min")


# ---------------------------------------------------------------- the Ray Train loop


@dataclass
class LoopState:
    """What a checkpoint needs beyond the tensors to resume the loop where it stopped."""

    epoch: int = 0  # epochs finished
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_ndcg: float = -1.0
    best_epoch: int = 0
    bad_evals: int = 0
    stopped_early: bool = False


def track_best(state: LoopState, ndcg: float, epoch: int) -> bool:
    """Record one validation; True when it beats the best so far (a tie is no improvement)."""
    if ndcg > state.best_ndcg:
        state.best_ndcg, state.best_epoch, state.bad_evals = ndcg, epoch, 0
        return True
    state.bad_evals += 1
    return False


def check_resumable(meta: dict[str, Any], model: ModelConfig, vocab: SidVocab) -> None:
    """Raise unless a checkpoint's meta.json describes the same network as this run."""
    expected = {"model_config": dataclasses.asdict(model), "vocab": dataclasses.asdict(vocab)}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise ValueError(f"sft resume: the checkpoint's {key} {meta.get(key)} differs from this run's {value}; "
                             "use a new run name or delete the old run directory")


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _all_ranks(value: torch.Tensor, op: str) -> torch.Tensor:
    """Sum over ranks (op="sum") or take rank 0's value (op="bcast"); a no-op on one worker."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if op == "sum":
            dist.all_reduce(value)
        else:
            dist.broadcast(value, src=0)
    return value


def _train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker; rank 0 validates, prints and writes checkpoints."""
    import ray
    import ray.train
    import ray.train.torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from torch.utils.data import DataLoader, DistributedSampler

    from digr.rec.trie import SidTrie

    cfg: SFTConfig = config["cfg"]
    data = ray.get(config["data"])
    if cfg.threads_per_worker:
        torch.set_num_threads(cfg.threads_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    vocab: SidVocab = data["vocab"]
    sid_tokens = vocab.encode(torch.tensor(data["sids"]))  # a copy: object-store arrays are read-only

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    features = torch.from_numpy(np.array(data["features"])) if data["features"] is not None else None
    model = SidRecommender(vocab, cfg.model, sid_tokens, features).to(device)
    dataset = SidDataset(data["train"])
    # DistributedSampler pads to equal shards, so every rank runs the same number of steps.
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    weights = (target_weights(data["train"].targets, len(sid_tokens), cfg.target_weight_power)
               if cfg.target_weight_power else None)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                        collate_fn=SidCollate(sid_tokens, cfg.max_history, cfg.model.encoder_input, weights))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state, best_state, saved = LoopState(), None, None

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            with open(os.path.join(ckpt_dir, _META)) as f:
                check_resumable(json.load(f), cfg.model, vocab)
            saved = torch.load(os.path.join(ckpt_dir, _TRAIN_STATE), map_location=device, weights_only=False)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            state = LoopState(**saved["state"])
            if rank == 0:
                best_state = torch.load(os.path.join(ckpt_dir, _BEST_MODEL), map_location="cpu")
        if rank == 0:
            say(f"sft resuming after epoch {state.epoch} (step {state.step})")
    # Total steps counted from where we are: a resume with more epochs or another number of
    # workers (other steps per epoch) still decays to zero exactly at the last epoch.
    total_steps = state.step + max(cfg.epochs - state.epoch, 0) * len(loader)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, max(total_steps, 1))
    if saved is not None:
        scheduler.load_state_dict(saved["scheduler"])  # the step count; the lambda is the new one
        # Making the scheduler set every group's lr to the schedule's step-0 value (0 in warmup);
        # the next step must use the (new) schedule's value at the resumed step.
        for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * fn(scheduler.last_epoch)

    # DDP when world > 1 (gloo on CPU, nccl on GPU). The buffers (SID table, content vectors)
    # are the same constants on every rank: no need to re-broadcast megabytes every step.
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})
    plain = model.module if hasattr(model, "module") else model
    ema = None
    if cfg.ema_decay and rank == 0:  # only rank 0 validates, so only it keeps the average
        ema = AveragedModel(plain, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
        if saved is not None and saved.get("ema") is not None:  # else the average starts from the resumed weights
            ema.load_state_dict(saved["ema"])
    evaluated = ema.module if ema is not None else plain  # what validation scores and the best model is
    trie = SidTrie.from_codes(data["sids"], vocab).to(device) if rank == 0 else None
    epoch_seconds = [r["seconds"] for r in state.history]
    if saved is not None and saved.get("rng") is not None:
        torch.set_rng_state(saved["rng"].cpu())
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([t.cpu() for t in saved["cuda_rng"]])

    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        if state.stopped_early:
            break
        start = time.perf_counter()
        sampler.set_epoch(epoch)
        model.train()
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # (loss * rows, rows)
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = sft_step(model, batch, cfg.dense_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(plain)
            state.step += 1
            rows = len(batch["targets"])
            totals += torch.stack([loss.detach().double() * rows, totals.new_tensor(rows)])  # no GPU sync per step
        totals = _all_ranks(totals, "sum")
        row: dict[str, Any] = {"epoch": epoch, "step": state.step, "train_loss": float(totals[0] / totals[1]),
                               "valid_loss": None, "valid_ndcg@10": None, "valid_hr@10": None}
        stop = False
        if rank == 0 and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            v = validate(evaluated, trie, data["valid"], cfg.max_history, cfg.valid_beam, cfg.valid_exclude_seen, device,
                         cfg.dense_weight)
            row.update({"valid_loss": v["loss"], "valid_ndcg@10": v["ndcg@10"], "valid_hr@10": v["hr@10"]})
            if track_best(state, v["ndcg@10"], epoch):
                best_state = _cpu_state(evaluated)
            stop = state.bad_evals >= cfg.patience and epoch < cfg.epochs
        # Every rank must leave the loop at the same epoch, or DDP's next all-reduce hangs.
        stop = bool(_all_ranks(torch.tensor([int(stop)], device=device), "bcast").item())
        row["seconds"] = time.perf_counter() - start
        state.epoch, state.stopped_early = epoch, stop
        state.history.append(row)
        epoch_seconds.append(row["seconds"])
        metrics = {k: v for k, v in row.items() if v is not None}
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
        else:
            say(progress_line(epoch, cfg.epochs, state.step, row, state.best_ndcg, state.best_epoch,
                              epoch_seconds))
            with tempfile.TemporaryDirectory() as tmp:
                torch.save({"model": plain.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "state": dataclasses.asdict(state),
                            "ema": ema.state_dict() if ema is not None else None,
                            # The RNG as the next epoch will find it (dropout, the loader's seed):
                            # a run resumed from here trains exactly as one that never stopped.
                            "rng": torch.get_rng_state(),
                            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                           os.path.join(tmp, _TRAIN_STATE))
                # Before the first validation the best model is the current one.
                torch.save(best_state if best_state is not None else _cpu_state(evaluated),
                           os.path.join(tmp, _BEST_MODEL))
                with open(os.path.join(tmp, _META), "w") as f:
                    json.dump({"epoch": epoch, "model_config": dataclasses.asdict(cfg.model),
                               "vocab": dataclasses.asdict(vocab), "sft_config": _jsonable(cfg)}, f, indent=2)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def uses_features(model: ModelConfig) -> bool:
    """Whether the model reads item content vectors (so SFT needs the embed stage's output)."""
    return model.encoder_input == "items" and model.content_features


def _jsonable(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# ---------------------------------------------------------------- driver


def run_sft(
    examples: pa.Table,
    sids: np.ndarray,
    codebook_size: int,
    cfg: SFTConfig,
    storage_dir: str,
    name: str = "sft",
    features: np.ndarray | None = None,
) -> SFTResult:
    """Train (or resume, or return the finished run at `<storage_dir>/<name>`) and return the best model.

    examples: user_id string, split 'train'|'valid'|'test', history list<int32> item_idx (oldest
    first), target int32. sids: (N_items, sid_len) int64 codes, row = item_idx.
    features: (N_items, F) float32 item content vectors (the embed stage's), row = item_idx;
    required when the model reads content features (`ModelConfig.content_features`).
    """
    import ray
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchTrainer

    sids = np.ascontiguousarray(sids, dtype=np.int64)
    vocab = vocab_for(sids, codebook_size)
    train = select_examples(examples, "train", len(sids), max_per_user=cfg.max_train_examples_per_user)
    valid = select_examples(examples, "valid", len(sids), limit=cfg.valid_users, seed=cfg.seed)
    if len(train) == 0 or len(valid) == 0:
        raise ValueError(f"examples: need train and valid rows, got {len(train)} train and {len(valid)} valid")
    if cfg.scaling.num_workers > len(train):
        raise ValueError(f"sft.scaling.num_workers={cfg.scaling.num_workers} exceeds the {len(train)} train rows")
    if uses_features(cfg.model):
        if features is None or features.ndim != 2 or features.shape[0] != len(sids):
            got = None if features is None else features.shape
            raise ValueError(f"sft.model.content_features needs features of shape (N_items={len(sids)}, F), got {got}")
        features = np.ascontiguousarray(features, dtype=np.float32)
    else:
        features = None
    data = ray.put({"train": train, "valid": valid, "sids": sids, "vocab": vocab, "features": features})
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg, "data": data},
        scaling_config=cfg.scaling.to_ray(),
        run_config=RunConfig(storage_path=storage.absolute(storage_dir), name=name,
                             checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                             failure_config=cfg.scaling.failure_config()),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"sft run {name!r} under {storage_dir} finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt_dir:
        saved = torch.load(os.path.join(ckpt_dir, _TRAIN_STATE), map_location="cpu", weights_only=False)
        best = torch.load(os.path.join(ckpt_dir, _BEST_MODEL), map_location="cpu")
    state = LoopState(**saved["state"])
    return SFTResult(
        model_state=best,
        model_config=dataclasses.asdict(cfg.model),
        vocab=vocab,
        history=state.history,
        best_epoch=state.best_epoch or state.epoch,
        stopped_early=state.stopped_early,
        checkpoint_path=result.checkpoint.path,
    )


# ---------------------------------------------------------------- model artifacts


def save_model(model: SFTResult | SidRecommender, path: str) -> None:
    """Write `path/` (local or s3://): the T5 as a transformers directory (save_pretrained),
    `encoder_inputs.pt` (the rest of the `SidRecommender` state: SID tokens, item embedding,
    content projection and features), sids.npy (the (N_items, sid_len) int64 codes, row =
    item_idx, for other tools) and vocab.json (vocabulary, model config, file list).
    """
    import io

    if isinstance(model, SFTResult):
        model = model.model()
    with tempfile.TemporaryDirectory() as tmp:
        model.t5.save_pretrained(tmp)
        files = sorted(os.listdir(tmp))
        for fname in files:
            with open(os.path.join(tmp, fname), "rb") as f:
                storage.write_bytes(storage.join(path, fname), f.read())
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith("t5.")}
    buf = io.BytesIO()
    torch.save(rest, buf)
    storage.write_bytes(storage.join(path, _ENCODER_INPUTS), buf.getvalue())
    buf = io.BytesIO()
    np.save(buf, model.vocab.decode(model.sid_tokens.cpu()).numpy())
    storage.write_bytes(storage.join(path, "sids.npy"), buf.getvalue())
    # Written last: load_model treats a directory without vocab.json as unfinished.
    storage.write_json(storage.join(path, "vocab.json"), {
        "vocab": dataclasses.asdict(model.vocab), "model_config": dataclasses.asdict(model.cfg),
        "model_files": files,
    })


def load_model(path: str) -> SidRecommender:
    """Read what `save_model` wrote: the `SidRecommender` in eval mode (`.t5`, `.vocab`, `.sid_tokens`)."""
    import io

    if not storage.exists(storage.join(path, "vocab.json")):
        raise FileNotFoundError(f"no saved SFT model at {path} (vocab.json missing)")
    meta = storage.read_json(storage.join(path, "vocab.json"))
    if "model_config" not in meta:
        raise ValueError(f"{path}: saved by an older digr (no model_config in vocab.json); re-run the sft stage")
    vocab = SidVocab(**meta["vocab"])
    with tempfile.TemporaryDirectory() as tmp:
        for fname in meta["model_files"]:
            with open(os.path.join(tmp, fname), "wb") as f:
                f.write(storage.read_bytes(storage.join(path, fname)))
        t5 = T5ForConditionalGeneration.from_pretrained(tmp)
    rest = torch.load(io.BytesIO(storage.read_bytes(storage.join(path, _ENCODER_INPUTS))), map_location="cpu")
    if t5.config.vocab_size != vocab.vocab_size or rest["sid_tokens"].shape[1] != vocab.sid_len:
        raise ValueError(f"{path}: model vocab_size {t5.config.vocab_size} / sid_tokens "
                         f"{tuple(rest['sid_tokens'].shape)} do not match vocab.json {vocab}")
    state = {**{f"t5.{k}": v for k, v in t5.state_dict().items()}, **rest}
    return SidRecommender.from_state(vocab, ModelConfig(**meta["model_config"]), state).eval()
