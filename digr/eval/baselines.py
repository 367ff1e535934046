"""Non-generative baselines on item_idx sequences: popularity and SASRec.

Split convention (leave-last-out, as in `metrics`): for a user's chronological sequence s,
the test target is s[-1] (history s[:-1]), the valid target s[-2] (history s[:-2]), and the
train part is s[:-2]. Baselines learn from train parts only, so neither held-out item leaks.

SASRec: Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018. The model is
the paper's (shared item embeddings, learned positions, causal self-attention, scores =
h · E_item); the optional full-catalogue cross-entropy loss follows later re-evaluations
(e.g. Klenitskiy & Vasilev, RecSys 2023) that find it much stronger than the paper's BCE.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from digr.data.metrics import EMPTY, hr_ndcg

HOLDOUT = 2  # valid + test targets at the end of every sequence


def train_part(seq: Sequence[int]) -> list[int]:
    """The training interactions of one chronological sequence: all but the last two."""
    return list(seq[:-HOLDOUT])


def seen_mask(histories: Sequence[Sequence[int]], n_items: int) -> np.ndarray:
    """(B, n_items) bool, True where the item is in that row's history."""
    mask = np.zeros((len(histories), n_items), dtype=bool)
    for row, h in enumerate(histories):
        mask[row, np.asarray(h, dtype=np.int64)] = True
    return mask


# --------------------------------------------------------------------------- popularity


def popularity_counts(sequences: Sequence[Sequence[int]], n_items: int) -> np.ndarray:
    """(n_items,) int64 interaction counts over the train parts of full sequences."""
    flat = [i for s in sequences for i in train_part(s)]
    _check_items(flat, n_items, "sequences")
    return np.bincount(np.asarray(flat, dtype=np.int64), minlength=n_items)


def popularity_rank(
    train_sequences_or_counts: np.ndarray | Sequence[Sequence[int]],
    histories: Sequence[Sequence[int]],
    k: int,
    exclude_seen: bool = True,
    n_items: int | None = None,
) -> np.ndarray:
    """Most-interacted items first, ties broken by lower item_idx.

    train_sequences_or_counts: (n_items,) counts (see `popularity_counts`, which cuts the
        held-out items from full sequences), or train parts that are counted as given.
    histories: B item_idx lists; with exclude_seen their items are not recommended.
    n_items: catalogue size; needed only with sequences (default: max id seen + 1).
    Returns (B, k) int64 item_idx, EMPTY-padded when fewer than k items remain.
    """
    if isinstance(train_sequences_or_counts, np.ndarray):
        counts = train_sequences_or_counts
        if counts.ndim != 1 or (counts < 0).any():
            raise ValueError(f"counts must be a (n_items,) non-negative array, got shape {counts.shape}")
        if n_items is not None and n_items != counts.shape[0]:
            raise ValueError(f"n_items={n_items} but counts has {counts.shape[0]} entries")
    else:
        flat = [i for s in train_sequences_or_counts for i in s]
        if n_items is None:
            n_items = 1 + max((max(flat, default=-1), *(max(h, default=-1) for h in histories)))
        _check_items(flat, n_items, "train_sequences")
        counts = np.bincount(np.asarray(flat, dtype=np.int64), minlength=n_items)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    # A stable sort of -count keeps equal counts in item_idx order: the tie-break.
    order = np.argsort(-counts, kind="stable")
    out = np.full((len(histories), k), EMPTY, dtype=np.int64)
    for row, h in enumerate(histories):
        seen = set(h) if exclude_seen else set()
        # The first k + |seen| items of the global order always hold k unseen ones.
        picks = [i for i in order[: k + len(seen)] if i not in seen][:k]
        out[row, : len(picks)] = picks
    return out


# --------------------------------------------------------------------------- SASRec


@dataclass(frozen=True)
class SASRecConfig:
    """SASRec hyper-parameters.

    Defaults were picked on amazon-scientific valid NDCG@10 (seen items excluded), single
    CPU thread: about 33 epochs / 160 s, valid NDCG@10 0.078, test NDCG@10 0.065 and HR@10
    0.092 (popularity: 0.017 / 0.025). dropout 0.5 scored the same in 3x the epochs and
    max_len 20 the same in 110 s. On long-history data (MovieLens) lower `epochs` or
    `patience` to bound the time: one epoch reads up to max_len positions per user.
    """

    hidden: int = 64
    layers: int = 2
    heads: int = 2
    ffn_mult: int = 4  # feed-forward width = ffn_mult * hidden
    dropout: float = 0.3
    max_len: int = 50  # items of history the model reads (most recent kept)
    epochs: int = 200
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.0
    loss: str = "ce"  # "ce": softmax over the whole catalogue; "bce": one sampled negative per position
    patience: int = 10  # evaluations without a better valid NDCG@10 before stopping
    eval_every: int = 1  # epochs between validations
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "ffn_mult", "max_len", "epochs", "batch_size", "patience", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"SASRecConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"SASRecConfig.hidden={self.hidden} must be divisible by heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SASRecConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.loss not in ("ce", "bce"):
            raise ValueError(f"SASRecConfig.loss must be 'ce' or 'bce', got {self.loss!r}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"SASRecConfig.lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")


class SASRec(nn.Module):
    """Causal self-attention over item embeddings; the score of item j is h_t · E[j].

    Inputs are item_idx + 1, right-padded with 0, so that under a causal mask no real position
    ever attends to padding (left padding, as in the paper, needs a key mask whose all-masked
    rows give NaN). Positions count from the oldest item in the window.
    """

    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.n_items = n_items
        self.cfg = cfg
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            cfg.hidden, cfg.heads, cfg.ffn_mult * cfg.hidden, cfg.dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        # enable_nested_tensor only applies to post-LN with a padding mask; off avoids a warning.
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(cfg.hidden)  # pre-LN blocks leave the output un-normalised
        # Small init (BERT4Rec / RecBole style): the default N(0, 1) makes the initial
        # dot-product scores so large that softmax training starts saturated.
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T) int64, item_idx + 1, 0 = padding on the right, T <= max_len.

        Returns hidden states (B, T, hidden); position t depends on tokens[:, :t + 1] only.
        """
        if tokens.shape[1] > self.cfg.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len={self.cfg.max_len}")
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.item_emb(tokens) + self.pos_emb(positions))
        causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
        return self.final_norm(self.encoder(x, mask=causal, is_causal=True))

    def item_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (..., hidden) -> (..., n_items) scores against every item (shared embeddings)."""
        return hidden @ self.item_emb.weight[1:].T


def _check_items(items: Sequence[int], n_items: int, what: str) -> None:
    if len(items) and (min(items) < 0 or max(items) >= n_items):
        raise ValueError(f"{what} hold item_idx outside [0, {n_items}): min {min(items)}, max {max(items)}")


def _pad_right(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Rows of different lengths -> (B, max_len_in_batch) int64, padded with `value`."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


@torch.no_grad()
def sasrec_rank(
    model: SASRec,
    histories: Sequence[Sequence[int]],
    k: int,
    exclude: np.ndarray | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    """Top-k items over the full catalogue after each history.

    histories: B non-empty item_idx lists, oldest first (the last max_len items are read).
    exclude: (B, n_items) bool, True = never recommend (e.g. `seen_mask(histories, n)`).
    Returns (B, k) int64 item_idx, best first, EMPTY where fewer than k items are allowed.
    """
    n_items = model.n_items
    if not 1 <= k <= n_items:
        raise ValueError(f"k must be in [1, n_items={n_items}], got {k}")
    if exclude is not None and exclude.shape != (len(histories), n_items):
        raise ValueError(f"exclude must be (B={len(histories)}, n_items={n_items}) bool, got {exclude.shape}")
    for row, h in enumerate(histories):
        if len(h) == 0:
            raise ValueError(f"history {row} is empty: SASRec needs at least one item")
    _check_items([i for h in histories for i in h], n_items, "histories")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = np.empty((len(histories), k), dtype=np.int64)
    for start in range(0, len(histories), batch_size):
        chunk = [list(h[-model.cfg.max_len :]) for h in histories[start : start + batch_size]]
        tokens = _pad_right([[i + 1 for i in h] for h in chunk], 0).to(device)
        last = torch.as_tensor([len(h) - 1 for h in chunk], device=device)
        hidden = model(tokens)[torch.arange(len(chunk), device=device), last]  # (b, hidden)
        scores = model.item_scores(hidden)  # (b, n_items)
        if exclude is not None:
            ex = torch.as_tensor(exclude[start : start + len(chunk)], device=device)
            scores = scores.masked_fill(ex, float("-inf"))
        values, idx = scores.topk(k, dim=1)
        idx[values == float("-inf")] = EMPTY
        out[start : start + len(chunk)] = idx.cpu().numpy()
    model.train(was_training)
    return out


def _sequence_loss(model: SASRec, inputs: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """inputs: (B, T) item_idx + 1 right-padded with 0; targets: (B, T) item_idx, -1 = no target."""
    hidden = model(inputs)
    valid = targets >= 0
    h = hidden[valid]  # (N, hidden): score only real positions, pads are most of a batch
    pos = targets[valid]
    if loss == "ce":
        return F.cross_entropy(model.item_scores(h), pos)
    # BCE with one uniform negative per position (paper, Sec. III-E); a negative that equals
    # the positive is shifted by one so it is never the target itself.
    neg = torch.randint(0, model.n_items, pos.shape, device=pos.device)
    neg = torch.where(neg == pos, (neg + 1) % model.n_items, neg)
    emb = model.item_emb.weight[1:]
    pos_logit = (h * emb[pos]).sum(-1)
    neg_logit = (h * emb[neg]).sum(-1)
    return F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit)) + \
        F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit))


def _length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index batches of similar length, in random order.

    lengths: (N,) int. Most histories are short (median 6 on Amazon 5-core) and a few long
    ones would pad a random batch to max_len: grouping by length cuts the padded work ~9x.
    A random permutation before the stable sort reshuffles who shares a batch every epoch.
    """
    order = rng.permutation(len(lengths))
    order = order[np.argsort(lengths[order], kind="stable")]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def train_sasrec(
    sequences: Sequence[Sequence[int]],
    n_items: int,
    cfg: SASRecConfig,
    log: Callable[[str], None] = print,
) -> tuple[SASRec, list[dict]]:
    """Train on train parts, early-stop on valid NDCG@10 (seen items excluded).

    sequences: one full chronological item_idx list per user (valid and test targets
        included; they are cut here). Training pairs are input s[:-1], targets s[1:] over
        the last max_len + 1 items of each train part s, every position a target.
    Returns the model with its best-validation weights (in eval mode) and one dict per
    validation: {"epoch", "loss", "hr@10", "ndcg@10", "seconds"}.
    """
    if n_items < 2:
        raise ValueError(f"n_items must be >= 2, got {n_items}")
    _check_items([i for s in sequences for i in s], n_items, "sequences")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    windows = [train_part(s)[-(cfg.max_len + 1) :] for s in sequences]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError(f"no sequence is long enough to train on (need >= {HOLDOUT + 2} items)")
    valid_users = [s for s in sequences if len(s) >= HOLDOUT + 1]
    valid_hist = [list(s[:-HOLDOUT]) for s in valid_users]
    valid_tgt = np.asarray([s[-HOLDOUT] for s in valid_users], dtype=np.int64)

    lengths = np.asarray([len(w) for w in windows])
    model = SASRec(n_items, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict] = []
    best_ndcg, best_state, bad_evals = -1.0, copy.deepcopy(model.state_dict()), 0
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        total, batches = 0.0, 0
        for b in _length_batches(lengths, cfg.batch_size, rng):
            rows = [windows[i] for i in b]
            inputs = _pad_right([[i + 1 for i in w[:-1]] for w in rows], 0)
            targets = _pad_right([w[1:] for w in rows], -1)
            loss = _sequence_loss(model, inputs, targets, cfg.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
        if epoch % cfg.eval_every and epoch != cfg.epochs:
            continue
        metrics = _validate(model, valid_hist, valid_tgt) if valid_users else {"hr@10": 0.0, "ndcg@10": 0.0}
        row = {"epoch": epoch, "loss": total / batches, **metrics, "seconds": time.perf_counter() - start}
        history.append(row)
        log(f"sasrec epoch {epoch}: loss {row['loss']:.4f} valid hr@10 {metrics['hr@10']:.4f} "
            f"ndcg@10 {metrics['ndcg@10']:.4f} ({row['seconds']:.0f}s)")
        if metrics["ndcg@10"] > best_ndcg:
            best_ndcg, best_state, bad_evals = metrics["ndcg@10"], copy.deepcopy(model.state_dict()), 0
        else:
            bad_evals += 1
            if bad_evals >= cfg.patience:
                log(f"sasrec early stop at epoch {epoch}; best valid ndcg@10 {best_ndcg:.4f}")
                break
    model.load_state_dict(best_state)
    model.eval()
    return model, history


def _validate(model: SASRec, histories: list[list[int]], targets: np.ndarray, chunk: int = 2048) -> dict[str, float]:
    """HR/NDCG@10 on (history, target) pairs with seen items excluded; chunked so the
    (B, n_items) exclusion mask stays small on large catalogues."""
    k = min(10, model.n_items)  # toy catalogues smaller than 10 score their full ranking
    ranked = np.concatenate([
        sasrec_rank(model, histories[s : s + chunk], k, seen_mask(histories[s : s + chunk], model.n_items))
        for s in range(0, len(histories), chunk)
    ])
    ranked = np.pad(ranked, ((0, 0), (0, 10 - k)), constant_values=EMPTY)
    out = hr_ndcg(ranked, targets, ks=(10,))
    return {"hr@10": out["hr@10"], "ndcg@10": out["ndcg@10"]}

