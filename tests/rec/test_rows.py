"""append_rows: hand-checked rows, in-place growth into spare capacity, and no branch overwriting another."""

import pytest
import torch

from digr.rec.rows import append_rows


def test_append_rows_values_and_capacity() -> None:
    t = torch.tensor([[1, 2], [3, 4]])
    a = append_rows(t, torch.tensor([[5, 6]]))
    assert a.tolist() == [[1, 2], [3, 4], [5, 6]] and t.tolist() == [[1, 2], [3, 4]]
    # capacity 3 + max(1, int(0.25 * 3)) = 4 rows: the next row fits in place, the one after does not.
    assert a.untyped_storage().nbytes() == 4 * 2 * 8
    b = append_rows(a, torch.tensor([[7, 8]]))
    assert b.data_ptr() == a.data_ptr() and b.tolist() == [[1, 2], [3, 4], [5, 6], [7, 8]]
    assert a.tolist() == [[1, 2], [3, 4], [5, 6]]  # the shorter tensor still sees only its rows
    c = append_rows(b, torch.tensor([[9, 10]]))
    assert c.data_ptr() != b.data_ptr() and c[-1].tolist() == [9, 10] and c.shape == (5, 2)


def test_append_rows_never_overwrites_a_branch() -> None:
    base = append_rows(torch.zeros(0, 3), torch.ones(4, 3))  # capacity 5
    child = append_rows(base, torch.full((1, 3), 2.0))       # in place: row 4
    other = append_rows(base, torch.full((1, 3), 3.0))       # base is no longer the longest: a copy
    assert child.data_ptr() == base.data_ptr() and other.data_ptr() != base.data_ptr()
    assert child[-1].tolist() == [2.0, 2.0, 2.0] and other[-1].tolist() == [3.0, 3.0, 3.0]


def test_append_rows_casts_and_checks_shape() -> None:
    t = torch.zeros(2, 2, dtype=torch.float16)
    assert append_rows(t, torch.ones(1, 2, dtype=torch.float64)).dtype == torch.float16
    with pytest.raises(ValueError, match="do not match"):
        append_rows(t, torch.ones(1, 3))


def test_append_rows_under_inference_mode() -> None:
    with torch.inference_mode():
        t = append_rows(torch.zeros(2, 2), torch.ones(1, 2))
        assert append_rows(t, torch.ones(1, 2)).tolist() == [[0, 0], [0, 0], [1, 1], [1, 1]]
