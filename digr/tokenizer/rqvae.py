"""RQ-VAE: turn item embeddings into a tuple of codes (the Semantic ID without its suffix).

Residual-quantised VAE as used by TIGER (Rajput et al. 2023), after Lee et al. 2022
("Autoregressive Image Generation using Residual Quantization"):

    z = E(x);  r_0 = z;  c_l = argmin_k ||r_l - e_{l,k}||^2;  r_{l+1} = r_l - e_{l,c_l}
    z_q = sum_l e_{l,c_l};  x_hat = D(z + sg[z_q - z])          (straight-through)
    loss = ||x - x_hat||^2 + sum_l ( ||sg[r_l] - e_{l,c_l}||^2 + beta * ||r_l - sg[e_{l,c_l}]||^2 )

Every squared norm is summed over the feature axis and averaged over the batch, as the
paper's notation reads. Codebooks start from k-means on the residuals of a sample of the data
(TIGER: of the first batch) and codes left unused for `dead_code_window` steps are re-seeded from current
residuals, which keeps codebook usage high on small catalogues.

`method="rqkmeans"` is the same module without E, D or training: r_0 = x, each level's
residual L2-normalised, and level l's codebook is k-means on every item's r_l (GRID's residual
k-means, Ju et al. 2025), so serving and the tokenize stage handle both methods alike.

The pure pieces (`kmeans`, `residual_quantize`, `quantization_losses`, `straight_through`,
`reset_dead_codes`) are plain tensor functions; `train_rqvae` runs the loop and works
both alone and inside a Ray Train worker (DDP when torch.distributed is initialised).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

METHODS = ("rqvae", "rqkmeans")


@dataclass(frozen=True)
class RQVAEConfig:
    # "rqvae": TIGER's RQ-VAE (MLP encoder -> residual codebooks -> MLP decoder, trained).
    # "rqkmeans": residual k-means on the embeddings themselves: no encoder, decoder or
    # gradient steps; level l's codebook is k-means (`kmeans_iters` Lloyd steps) on every
    # item's residual after levels < l, L2-normalised before each level as GRID does.
    # Without the normalisation, on Scientific's MiniLM vectors, level 2 put 969 of 4,344
    # items on one code (small residuals all sit near the origin); with it, at most 41, and
    # collisions fall from 38% to 24%. GRID's ablation (Ju et al. 2025, "A Practitioner's
    # Handbook", Table 1) found it at or above the RQ-VAE on Amazon Beauty/Toys/Sports; here
    # too (docs/results.md). Only levels, codebook_size, kmeans_iters and seed apply; it
    # fits on all N items (N x K distances per Lloyd step) and cannot fuse image evidence.
    method: str = "rqvae"
    levels: int = 3
    codebook_size: int = 256
    hidden_dims: tuple[int, ...] = (512, 256, 128)
    latent_dim: int = 32
    beta: float = 0.25
    # Tuned on Amazon Scientific (4,344 items, MiniLM text): 50 epochs of 256 (~850 steps,
    # ~25 s on one contended CPU core) reach ~12% colliding items with every code of every
    # level in use; 200 x 1024 took ~90 s and collided more (14%): longer training packs
    # near-duplicate items (8% of items have a neighbour at cosine > 0.99) closer together.
    epochs: int = 50
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    kmeans_init: bool = True
    kmeans_iters: int = 20
    # k-means runs on a seeded sample of this many items. TIGER used the first batch, but a
    # 256-item batch against 256 codes would just put one code on each item.
    kmeans_samples: int = 4096
    dead_code_window: int = 50  # steps; 0 disables dead-code re-seeding
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"RQVAEConfig.method must be one of {METHODS}, got {self.method!r}")
        for name in ("levels", "codebook_size", "latent_dim", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"RQVAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if any(h < 1 for h in self.hidden_dims):
            raise ValueError(f"RQVAEConfig.hidden_dims must all be >= 1, got {self.hidden_dims}")
        if self.beta < 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"RQVAEConfig: need beta >= 0, lr > 0, weight_decay >= 0; got {self}")
        if self.kmeans_iters < 0 or self.dead_code_window < 0:
            raise ValueError("RQVAEConfig.kmeans_iters and dead_code_window must be >= 0")
        if self.kmeans_samples < 1:
            raise ValueError(f"RQVAEConfig.kmeans_samples must be >= 1, got {self.kmeans_samples}")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- pure core


def sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """x: (N, d), c: (K, d) -> (N, K) squared Euclidean distances."""
    return (x * x).sum(1, keepdim=True) - 2.0 * x @ c.T + (c * c).sum(1)[None, :]


def kmeans(
    x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding. x: (N, d) -> (centroids (k, d), labels (N,) int64).

    Written by hand (a few lines of torch) rather than pulling in scikit-learn for one call.
    With N < k the surplus centroids repeat data points; dead-code re-seeding fixes them later.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans: x must be a non-empty (N, d) tensor, got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"kmeans: k must be >= 1, got {k}")
    x = x.detach()
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=generator).item()
    centroids = [x[first]]
    d2 = sq_dists(x, x[first : first + 1]).squeeze(1).clamp_min(0)
    for _ in range(1, k):
        # k-means++: draw the next seed with probability proportional to squared distance;
        # when every point already sits on a seed (N <= k), fall back to a uniform draw.
        weights = d2 if d2.sum() > 0 else torch.ones_like(d2)
        idx = torch.multinomial(weights, 1, generator=generator).item()
        centroids.append(x[idx])
        d2 = torch.minimum(d2, sq_dists(x, x[idx : idx + 1]).squeeze(1).clamp_min(0))
    c = torch.stack(centroids)
    labels = sq_dists(x, c).argmin(1)
    for _ in range(iters):
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        # An empty cluster keeps its old centroid instead of collapsing to the origin.
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
        labels = sq_dists(x, c).argmin(1)
    return c, labels


@dataclass
class RQResult:
    """codes: (B, L) int64; chosen: (B, L, d) the picked code vectors e_{l,c_l};
    residuals: (B, L, d) the residual r_l entering level l (r_0 = z)."""

    codes: torch.Tensor
    chosen: torch.Tensor
    residuals: torch.Tensor

    @property
    def quantized(self) -> torch.Tensor:
        """(B, d) z_q = sum over levels of the chosen code vectors."""
        return self.chosen.sum(1)


def residual_quantize(z: torch.Tensor, codebooks: torch.Tensor, normalize: bool = False) -> RQResult:
    """z: (B, d), codebooks: (L, K, d) -> nearest code per level on successive residuals.
    normalize: L2-normalise each level's residual before its lookup (residual k-means as GRID
    does it); the recorded residuals are then the normalised ones.

    The residual passed down is r_l - sg[e_l]: the codebook of level l learns only from its
    own codebook loss, while deeper commitment terms still pull the encoder output towards
    the sum of codes. Ties go to the lowest code index (argmin).
    """
    if z.ndim != 2 or codebooks.ndim != 3 or z.shape[1] != codebooks.shape[2]:
        raise ValueError(
            f"residual_quantize: need z (B, d) and codebooks (L, K, d); got {tuple(z.shape)}, {tuple(codebooks.shape)}"
        )
    r = z
    codes, chosen, residuals = [], [], []
    for cb in codebooks:
        if normalize:
            r = F.normalize(r, dim=-1)
        c = sq_dists(r.detach(), cb.detach()).argmin(1)
        e = cb[c]
        codes.append(c)
        chosen.append(e)
        residuals.append(r)
        r = r - e.detach()
    return RQResult(torch.stack(codes, 1), torch.stack(chosen, 1), torch.stack(residuals, 1))


def quantization_losses(
    residuals: torch.Tensor, chosen: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residuals, chosen: (B, L, d) -> (codebook_loss (L,), commitment_loss (L,)), each a
    batch mean of squared norms. The total quantisation loss is codebook + beta * commitment:
    codebook ||sg[r] - e||^2 moves the codes, commitment ||r - sg[e]||^2 moves the encoder."""
    codebook = (residuals.detach() - chosen).pow(2).sum(-1).mean(0)
    commitment = (residuals - chosen.detach()).pow(2).sum(-1).mean(0)
    return codebook, beta * commitment


def straight_through(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Value of z_q, gradient of z: the decoder's gradient flows to the encoder unchanged."""
    return z + (z_q - z).detach()


@torch.no_grad()
def reset_dead_codes(
    codebook: torch.Tensor,
    last_used: torch.Tensor,
    step: int,
    window: int,
    residuals: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Re-seed codes unused for `window` steps with random current residuals, in place.

    codebook: (K, d) one level's codes; last_used: (K,) int64 last step each code was picked
    (also updated in place for the re-seeded codes, so they get a fresh window);
    residuals: (B, d) this level's residuals from the current batch. Returns (K,) bool, the
    codes that were reset.
    """
    dead = (step - last_used) >= window
    n_dead = int(dead.sum())
    if n_dead == 0 or window <= 0:
        return torch.zeros_like(dead)
    # Drawn on the CPU (where the seeded generator lives), then moved: works for CUDA residuals.
    pick = torch.randint(residuals.shape[0], (n_dead,), generator=generator).to(residuals.device)
    codebook[dead] = residuals[pick].detach().to(codebook.dtype)
    last_used[dead] = step
    return dead


# --------------------------------------------------------------------------- model


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass
class RQVAEOutput:
    """recon: (B, D); codes: (B, L) int64; latent z: (B, d); residuals: (B, L, d);
    losses are scalars except codebook_loss / commitment_loss: (L,) per level."""

    recon: torch.Tensor
    codes: torch.Tensor
    latent: torch.Tensor
    residuals: torch.Tensor
    loss: torch.Tensor
    recon_loss: torch.Tensor
    quant_loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor


class RQVAE(nn.Module):
    """MLP encoder D -> hidden_dims -> latent_dim, `levels` codebooks of `codebook_size`,
    mirrored MLP decoder back to D.

    With image_dim > 0 (IEID "+ image"), rows are packed as `digr.tokenizer.fusion.pack_image` writes
    them, [e_text (D_t); img (image_dim); has_image (1)], and the encoder reads the fused
    e_mm = W_f·[e_text; W_v·img] (`CrossModalFusion`, d_out = D_t) instead of the raw row. The
    decoder reconstructs [e_text; img], the image part only where there is an image, so W_v and
    W_f train with the tokenizer's own objective and cannot collapse (they must keep what the
    decoder needs to rebuild both modalities)."""

    def __init__(self, input_dim: int, cfg: RQVAEConfig, image_dim: int = 0) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.image_dim = image_dim
        self.cfg = cfg
        self.fusion: nn.Module | None = None
        if cfg.method == "rqkmeans":
            if image_dim > 0:
                raise ValueError("RQVAEConfig.method='rqkmeans' has no trained fusion for image evidence; "
                                 "use method='rqvae' with embed.evidence including images")
            # Codes live in the embedding space itself: identity "encoder" and "decoder".
            self.encoder, self.decoder = nn.Identity(), nn.Identity()
            self.codebooks = nn.Parameter(torch.zeros(cfg.levels, cfg.codebook_size, input_dim))
            return
        target_dim = input_dim
        if image_dim > 0:
            from digr.tokenizer.fusion import CrossModalFusion

            text_dim = input_dim - image_dim - 1
            if text_dim < 1:
                raise ValueError(f"RQVAE: input_dim {input_dim} leaves no text part beside image_dim {image_dim} + 1")
            self.fusion = CrossModalFusion(text_dim, image_dim)
            target_dim = text_dim + image_dim
        dims = [self.fusion.d_out if self.fusion is not None else input_dim, *cfg.hidden_dims, cfg.latent_dim]
        self.encoder = _mlp(dims)
        self.decoder = _mlp([*dims[::-1][:-1], target_dim])
        # (L, K, d); small random start, replaced by k-means when kmeans_init is set.
        self.codebooks = nn.Parameter(torch.randn(cfg.levels, cfg.codebook_size, cfg.latent_dim) * 0.1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, input_dim) -> z (B, latent_dim), through the fusion when there is one."""
        if self.fusion is None:
            return self.encoder(x)
        from digr.tokenizer.fusion import unpack_image

        text, img, has = unpack_image(x, self.image_dim)
        return self.encoder(self.fusion(text, img, has))

    def target(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (what the decoder rebuilds (B, T), per-entry weights (B, T) or None = all 1)."""
        if self.fusion is None:
            return x, None
        from digr.tokenizer.fusion import unpack_image

        text, img, has = unpack_image(x, self.image_dim)
        weight = torch.cat([torch.ones_like(text), has.to(x.dtype)[:, None].expand_as(img)], dim=1)
        return torch.cat([text, img], dim=1), weight

    def quantize(self, z: torch.Tensor) -> RQResult:
        return residual_quantize(z, self.codebooks, normalize=self.cfg.method == "rqkmeans")

    def forward(self, x: torch.Tensor) -> RQVAEOutput:
        """x: (B, D) float32 -> RQVAEOutput."""
        z = self.encode(x)
        rq = self.quantize(z)
        recon = self.decoder(straight_through(z, rq.quantized))
        target, weight = self.target(x)
        err = (recon - target).pow(2)
        recon_loss = (err if weight is None else err * weight).sum(-1).mean()
        codebook, commitment = quantization_losses(rq.residuals, rq.chosen, self.cfg.beta)
        quant_loss = (codebook + commitment).sum()
        return RQVAEOutput(
            recon=recon,
            codes=rq.codes,
            latent=z,
            residuals=rq.residuals,
            loss=recon_loss + quant_loss,
            recon_loss=recon_loss,
            quant_loss=quant_loss,
            codebook_loss=codebook,
            commitment_loss=commitment,
        )

    @torch.no_grad()
    def init_codebooks_kmeans(self, x: torch.Tensor, iters: int, generator: torch.Generator | None = None) -> None:
        """Level by level: k-means on the residuals of x (B, D) left by the levels above."""
        r = self.encode(x)
        for level in range(self.cfg.levels):
            if self.cfg.method == "rqkmeans":
                r = F.normalize(r, dim=-1)  # as `quantize` looks it up
            c, labels = kmeans(r, self.cfg.codebook_size, iters, generator)
            self.codebooks[level].copy_(c)
            r = r - c[labels]


# --------------------------------------------------------------------------- training


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_embeddings(emb: np.ndarray) -> None:
    """Raise ValueError unless emb is a non-empty, finite (N, D) float array."""
    if not isinstance(emb, np.ndarray) or emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise ValueError(f"emb must be a non-empty (N, D) numpy array, got {getattr(emb, 'shape', type(emb))}")
    if not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(f"emb must be floating point, got dtype {emb.dtype}")
    if not np.isfinite(emb).all():
        raise ValueError("emb contains NaN or inf")


@torch.no_grad()
def assign_codes(model: RQVAE, emb: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """emb: (N, D) -> codes (N, levels) int64, nearest code per level (eval mode)."""
    check_embeddings(emb)
    model = getattr(model, "module", model)  # accept a DDP-wrapped model
    if emb.shape[1] != model.input_dim:
        raise ValueError(f"emb has D={emb.shape[1]}, the model expects {model.input_dim}")
    was_training = model.training
    model.eval()
    device = model.codebooks.device
    out = []
    for start in range(0, emb.shape[0], batch_size):
        x = torch.as_tensor(emb[start : start + batch_size], dtype=torch.float32, device=device)
        out.append(model.quantize(model.encode(x)).codes.cpu())
    model.train(was_training)
    return torch.cat(out).numpy().astype(np.int64)


def train_rqvae(
    emb: np.ndarray,
    cfg: RQVAEConfig,
    on_epoch: Callable[[dict], None] | None = None,
    device: torch.device | str | None = None,
    image_dim: int = 0,
) -> tuple[RQVAE, list[dict]]:
    """Train an RQ-VAE on emb: (N, D). Returns the (unwrapped) model and a per-epoch history
    [{"epoch", "loss", "recon_loss", "quant_loss", "unique_sid_rate", "dead_resets", "seconds"}].

    Deterministic for a seed. Under torch.distributed every rank must hold the same `emb`:
    ranks shard each epoch's permutation, DDP averages gradients, code usage is all-reduced
    and rank 0's dead-code re-seeding is broadcast, so the model stays identical on every
    rank. `on_epoch` runs on every rank (Ray's report is a barrier that all ranks must hit);
    the caller decides what rank 0 alone does.
    """
    check_embeddings(emb)
    rank, world = _dist_info()
    device = torch.device(device) if device is not None else torch.device("cpu")
    n, d_in = emb.shape
    if n < world:
        raise ValueError(f"emb has {n} rows, fewer than the {world} workers")
    gen = torch.Generator().manual_seed(cfg.seed)  # shuffles and k-means: identical on every rank
    reset_gen = torch.Generator().manual_seed(cfg.seed + 1 + rank)
    data = torch.as_tensor(emb, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(cfg.seed)  # model init: identical on every rank
        model = RQVAE(d_in, cfg, image_dim)

    if cfg.method == "rqkmeans":
        return _fit_rqkmeans(model, data, cfg, gen, on_epoch)
    perm = torch.randperm(n, generator=gen)
    if cfg.kmeans_init:
        # Same sample and seed on every rank, so every rank starts from the same codebooks.
        model.init_codebooks_kmeans(data[perm[: cfg.kmeans_samples]], cfg.kmeans_iters, gen)
    model.to(device)
    ddp: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    local_bs = max(1, cfg.batch_size // world)
    per_rank = n // world  # equal shards so every rank takes the same number of steps
    last_used = torch.zeros(cfg.levels, cfg.codebook_size, dtype=torch.long, device=device)
    step = 0
    history: list[dict] = []
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        if epoch > 0:
            perm = torch.randperm(n, generator=gen)
        shard = perm[: per_rank * world][rank::world]
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, recon, quant, batches
        resets = 0
        model.train()
        for start in range(0, per_rank, local_bs):
            x = data[shard[start : start + local_bs]].to(device)
            out: RQVAEOutput = ddp(x)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            step += 1
            sums += torch.tensor(
                [out.loss.item(), out.recon_loss.item(), out.quant_loss.item(), 1.0], dtype=torch.float64, device=device
            )
            if cfg.dead_code_window > 0:
                resets += _track_and_reset(model, out, last_used, step, cfg.dead_code_window, reset_gen, world)
        if world > 1:
            dist.all_reduce(sums)
        codes = assign_codes(model, emb)
        rec = {
            "epoch": epoch + 1,
            "loss": float(sums[0] / sums[3]),
            "recon_loss": float(sums[1] / sums[3]),
            "quant_loss": float(sums[2] / sums[3]),
            "unique_sid_rate": float(np.unique(codes, axis=0).shape[0] / n),
            "dead_resets": resets,
            "seconds": time.perf_counter() - t0,
        }
        history.append(rec)
        if on_epoch is not None:
            on_epoch(rec)
    model.eval()
    return model, history


@torch.no_grad()
def _fit_rqkmeans(model: RQVAE, data: torch.Tensor, cfg: RQVAEConfig, gen: torch.Generator,
                  on_epoch: Callable[[dict], None] | None) -> tuple[RQVAE, list[dict]]:
    """Residual k-means on all N rows of data (N, D), the same on every rank (same data and seed);
    one history record: "loss"/"recon_loss" = mean squared residual the last level leaves."""
    t0 = time.perf_counter()
    model.init_codebooks_kmeans(data, cfg.kmeans_iters, gen)
    model.eval()
    rq = model.quantize(data)
    codes = rq.codes.numpy()
    recon = float((rq.residuals[:, -1] - rq.chosen[:, -1]).pow(2).sum(-1).mean())
    rec = {"epoch": 1, "loss": recon, "recon_loss": recon, "quant_loss": 0.0,
           "unique_sid_rate": float(np.unique(codes, axis=0).shape[0] / len(codes)), "dead_resets": 0,
           "seconds": time.perf_counter() - t0}
    if on_epoch is not None:
        on_epoch(rec)
    return model, [rec]


@torch.no_grad()
def _track_and_reset(
    model: RQVAE,
    out: RQVAEOutput,
    last_used: torch.Tensor,
    step: int,
    window: int,
    gen: torch.Generator,
    world: int,
) -> int:
    """Mark the codes this step picked on any rank as used; re-seed the dead ones."""
    used = torch.zeros_like(last_used)
    used.scatter_(1, out.codes.T, 1)
    if world > 1:
        dist.all_reduce(used)  # usage is global, so every rank finds the same dead codes
    last_used[used > 0] = step
    n_reset = 0
    for level in range(model.cfg.levels):
        n_reset += int(
            reset_dead_codes(model.codebooks[level], last_used[level], step, window, out.residuals[:, level], gen).sum()
        )
    if world > 1 and n_reset:
        # Replacement residuals came from each rank's own batch: take rank 0's everywhere.
        dist.broadcast(model.codebooks.data, src=0)
    return n_reset
