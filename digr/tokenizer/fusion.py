"""Cross-modal fusion before quantisation (CMSA, DeepInterestGR): pure torch, no Ray.

    e_vis = W_v · img                 W_v: (d_vis, d_img), no bias
    e_mm  = W_f · [e_text; e_vis]     W_f: (d_out, d_text + d_vis), no bias

Both maps are linear without bias, as the paper writes them; the tokenizer trains them with
its own objective (this module only defines them).

Items without an image (images.parquet status != ok) take a learned vector `e_none` (d_vis,)
in place of W_v · img. Why this rather than the alternatives:
- a zero e_vis would make "no image" indistinguishable from "an image whose projection is
  near zero", and pushes every imageless item onto the text-only subspace of W_f's output;
- zero e_vis plus an indicator column widens W_f to [e_text; e_vis; 1]: in e_mm that indicator
  adds a learned offset, which is exactly what W_f · [0; e_none] adds, so the two are the
  same family; the learned vector keeps the paper's input shape [e_text; e_vis] as written;
- the choice is made with `torch.where`, not by multiplying by the mask, so whatever sits in an
  imageless row of `img` (NaN from `digr.evidence.images.load_image_vectors`) cannot leak into e_mm or
  into any gradient.
`e_none` starts at zero (so at initialisation an imageless item is its text projection) and
gets gradient only from imageless items; W_v gets gradient only from items with an image.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class CrossModalFusion(nn.Module):
    """e_text (N, d_text), img (N, d_img), has_image (N,) bool -> e_mm (N, d_out).

    Parameters: W_v = `vis.weight` (d_vis, d_img), W_f = `fuse.weight` (d_out, d_text + d_vis),
    `e_none` (d_vis,). d_vis defaults to d_text and d_out to d_text (the tokenizer's input width
    stays what the text-only RQ-VAE saw)."""

    def __init__(self, d_text: int, d_img: int, d_vis: int | None = None, d_out: int | None = None) -> None:
        super().__init__()
        self.d_text, self.d_img = d_text, d_img
        self.d_vis, self.d_out = d_vis or d_text, d_out or d_text
        self.vis = nn.Linear(d_img, self.d_vis, bias=False)
        self.fuse = nn.Linear(d_text + self.d_vis, self.d_out, bias=False)
        self.e_none = nn.Parameter(torch.zeros(self.d_vis))

    def visual(self, img: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        """img (N, d_img), has_image (N,) bool -> e_vis (N, d_vis): W_v · img, or e_none where no image."""
        if img.shape[-1] != self.d_img or has_image.shape != img.shape[:1]:
            raise ValueError(f"img {tuple(img.shape)} / has_image {tuple(has_image.shape)}: "
                             f"expected (N, {self.d_img}) / (N,)")
        mask = has_image.to(torch.bool).unsqueeze(-1)                        # (N, 1)
        safe = torch.where(mask, img, torch.zeros((), dtype=img.dtype, device=img.device))  # NaN rows -> 0
        return torch.where(mask, self.vis(safe), self.e_none.to(img.dtype))  # (N, d_vis)

    def forward(self, e_text: torch.Tensor, img: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        """-> e_mm (N, d_out) = W_f · [e_text; e_vis]."""
        if e_text.shape != (img.shape[0], self.d_text):
            raise ValueError(f"e_text {tuple(e_text.shape)}: expected ({img.shape[0]}, {self.d_text})")
        return self.fuse(torch.cat([e_text, self.visual(img, has_image)], dim=-1))


def pack_image(e_text: np.ndarray, img: np.ndarray, has_image: np.ndarray) -> np.ndarray:
    """(N, D_t), (N, D_i) with NaN rows where there is no image, (N,) bool -> (N, D_t + D_i + 1):
    [e_text; img (zeros where none); has_image as 0/1]. One flat row per item, so the embed
    stage's table, the RQ-VAE's data loader and code assignment need not know about images."""
    if e_text.ndim != 2 or img.ndim != 2 or has_image.shape != (len(e_text),) or len(img) != len(e_text):
        raise ValueError(f"pack_image: need (N, D_t), (N, D_i), (N,); got {e_text.shape}, {img.shape}, {has_image.shape}")
    if not np.isfinite(img[has_image]).all():
        raise ValueError("pack_image: an item marked as having an image has a non-finite image vector")
    safe = np.where(has_image[:, None], img, 0.0)
    return np.concatenate([e_text, safe, has_image[:, None]], axis=1).astype(np.float32)


def unpack_image(x: torch.Tensor, image_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `pack_image` on a tensor: (B, D_t + image_dim + 1) -> e_text, img, has_image (bool)."""
    d_text = x.shape[1] - image_dim - 1
    return x[:, :d_text], x[:, d_text:d_text + image_dim], x[:, -1] > 0.5
