"""Non-generative baselines on item_idx sequences: popularity and SASRec.

Split convention (leave-last-out, as in `metrics`): for a user's chronological sequence s,
the test target is s[-1] (history s[:-1]), the valid target s[-2] (history s[:-2]), and the
train part is s[:-2]. Baselines learn from train parts only, so neither held-out item leaks.

SASRec: Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018. The defaults
follow RecBole 1.2.1's SASRec, the implementation reviewers compare against: post-LN blocks
(BERT-style), a LayerNorm + dropout on the input embeddings, N(0, 0.02) init, GELU, 2 layers x
2 heads x 64, dropout 0.5, Adam 1e-3, batch 256, max length 20, and RecBole's training data:
every prefix of every training sequence is one example, scored at its last position only, with
a softmax over the whole catalogue (CE; e.g. Klenitskiy & Vasilev, RecSys 2023, find it much
stronger than the paper's BCE). `benchmarks/bench_baselines.py` runs RecBole itself on the same
split. The recipe this project used before (pre-LN, one window of the last max_len + 1 items per
user with every position a target) stays reachable: `norm="pre", examples="windows"`.
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
    """SASRec hyper-parameters; the defaults are RecBole 1.2.1's SASRec with CE loss (module
    docstring). The earlier in-house recipe, picked on amazon-scientific valid NDCG@10, was
    dropout 0.3, max_len 50, lr 3e-3, norm "pre", examples "windows" (docs/results.md)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 2
    ffn_mult: int = 4  # feed-forward width = ffn_mult * hidden (RecBole inner_size 256)
    dropout: float = 0.5  # hidden and attention dropout (RecBole hidden_dropout_prob, attn_dropout_prob)
    max_len: int = 20  # items of history the model reads (most recent kept)
    epochs: int = 300
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    loss: str = "ce"  # "ce": softmax over the whole catalogue; "bce": one sampled negative per position
    patience: int = 10  # evaluations without a better valid NDCG@10 before stopping
    eval_every: int = 1  # epochs between validations
    norm: str = "post"  # "post": RecBole / BERT blocks, embedding LayerNorm; "pre": pre-LN blocks + final norm
    examples: str = "prefixes"  # "prefixes": every prefix one example (RecBole); "windows": one per user
    seed: int = 0

    def recipe(self) -> str:
        """One line for reports: RecBole-grade, or which settings differ from RecBole's."""
        ref = SASRecConfig()
        diff = [f"{f}={getattr(self, f)}" for f in self.__dataclass_fields__
                if f not in ("seed", "eval_every") and getattr(self, f) != getattr(ref, f)]
        return ("RecBole 1.2.1 SASRec settings (CE)" if not diff else
                "in-house recipe, not RecBole-grade: " + ", ".join(diff))

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
        if self.norm not in ("post", "pre"):
            raise ValueError(f"SASRecConfig.norm must be 'post' or 'pre', got {self.norm!r}")
        if self.examples not in ("prefixes", "windows"):
            raise ValueError(f"SASRecConfig.examples must be 'prefixes' or 'windows', got {self.examples!r}")
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
        post = cfg.norm == "post"
        layer = nn.TransformerEncoderLayer(
            cfg.hidden, cfg.heads, cfg.ffn_mult * cfg.hidden, cfg.dropout,
            activation="gelu", batch_first=True, norm_first=not post, layer_norm_eps=1e-12 if post else 1e-5,
        )
        if post:
            layer.dropout = nn.Identity()  # RecBole's feed-forward has no dropout between its two layers
        # enable_nested_tensor only applies to post-LN with a padding mask; off avoids a warning.
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        # Post-LN: the input embeddings are normalised (RecBole); pre-LN: the output is.
        self.emb_norm = nn.LayerNorm(cfg.hidden, eps=1e-12) if post else nn.Identity()
        self.final_norm = nn.Identity() if post else nn.LayerNorm(cfg.hidden)
        # Small init (BERT4Rec / RecBole): the default N(0, 1) makes the initial dot-product
        # scores so large that softmax training starts saturated.
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        if post:  # RecBole's init of every Linear (its q/k/v are Linears: our fused in_proj too)
            for m in self.encoder.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.MultiheadAttention):
                    nn.init.normal_(m.in_proj_weight, std=0.02)
                    nn.init.zeros_(m.in_proj_bias)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T) int64, item_idx + 1, 0 = padding on the right, T <= max_len.

        Returns hidden states (B, T, hidden); position t depends on tokens[:, :t + 1] only.
        """
        if tokens.shape[1] > self.cfg.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len={self.cfg.max_len}")
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.emb_norm(self.item_emb(tokens) + self.pos_emb(positions)))
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
    out = np.empty((len(histories), k), dtype=np.int64)
    for start in range(0, len(histories), batch_size):
        scores = sasrec_scores(model, histories[start : start + batch_size],
                               None if exclude is None else exclude[start : start + batch_size])
        values, idx = scores.topk(k, dim=1)
        idx[values == float("-inf")] = EMPTY
        out[start : start + len(idx)] = idx.cpu().numpy()
    return out


@torch.no_grad()
def sasrec_scores(model: SASRec, histories: Sequence[Sequence[int]], exclude: np.ndarray | None = None) -> torch.Tensor:
    """Scores h_t . E[j] of every item after each history (one batch, no chunking).

    histories: B non-empty item_idx lists, oldest first (the last max_len items are read).
    exclude: (B, n_items) bool, True = -inf. Returns (B, n_items) float32 on the model's device;
    `torch.log_softmax(scores, -1)` is SASRec's log p(item | history) (excluded items at 0 mass).
    """
    n_items = model.n_items
    if exclude is not None and exclude.shape != (len(histories), n_items):
        raise ValueError(f"exclude must be (B={len(histories)}, n_items={n_items}) bool, got {exclude.shape}")
    for row, h in enumerate(histories):
        if len(h) == 0:
            raise ValueError(f"history {row} is empty: SASRec needs at least one item")
    _check_items([i for h in histories for i in h], n_items, "histories")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunk = [list(h[-model.cfg.max_len :]) for h in histories]
    tokens = _pad_right([[i + 1 for i in h] for h in chunk], 0).to(device)
    last = torch.as_tensor([len(h) - 1 for h in chunk], device=device)
    scores = model.item_scores(model(tokens)[torch.arange(len(chunk), device=device), last]).float()  # (B, n_items)
    if exclude is not None:
        scores = scores.masked_fill(torch.as_tensor(exclude, device=device), float("-inf"))
    model.train(was_training)
    return scores


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


def training_windows(sequences: Sequence[Sequence[int]], max_len: int, examples: str) -> list[list[int]]:
    """The training examples of full sequences, each a list of up to max_len + 1 item_idx whose
    first len - 1 are the input and the rest the targets.

    "prefixes" (RecBole): for every train part t and every position j >= 1, t[max(0, j - max_len) : j + 1],
        scored at its last position only (its target t[j]): len(t) - 1 examples per user.
    "windows": one per user, the last max_len + 1 items of t, every position a target.
    E.g. t = [5, 6, 7, 8], max_len 2: prefixes [5, 6], [5, 6, 7], [6, 7, 8]; windows [6, 7, 8].
    """
    parts = [train_part(s) for s in sequences]
    if examples == "windows":
        return [t[-(max_len + 1):] for t in parts if len(t) >= 2]
    return [t[max(0, j - max_len): j + 1] for t in parts for j in range(1, len(t))]


def train_sasrec(
    sequences: Sequence[Sequence[int]],
    n_items: int,
    cfg: SASRecConfig,
    log: Callable[[str], None] = print,
) -> tuple[SASRec, list[dict]]:
    """Train on train parts, early-stop on valid NDCG@10 (seen items excluded).

    sequences: one full chronological item_idx list per user (valid and test targets
        included; they are cut here). Training examples: `training_windows`.
    Returns the model with its best-validation weights (in eval mode) and one dict per
    validation: {"epoch", "loss", "hr@10", "ndcg@10", "seconds"}.
    """
    if n_items < 2:
        raise ValueError(f"n_items must be >= 2, got {n_items}")
    _check_items([i for s in sequences for i in s], n_items, "sequences")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    windows = training_windows(sequences, cfg.max_len, cfg.examples)
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
        # Prefixes are shuffled as RecBole does; windows grouped by length (`_length_batches`).
        order = (_length_batches(lengths, cfg.batch_size, rng) if cfg.examples == "windows" else
                 np.array_split(rng.permutation(len(windows)), max(1, -(-len(windows) // cfg.batch_size))))
        for b in order:
            rows = [windows[i] for i in b]
            inputs = _pad_right([[i + 1 for i in w[:-1]] for w in rows], 0)
            targets = _pad_right([w[1:] for w in rows], -1)
            if cfg.examples == "prefixes":  # only the last position is a target
                last = torch.as_tensor([len(w) - 2 for w in rows])
                keep = torch.zeros_like(targets, dtype=torch.bool)
                keep[torch.arange(len(rows)), last] = True
                targets = targets.masked_fill(~keep, -1)
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

