"""PyTorch's 2:4 kernels: which linears qualify, and an honest 'unavailable' off CUDA."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eval.semi_structured import is_two_four, semi_structured_speedup, two_four_linears, unavailable_reason
from prune.masks.base import merge
from prune.methods.oneshot.method import attach_magnitude
from prune.runs.recipe import parse_recipe
from tests.conftest import make_tiny_llama


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 6), keep=st.integers(0, 4), seed=st.integers(0, 1000))
def test_two_four_means_at_most_two_nonzeros_in_every_group_of_four(rows, groups, keep, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, groups * 4, generator=generator) + 10  # no accidental zeros
    scores = torch.rand(rows, groups, 4, generator=generator)
    drop = scores.argsort(-1)[..., : 4 - keep]  # zero 4 - keep positions of every group
    weight.view(rows, groups, 4).scatter_(-1, drop, 0.0)
    assert is_two_four(weight) == (keep <= 2)


def test_a_width_not_divisible_by_four_is_not_two_four():
    assert not is_two_four(torch.zeros(4, 6))


def test_magnitude_two_four_model_lists_every_block_linear_and_reports_cpu_unavailable():
    model = make_tiny_llama()
    assert two_four_linears(model) == [] and semi_structured_speedup(model) is None
    recipe = parse_recipe({"method": {"name": "magnitude", "sparsity": "2:4"}})
    attach_magnitude(model, recipe.method, None)
    merge(model)
    names = two_four_linears(model)
    assert len(names) == 2 * 7 and all(name.startswith("model.layers.") for name in names)  # q k v o gate up down
    result = semi_structured_speedup(model)
    assert result == {"available": False, "reason": unavailable_reason(torch.device("cpu")), "layers": 14}
    assert "NVIDIA" in result["reason"]
