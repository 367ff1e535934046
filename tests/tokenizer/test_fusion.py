"""Cross-modal fusion (digr.tokenizer.fusion) on tiny hand-computed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from digr.tokenizer.fusion import CrossModalFusion


def _fixed() -> CrossModalFusion:
    m = CrossModalFusion(d_text=2, d_img=3, d_vis=2, d_out=2)
    with torch.no_grad():
        m.vis.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]))           # W_v (2, 3)
        m.fuse.weight.copy_(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 1.0]]))  # W_f (2, 4)
        m.e_none.copy_(torch.tensor([10.0, 20.0]))
    return m


def test_projection_and_fusion_by_hand() -> None:
    m = _fixed()
    e_text = torch.tensor([[0.5, -1.0], [2.0, 3.0]])
    img = torch.tensor([[1.0, 2.0, 3.0], [math.nan] * 3])  # row 1 has no image: NaN, as load_image_vectors gives
    has = torch.tensor([True, False])
    # row 0: e_vis = W_v·[1,2,3] = [1+6, 2-3] = [7, -1]; e_mm = W_f·[0.5,-1,7,-1] = [0.5+7, -2-1] = [7.5, -3]
    # row 1: e_vis = e_none = [10, 20];           e_mm = W_f·[2,3,10,20] = [2+10, 6+20] = [12, 26]
    assert torch.equal(m.visual(img, has), torch.tensor([[7.0, -1.0], [10.0, 20.0]]))
    e_mm = m(e_text, img, has)
    assert torch.equal(e_mm, torch.tensor([[7.5, -3.0], [12.0, 26.0]]))


def test_gradients_stay_on_their_side_of_the_mask_and_nan_never_leaks() -> None:
    m = _fixed()
    e_text = torch.tensor([[0.5, -1.0], [2.0, 3.0]])
    img = torch.tensor([[1.0, 2.0, 3.0], [math.nan] * 3])
    m(e_text, img, torch.tensor([True, False])).sum().backward()
    # d sum / d e_vis = W_f[:, 2:]^T · [1, 1] = [1, 1] for each row.
    # W_v: only row 0 (with an image) -> outer([1, 1], [1, 2, 3]); e_none: only row 1 -> [1, 1]
    assert torch.equal(m.vis.weight.grad, torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]))
    assert torch.equal(m.e_none.grad, torch.tensor([1.0, 1.0]))
    # W_f sees [e_text; e_vis] of both rows: column sums [0.5+2, -1+3, 7+10, -1+20] in each output row
    assert torch.equal(m.fuse.weight.grad, torch.tensor([[2.5, 2.0, 17.0, 19.0]] * 2))
    assert not any(torch.isnan(p.grad).any() for p in m.parameters())


def test_fresh_module_has_no_bias_and_imageless_items_start_as_their_text_projection() -> None:
    torch.manual_seed(0)
    m = CrossModalFusion(d_text=4, d_img=6)
    assert m.vis.bias is None and m.fuse.bias is None
    assert (m.d_vis, m.d_out) == (4, 4) and tuple(m.fuse.weight.shape) == (4, 8)
    e_text = torch.randn(3, 4)
    out = m(e_text, torch.zeros(3, 6), torch.zeros(3, dtype=torch.bool))
    assert torch.allclose(out, e_text @ m.fuse.weight[:, :4].T)
    # zero input -> zero output for items with an image: no hidden bias anywhere
    assert torch.equal(m(torch.zeros(2, 4), torch.zeros(2, 6), torch.ones(2, dtype=torch.bool)), torch.zeros(2, 4))


def test_shape_errors_name_the_shapes() -> None:
    m = CrossModalFusion(d_text=2, d_img=3)
    with pytest.raises(ValueError, match=r"img \(2, 4\)"):
        m(torch.zeros(2, 2), torch.zeros(2, 4), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"has_image \(3,\)"):
        m(torch.zeros(2, 2), torch.zeros(2, 3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"e_text \(2, 5\)"):
        m(torch.zeros(2, 5), torch.zeros(2, 3), torch.ones(2, dtype=torch.bool))


def test_pack_and_unpack_image_rows_by_hand() -> None:
    import numpy as np

    from digr.tokenizer.fusion import pack_image, unpack_image

    text = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    img = np.array([[5.0, 6.0, 7.0], [np.nan] * 3], np.float32)
    packed = pack_image(text, img, np.array([True, False]))
    assert packed.tolist() == [[1, 2, 5, 6, 7, 1], [3, 4, 0, 0, 0, 0]]
    t, i, h = unpack_image(torch.from_numpy(packed), 3)
    assert t.tolist() == text.tolist() and i.tolist() == [[5, 6, 7], [0, 0, 0]] and h.tolist() == [True, False]
    with pytest.raises(ValueError, match="non-finite"):
        pack_image(text, img, np.array([True, True]))


def test_rqvae_with_image_masks_missing_images_and_trains_the_fusion() -> None:
    import numpy as np

    from digr.tokenizer.fusion import pack_image
    from digr.tokenizer.rqvae import RQVAE, RQVAEConfig

    cfg = RQVAEConfig(levels=2, codebook_size=4, hidden_dims=(8,), latent_dim=4)
    torch.manual_seed(0)
    model = RQVAE(2 + 3 + 1, cfg, image_dim=3)
    assert model.fusion is not None and model.decoder[-1].out_features == 5  # rebuilds [text; img], not the flag
    text = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    a = pack_image(text, np.array([[1.0, 2.0, 3.0], [np.nan] * 3], np.float32), np.array([True, False]))
    # The imageless row's loss is the same whatever its (zeroed) image slots would hold: masked.
    b = a.copy()
    b[1, 2:5] = 0.0
    assert torch.allclose(model(torch.from_numpy(a)).recon_loss, model(torch.from_numpy(b)).recon_loss)
    # W_v learns only from rows with an image; e_none only from rows without; W_f from both.
    only_missing = torch.from_numpy(a[1:])
    model(only_missing).loss.backward()
    assert float(model.fusion.vis.weight.grad.abs().sum()) == 0.0
    assert float(model.fusion.e_none.grad.abs().sum()) > 0 and float(model.fusion.fuse.weight.grad.abs().sum()) > 0


def test_image_evidence_separates_items_whose_text_is_the_same() -> None:
    """Two groups with identical text and different images: only the fused RQ-VAE tells them apart."""
    import numpy as np

    from digr.tokenizer.fusion import pack_image
    from digr.tokenizer.rqvae import RQVAEConfig, assign_codes, train_rqvae

    rng = np.random.default_rng(0)
    n = 64
    text = np.tile(rng.normal(size=(1, 4)), (n, 1)).astype(np.float32) + 0.01 * rng.normal(size=(n, 4)).astype(np.float32)
    group = np.arange(n) % 2
    img = (np.where(group[:, None] == 0, 3.0, -3.0) + 0.1 * rng.normal(size=(n, 3))).astype(np.float32)
    has = np.ones(n, bool)
    has[::8] = False  # some items have no image: they still get codes
    img[~has] = np.nan
    cfg = RQVAEConfig(levels=1, codebook_size=4, hidden_dims=(8,), latent_dim=2, epochs=30, batch_size=16, lr=1e-2,
                      kmeans_iters=5, dead_code_window=0)
    emb = pack_image(text, img, has)
    model, hist = train_rqvae(emb, cfg, image_dim=3)
    codes = assign_codes(model, emb)[:, 0]
    assert hist[-1]["recon_loss"] < 0.5 * hist[0]["recon_loss"]
    # the first-level code follows the image group: no code is shared by the two groups
    assert not set(codes[has & (group == 0)].tolist()) & set(codes[has & (group == 1)].tolist())
