import numpy as np
import pytest

from veilface.crypto.layout import DiagonalLayout
from veilface.errors import InvalidArgument


@pytest.mark.parametrize("dim,slots", [(128, 2048), (100, 2048), (512, 2048), (128, 4096)])
def test_plain_diagonal_scores_equal_inner_products(dim: int, slots: int) -> None:
    rng = np.random.default_rng(dim)
    lay = DiagonalLayout(dim, slots)
    n = min(300, slots)
    x = rng.normal(size=(n, dim))
    s = rng.choice(slots, n, replace=False)
    p = rng.normal(size=dim)
    diag = lay.pack(x, s)
    full = lay.plain_scores(diag, p)
    np.testing.assert_allclose(full[s], x @ p, atol=1e-9)
    empty = np.setdiff1d(np.arange(slots), s)
    assert np.abs(full[empty]).max() == 0.0  # no slot holds anything but its own score
    pre, rest = lay.plain_scores(diag, p, "presel"), lay.plain_scores(diag, p, "rest")
    np.testing.assert_allclose(pre + rest, full, atol=1e-9)
    np.testing.assert_allclose(lay.unpack(diag, s), x, atol=1e-12)


def test_preselection_is_a_window_of_m_coordinates() -> None:
    lay = DiagonalLayout(128, 2048)
    x = np.zeros((1, 128))
    x[0, :] = 1.0
    p = np.ones(128)
    pre = lay.plain_scores(lay.pack(x, [7]), p, "presel")
    assert pre[7] == pytest.approx(lay.m)


def test_bad_shapes_are_rejected() -> None:
    lay = DiagonalLayout(128, 2048)
    with pytest.raises(InvalidArgument):
        lay.pack(np.zeros((2, 64)), [0, 1])
    with pytest.raises(InvalidArgument):
        lay.pack(np.zeros((2, 128)), [0, 0])
    with pytest.raises(InvalidArgument):
        lay.pack(np.zeros((1, 128)), [2048])
    with pytest.raises(InvalidArgument):
        DiagonalLayout(4096, 2048)
