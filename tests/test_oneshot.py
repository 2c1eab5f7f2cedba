"""One-shot tensor math: masks from scores, Wanda statistics, SparseGPT's OBS pruning."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prune.calibration.input_norms import WandaStats
from prune.core.errors import UserInputError
from prune.core.sparsity import Sparsity, parse_sparsity
from prune.methods.oneshot.magnitude import magnitude_scores
from prune.methods.oneshot.masking import mask_from_scores, removed_count
from prune.methods.oneshot.sparsegpt import HessianStats, sparsegpt_prune
from prune.methods.oneshot.wanda import wanda_scores


def _scores(out_features, in_features, seed):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=60, deadline=None)
@given(
    out_features=st.integers(1, 16),
    m=st.integers(2, 8),
    groups=st.integers(1, 4),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_nm_keeps_exactly_n_of_every_m(out_features, m, groups, data, seed):
    n = data.draw(st.integers(1, m - 1))
    scores = _scores(out_features, m * groups, seed)
    keep = mask_from_scores(scores, Sparsity(n=n, m=m))
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    grouped_keep = keep.reshape(out_features, groups, m)
    assert (grouped_keep.sum(-1) == n).all()
    grouped = scores.reshape(out_features, groups, m)  # kept scores dominate pruned ones in each group
    kept_min = grouped.masked_fill(~grouped_keep, float("inf")).amin(-1)
    pruned_max = grouped.masked_fill(grouped_keep, float("-inf")).amax(-1)
    assert (kept_min >= pruned_max).all()


@settings(max_examples=60, deadline=None)
@given(
    out_features=st.integers(1, 16),
    in_features=st.integers(1, 40),
    fraction=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**16),
)
def test_fraction_removes_exact_count(out_features, in_features, fraction, seed):
    scores = _scores(out_features, in_features, seed)
    layer = mask_from_scores(scores, Sparsity(fraction=fraction), "layer")
    assert (~layer).sum().item() == removed_count(fraction, scores.numel())
    if (~layer).any() and layer.any():
        assert scores[~layer].max() <= scores[layer].min()
    row = mask_from_scores(scores, Sparsity(fraction=fraction), "row")
    assert ((~row).sum(1) == removed_count(fraction, in_features)).all()


def test_removed_count_rounds_half_up():
    cases = [(0.5, 3), (0.5, 5), (0.25, 2), (0.3, 10)]
    assert [removed_count(f, n) for f, n in cases] == [2, 3, 1, 3]
    assert removed_count(0.01, 10) == 0 and removed_count(0.99, 10) == 10


def test_nm_needs_divisible_in_features_and_known_granularity():
    with pytest.raises(UserInputError, match="divisible by 4"):
        mask_from_scores(torch.randn(3, 10), parse_sparsity("2:4"))
    with pytest.raises(UserInputError, match="divisible by 4"):
        sparsegpt_prune(torch.randn(3, 10), torch.eye(10), parse_sparsity("2:4"))
    with pytest.raises(UserInputError, match="granularity"):
        mask_from_scores(torch.randn(3, 10), parse_sparsity(0.5), "column")


def test_wanda_stats_are_squared_column_norms():
    x = torch.randn(3, 5, 8, dtype=torch.float32)
    stats = WandaStats(8)
    stats.add(x[:2])
    stats.add(x[2:])
    expected = (x.double().reshape(-1, 8) ** 2).sum(0)
    torch.testing.assert_close(stats.input_sq_norm(), expected)
    assert stats.tokens == 15
    weight = torch.randn(4, 8)
    torch.testing.assert_close(wanda_scores(weight, stats.input_sq_norm()), weight.abs() * expected.sqrt().float())


def test_hessian_stats_running_average():
    x = torch.randn(40, 12)
    stats = HessianStats(12)
    for chunk in x.split(7):
        stats.add(chunk.reshape(1, -1, 12))
    torch.testing.assert_close(stats.matrix(), 2 / 40 * x.t() @ x, rtol=1e-5, atol=1e-5)


def _layer_problem(out_features=32, in_features=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(in_features, in_features, generator=g) / in_features**0.5
    scale = torch.rand(in_features, generator=g) * 3 + 0.1  # uneven feature scales, correlated features
    noise = 0.3 * torch.randn(tokens, in_features, generator=g)
    x = (torch.randn(tokens, in_features, generator=g) @ mixing + noise) * scale
    weight = torch.randn(out_features, in_features, generator=g)
    stats = HessianStats(in_features)
    for chunk in x.split(100):
        stats.add(chunk)
    return weight, x, stats.matrix()


def _error(weight, new_weight, x):
    return torch.linalg.norm(x @ weight.t() - x @ new_weight.t()).item()


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_sparsegpt_beats_wanda_and_magnitude(sparsity):
    sparsity = parse_sparsity(sparsity)
    weight, x, hessian = _layer_problem()
    new_weight, keep = sparsegpt_prune(weight, hessian, sparsity, blocksize=16)
    assert (new_weight[~keep] == 0).all()
    wanda_norm = (x.double() ** 2).sum(0)
    errors = {
        "sparsegpt": _error(weight, new_weight, x),
        "wanda": _error(weight, weight * mask_from_scores(wanda_scores(weight, wanda_norm), sparsity, "row"), x),
        "magnitude": _error(weight, weight * mask_from_scores(magnitude_scores(weight), sparsity), x),
    }
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"], errors
    _, mask_only = sparsegpt_prune(weight, hessian, sparsity, blocksize=16, update_weights=False)
    assert torch.equal(mask_only, keep)


def test_sparsegpt_exact_sparsity_and_mask_only_returns_input():
    weight, _, hessian = _layer_problem(out_features=7, in_features=40)
    for fraction in (0.3, 0.5, 0.77):
        _, keep = sparsegpt_prune(weight, hessian, Sparsity(fraction=fraction), blocksize=16)
        assert (~keep).sum().item() == removed_count(fraction, weight.numel())
    same, keep = sparsegpt_prune(weight, hessian, parse_sparsity("2:4"), blocksize=6, update_weights=False)
    assert torch.equal(same, weight)
    assert (keep.reshape(7, 10, 4).sum(-1) == 2).all()


def test_sparsegpt_dead_inputs_dtype_and_layout():
    weight, _, hessian = _layer_problem(out_features=8, in_features=16, tokens=64)
    hessian = hessian.clone()
    hessian[3, :] = 0
    hessian[:, 3] = 0
    new_weight, keep = sparsegpt_prune(weight.to(torch.bfloat16), hessian, parse_sparsity("2:4"))
    assert new_weight.dtype == torch.bfloat16 and new_weight.is_contiguous()
    assert (new_weight[:, 3] == 0).all() and torch.isfinite(new_weight.float()).all()
    transposed = weight.t().contiguous().t()  # a GPT-2 Conv1D weight seen as [out, in]
    a, ka = sparsegpt_prune(transposed, hessian, parse_sparsity(0.5))
    b, kb = sparsegpt_prune(weight, hessian, parse_sparsity(0.5))
    assert torch.equal(a, b) and torch.equal(ka, kb)


def test_sparsegpt_bad_hessian_is_a_clear_error():
    with pytest.raises(UserInputError, match="not positive definite"):
        sparsegpt_prune(torch.randn(4, 8), -torch.eye(8), parse_sparsity(0.5))
    bad = torch.eye(8)
    bad[0, 0] = float("nan")
    with pytest.raises(UserInputError, match="NaN"):
        sparsegpt_prune(torch.randn(4, 8), bad, parse_sparsity(0.5))
