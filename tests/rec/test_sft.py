"""SFT: example building by hand, the loop's bookkeeping, and small Ray Train runs (learn, DDP, resume)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from digr.platform.scaling import ScalingConfig
from digr.rec.seqmodel import ModelConfig, SidRecommender, SidVocab
from digr.rec.sft import (
    LoopState,
    SFTConfig,
    check_resumable,
    load_model,
    progress_line,
    run_sft,
    save_model,
    seen_items,
    sft_step,
    track_best,
)
from digr.rec.sft_data import SidCollate, SidDataset, select_examples, target_weights, vocab_for

torch.set_num_threads(1)

# A 4-item catalogue, codebook_size 2, sid_len 3 (2 RQ levels + suffix). Items 0 and 3 share
# the RQ prefix (0, 0), so item 3 gets suffix 1 and suffix_size = 2.
# Token offsets: level 0 -> 2, level 1 -> 2 + 2 = 4, suffix -> 2 + 2 * 2 = 6; vocab_size = 8.
#   item 0 (0,0,0) -> [2,4,6]   item 1 (0,1,0) -> [2,5,6]
#   item 2 (1,0,0) -> [3,4,6]   item 3 (0,0,1) -> [2,4,7]
SIDS4 = np.array([[0, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=np.int64)


def _table(rows: list[tuple[str, str, list[int], int]]) -> pa.Table:
    users, splits, hists, targets = zip(*rows)
    return pa.table({
        "user_id": pa.array(users, pa.string()),
        "split": pa.array(splits, pa.string()),
        "history": pa.array(hists, pa.list_(pa.int32())),
        "target": pa.array(targets, pa.int32()),
    })


# Users a and b interleaved, each user's rows in time order.
EXAMPLES4 = _table([
    ("a", "train", [0], 1),
    ("b", "train", [3], 2),
    ("a", "train", [0, 1], 2),
    ("b", "train", [3, 2], 1),
    ("a", "train", [0, 1, 2], 3),
    ("a", "valid", [0, 1, 2, 3], 0),
    ("b", "valid", [3, 2, 1], 0),
    ("a", "test", [0, 1, 2, 3, 0], 1),
])


def test_vocab_for_hand_catalogue() -> None:
    vocab = vocab_for(SIDS4, codebook_size=2)
    assert vocab == SidVocab(levels=2, codebook_size=2, suffix_size=2)
    assert vocab.vocab_size == 8
    assert vocab.encode(torch.from_numpy(SIDS4)).tolist() == [[2, 4, 6], [2, 5, 6], [3, 4, 6], [2, 4, 7]]


def test_vocab_for_rejects_bad_codes() -> None:
    with pytest.raises(ValueError, match="item 2 has RQ code outside"):
        vocab_for(np.array([[0, 0, 0], [1, 1, 0], [2, 0, 0]]), codebook_size=2)
    with pytest.raises(ValueError, match="negative suffix"):
        vocab_for(np.array([[0, 0, -1]]), codebook_size=2)
    with pytest.raises(ValueError, match="sid_len >= 2"):
        vocab_for(np.array([0, 1]), codebook_size=2)


def test_select_and_collate_by_hand() -> None:
    # Each user's last train row, in table order: b's ([3, 2] -> 1) comes before a's ([0, 1, 2] -> 3).
    train = select_examples(EXAMPLES4, "train", n_items=4, max_per_user=1)
    assert train.histories() == [[3, 2], [0, 1, 2]]
    assert train.targets.tolist() == [1, 3]
    assert len(select_examples(EXAMPLES4, "train", n_items=4)) == 5

    sid_tokens = vocab_for(SIDS4, 2).encode(torch.from_numpy(SIDS4))
    batch = SidCollate(sid_tokens, max_history=3, encoder_input="sid_tokens")(
        [SidDataset(train)[0], SidDataset(train)[1]])
    # [3, 2]    -> 2,4,7 | 3,4,6 | EOS=1, padded with PAD=0 to the longest row (3 items * 3 + 1 = 10)
    # [0, 1, 2] -> 2,4,6 | 2,5,6 | 3,4,6 | EOS=1
    assert batch["input_ids"].tolist() == [
        [2, 4, 7, 3, 4, 6, 1, 0, 0, 0],
        [2, 4, 6, 2, 5, 6, 3, 4, 6, 1],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 7 + [0] * 3, [1] * 10]
    assert batch["labels"].tolist() == [[2, 5, 6], [2, 4, 7]]  # items 1 and 3
    assert batch["targets"].tolist() == [1, 3]

    # max_history=2 keeps the last two items of [0, 1, 2]: 2,5,6 | 3,4,6 | EOS.
    short = SidCollate(sid_tokens, max_history=2, encoder_input="sid_tokens")([SidDataset(train)[1]])
    assert short["input_ids"].tolist() == [[2, 5, 6, 3, 4, 6, 1]]

    # "items": one position per item (its item_idx), right-padded with 0 and masked; no EOS.
    items = SidCollate(sid_tokens, max_history=3, encoder_input="items")([SidDataset(train)[0], SidDataset(train)[1]])
    assert items["input_ids"].tolist() == [[3, 2, 0], [0, 1, 2]]
    assert items["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert items["labels"].tolist() == [[2, 5, 6], [2, 4, 7]]


def test_target_weights_by_hand_and_the_weighted_loss() -> None:
    # Targets 0,0,0,0,1: counts 4, 1, 0. power 0.5: raw 1/2, 1, (unused) -> mean over the 5
    # examples (4 * 1/2 + 1) / 5 = 0.6 -> 0.8333, 1.6667; item 2 is never a target: 1.
    w = target_weights(np.array([0, 0, 0, 0, 1]), 3, 0.5)
    assert torch.allclose(w, torch.tensor([0.5 / 0.6, 1 / 0.6, 1.0]))
    assert torch.equal(target_weights(np.array([0, 0, 1]), 3, 0.0), torch.ones(3))

    train = select_examples(EXAMPLES4, "train", n_items=4, max_per_user=1)  # targets 1, 3
    sid_tokens = vocab_for(SIDS4, 2).encode(torch.from_numpy(SIDS4))
    batch = SidCollate(sid_tokens, 3, "items", torch.tensor([1.0, 2.0, 1.0, 6.0]))(
        [SidDataset(train)[0], SidDataset(train)[1]])
    assert batch["weights"].tolist() == [2.0, 6.0]
    torch.manual_seed(0)
    model = SidRecommender(vocab_for(SIDS4, 2), ModelConfig(d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                           num_decoder_layers=1, num_heads=2, content_features=False),
                           sid_tokens).eval()
    rows = [model(batch["input_ids"][i:i + 1], batch["attention_mask"][i:i + 1], batch["labels"][i:i + 1])
            for i in range(2)]  # each row's mean token loss
    plain = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert torch.allclose(plain, (rows[0] + rows[1]) / 2, atol=1e-6)
    assert torch.allclose(sft_step(model, batch), (2 * rows[0] + 6 * rows[1]) / 8, atol=1e-6)
    ones = model(batch["input_ids"], batch["attention_mask"], batch["labels"], torch.ones(2))
    assert torch.allclose(ones, plain, atol=1e-6)


def test_valid_subset_is_seeded() -> None:
    one = select_examples(EXAMPLES4, "valid", n_items=4, limit=1, seed=0)
    assert len(one) == 1
    assert one.targets.tolist() == select_examples(EXAMPLES4, "valid", n_items=4, limit=1, seed=0).targets.tolist()
    picks = {tuple(select_examples(EXAMPLES4, "valid", n_items=4, limit=1, seed=s).history(0)) for s in range(20)}
    assert picks == {(0, 1, 2, 3), (3, 2, 1)}  # both rows are reachable, so the subset is really sampled


def test_select_rejects_bad_tables() -> None:
    with pytest.raises(ValueError, match="missing column"):
        select_examples(EXAMPLES4.drop_columns(["target"]), "train", n_items=4)
    with pytest.raises(ValueError, match="outside \\[0, 3\\)"):
        select_examples(EXAMPLES4, "train", n_items=3)  # item 3 is past a 3-item catalogue
    with pytest.raises(ValueError, match="unknown value"):
        select_examples(_table([("a", "dev", [0], 1)]), "train", n_items=4)
    with pytest.raises(ValueError, match="split must be one of"):
        select_examples(EXAMPLES4, "eval", n_items=4)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="sft.epochs"):
        SFTConfig(epochs=0)
    with pytest.raises(ValueError, match="sft.valid_beam"):
        SFTConfig(valid_beam=5)
    with pytest.raises(ValueError, match="ema_decay"):
        SFTConfig(ema_decay=1.0)


def test_seen_items() -> None:
    # Row 0 saw items 0 and 2, row 1 saw nothing.
    assert seen_items([[0, 2], []], n_items=3).tolist() == [[True, False, True], [False, False, False]]


def test_track_best_and_patience() -> None:
    state = LoopState()
    # ndcg 0.1 (best), 0.05 (worse), 0.1 (tie = no improvement), 0.2 (best again)
    assert track_best(state, 0.1, epoch=1)
    assert not track_best(state, 0.05, epoch=2)
    assert not track_best(state, 0.1, epoch=3)
    assert (state.best_epoch, state.bad_evals) == (1, 2)
    assert track_best(state, 0.2, epoch=4)
    assert (state.best_ndcg, state.best_epoch, state.bad_evals) == (0.2, 4, 0)


def test_check_resumable() -> None:
    vocab = SidVocab(levels=2, codebook_size=8, suffix_size=1)
    meta = {"model_config": dataclasses.asdict(TINY), "vocab": dataclasses.asdict(vocab)}
    check_resumable(meta, TINY, vocab)  # same network: fine
    with pytest.raises(ValueError, match="model_config"):
        check_resumable(meta, dataclasses.replace(TINY, d_ff=128), vocab)
    with pytest.raises(ValueError, match="vocab"):
        check_resumable(meta, TINY, dataclasses.replace(vocab, suffix_size=2))


def test_progress_line() -> None:
    row = {"train_loss": 2.314, "valid_ndcg@10": 0.02131}
    # 41 s/epoch mean of [40, 42]; 27 epochs left * 41 s = 1107 s = 18.45 min -> "18"
    line = progress_line(3, 30, 480, row, best=0.023, best_epoch=2, seconds=[40.0, 42.0])
    assert line == "sft epoch 3/30 step 480 loss 2.31 valid ndcg@10 0.0213 (best 0.0230 @2) 41 s/epoch ETA 18 min"


# ---------------------------------------------------------------- Ray Train runs on a toy task

# 64 items with distinct SIDs: codebook 8, item i -> (i // 8, i % 8, 0). Each user walks the
# full-period chain f(x) = (5x + 3) mod 64 (Hull-Dobell: 3 odd, 5 - 1 divisible by 4), so the
# next item is a function of the last one and never repeats within a 10-item sequence.
# Chance HR@10 with the <= 9 seen items excluded is at most 10 / 55 = 0.18.
N_TOY = 64
TOY_SIDS = np.stack([np.arange(N_TOY) // 8, np.arange(N_TOY) % 8, np.zeros(N_TOY, dtype=np.int64)], axis=1)
TINY = ModelConfig(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2, dropout=0.0,
                   content_features=False)  # items layout: SID-token sum + item embedding


def _toy_examples(seq_len: int = 10) -> pa.Table:
    rows = []
    for user in range(N_TOY):
        seq = [user]
        while len(seq) < seq_len:
            seq.append((5 * seq[-1] + 3) % N_TOY)
        for t in range(1, seq_len):
            split = "test" if t == seq_len - 1 else "valid" if t == seq_len - 2 else "train"
            rows.append((f"u{user}", split, seq[:t], seq[t]))
    return _table(rows)


TOY = _toy_examples()  # 64 users * 7 train rows = 448 train, 64 valid, 64 test


@pytest.fixture
def fast_reports(monkeypatch) -> None:
    """Ray Train V2's controller polls workers every 2 s, so each `report` waits up to 2 s;
    with 0.2 s epochs that would dominate. The driver propagates this variable at fit time."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


def _toy_cfg(**kw) -> SFTConfig:
    base = dict(model=TINY, batch_size=16, lr=1e-2, warmup_steps=5, max_history=2, valid_users=64,
                valid_beam=10, patience=20, threads_per_worker=1)
    return SFTConfig(**{**base, **kw})


def test_sft_learns_resumes_and_scales_out(ray_local, fast_reports, tmp_path) -> None:
    # 1) Three epochs on one worker: 448 rows / batch 16 = 28 steps per epoch.
    first = run_sft(TOY, TOY_SIDS, 8, _toy_cfg(epochs=3), str(tmp_path), name="toy")
    assert [h["step"] for h in first.history] == [28, 56, 84]
    assert not first.stopped_early

    # 2) Re-run with epochs=6 on two DDP workers: it resumes after epoch 3. Each rank now gets
    # 224 rows: ceil(224 / 16) = 14 steps per epoch, counting on from step 84.
    two = ScalingConfig(num_workers=2)
    res = run_sft(TOY, TOY_SIDS, 8, _toy_cfg(epochs=6, scaling=two), str(tmp_path), name="toy")
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4, 5, 6]
    assert res.history[:3] == first.history  # loaded from the checkpoint, timings included
    assert [h["step"] for h in res.history[3:]] == [98, 112, 126]

    # It learned: the loss falls and valid HR@10 ends far above chance (<= 0.18).
    losses = [h["train_loss"] for h in res.history]
    hr = [h["valid_hr@10"] for h in res.history]
    assert losses[-1] < 0.5 * losses[0], losses
    assert max(hr) >= 0.8 and max(hr) > hr[0] + 0.3, hr
    ndcg = [h["valid_ndcg@10"] for h in res.history]
    assert res.best_epoch == 1 + int(np.argmax(ndcg))

    # 3) Re-running the finished run trains nothing and returns the same best model.
    again = run_sft(TOY, TOY_SIDS, 8, _toy_cfg(epochs=6, scaling=two), str(tmp_path), name="toy")
    assert again.history == res.history and again.best_epoch == res.best_epoch
    assert all(torch.equal(v, res.model_state[k]) for k, v in again.model_state.items())

    # The returned state is the best epoch's model, and it round-trips through save/load.
    save_model(res, str(tmp_path / "model"))
    model = load_model(str(tmp_path / "model"))
    assert model.vocab == res.vocab and torch.equal(model.sid_tokens, res.vocab.encode(torch.from_numpy(TOY_SIDS)))
    assert np.load(tmp_path / "model" / "sids.npy").tolist() == TOY_SIDS.tolist()
    assert model.state_dict().keys() == res.model_state.keys()
    assert all(torch.equal(v, res.model_state[k]) for k, v in model.state_dict().items())


def test_sft_ema_validates_saves_and_resumes_the_average(ray_local, fast_reports, tmp_path) -> None:
    # One epoch (28 steps): the first validation is always the best, so the returned model is
    # the weight average after step 28, which the checkpoint keeps next to the raw weights.
    res = run_sft(TOY, TOY_SIDS, 8, _toy_cfg(epochs=1, ema_decay=0.5), str(tmp_path), name="ema")
    saved = torch.load(os.path.join(res.checkpoint_path, "train_state.pt"), weights_only=False)
    ema, raw = saved["ema"], saved["model"]
    assert int(ema["n_averaged"]) == 28  # updated once per optimizer step
    assert all(torch.equal(v, ema[f"module.{k}"]) for k, v in res.model_state.items())
    assert not torch.equal(raw["t5.lm_head.weight"], ema["module.t5.lm_head.weight"])  # an average, not the raw weights

    # A resumed run continues the same average rather than restarting it.
    more = run_sft(TOY, TOY_SIDS, 8, _toy_cfg(epochs=2, ema_decay=0.5), str(tmp_path), name="ema")
    saved = torch.load(os.path.join(more.checkpoint_path, "train_state.pt"), weights_only=False)
    assert int(saved["ema"]["n_averaged"]) == 56


def test_save_load_round_trip_with_recency_and_tied_tables(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, recency_positions=3, tie_embeddings=True)
    model = SidRecommender(vocab_for(TOY_SIDS, 8), cfg, vocab_for(TOY_SIDS, 8).encode(torch.from_numpy(TOY_SIDS))).eval()
    assert model.t5.lm_head.weight is model.t5.shared.weight
    save_model(model, str(tmp_path / "m"))
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.cfg == cfg and loaded.t5.lm_head.weight is loaded.t5.shared.weight
    assert torch.equal(loaded.recency.weight, model.recency.weight)
    ids, mask = model.batch([[1, 2, 3], [4]], max_items=5)
    labels = model.vocab.encode(torch.from_numpy(TOY_SIDS[[5, 6]]))
    assert torch.equal(loaded(ids, mask, labels), model(ids, mask, labels))

