"""Each one-shot method is one rule, held by its MethodSpec, and every path prunes with it: `prune run`'s sequential
calibration (attach) and a sweep's shared statistics (prune_from_stats) give the same masks and re-fit weights
wherever they see the same inputs (block 0: the dense model's inputs in both schemes)."""

from __future__ import annotations

import pytest
import torch

from prune import method_config
from prune.calibration.layerwise import collect_stats
from prune.methods.oneshot.method import prune_from_stats, prune_sequentially
from prune.methods.oneshot.stats import InputStats
from prune.methods.registry import METHODS, get_method
from prune.models.blocks import in_out_features
from tests.conftest import make_tiny_gpt2, make_tiny_llama

CONFIGS = {
    "magnitude-0.37": {"name": "magnitude", "sparsity": 0.37},
    "magnitude-2:4-row": {"name": "magnitude", "sparsity": "2:4", "granularity": "row"},
    "wanda-0.5": {"name": "wanda", "sparsity": 0.5},
    "wanda-2:4-layer": {"name": "wanda", "sparsity": "2:4", "granularity": "layer"},
    "sparsegpt-0.5": {"name": "sparsegpt", "sparsity": 0.5, "blocksize": 16},
    "sparsegpt-2:4-mask-only": {"name": "sparsegpt", "sparsity": "2:4", "update_weights": False},
}


def test_every_method_with_shared_statistics_is_covered():
    shared = {name for name, declared in METHODS.items() if declared.statistics is not None}
    assert shared == {entry["name"] for entry in CONFIGS.values()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_sequential_and_shared_statistics_paths_agree_on_block_zero(family, key, one_thread):
    model = make_tiny_llama() if family == "llama" else make_tiny_gpt2()
    fields = dict(CONFIGS[key])
    config = method_config(fields.pop("name"), **fields)
    spec = get_method(config.name)
    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    first = [name for name in spec.targets(model, config) if ".0." in name]  # block 0's targets
    sequential = prune_sequentially(spec.block_pruning(config), model, first, calibration, progress=False)

    stats = collect_stats(
        model, first, lambda module: InputStats(in_out_features(module)[0], True), calibration, progress=False
    )
    modules = dict(model.named_modules())
    for name in first:
        mask, weight = prune_from_stats(
            config, modules[name], None if spec.declared.statistics == "none" else stats[name]
        )
        assert torch.equal(mask.cpu(), sequential.masks[name]), name
        if weight is None:
            assert name not in sequential.weights
        else:
            expected = sequential.weights[name]
            assert torch.equal(weight.to(expected.dtype).masked_fill(~mask, 0).cpu(), expected), name
    assert len(sequential.masks) == len(first) > 0
    assert bool(sequential.weights) == config.changes_weights
