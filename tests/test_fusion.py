"""Cross-modal fusion (digr.fusion) on tiny hand-computed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from digr.fusion import CrossModalFusion


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
