"""Tensors that grow by rows in amortised O(rows added), for adding items to a served catalogue.

`torch.cat([t, rows])` copies all of `t`: at 1M items that is ~0.5 GB per table (the item
embeddings, the decoder's last-level prefix states) for every 100 items added. `append_rows`
instead allocates spare capacity once and writes later rows into it, like a vector's push_back.
Written by hand: torch has no growable tensor (`resize_` reallocates and cannot share a
storage with tensors that are still being read).

Safe with readers: rows already handed out are never written again, so a tensor returned
earlier (the parent trie's tables, a decode in flight) still sees exactly its own rows. Only the
longest tensor over a storage may grow in place (the storage records how much of it is handed
out); growing an older, shorter one copies, so two branches never write the same rows.
"""

from __future__ import annotations

import math

import torch

_USED = "_digr_rows_used"  # attribute on the storage: elements handed out, from offset 0


def append_rows(t: torch.Tensor, rows: torch.Tensor, spare: float = 0.25) -> torch.Tensor:
    """t (N, *rest), rows (M, *rest) -> (N + M, *rest), t's rows then rows, t's dtype and device.

    In place into `t`'s spare capacity when `t` is the longest tensor handed out over it;
    otherwise one copy into a new storage with room for `spare` x (N + M) more rows. The result
    is a plain tensor (no autograd history); `t` itself is unchanged.
    """
    if t.ndim == 0 or rows.shape[1:] != t.shape[1:]:
        raise ValueError(f"append_rows: rows {tuple(rows.shape)} do not match t {tuple(t.shape)} after dim 0")
    n, m = t.shape[0], rows.shape[0]
    storage = t.untyped_storage()
    need = (n + m) * math.prod(t.shape[1:]) * t.element_size()
    if (t.is_contiguous() and t.storage_offset() == 0 and getattr(storage, _USED, None) == t.numel()
            and storage.nbytes() >= need):
        out = torch.empty(0, dtype=t.dtype, device=t.device).set_(storage, 0, (n + m, *t.shape[1:]))
    else:
        capacity = n + m + max(1, int(spare * (n + m)))
        out = torch.empty((capacity, *t.shape[1:]), dtype=t.dtype, device=t.device)[: n + m]
        out[:n] = t.detach()
        storage = out.untyped_storage()
    out[n:] = rows.detach().to(t)
    setattr(storage, _USED, out.numel())
    return out
