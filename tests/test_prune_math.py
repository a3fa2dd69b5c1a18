"""The pure math of masks and of each pruner, on random tensors."""
import pytest
import torch

from seftc.errors import SeftcError
from seftc.prune.magnitude import magnitude_mask
from seftc.prune.masks import (
    Pattern, detect_pattern, mask_checksum, nm_holds, nm_mask, parse_pattern, prune_count, split_counts, unstructured_mask,
)
from seftc.prune.owl import allocate, outlier_ratio
from seftc.prune.sparsegpt import hessian, sparsegpt_prune
from seftc.prune.wanda import wanda_mask, wanda_scores

SHAPES = [(8, 16), (7, 24), (33, 40), (1, 8)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.99])
@pytest.mark.parametrize("per_row", [False, True])
def test_unstructured_mask_exact_count(shape, sparsity, per_row):
    scores = torch.rand(shape)
    keep = unstructured_mask(scores, sparsity, per_row)
    assert keep.shape == scores.shape
    assert int((~keep).sum()) == prune_count(scores.numel(), sparsity)


def test_unstructured_mask_drops_lowest():
    scores = torch.arange(12.0).reshape(3, 4)
    assert unstructured_mask(scores, 0.5, per_row=False).reshape(-1).tolist() == [False] * 6 + [True] * 6
    assert unstructured_mask(scores, 0.5, per_row=True).tolist() == [[False, False, True, True]] * 3


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
def test_nm_mask_exactly_n_per_group(pattern):
    p = parse_pattern(pattern)
    scores = torch.rand(6, 32)
    keep = nm_mask(scores, p)
    assert (keep.reshape(-1, p.m).sum(dim=1) == p.n).all()
    assert nm_holds(scores * keep, p)


def test_nm_requires_divisible_width():
    with pytest.raises(SeftcError, match="divisible"):
        nm_mask(torch.rand(4, 10), Pattern(2, 4))


@pytest.mark.parametrize("text", ["2:2", "0:4", "5:4", "x:y", "50%"])
def test_bad_patterns(text):
    with pytest.raises(SeftcError):
        parse_pattern(text)


def test_split_counts_is_exact_and_bounded():
    for total, sizes in [(10, [3, 3, 3, 3]), (7, [1, 100]), (0, [5, 5]), (9, [2, 3, 4])]:
        counts = split_counts(total, sizes)
        assert sum(counts) == total
        assert all(0 <= c <= s for c, s in zip(counts, sizes))


def test_detect_pattern_and_checksum():
    w = torch.randn(4, 8)
    assert detect_pattern(w) == "dense"
    w24 = w * nm_mask(w.abs(), Pattern(2, 4))
    assert detect_pattern(w24) == "2:4"
    w[0, :4] = 0
    w[0, 4:] = 1
    w[1:] = 0
    assert detect_pattern(w) == "4:8"
    m = torch.rand(5, 9) > 0.5
    assert mask_checksum(m) == mask_checksum(m.clone())
    m2 = m.clone()
    m2[0, 0] = ~m2[0, 0]
    assert mask_checksum(m) != mask_checksum(m2)


def test_magnitude_keeps_largest():
    w = torch.tensor([[0.1, -3.0, 0.2, 2.0], [-0.5, 0.05, 4.0, -0.01]])
    keep = magnitude_mask(w, 0.5, Pattern())
    assert keep.tolist() == [[False, True, False, True], [True, False, True, False]]


def test_wanda_score_weights_columns_by_input_norm():
    w = torch.ones(3, 4)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 5)
    sq = x.pow(2).sum(0)
    assert torch.allclose(wanda_scores(w, sq), sq.sqrt().expand(3, 4))
    keep = wanda_mask(w, sq, 0.5, Pattern())
    assert keep.tolist() == [[False, False, True, True]] * 3  # big-input columns survive in every row
    # a large weight on a silent input loses to a small weight on a loud input
    w2 = torch.tensor([[100.0, 1.0]])
    assert wanda_mask(w2, torch.tensor([1e-8, 1.0]), 0.5, Pattern()).tolist() == [[False, True]]


def _recon_error(w, w_hat, x):
    return float(((x @ w.T - x @ w_hat.T) ** 2).sum())


@pytest.mark.parametrize("pattern,sparsity", [(Pattern(), 0.5), (Pattern(), 0.7), (Pattern(2, 4), 0.5)])
def test_sparsegpt_beats_its_own_mask_without_update_and_magnitude(pattern, sparsity):
    torch.manual_seed(0)
    rows, cols, n = 32, 64, 512
    x = torch.randn(n, cols) @ torch.randn(cols, cols) * 0.3 + torch.randn(cols)  # correlated inputs
    w = torch.randn(rows, cols)
    w_sgpt, keep = sparsegpt_prune(w, hessian(x), sparsity, pattern, blocksize=16)
    assert int((~keep).sum()) == prune_count(w.numel(), sparsity if not pattern.is_nm else 0.5)
    assert torch.equal(w_sgpt != 0, keep)
    if pattern.is_nm:
        assert nm_holds(w_sgpt, pattern)
    mag = magnitude_mask(w, sparsity, pattern)
    err_sgpt = _recon_error(w, w_sgpt, x)
    assert err_sgpt < _recon_error(w, w * mag, x)  # same mask budget, magnitude
    assert err_sgpt < _recon_error(w, w * keep, x)  # same mask, no compensation


def test_sparsegpt_tolerates_dead_inputs():
    x = torch.randn(64, 16)
    x[:, 3] = 0
    w = torch.randn(8, 16)
    w_hat, keep = sparsegpt_prune(w, hessian(x), 0.5, Pattern(), blocksize=8)
    assert torch.isfinite(w_hat).all() and int((~keep).sum()) == 64


def test_owl_allocation_keeps_mean_and_orders_by_outliers():
    s = allocate([0.01, 0.05, 0.02, 0.03], [10, 10, 10, 10], 0.7, 0.08)
    assert abs(sum(s) / 4 - 0.7) < 1e-9
    assert s[1] == min(s) and s[0] == max(s)
    assert abs(max(s) - min(s) - 0.16) < 1e-9
    scores = [torch.tensor([1.0, 1.0, 1.0, 100.0])]
    assert outlier_ratio(scores, 2.0) == 0.25
