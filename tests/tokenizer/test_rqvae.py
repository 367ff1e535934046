"""RQ-VAE core on tiny hand-computed tensors (digr/tokenizer/rqvae.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from digr.tokenizer.rqvae import (
    RQVAE,
    RQVAEConfig,
    assign_codes,
    kmeans,
    quantization_losses,
    reset_dead_codes,
    residual_quantize,
    straight_through,
    train_rqvae,
)

torch.set_num_threads(1)

# A 2-level toy: level 0 codes (0,0),(4,4); level 1 codes (1,0),(0,1).
CODEBOOKS = torch.tensor([[[0.0, 0.0], [4.0, 4.0]], [[1.0, 0.0], [0.0, 1.0]]])
Z = torch.tensor([[3.8, 5.1], [1.2, 0.1]])


def test_residual_quantize_toy():
    # z0=(3.8,5.1): level 0 d2 to (0,0)=40.45, to (4,4)=0.04+1.21=1.25 -> code 1, r1=(-0.2,1.1);
    #   level 1 d2 to (1,0)=1.44+1.21=2.65, to (0,1)=0.04+0.01=0.05 -> code 1; z_q=(4,5).
    # z1=(1.2,0.1): level 0 d2 1.45 vs 23.05 -> code 0, r1=(1.2,0.1);
    #   level 1 d2 to (1,0)=0.05, to (0,1)=2.25 -> code 0; z_q=(1,0).
    rq = residual_quantize(Z, CODEBOOKS)
    assert rq.codes.dtype == torch.int64
    assert rq.codes.tolist() == [[1, 1], [0, 0]]
    torch.testing.assert_close(rq.residuals, torch.tensor([[[3.8, 5.1], [-0.2, 1.1]], [[1.2, 0.1], [1.2, 0.1]]]))
    torch.testing.assert_close(rq.quantized, torch.tensor([[4.0, 5.0], [1.0, 0.0]]))


def test_residual_quantize_rejects_mismatched_dims():
    with pytest.raises(ValueError, match="codebooks"):
        residual_quantize(Z, torch.zeros(2, 2, 3))


def test_quantization_losses_values_and_gradients():
    # Squared distances r - e (from the toy above): item 0: 1.25 (level 0), 0.05 (level 1);
    # item 1: 1.45, 0.05. Batch means: codebook = (1.35, 0.05); commitment = 0.25 * that.
    cb = CODEBOOKS.clone().requires_grad_(True)
    z = Z.clone().requires_grad_(True)
    rq = residual_quantize(z, cb)
    codebook, commitment = quantization_losses(rq.residuals, rq.chosen, beta=0.25)
    torch.testing.assert_close(codebook, torch.tensor([1.35, 0.05]))
    torch.testing.assert_close(commitment, torch.tensor([0.3375, 0.0125]))

    # The codebook term moves only the codes: d/de of mean_b ||sg[r]-e||^2 = 2(e - r)/B.
    codebook.sum().backward()
    assert z.grad is None
    # Code (4,4) at level 0 is picked by item 0 only: 2*((4,4)-(3.8,5.1))/2 = (0.2,-1.1).
    torch.testing.assert_close(cb.grad[0, 1], torch.tensor([0.2, -1.1]))
    assert cb.grad[1].abs().sum() > 0

    # The commitment term moves only the encoder output.
    cb2 = CODEBOOKS.clone().requires_grad_(True)
    z2 = Z.clone().requires_grad_(True)
    rq2 = residual_quantize(z2, cb2)
    _, commitment2 = quantization_losses(rq2.residuals, rq2.chosen, beta=0.25)
    commitment2.sum().backward()
    assert cb2.grad is None
    assert z2.grad is not None and z2.grad.abs().sum() > 0


def test_straight_through_value_and_gradient():
    z = torch.tensor([[3.8, 5.1]], requires_grad=True)
    z_q = torch.tensor([[4.0, 5.0]], requires_grad=True)
    out = straight_through(z, z_q)
    torch.testing.assert_close(out, z_q.detach())  # forward: the quantised value
    (out * torch.tensor([[2.0, 3.0]])).sum().backward()
    torch.testing.assert_close(z.grad, torch.tensor([[2.0, 3.0]]))  # backward: copied to z
    assert z_q.grad is None


def _identity_model() -> RQVAE:
    """D = latent = 2 with identity encoder/decoder (ReLU is the identity on positive inputs)."""
    cfg = RQVAEConfig(levels=2, codebook_size=2, hidden_dims=(2,), latent_dim=2, beta=0.25)
    model = RQVAE(2, cfg)
    with torch.no_grad():
        for lin in [m for m in model.modules() if isinstance(m, torch.nn.Linear)]:
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
        model.codebooks.copy_(CODEBOOKS)
    return model


def test_forward_loss_terms():
    # x = z = (3.8,5.1) -> z_q = (4,5) -> recon (4,5): recon loss 0.04 + 0.01 = 0.05.
    # quant = codebook (1.25 + 0.05) + 0.25 * commitment (1.25 + 0.05) = 1.625; total 1.675.
    model = _identity_model()
    out = model(torch.tensor([[3.8, 5.1]]))
    assert out.codes.tolist() == [[1, 1]]
    torch.testing.assert_close(out.recon, torch.tensor([[4.0, 5.0]]))
    torch.testing.assert_close(out.recon_loss, torch.tensor(0.05))
    torch.testing.assert_close(out.quant_loss, torch.tensor(1.625))
    torch.testing.assert_close(out.loss, torch.tensor(1.675))


def test_recon_gradient_reaches_encoder_through_quantiser():
    model = _identity_model()
    out = model(torch.tensor([[3.8, 5.1]]))
    out.recon_loss.backward()
    # recon - x = (0.2,-0.1): d recon_loss / d recon = (0.4,-0.2), passed straight through
    # the quantiser and the identity layers to the encoder's last bias.
    torch.testing.assert_close(model.encoder[-1].bias.grad, torch.tensor([0.4, -0.2]))


def test_kmeans_finds_obvious_clusters():
    # Pairs around (0,0), (10,10) and (-10,10): the means are exactly those centres.
    x = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [10.0, 9.0], [10.0, 11.0], [-10.0, 9.0], [-10.0, 11.0]])
    for seed in range(5):
        c, labels = kmeans(x, 3, iters=5, generator=torch.Generator().manual_seed(seed))
        assert sorted(map(tuple, c.tolist())) == [(-10.0, 10.0), (0.0, 0.0), (10.0, 10.0)]
        assert labels[0] == labels[1] and labels[2] == labels[3] and labels[4] == labels[5]
        assert len(set(labels.tolist())) == 3


def test_kmeans_with_fewer_points_than_clusters():
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    c, labels = kmeans(x, 4, iters=2, generator=torch.Generator().manual_seed(0))
    assert c.shape == (4, 2)
    assert {tuple(r) for r in c.tolist()} == {(0.0, 0.0), (1.0, 1.0)}  # seeds are data points
    torch.testing.assert_close(c[labels], x)
    with pytest.raises(ValueError, match="non-empty"):
        kmeans(torch.zeros(0, 2), 2, 1)


def test_reset_dead_codes():
    # step 10, window 5: code 0 last used at 5 (10-5 >= 5, dead), code 1 never (dead),
    # code 2 at 8 (alive). The only current residual is (7,7), so both dead codes become it.
    codebook = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    last_used = torch.tensor([5, 0, 8])
    reset = reset_dead_codes(codebook, last_used, step=10, window=5, residuals=torch.tensor([[7.0, 7.0]]))
    assert reset.tolist() == [True, True, False]
    torch.testing.assert_close(codebook, torch.tensor([[7.0, 7.0], [7.0, 7.0], [2.0, 2.0]]))
    assert last_used.tolist() == [10, 10, 8]  # re-seeded codes get a fresh window
    # window 0 disables it.
    assert not reset_dead_codes(codebook, torch.tensor([0, 0, 0]), 10, 0, torch.ones(1, 2)).any()


def _blobs(n: int = 96, d: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, d)) * 3
    return (centres[rng.integers(0, 6, n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


TINY = RQVAEConfig(levels=2, codebook_size=8, hidden_dims=(16,), latent_dim=4, epochs=6, batch_size=32,
                   lr=3e-3, kmeans_iters=5, dead_code_window=4)


def test_train_rqvae_is_deterministic_and_learns():
    emb = _blobs()
    model, hist = train_rqvae(emb, TINY)
    model2, hist2 = train_rqvae(emb, TINY)
    codes = assign_codes(model, emb)
    assert codes.shape == (96, 2) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 8
    np.testing.assert_array_equal(codes, assign_codes(model2, emb))
    assert [h["loss"] for h in hist] == [h["loss"] for h in hist2]
    assert [h["epoch"] for h in hist] == list(range(1, 7))
    assert {"loss", "recon_loss", "quant_loss", "unique_sid_rate", "dead_resets"} <= set(hist[0])
    assert hist[-1]["loss"] < hist[0]["loss"]
    # A different seed gives a different model.
    _, hist3 = train_rqvae(emb, RQVAEConfig(**{**TINY.to_dict(), "seed": 1}))
    assert [h["loss"] for h in hist3] != [h["loss"] for h in hist]


def test_dead_codes_are_reseeded_during_training():
    # A random (not k-means) start leaves codes that no residual picks; with a window they
    # are re-seeded, without one they are not.
    cfg = RQVAEConfig(**{**TINY.to_dict(), "kmeans_init": False, "dead_code_window": 2})
    _, hist = train_rqvae(_blobs(), cfg)
    assert sum(h["dead_resets"] for h in hist) > 0
    _, hist_off = train_rqvae(_blobs(), RQVAEConfig(**{**cfg.to_dict(), "dead_code_window": 0}))
    assert sum(h["dead_resets"] for h in hist_off) == 0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        train_rqvae(np.full((4, 3), np.nan, dtype=np.float32), TINY)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        train_rqvae(np.zeros(5, dtype=np.float32), TINY)
    with pytest.raises(ValueError, match="codebook_size"):
        RQVAEConfig(codebook_size=0)
    model, _ = train_rqvae(_blobs(), RQVAEConfig(**{**TINY.to_dict(), "epochs": 1}))
    with pytest.raises(ValueError, match="D=5"):
        assign_codes(model, np.zeros((3, 5), dtype=np.float32))


def test_rqkmeans_is_residual_kmeans_on_the_embeddings():
    # Unit vectors a=(1,0), b=(.8,.6), c=(-1,0), d=(-.8,.6), 2 codes x 2 levels. Level 0 splits
    # {a, b} | {c, d} (centroids (.9,.3), (-.9,.3)); the residuals (.1,-.3), (-.1,.3), (-.1,-.3),
    # (.1,.3) are L2-normalised to (+-.316, +-.949) before level 1, which splits each pair.
    x = np.array([[1.0, 0.0], [0.8, 0.6], [-1.0, 0.0], [-0.8, 0.6]], dtype=np.float32)
    cfg = RQVAEConfig(method="rqkmeans", levels=2, codebook_size=2, kmeans_iters=10)
    model, hist = train_rqvae(x, cfg)
    assert model.codebooks.shape == (2, 2, 2)  # in the embedding space itself: no encoder
    got = sorted(model.codebooks[0].tolist())
    torch.testing.assert_close(torch.tensor(got), torch.tensor([[-0.9, 0.3], [0.9, 0.3]]))
    codes = assign_codes(model, x)
    assert codes[0, 0] == codes[1, 0] != codes[2, 0] == codes[3, 0]
    assert codes[0, 1] != codes[1, 1] and codes[2, 1] != codes[3, 1]
    r1 = model.quantize(torch.tensor(x)).residuals[:, 1]
    torch.testing.assert_close(r1.abs(), torch.tensor([[0.1, 0.3]] * 4) / 0.1**0.5)
    assert len(hist) == 1 and hist[0]["unique_sid_rate"] == 1.0 and hist[0]["loss"] >= 0
    # The same seed gives the same codebooks; the model round-trips through a state dict.
    again, _ = train_rqvae(x, cfg)
    torch.testing.assert_close(again.codebooks, model.codebooks, rtol=0, atol=0)
    loaded = RQVAE(2, cfg)
    loaded.load_state_dict(model.state_dict())
    assert (assign_codes(loaded, x) == codes).all()


def test_rqkmeans_bad_config_raises():
    with pytest.raises(ValueError, match="method"):
        RQVAEConfig(method="kmeans")
    with pytest.raises(ValueError, match="image evidence"):
        RQVAE(10, RQVAEConfig(method="rqkmeans"), image_dim=4)


def _ddp_worker(rank: int, init_file: str, out_dir: str, cfg: RQVAEConfig) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model, hist = train_rqvae(_blobs(), cfg)
        torch.save({"state": model.state_dict(), "hist": hist}, f"{out_dir}/rank{rank}.pt")
        # Both ranks leave together: a rank that tears gloo down while the other is still in
        # its last collective made the other abort ("terminate called without an active
        # exception", about 1 run in 6).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_stay_identical(tmp_path):
    # Two gloo ranks: shards differ, but gradient averaging, all-reduced code usage and rank
    # 0's broadcast of re-seeded codes must leave both ranks with the same model.
    cfg = RQVAEConfig(**{**TINY.to_dict(), "kmeans_init": False, "dead_code_window": 2, "epochs": 3})
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path), cfg), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert sum(h["dead_resets"] for h in r0["hist"]) > 0  # the broadcast path ran
    for k in r0["state"]:
        torch.testing.assert_close(r0["state"][k], r1["state"][k], rtol=0, atol=0)
    assert r0["hist"] == [{**h, "seconds": r0["hist"][i]["seconds"]} for i, h in enumerate(r1["hist"])]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_rqvae_on_cuda():
    emb = _blobs()
    model, hist = train_rqvae(emb, RQVAEConfig(**{**TINY.to_dict(), "kmeans_init": False}), device="cuda")
    assert model.codebooks.device.type == "cuda"
    codes = assign_codes(model, emb)
    assert codes.shape == (96, 2) and 0 <= codes.min() and codes.max() < 8
    assert sum(h["dead_resets"] for h in hist) > 0
