"""GRPO: improve the SFT recommender with group-relative policy optimisation.

For each training history the current policy generates a group of G SIDs under the trie
(`digr.rec.decode.sample`, or beam search with the group = the top G beams); each gets a reward
(`digr.rl.rewards`, default 1[exact] + 0.1 * valid + 0.0 * LCP/3 + 0.5 * q * 1[exact]); the
advantages are the group-normalised rewards; the loss is PPO's clipped surrogate per token
plus a token-level KL to the frozen SFT model (DeepSeekMath's GRPO):

    A_i      = (r_i - mean(r)) / (std(r) + 1e-6)                   over the G samples of a history
    ratio_t  = exp(logp_t - logp_old_t)
    kl_t     = exp(ref_t - logp_t) - (ref_t - logp_t) - 1           (k3 estimator, >= 0)
    loss     = - mean_t [ min(ratio_t A, clip(ratio_t, 1-eps, 1+eps) A) - beta kl_t ]

The log-probs are those of the distribution the rollouts are drawn from: softmax over the
codes the trie allows at each level (`digr.rec.decode.constrained_logprobs`). Dropout is off
throughout (the policy stays in eval mode), so with one update per rollout batch the ratio
is exactly 1 and the loss gradient is the plain policy gradient plus the KL term.

Ray wrapper: one Ray Train `TorchTrainer`. Each worker rolls out on its own share of the
histories (data parallel; rollouts, rewards and the update all run in the worker) and the
gradients are averaged by DDP (gloo on CPU, NCCL on GPU) or by a DeepSpeed engine
(`strategy: deepspeed`, ZeRO stage by config). With `rollout_workers: N` the driver also
starts N `RolloutWorker` actors (their own CPUs/GPUs): each step a trainer worker puts its
current weights in the object store and its share of the actors generate, reward and score
the groups (`make_rollouts`); the trainer only computes the loss (`rollout_loss`) and
updates. Rank 0 validates on the valid split, keeps
the best model, and reports a checkpoint every `checkpoint_every` steps; re-running the same
command resumes from the last one: weights, optimizer state and step count (under DeepSpeed
every rank writes its ZeRO shard with `engine.save_checkpoint` and Ray Train merges the
workers' folders into one checkpoint).
"""

from __future__ import annotations

import copy
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

from digr.platform.scaling import ScalingConfig, say
from digr.rec.seqmodel import SidRecommender
from digr.rec.sft_data import Examples, select_examples
from digr.rl.rewards import RewardConfig, RewardInputs, total_reward

_DS_TAG = "deepspeed"  # sub-folder of a checkpoint with every rank's DeepSpeed shards
_STATE, _BEST, _META = "grpo_state.pt", "best_model.pt", "meta.json"
ROLLOUTS = ("sample", "beam")
STRATEGIES = ("ddp", "deepspeed")
ADVANTAGES = ("group", "batch")


@dataclass(frozen=True)
class DeepSpeedSettings:
    zero_stage: int = 2             # 0-3
    config_file: str = ""           # a DeepSpeed JSON; "" = built from this config (`deepspeed_config`)

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"grpo.deepspeed.zero_stage must be 0-3, got {self.zero_stage}")


@dataclass(frozen=True)
class GRPOConfig:
    enabled: bool = False           # run inside the whole pipeline; `python -m jobs.grpo` always runs it
    group_size: int = 8             # G
    rollout: str = "beam"           # beam (beam-as-group, MiniOneRec) | sample (temperature)
    temperature: float = 1.0
    steps: int = 300
    batch_size: int = 64            # histories per step per worker
    clip_eps: float = 0.2
    beta: float = 1e-3              # KL weight to the frozen SFT reference
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_history: int = 20           # must match the SFT model's window
    eval_every: int = 50            # steps between validations (and best-model tracking)
    valid_users: int = 2000
    valid_beam: int = 20
    checkpoint_every: int = 50
    seed: int = 0
    threads_per_worker: int = 0
    reward: RewardConfig = field(default_factory=RewardConfig)
    # How rewards become advantages (`group_advantages`): "group" is the paper's per-group std,
    # under which the QARM bonus cancels; "batch" divides by the batch's std, so it does not.
    advantage: str = "group"
    strategy: str = "ddp"           # ddp | deepspeed
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    # Disaggregated rollouts: > 0 starts this many `RolloutWorker` actors (each rollout_cpus /
    # rollout_gpus) that generate and score the groups; each trainer worker sends its batch to
    # its share of them with the current weights. 0: every trainer worker rolls out itself.
    rollout_workers: int = 0
    rollout_cpus: float = 1.0
    rollout_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.rollout not in ROLLOUTS:
            raise ValueError(f"grpo.rollout must be one of {ROLLOUTS}, got {self.rollout!r}")
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"grpo.advantage must be one of {ADVANTAGES}, got {self.advantage!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"grpo.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        for name in ("group_size", "steps", "batch_size", "eval_every", "checkpoint_every", "valid_users",
                     "max_history"):
            if getattr(self, name) < 1:
                raise ValueError(f"grpo.{name} must be >= 1, got {getattr(self, name)}")
        if self.rollout_workers < 0 or self.rollout_cpus < 0 or self.rollout_gpus < 0:
            raise ValueError("grpo: rollout_workers, rollout_cpus and rollout_gpus must be >= 0")
        if self.group_size < 2:
            raise ValueError("grpo.group_size must be >= 2: advantages compare samples within a group")
        if not self.temperature > 0 or not self.lr > 0 or self.beta < 0 or not 0 < self.clip_eps < 1:
            raise ValueError("grpo: need temperature > 0, lr > 0, beta >= 0, 0 < clip_eps < 1")


# ---------------------------------------------------------------- pure pieces


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6, scale: str = "group") -> torch.Tensor:
    """rewards: (B, G) -> (B, G) advantages: the group mean subtracted, then divided by a std
    (Bessel's correction, as TRL and verl); a group whose rewards are all equal gets zeros.

    scale "group": each row by its own std (GRPO, DeepSeekMath). A reward that is one factor per
        group times a 0/1 hit, such as (1 + alpha * q_target) * 1[exact], is divided out: the
        QARM bonus then changes nothing.
    scale "batch": every row by the std of all centred rewards in the batch (REINFORCE++,
        Hu et al. 2025; Dr. GRPO, Liu et al. 2025, drops the per-group std for the same bias).
        A hit on a target with q = 1 then gets 1 + alpha times the advantage of a hit on a q = 0
        target, so the quality bonus survives.
    """
    if scale not in ADVANTAGES:
        raise ValueError(f"advantage scale must be one of {ADVANTAGES}, got {scale!r}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        return centred / (rewards.std(dim=1, keepdim=True) + eps)
    return centred / (centred.std() + eps) if centred.numel() > 1 else centred


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              clip_eps: float = 0.2, beta: float = 1e-3) -> tuple[torch.Tensor, dict[str, float]]:
    """logp, old_logp, ref_logp: (B, G, L) per-token log-probs; advantages: (B, G).
    -> (scalar loss, {"kl", "clip_frac", "ratio"}): the token-mean of
    -(min(ratio A, clip(ratio) A) - beta * kl)."""
    adv = advantages.unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    d = ref_logp - logp
    kl = torch.exp(d) - d - 1
    loss = -(surrogate - beta * kl).mean()
    clipped = ((ratio - 1).abs() > clip_eps).float().mean()
    return loss, {"kl": float(kl.detach().mean()), "clip_frac": float(clipped), "ratio": float(ratio.detach().mean())}


def rollout(policy: SidRecommender, trie: Any, histories: list[list[int]], cfg: GRPOConfig,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """-> items (B, G), sids (B, G, sid_len), rank (B, G) for beam groups (None for samples)."""
    from digr.rec.decode import recommend, sample

    if cfg.rollout == "beam":
        out = recommend(policy, trie, histories, cfg.max_history, beam_size=cfg.group_size, top_k=cfg.group_size)
        if bool((out.items < 0).any()):
            raise ValueError(f"grpo: the catalogue has fewer valid SIDs than group_size={cfg.group_size}")
        rank = torch.arange(cfg.group_size).expand_as(out.items)
        return out.items, out.sids, rank
    out = sample(policy, trie, histories, cfg.max_history, cfg.group_size, cfg.temperature, generator)
    return out.items, out.sids, None


@dataclass(frozen=True, eq=False)
class RolloutBatch:
    """B histories' groups, scored: what a rollout worker hands the trainer.
    items (B, G) item_idx; sids (B, G, sid_len); advantages (B, G); old_logp, ref_logp
    (B, G, sid_len) per-token log-probs under the rollout policy and the frozen SFT reference."""

    histories: list[list[int]]
    items: torch.Tensor
    sids: torch.Tensor
    advantages: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    stats: dict[str, float]

    @staticmethod
    def concat(parts: list[RolloutBatch]) -> RolloutBatch:
        """Row-wise concatenation, in order; stats averaged by rows (rollouts/s summed: the parts ran in parallel)."""
        rows = np.array([len(p.histories) for p in parts], dtype=np.float64)
        stats = {k: float(np.dot(rows, [p.stats[k] for p in parts]) / rows.sum()) for k in parts[0].stats}
        stats["rollouts_per_s"] = float(sum(p.stats["rollouts_per_s"] for p in parts))
        stats["rollout_s"] = float(max(p.stats["rollout_s"] for p in parts))
        return RolloutBatch([h for p in parts for h in p.histories],
                            *(torch.cat([getattr(p, f) for p in parts]) for f in
                              ("items", "sids", "advantages", "old_logp", "ref_logp")), stats)


@torch.no_grad()
def make_rollouts(policy: SidRecommender, reference: SidRecommender, trie: Any, histories: list[list[int]],
                  targets: torch.Tensor, sids_table: torch.Tensor, quality: torch.Tensor, cfg: GRPOConfig,
                  generator: torch.Generator | None = None,
                  intents: tuple[torch.Tensor, torch.Tensor] | None = None) -> RolloutBatch:
    """Roll out a group per history, reward it, normalise the advantages and record the rollout
    policy's and the reference's log-probs. targets: (B,) item_idx; sids_table: (N_items,
    sid_len) codes; quality: (N_items,) q, 0 = unknown; intents: (N_items, d) unit intent
    vectors and (N_items,) bool "has intents", for the interest reward."""
    from digr.rec.decode import constrained_logprobs

    policy.eval()  # no dropout in RL: the rollout and the update see the same function
    t0 = time.perf_counter()
    items, sids, rank = rollout(policy, trie, histories, cfg, generator)
    rollout_s = time.perf_counter() - t0
    inputs = RewardInputs(items=items, sids=sids, target=targets, target_sids=sids_table[targets],
                          levels=policy.vocab.levels, quality=quality[targets], rank=rank,
                          intent_vectors=intents[0] if intents else None, has_intents=intents[1] if intents else None)
    rewards, parts = total_reward(inputs, cfg.reward)
    input_ids, mask = policy.batch(histories, cfg.max_history)
    old = constrained_logprobs(policy, trie, input_ids, mask, sids)
    ref = constrained_logprobs(reference, trie, input_ids, mask, sids)
    stats = {f"reward_{k}": v for k, v in parts.items()}
    stats["reward"] = float(rewards.mean())
    stats["hit_rate"] = float((items == targets.unsqueeze(1)).any(dim=1).float().mean())
    stats["rollout_s"] = rollout_s
    stats["rollouts_per_s"] = items.numel() / max(rollout_s, 1e-9)
    return RolloutBatch(histories, items, sids, group_advantages(rewards, scale=cfg.advantage), old, ref, stats)


def rollout_loss(policy: SidRecommender, trie: Any, batch: RolloutBatch, cfg: GRPOConfig
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of a scored rollout batch under the current policy (with gradients).
    Dropout stays off, as in the rollout: the same function scores both."""
    from digr.rec.decode import constrained_logprobs

    policy.eval()
    input_ids, mask = policy.batch(batch.histories, cfg.max_history)
    new = constrained_logprobs(policy, trie, input_ids, mask, batch.sids.to(input_ids.device))
    loss, stats = grpo_loss(new, batch.old_logp.to(new.device), batch.ref_logp.to(new.device),
                            batch.advantages.to(new.device), cfg.clip_eps, cfg.beta)
    return loss, {**batch.stats, **stats}


def grpo_step(policy: SidRecommender, reference: SidRecommender, trie: Any, histories: list[list[int]],
              targets: torch.Tensor, sids_table: torch.Tensor, quality: torch.Tensor, cfg: GRPOConfig,
              generator: torch.Generator | None = None,
              intents: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """One GRPO batch up to the loss, rollouts in this process (the caller does backward and
    the optimizer step). Arguments as `make_rollouts`."""
    batch = make_rollouts(policy, reference, trie, histories, targets, sids_table, quality, cfg, generator, intents)
    return rollout_loss(policy, trie, batch, cfg)


@dataclass(frozen=True, eq=False)
class Scoring:
    """What rolling out and scoring needs on one device, built from `run_grpo`'s data: the
    policy (SFT weights), the frozen SFT reference, the trie, the (N_items, sid_len) SID table,
    (N_items,) q and the optional (intent vectors, has intents) pair."""

    policy: SidRecommender
    reference: SidRecommender
    trie: Any
    sids_table: torch.Tensor
    quality: torch.Tensor
    intents: tuple[torch.Tensor, torch.Tensor] | None

    @staticmethod
    def build(data: dict[str, Any], device: torch.device) -> Scoring:
        from digr.rec.trie import SidTrie

        state = {k: torch.as_tensor(np.array(v)) for k, v in data["sft_state"].items()}
        policy = SidRecommender.from_state(data["vocab"], data["model_config"], state).to(device)
        intents = None
        if data.get("intent_vectors") is not None:
            intents = (torch.from_numpy(np.array(data["intent_vectors"], dtype=np.float32)).to(device),
                       torch.from_numpy(np.array(data["has_intents"], dtype=bool)).to(device))
        return Scoring(policy, copy.deepcopy(policy).eval().requires_grad_(False),
                       SidTrie.from_codes(np.array(data["sids"]), data["vocab"]).to(device),
                       torch.from_numpy(np.array(data["sids"])).to(device),
                       torch.from_numpy(np.array(data["quality"])).to(device), intents)


class RolloutWorker:
    """A Ray actor holding a copy of the policy and the frozen SFT reference: it rolls out and
    scores groups for the trainer (`grpo.rollout_workers` > 0), so generation can run on other
    devices than the update. `rollout` loads the trainer's weights when their version changes."""

    def __init__(self, data: dict[str, Any], cfg: GRPOConfig) -> None:
        if cfg.threads_per_worker:
            torch.set_num_threads(cfg.threads_per_worker)
        self.device = torch.device("cuda" if cfg.rollout_gpus and torch.cuda.is_available() else "cpu")
        self.s = Scoring.build(data, self.device)
        self.s.policy.requires_grad_(False)
        self.cfg, self.version = cfg, -1

    def rollout(self, version: int, weights: dict[str, torch.Tensor], histories: list[list[int]],
                targets: np.ndarray, seed: int) -> RolloutBatch:
        s = self.s
        if version != self.version:
            s.policy.load_state_dict(weights)
            self.version = version
        gen = torch.Generator(device=self.device).manual_seed(seed)
        batch = make_rollouts(s.policy, s.reference, s.trie, histories, torch.tensor(targets, device=self.device),
                              s.sids_table, s.quality, self.cfg, gen, s.intents)
        return RolloutBatch(batch.histories, *(getattr(batch, f).cpu() for f in
                                               ("items", "sids", "advantages", "old_logp", "ref_logp")), batch.stats)


def deepspeed_config(cfg: GRPOConfig, world: int) -> dict[str, Any]:
    """The DeepSpeed config: `cfg.deepspeed.config_file` when given, else built from `cfg`
    (our optimizer is passed in, so the JSON carries no optimizer section)."""
    if cfg.deepspeed.config_file:
        with open(cfg.deepspeed.config_file) as f:
            return json.load(f)
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "train_batch_size": cfg.batch_size * world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


# ---------------------------------------------------------------- the Ray Train loop


@dataclass
class GRPOState:
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_ndcg: float = -1.0
    best_step: int = 0


def _train_loop(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    from digr.rec.sft import _cpu_state, validate

    cfg: GRPOConfig = config["cfg"]
    data = ray.get(config["data"])
    if cfg.threads_per_worker:
        torch.set_num_threads(cfg.threads_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    scoring = Scoring.build(data, device)
    policy, reference, trie = scoring.policy, scoring.reference, scoring.trie
    sids_table, quality, intents = scoring.sids_table, scoring.quality, scoring.intents
    train: Examples = data["train"]
    state, saved, best_state = GRPOState(), None, None

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            saved = torch.load(os.path.join(ckpt_dir, _STATE), map_location=device, weights_only=False)
            policy.load_state_dict(saved["model"])
            state = GRPOState(**saved["state"])
            if rank == 0:
                best_state = torch.load(os.path.join(ckpt_dir, _BEST), map_location="cpu")
        if rank == 0:
            say(f"grpo resuming after step {state.step}")

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.strategy == "deepspeed":
        import deepspeed

        for var, value in (("LOCAL_RANK", ctx.get_local_rank()), ("RANK", rank), ("WORLD_SIZE", world)):
            os.environ.setdefault(var, str(value))
        if device.type == "cpu":  # on CPU DeepSpeed JIT-builds its shared-memory comm op at init
            for lock in clear_stale_extension_locks():
                say(f"grpo: removed a stale torch-extension build lock {lock}")
        engine, optimizer, _, _ = deepspeed.initialize(model=policy, optimizer=optimizer,
                                                       config=deepspeed_config(cfg, world))
        module = engine.module
        if checkpoint is not None:
            with checkpoint.as_directory() as ckpt_dir:
                if not os.path.isdir(os.path.join(ckpt_dir, _DS_TAG)):
                    raise RuntimeError(f"grpo: checkpoint {checkpoint.path} has no DeepSpeed state ({_DS_TAG}/); "
                                       "it was written with strategy ddp, resume with that strategy")
                engine.load_checkpoint(ckpt_dir, tag=_DS_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
    else:
        # No DDP wrapper: the loss is built from the module's parts (encoder, decoder steps),
        # never from one call of a wrapper's forward, so `_sync_grads` averages the gradients.
        # Every rank starts from the same SFT weights and applies the same averaged update.
        if saved is not None and "optimizer" in saved:
            optimizer.load_state_dict(saved["optimizer"])
        engine, module = None, policy

    # ZeRO-3 partitions the weights: every forward is a collective, so every rank validates
    # (in lockstep; rank 0 keeps the figure) and state dicts are read with the weights gathered.
    zero3 = cfg.strategy == "deepspeed" and cfg.deepspeed.zero_stage == 3
    validates = rank == 0 or zero3

    def evaluate_now() -> float:
        v = validate(module, trie, data["valid"], cfg.max_history, cfg.valid_beam, True, device)
        return float(v["ndcg@10"])

    def full_state() -> dict[str, torch.Tensor]:
        if not zero3:
            return _cpu_state(module)
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return _cpu_state(module)

    if validates and state.step == 0:
        state.best_ndcg, state.best_step = evaluate_now(), 0  # the SFT model is the first candidate
        best_state = full_state()
        if rank == 0:
            say(f"grpo step 0 valid ndcg@10 {state.best_ndcg:.4f} (the SFT model)")

    actors = config.get("rollout_actors") or []
    mine = actors[rank::world] if len(actors) >= world else ([actors[rank % len(actors)]] if actors else [])
    times: list[float] = []
    for step in range(state.step + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, step, rank])
        idx = rng.choice(len(train), size=min(cfg.batch_size, len(train)), replace=False)
        histories = [train.history(i).tolist() for i in idx]
        targets = torch.from_numpy(train.targets[idx]).to(device)
        if mine:  # disaggregated: this rank's rollout workers generate and score, in parallel
            weights = ray.put(full_state())
            chunks = [c for c in np.array_split(np.arange(len(idx)), len(mine)) if len(c)]
            futures = [actor.rollout.remote(step, weights, [histories[i] for i in c], train.targets[idx[c]],
                                            int(rng.integers(2**62))) for actor, c in zip(mine, chunks)]
            loss, stats = rollout_loss(module, trie, RolloutBatch.concat(ray.get(futures)), cfg)
        else:
            gen = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
            loss, stats = grpo_step(module, reference, trie, histories, targets, sids_table, quality, cfg, gen, intents)
        if cfg.strategy == "deepspeed":
            engine.backward(loss)
            engine.step()
        else:
            apply_update(optimizer, params, loss, world, cfg.grad_clip)
        times.append(time.perf_counter() - t0)
        row: dict[str, Any] = {"step": step, "loss": float(loss.detach()), **stats, "seconds": times[-1],
                               "rollout_workers": len(mine)}
        if validates and (step % cfg.eval_every == 0 or step == cfg.steps):
            ndcg = evaluate_now()
            row["valid_ndcg@10"] = ndcg
            if ndcg > state.best_ndcg:
                state.best_ndcg, state.best_step, best_state = ndcg, step, full_state()
        state.step = step
        state.history.append(row)
        if rank == 0 and (step % 10 == 0 or step == cfg.steps):
            eta = (cfg.steps - step) * float(np.mean(times[-10:])) / 60
            valid = f" valid ndcg@10 {row['valid_ndcg@10']:.4f}" if "valid_ndcg@10" in row else ""
            say(f"grpo step {step}/{cfg.steps} reward {row['reward']:.3f} hit@G {row['hit_rate']:.3f} "
                f"kl {row['kl']:.4f}{valid} (best {state.best_ndcg:.4f} @{state.best_step}) "
                f"{np.mean(times[-10:]):.2f} s/step ETA {eta:.1f} min")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
            current = full_state()  # a collective under ZeRO-3: every rank takes part
            if rank != 0 and engine is None:
                ray.train.report(metrics, checkpoint=None)
                continue
            with tempfile.TemporaryDirectory() as tmp:
                if engine is not None:  # a collective: every rank writes its own optimizer (and ZeRO) shard
                    engine.save_checkpoint(tmp, tag=_DS_TAG, save_latest=False)
                if rank != 0:
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
                    continue
                payload = {"model": current, "state": dataclasses.asdict(state)}
                if cfg.strategy != "deepspeed":
                    payload["optimizer"] = optimizer.state_dict()
                torch.save(payload, os.path.join(tmp, _STATE))
                torch.save(best_state if best_state is not None else current, os.path.join(tmp, _BEST))
                with open(os.path.join(tmp, _META), "w") as f:
                    json.dump({"step": step, "grpo_config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str))},
                              f, indent=2)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def apply_update(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], loss: torch.Tensor, world: int,
                 grad_clip: float) -> None:
    """One optimizer step on `loss`: gradients averaged over `world` workers (`_sync_grads`; a
    no-op for one), clipped to `grad_clip` (0 = no clipping)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    _sync_grads(params, world)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


STALE_LOCK_SECONDS = 600.0  # a C++ op build takes ~25 s here; a lock this old has no builder left


def clear_stale_extension_locks(root: str | None = None, max_age_s: float = STALE_LOCK_SECONDS) -> list[str]:
    """Remove torch C++-extension build locks older than `max_age_s` under `root` (default:
    `$TORCH_EXTENSIONS_DIR` or torch's default build root). -> the removed paths.

    torch's `FileBaton` marks a build with an empty `lock` file and records no owner; a process
    killed mid-build leaves it behind and every later load of that op (DeepSpeed's
    `deepspeed_shm_comm` on CPU) waits on it forever. A live build holds its lock for seconds,
    so an old one is safe to remove."""
    from torch.utils.cpp_extension import get_default_build_root

    root = root or os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    removed = []
    now = time.time()
    for folder, _, files in os.walk(root):
        path = os.path.join(folder, "lock")
        if "lock" in files and now - os.path.getmtime(path) > max_age_s:
            try:
                os.remove(path)
            except FileNotFoundError:  # another worker removed it first
                continue
            removed.append(path)
    return removed


def _sync_grads(params: list[torch.Tensor], world: int) -> None:
    """Average gradients over workers (what DDP's hooks do; done by hand because the loss is
    built from the module's parts, not from one call of the DDP wrapper)."""
    import torch.distributed as dist

    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


# ---------------------------------------------------------------- driver


@dataclass(frozen=True, eq=False)
class GRPOResult:
    model: SidRecommender  # the best model by valid NDCG@10 (the SFT model if no step beat it)
    last_state: dict[str, torch.Tensor]  # the weights after the last step
    history: list[dict[str, Any]]
    best_step: int
    best_valid_ndcg: float


def run_grpo(examples: pa.Table, sft_model: SidRecommender, cfg: GRPOConfig, storage_dir: str, name: str = "grpo",
             quality: np.ndarray | None = None, intent_vectors: np.ndarray | None = None,
             has_intents: np.ndarray | None = None) -> GRPOResult:
    """Train (or resume, or return the finished run at `<storage_dir>/<name>`).

    examples: the ingest stage's examples table; sft_model: the trained SFT recommender (its
    SID table defines the catalogue); quality: (N_items,) float q_i, NaN or absent = unknown (0);
    intent_vectors (N_items, d) and has_intents (N_items,) bool: the items' intent embeddings for
    the interest reward (`reward.interest` > 0 needs them)."""
    import ray
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from digr.platform import storage

    n_items = sft_model.n_items
    train = select_examples(examples, "train", n_items)
    valid = select_examples(examples, "valid", n_items, limit=cfg.valid_users, seed=cfg.seed)
    if len(train) < cfg.group_size or len(valid) == 0:
        raise ValueError(f"grpo: need train and valid rows, got {len(train)} train and {len(valid)} valid")
    q = np.zeros(n_items, np.float32) if quality is None else np.nan_to_num(np.asarray(quality, np.float32))
    if q.shape != (n_items,):
        raise ValueError(f"grpo: quality must be (N_items={n_items},), got {q.shape}")
    if cfg.reward.interest > 0 and intent_vectors is None:
        raise ValueError("grpo: reward.interest > 0 needs the items' intent vectors (run_grpo's intent_vectors "
                         "and has_intents); without them the interest reward would be 0 for every rollout")
    if intent_vectors is not None:
        vec = np.asarray(intent_vectors, np.float32)
        has = np.ones(n_items, bool) if has_intents is None else np.asarray(has_intents, bool)
        if vec.ndim != 2 or vec.shape[0] != n_items or has.shape != (n_items,):
            raise ValueError(f"grpo: intent_vectors must be (N_items={n_items}, d) and has_intents ({n_items},), "
                             f"got {vec.shape} and {has.shape}")
        norms = np.linalg.norm(vec, axis=1, keepdims=True)
        intent_vectors, has_intents = vec / np.maximum(norms, 1e-12), has & (norms[:, 0] > 0)
    sids = sft_model.vocab.decode(sft_model.sid_tokens).cpu().numpy()
    data = ray.put({"train": train, "valid": valid, "sids": sids, "vocab": sft_model.vocab,
                    "model_config": sft_model.cfg, "quality": q, "intent_vectors": intent_vectors,
                    "has_intents": has_intents,
                    "sft_state": {k: v.cpu().numpy() for k, v in sft_model.state_dict().items()}})
    actors = []
    if cfg.rollout_workers:
        worker = ray.remote(num_cpus=cfg.rollout_cpus, num_gpus=cfg.rollout_gpus)(RolloutWorker)
        actors = [worker.remote(data, cfg) for _ in range(cfg.rollout_workers)]
    trainer = TorchTrainer(
        _train_loop, train_loop_config={"cfg": cfg, "data": data, "rollout_actors": actors},
        scaling_config=cfg.scaling.to_ray(),
        run_config=RunConfig(storage_path=storage.absolute(storage_dir), name=name,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=cfg.scaling.failure_config()),
    )
    try:
        result = trainer.fit()
    finally:
        for actor in actors:
            ray.kill(actor)
    if result.checkpoint is None:
        raise RuntimeError(f"grpo run {name!r} under {storage_dir} finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt_dir:
        saved = torch.load(os.path.join(ckpt_dir, _STATE), map_location="cpu", weights_only=False)
        best = torch.load(os.path.join(ckpt_dir, _BEST), map_location="cpu")
    state = GRPOState(**saved["state"])
    model = SidRecommender.from_state(sft_model.vocab, sft_model.cfg, best)
    return GRPOResult(model=model, last_state=saved["model"], history=state.history, best_step=state.best_step,
                      best_valid_ndcg=state.best_ndcg)
