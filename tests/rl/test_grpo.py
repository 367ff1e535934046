"""GRPO: rewards and advantages by hand, the constrained sampler and its log-probs, a toy task
where a few GRPO steps raise the expected reward, and the Ray Train loop (DDP-style and
DeepSpeed ZeRO on CPU) with resume."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from digr.rec.decode import constrained_logprobs, sample
from digr.rec.seqmodel import ModelConfig, SidRecommender, SidVocab
from digr.rec.trie import SidTrie
from digr.rl.grpo import GRPOConfig, group_advantages, grpo_loss, grpo_step, run_grpo
from digr.rl.rewards import REWARDS, RewardConfig, RewardInputs, total_reward


def _inputs(**kw) -> RewardInputs:
    # one history, G = 3; the target is item 5 with SID (1, 2, 3 | suffix 0)
    base = dict(items=torch.tensor([[5, 7, -1]]), sids=torch.tensor([[[1, 2, 3, 0], [1, 2, 9, 0], [4, 2, 3, 0]]]),
                target=torch.tensor([5]), target_sids=torch.tensor([[1, 2, 3, 0]]), levels=3,
                quality=torch.tensor([0.8]))
    return RewardInputs(**{**base, **kw})


def test_rewards_by_hand() -> None:
    x = _inputs()
    assert REWARDS["exact"](x).tolist() == [[1.0, 0.0, 0.0]]
    assert REWARDS["valid"](x).tolist() == [[1.0, 1.0, 0.0]]
    # LCP over the 3 RQ-VAE codes: 3, 2 and 0 shared leading codes (the third differs at once)
    assert REWARDS["prefix"](x)[0].tolist() == pytest.approx([1.0, 2 / 3, 0.0])
    assert REWARDS["qarm"](x)[0].tolist() == pytest.approx([0.8, 0.0, 0.0])  # pays only on the exact hit
    assert REWARDS["rank"](x).tolist() == [[1.0, 0.0, 0.0]]  # no ranks: rank 0 -> 1/log2(2)
    ranked = _inputs(items=torch.tensor([[7, -1, 5]]), rank=torch.tensor([[0, 1, 2]]))
    assert REWARDS["rank"](ranked)[0].tolist() == pytest.approx([0.0, 0.0, 1 / math.log2(4)])
    # the paper's form: 1[exact] + 0.1 valid + 0.5 LCP/3 + 0.5 q 1[exact]
    total, parts = total_reward(x, RewardConfig(prefix=0.5))
    assert total[0].tolist() == pytest.approx([1 + 0.1 + 0.5 + 0.4, 0.1 + 0.5 * 2 / 3, 0.0])
    assert set(parts) == {"exact", "valid", "prefix", "qarm"}


def test_prefix_ignores_the_collision_suffix_and_qarm_needs_the_item() -> None:
    # same RQ-VAE codes, other suffix: a different item; full prefix credit, no exact, no bonus
    x = _inputs(items=torch.tensor([[6, 6, 6]]), sids=torch.tensor([[[1, 2, 3, 1]] * 3]))
    assert REWARDS["prefix"](x).tolist() == [[1.0] * 3]
    assert REWARDS["qarm"](x).tolist() == [[0.0] * 3]


def test_interest_reward_is_the_cosine_of_intent_vectors_where_both_exist() -> None:
    vecs = torch.zeros(8, 2)
    vecs[5] = torch.tensor([1.0, 0.0])
    vecs[7] = torch.tensor([0.6, 0.8])
    has = torch.zeros(8, dtype=torch.bool)
    has[[5, 7]] = True
    x = _inputs(intent_vectors=vecs, has_intents=has)
    assert REWARDS["interest"](x)[0].tolist() == pytest.approx([1.0, 0.6, 0.0])


def test_reward_weights_must_be_non_negative() -> None:
    with pytest.raises(ValueError, match="grpo.reward.prefix"):
        RewardConfig(prefix=-1.0)


def test_group_advantages_by_hand() -> None:
    # r = (1, 0, 0, 0): mean 0.25, sample std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]]))
    assert adv[0].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    assert adv[1].tolist() == [0.0] * 4  # equal rewards: nothing to learn


def test_qarm_bonus_cancels_under_group_scale_and_survives_under_batch_scale() -> None:
    # Two groups of G=2, one hit each; rewards (1 + 0.5 q) * 1[exact] with q = 1 and q = 0:
    # rows [1.5, 0] and [1, 0]. Group scale: both rows -> [+0.707, -0.707] (the factor cancels).
    # Batch scale: centred rows [0.75, -0.75] and [0.5, -0.5], std over all four
    # sqrt((2 * 0.75^2 + 2 * 0.5^2) / 3) = 0.7360 -> [1.019, -1.019] and [0.679, -0.679]: the hit on the
    # q = 1 target gets 1.5x the advantage of the hit on the q = 0 one.
    r = torch.tensor([[1.5, 0.0], [1.0, 0.0]])
    g = group_advantages(r)
    assert g[0].tolist() == pytest.approx(g[1].tolist()) and g[0, 0] == pytest.approx(0.7071, abs=1e-4)
    b = group_advantages(r, scale="batch")
    assert b.flatten().tolist() == pytest.approx([1.0190, -1.0190, 0.6794, -0.6794], abs=1e-4)
    assert float(b[0, 0] / b[1, 0]) == pytest.approx(1.5)
    assert group_advantages(torch.tensor([[2.0, 2.0]]), scale="batch").tolist() == [[0.0, 0.0]]
    with pytest.raises(ValueError, match="grpo.advantage"):
        GRPOConfig(advantage="row")


def test_grpo_loss_by_hand() -> None:
    # B=1, G=2, one token each. Sample 0: ratio 0.5/0.25 = 2, A = +1 -> clipped at 1.2.
    # Sample 1: ratio 1, A = -1 -> -1. ref == logp: KL 0. loss = -(1.2 - 1) / 2 = -0.1
    logp = torch.log(torch.tensor([[[0.5], [0.5]]]))
    old = torch.log(torch.tensor([[[0.25], [0.5]]]))
    loss, stats = grpo_loss(logp, old, logp, torch.tensor([[1.0, -1.0]]), clip_eps=0.2, beta=1.0)
    assert float(loss) == pytest.approx(-0.1) and stats["kl"] == 0.0 and stats["clip_frac"] == 0.5
    # A negative advantage with ratio 0.5: min(0.5 * -1, 0.8 * -1) = -0.8 (the pessimistic side).
    loss, _ = grpo_loss(torch.log(torch.tensor([[[0.25]]])), torch.log(torch.tensor([[[0.5]]])),
                        torch.log(torch.tensor([[[0.25]]])), torch.tensor([[-1.0]]), clip_eps=0.2, beta=0.0)
    assert float(loss) == pytest.approx(0.8)
    # KL (k3): ref - logp = log 2 -> 2 - log 2 - 1 = 0.30685; ratio 1, A 0: loss = beta * kl
    loss, stats = grpo_loss(torch.log(torch.tensor([[[0.25]]])), torch.log(torch.tensor([[[0.25]]])),
                            torch.log(torch.tensor([[[0.5]]])), torch.tensor([[0.0]]), beta=0.1)
    assert stats["kl"] == pytest.approx(1 - math.log(2)) and float(loss) == pytest.approx(0.1 * (1 - math.log(2)))


def _toy(n_items: int = 12, seed: int = 0, dropout: float = 0.0) -> tuple[SidRecommender, SidTrie]:
    vocab = SidVocab(levels=2, codebook_size=4, suffix_size=1)
    codes = np.array([[i // 4, i % 4, 0] for i in range(n_items)])
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2, dropout=dropout,
                      content_features=False)
    trie = SidTrie.from_codes(codes, vocab)
    return SidRecommender(vocab, cfg, vocab.encode(torch.from_numpy(codes))), trie


def test_constrained_logprobs_form_a_distribution_over_items_and_match_sampling() -> None:
    model, trie = _toy()
    hist = [[1, 2, 3]]
    codes = trie.codes.unsqueeze(0)  # every item's SID as one group: (1, 12, 3)
    lp = constrained_logprobs(model, trie, *model.batch(hist, 20), codes).sum(-1)  # (1, 12)
    assert float(torch.logsumexp(lp.detach(), dim=-1)) == pytest.approx(0.0, abs=1e-5)
    out = sample(model, trie, hist, 20, num_samples=4000, generator=torch.Generator().manual_seed(0))
    assert bool((out.items >= 0).all())  # every sample is an item
    freq = torch.bincount(out.items[0], minlength=12).float() / 4000
    assert torch.allclose(freq, lp[0].exp(), atol=0.03)


def test_a_few_grpo_steps_raise_the_reward_on_a_toy_task() -> None:
    """Target = the item after the last one in the history (mod 12). GRPO with the exact-match
    reward must raise the expected reward on held-out probes: the mean p(target) under the
    constrained policy (0.12 at the start; about 0.33 after 40 steps when written)."""
    model, trie = _toy(seed=1)
    reference = SidRecommender.from_state(model.vocab, model.cfg, model.state_dict()).eval().requires_grad_(False)
    rng = np.random.default_rng(0)
    sids = trie.codes
    cfg = GRPOConfig(group_size=8, rollout="sample", reward=RewardConfig(valid=0.0, prefix=0.0, qarm=0.0), beta=1e-3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    probe = [[(i - 1) % 12, i] for i in range(12)]
    probe_targets = torch.tensor([(i + 1) % 12 for i in range(12)])

    def expected_reward() -> float:
        with torch.no_grad():
            lp = constrained_logprobs(model, trie, *model.batch(probe, 20), sids[probe_targets].unsqueeze(1))
        return float(lp.sum(-1).exp().mean())

    before = expected_reward()
    rewards = []
    for step in range(40):
        last = rng.integers(0, 12, size=32)
        hist = [[int((x - 1) % 12), int(x)] for x in last]
        targets = torch.from_numpy((last + 1) % 12)
        loss, stats = grpo_step(model, reference, trie, hist, targets, sids, torch.zeros(12), cfg,
                                torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        rewards.append(stats["reward"])
    after = expected_reward()
    assert after > before + 0.1, (before, after)
    assert np.mean(rewards[-10:]) > np.mean(rewards[:10]) + 0.05, rewards


def test_rollout_batches_split_and_concatenated_score_like_one_batch() -> None:
    """What rollout workers do (each scores a slice of the batch; the trainer concatenates)
    gives the loss that one process scoring the whole batch gives."""
    from digr.rl.grpo import RolloutBatch, make_rollouts, rollout_loss

    model, trie = _toy(seed=2)
    reference = SidRecommender.from_state(model.vocab, model.cfg, model.state_dict()).eval().requires_grad_(False)
    cfg = GRPOConfig(group_size=4, rollout="beam", reward=RewardConfig(prefix=0.5))
    hist = [[i, (i + 1) % 12] for i in range(6)]
    targets = torch.tensor([(i + 2) % 12 for i in range(6)])
    args = (trie.codes, torch.linspace(0, 1, 12), cfg)
    whole = make_rollouts(model, reference, trie, hist, targets, *args)
    halves = RolloutBatch.concat([make_rollouts(model, reference, trie, hist[:4], targets[:4], *args),
                                  make_rollouts(model, reference, trie, hist[4:], targets[4:], *args)])
    assert halves.histories == hist and torch.equal(halves.items, whole.items)
    assert torch.allclose(halves.advantages, whole.advantages) and torch.allclose(halves.ref_logp, whole.ref_logp)
    assert halves.stats["reward"] == pytest.approx(whole.stats["reward"])  # row-weighted: 4/6 and 2/6
    loss_whole, _ = rollout_loss(model, trie, whole, cfg)
    loss_halves, _ = rollout_loss(model, trie, halves, cfg)
    assert torch.allclose(loss_whole, loss_halves, atol=1e-6)


def test_interest_reward_reaches_the_rollouts_and_is_refused_without_vectors(tmp_path) -> None:
    """The interest reward is computed from the intent vectors handed to the rollouts; a run
    that asks for it without vectors stops with an error instead of paying 0 everywhere."""
    from digr.rl.grpo import make_rollouts

    model, trie = _toy(seed=3)
    reference = SidRecommender.from_state(model.vocab, model.cfg, model.state_dict()).eval().requires_grad_(False)
    cfg = GRPOConfig(group_size=4, rollout="beam", reward=RewardConfig(interest=1.0))
    vecs = torch.zeros(12, 2)
    vecs[:, 0] = 1.0  # every item has the same intents: cosine 1 for every generated item
    has = torch.ones(12, dtype=torch.bool)
    has[5] = False  # target 5 has none: its row pays 0
    batch = make_rollouts(model, reference, trie, [[1, 2], [3, 4]], torch.tensor([3, 5]), trie.codes,
                          torch.zeros(12), cfg, intents=(vecs, has))
    assert batch.stats["reward_interest"] == pytest.approx(0.5)  # row 1: 1 for all 4; row 2: 0
    with pytest.raises(ValueError, match="interest"):
        run_grpo(_examples(), model, cfg, str(tmp_path))


def _examples(n_users: int = 24, n_items: int = 12) -> pa.Table:
    rows = []
    for u in range(n_users):
        seq = [(u + k) % n_items for k in range(6)]
        for t in range(1, 6):
            split = "test" if t == 5 else "valid" if t == 4 else "train"
            rows.append({"user_id": f"u{u}", "split": split, "history": seq[:t], "target": seq[t]})
    return pa.Table.from_pylist(rows, schema=pa.schema([("user_id", pa.string()), ("split", pa.string()),
                                                        ("history", pa.list_(pa.int32())), ("target", pa.int32())]))


def test_run_grpo_on_ray_train_checkpoints_and_resumes(ray_local, tmp_path) -> None:
    model, _ = _toy()
    cfg = GRPOConfig(steps=4, batch_size=8, group_size=4, eval_every=2, checkpoint_every=2, valid_users=24, lr=1e-3)
    first = run_grpo(_examples(), model, cfg, str(tmp_path), name="g")
    assert [r["step"] for r in first.history] == [1, 2, 3, 4]
    more = run_grpo(_examples(), model, GRPOConfig(**{**cfg.__dict__, "steps": 6}), str(tmp_path), name="g")
    assert [r["step"] for r in more.history] == [1, 2, 3, 4, 5, 6]
    assert more.history[:4] == first.history  # resumed, not restarted
    assert more.best_valid_ndcg >= 0.0 and isinstance(more.model, SidRecommender)
    assert not torch.equal(more.last_state["t5.lm_head.weight"], model.state_dict()["t5.lm_head.weight"])


def test_stale_extension_locks_are_removed_and_live_ones_kept(tmp_path) -> None:
    """A build lock left by a killed process hangs every later DeepSpeed start on CPU (torch's
    FileBaton waits for it forever); a young lock is a build in progress and stays."""
    import os

    from digr.rl.grpo import STALE_LOCK_SECONDS, clear_stale_extension_locks

    stale, live = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock", tmp_path / "py311_cpu" / "other_op" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = stale.stat().st_mtime - STALE_LOCK_SECONDS - 1
    os.utime(stale, (old, old))
    assert clear_stale_extension_locks(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists()
    assert clear_stale_extension_locks(str(tmp_path / "missing")) == []


# A hang here (a stuck op build) must fail in minutes, not at the suite's 15-minute default.
def test_run_grpo_with_rollout_workers_matches_rollouts_in_the_trainer(ray_local, tmp_path) -> None:
    """Disaggregated: 2 RolloutWorker actors generate and score the (deterministic, beam)
    groups with the weights each step's trainer sends; the run ends on the weights and history
    of the same run with rollouts inside the trainer (dropout configured: it must stay off)."""
    model, _ = _toy(dropout=0.3)
    cfg = GRPOConfig(steps=3, batch_size=8, group_size=4, rollout="beam", eval_every=3, checkpoint_every=3,
                     valid_users=24, lr=1e-2)
    inside = run_grpo(_examples(), model, cfg, str(tmp_path), name="inside")
    split = run_grpo(_examples(), model, GRPOConfig(**{**cfg.__dict__, "rollout_workers": 2, "rollout_cpus": 0.5}),
                     str(tmp_path), name="workers")
    assert [r["step"] for r in split.history] == [1, 2, 3]
    assert [r["rollout_workers"] for r in inside.history + split.history] == [0] * 3 + [2] * 3
    for a, b in zip(inside.history, split.history):
        assert a["reward"] == pytest.approx(b["reward"]) and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert not torch.equal(split.last_state["t5.lm_head.weight"], model.state_dict()["t5.lm_head.weight"])
    for k, v in inside.last_state.items():
        assert torch.allclose(v, split.last_state[k], atol=1e-5), k


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_run_grpo_with_deepspeed_zero_on_cpu(ray_local, tmp_path, stage: int) -> None:
    pytest.importorskip("deepspeed")
    from digr.platform.scaling import ScalingConfig
    from digr.rl.grpo import DeepSpeedSettings

    model, _ = _toy()
    cfg = GRPOConfig(steps=2, batch_size=8, group_size=4, eval_every=2, checkpoint_every=2, valid_users=24, lr=1e-2,
                     strategy="deepspeed", deepspeed=DeepSpeedSettings(zero_stage=stage),
                     scaling=ScalingConfig(num_workers=2, cpus_per_worker=1))
    res = run_grpo(_examples(), model, cfg, str(tmp_path), name=f"ds{stage}")
    assert [r["step"] for r in res.history] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in res.history)
    before = model.state_dict()
    changed = [k for k, v in res.last_state.items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert "t5.lm_head.weight" in changed  # the engine applied the updates (gathered back under ZeRO-3)


@pytest.mark.timeout(300)
def test_deepspeed_resume_restores_the_optimizer(ray_local, tmp_path) -> None:
    """ZeRO-2 on 2 workers: 2 steps + a resumed 2 steps end on exactly the weights of 4 steps
    in one go, which holds only if Adam's moments came back with the weights."""
    pytest.importorskip("deepspeed")
    from digr.platform.scaling import ScalingConfig
    from digr.rl.grpo import DeepSpeedSettings

    model, _ = _toy()
    cfg = GRPOConfig(steps=4, batch_size=8, group_size=4, eval_every=4, checkpoint_every=2, valid_users=24, lr=1e-2,
                     strategy="deepspeed", deepspeed=DeepSpeedSettings(zero_stage=2),
                     scaling=ScalingConfig(num_workers=2, cpus_per_worker=1))
    straight = run_grpo(_examples(), model, cfg, str(tmp_path), name="straight")
    run_grpo(_examples(), model, GRPOConfig(**{**cfg.__dict__, "steps": 2}), str(tmp_path), name="split")
    resumed = run_grpo(_examples(), model, cfg, str(tmp_path), name="split")
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4]
    for k, v in straight.last_state.items():
        assert torch.allclose(v, resumed.last_state[k], atol=1e-6), k
