"""SFT examples: (history -> next item) rows as compact arrays, a torch Dataset and its collate.

The lead's pipeline hands SFT an `examples` table (user_id, split, history, target), one
row per prediction: sliding-window targets for 'train', the second-to-last item for
'valid', the last for 'test'. Here the rows of one split become `Examples`, ragged
histories in pyarrow's list layout (values + offsets), so a 100k-row split ships to Ray
Train workers as three flat int arrays instead of 100k Python lists.

One training pair (TIGER, Rajput et al. 2023):
    encoder input = the last `max_history` history items: their item indices, one position
                    each ("items"), or their SID tokens flattened + EOS ("sid_tokens")
    labels        = the target's `sid_len` SID tokens (fixed length, so no EOS)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from digr.rec.seqmodel import SidVocab, history_inputs

SPLITS = ("train", "valid", "test")
COLUMNS = ("user_id", "split", "history", "target")


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value
class Examples:
    """Ragged histories: row i is values[offsets[i]:offsets[i+1]] (item_idx, oldest first).

    values: (total,) int64, offsets: (N + 1,) int64, targets: (N,) int64 item_idx.
    """

    values: np.ndarray
    offsets: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def history(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def histories(self) -> list[list[int]]:
        return [self.history(i).tolist() for i in range(len(self))]


def vocab_for(sids: np.ndarray, codebook_size: int) -> SidVocab:
    """The SID vocabulary implied by the codes. sids: (N_items, sid_len) int64, row = item_idx."""
    sids = np.asarray(sids)
    if sids.ndim != 2 or sids.shape[1] < 2 or sids.shape[0] == 0:
        raise ValueError(f"sids must be (N_items, sid_len >= 2) codes, got shape {sids.shape}")
    if not np.issubdtype(sids.dtype, np.integer):
        raise ValueError(f"sids must be integer codes, got dtype {sids.dtype}")
    if codebook_size < 1:
        raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
    rq, suffix = sids[:, :-1], sids[:, -1]
    if rq.min() < 0 or rq.max() >= codebook_size:
        item = int(np.flatnonzero(((rq < 0) | (rq >= codebook_size)).any(axis=1))[0])
        raise ValueError(
            f"sids: item {item} has RQ code outside [0, codebook_size={codebook_size}): {sids[item].tolist()}"
        )
    if suffix.min() < 0:
        raise ValueError(f"sids: item {int(np.argmin(suffix))} has a negative suffix code {int(suffix.min())}")
    return SidVocab(levels=sids.shape[1] - 1, codebook_size=codebook_size, suffix_size=int(suffix.max()) + 1)


def _check_table(examples: pa.Table, n_items: int) -> None:
    missing = [c for c in COLUMNS if c not in examples.column_names]
    if missing:
        raise ValueError(f"examples is missing column(s) {missing}; it has {examples.column_names}")
    if examples["history"].null_count or examples["target"].null_count:
        raise ValueError("examples: 'history' and 'target' must have no nulls")
    unknown = set(pc.unique(examples["split"]).to_pylist()) - set(SPLITS)
    if unknown:
        raise ValueError(f"examples.split: unknown value(s) {sorted(map(str, unknown))}; expected {SPLITS}")
    for name, col in (("target", examples["target"]), ("history", pc.list_flatten(examples["history"]))):
        if len(col) and (pc.min(col).as_py() < 0 or pc.max(col).as_py() >= n_items):
            raise ValueError(
                f"examples.{name}: item_idx outside [0, {n_items}) (min {pc.min(col).as_py()}, "
                f"max {pc.max(col).as_py()}); sids has {n_items} rows"
            )


def _last_per_user(user_ids: pa.ChunkedArray, n: int) -> np.ndarray:
    """(rows,) bool: True for each user's last `n` rows in table order (rows are chronological)."""
    codes = pc.dictionary_encode(user_ids).combine_chunks().indices.to_numpy(zero_copy_only=False)
    order = np.argsort(codes, kind="stable")  # groups users, keeps table order inside a group
    sorted_codes = codes[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_codes)) + 1]
    ends = np.r_[starts[1:], len(codes)]
    sizes = ends - starts
    from_end = np.repeat(ends, sizes) - 1 - np.arange(len(codes))  # 0 = the user's last row
    keep = np.zeros(len(codes), dtype=bool)
    keep[order[from_end < n]] = True
    return keep


def select_examples(
    examples: pa.Table,
    split: str,
    n_items: int,
    max_per_user: int = 0,
    limit: int = 0,
    seed: int = 0,
) -> Examples:
    """The rows of one split as `Examples`.

    max_per_user > 0 keeps each user's last `max_per_user` rows (table order is time order);
    limit > 0 keeps a seeded random subset of at most `limit` rows, in table order, so the
    validation subset is the same on every run and every resume.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _check_table(examples, n_items)
    rows = examples.filter(pc.equal(examples["split"], split))
    if max_per_user > 0 and rows.num_rows:
        rows = rows.filter(pa.array(_last_per_user(rows["user_id"], max_per_user)))
    if 0 < limit < rows.num_rows:
        pick = np.sort(np.random.default_rng(seed).choice(rows.num_rows, size=limit, replace=False))
        rows = rows.take(pa.array(pick))
    history = rows["history"]
    lengths = pc.list_value_length(history).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(history).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    targets = rows["target"].to_numpy().astype(np.int64)
    return Examples(values=values, offsets=offsets, targets=targets)


class SidDataset(torch.utils.data.Dataset):
    """Row i -> (history item_idx list, target item_idx); `SidCollate` turns a batch into tensors."""

    def __init__(self, examples: Examples) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.examples.history(i).tolist(), int(self.examples.targets[i])


class SidCollate:
    """A batch of (history, target) -> tensors, padded to the batch's longest history.

    sid_tokens: (N_items, sid_len) int64 token ids (`vocab.encode(sids)`).
    Returns input_ids (B, T) and attention_mask (B, T) as `seqmodel.history_inputs` lays them
    out for `encoder_input` (T = longest kept history for "items", that * sid_len + 1 for
    "sid_tokens"), labels (B, sid_len) token ids and targets (B,) item_idx.
    """

    def __init__(self, sid_tokens: torch.Tensor, max_history: int, encoder_input: str = "items",
                 item_weights: torch.Tensor | None = None) -> None:
        self.sid_tokens = sid_tokens
        self.max_history = max_history
        self.encoder_input = encoder_input
        self.item_weights = item_weights  # (N_items,) loss weight of an example by its target, or None

    def __call__(self, batch: list[tuple[list[int], int]]) -> dict[str, Any]:
        histories = [h for h, _ in batch]
        targets = torch.tensor([t for _, t in batch], dtype=torch.long)
        input_ids, attention_mask = history_inputs(histories, self.sid_tokens, self.max_history, self.encoder_input)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": self.sid_tokens[targets],
            "targets": targets,
        } | ({} if self.item_weights is None else {"weights": self.item_weights[targets]})


def target_weights(targets: np.ndarray, n_items: int, power: float) -> torch.Tensor:
    """(n_items,) float32 loss weights count(item as a target)^-power, scaled so the training
    examples' mean weight is 1 (the loss scale, and so the learning rate, stays that of the plain
    mean). power 0 -> all ones; 0.5 -> a target seen 4x as often counts half as much per example.

    >>> target_weights(np.array([0, 0, 0, 0, 1]), 3, 0.5).tolist()  # counts 4, 1, 0
    [0.8333333134651184, 1.6666666269302368, 1.0]
    """
    counts = np.bincount(targets, minlength=n_items).astype(np.float64)
    w = np.ones(n_items)  # an item never a training target keeps 1: no example carries it
    seen = counts > 0
    w[seen] = counts[seen] ** -power
    if len(targets):
        w[seen] /= w[targets].mean()
    return torch.from_numpy(w.astype(np.float32))
