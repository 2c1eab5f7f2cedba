"""The mask framework: wrapping keeps weights untouched, merge/unwrap, compact save/load, N:M storage."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prune.core.errors import UserInputError
from prune.core.sparsity import parse_sparsity
from prune.masks.base import attach_hard_masks, merge, wrappers
from prune.masks.storage import decode_nm, encode_nm, load_masks, nm_candidates, read_masks, save_masks
from prune.masks.targets import method_targets, select_targets
from prune.models.blocks import weight_matrix
from tests.conftest import make_tiny_gpt2, make_tiny_llama


def random_masks(model, names, density=0.5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    return {name: torch.rand(weight_matrix(modules[name]).shape, generator=generator) < density for name in names}


def test_default_targets_are_block_linears_only(tiny_model):
    names = select_targets(tiny_model, None)
    assert names and all(".h." in name or ".layers." in name for name in names)
    assert not any("lm_head" in name or "wte" in name or "embed" in name for name in names)


def test_pattern_matching_nothing_is_an_error(tiny_model):
    with pytest.raises(UserInputError, match=r"'\*\.nonexistent' matches no Linear/Conv1D module"):
        select_targets(tiny_model, ["*.nonexistent"])


def test_every_pattern_must_match_and_each_name_is_selected_once(tiny_model):
    with pytest.raises(UserInputError, match=r"'\*\.typo' matches no Linear/Conv1D module; the nearest"):
        select_targets(tiny_model, ["*.mlp.*", "*.typo"])
    names = select_targets(tiny_model, ["*.mlp.*", "*.0.*"])  # layer 0's FFN matches both patterns
    assert len(names) == len(set(names)) and any(".0.self_attn." in name or ".0.attn." in name for name in names)


def test_nm_incompatible_layers_listed_or_skipped():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=100,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    with pytest.raises(UserInputError, match=r"\(100\) not divisible by M=8: model.layers.0.mlp.down_proj"):
        method_targets(model, None, parse_sparsity("2:8"), skip_incompatible=False)
    kept = method_targets(model, None, parse_sparsity("2:8"), skip_incompatible=True)
    assert "model.layers.0.mlp.down_proj" not in kept and "model.layers.0.mlp.up_proj" in kept


def test_wrapped_forward_equals_manually_masked_weights(tiny_model, token_batch):
    names = select_targets(tiny_model, None)
    masks = random_masks(tiny_model, names)
    reference = make_tiny_llama() if "Llama" in type(tiny_model).__name__ else make_tiny_gpt2()
    with torch.no_grad():
        for name, module in reference.named_modules():
            if name in masks:
                weight_matrix(module).mul_(masks[name])
    attach_hard_masks(tiny_model, masks)
    assert len(wrappers(tiny_model)) == len(names)
    torch.testing.assert_close(tiny_model(token_batch).logits, reference(token_batch).logits)


def test_merge_copies_and_in_place_merge_masks_the_modules_own_weights(tiny_model, token_batch):
    """merge: the wrapped modules stay untouched (a sweep puts them back); in_place (a run's export): the same
    plain model, with each target's own weight tensor masked, no copy made."""
    names = select_targets(tiny_model, None)
    masks = random_masks(tiny_model, names)
    attach_hard_masks(tiny_model, masks)
    expected = tiny_model(token_batch).logits
    bases = {name: wrapper.base for name, wrapper in wrappers(tiny_model).items()}
    originals = {name: weight_matrix(base).clone() for name, base in bases.items()}
    copied = merge(tiny_model)
    torch.testing.assert_close(copied(token_batch).logits, expected)
    assert all(torch.equal(weight_matrix(base), originals[name]) for name, base in bases.items())

    attach_hard_masks(tiny_model, masks)  # wrap the merged copies again
    bases = {name: wrapper.base for name, wrapper in wrappers(tiny_model).items()}
    storage = {name: weight_matrix(base).data_ptr() for name, base in bases.items()}
    baked = merge(tiny_model, in_place=True)
    assert not wrappers(baked)
    torch.testing.assert_close(baked(token_batch).logits, expected)
    modules = dict(baked.named_modules())
    for name, base in bases.items():
        assert modules[name] is base and weight_matrix(base).data_ptr() == storage[name]
        assert torch.equal(weight_matrix(base), originals[name] * masks[name])


def test_nm_index_storage_is_compact(tmp_path):
    model = make_tiny_llama()
    names = select_targets(model, None)
    masks = {
        name: nm_candidates(2, 4)[torch.zeros(keep.numel() // 4, dtype=torch.long)].reshape(keep.shape)
        for name, keep in random_masks(model, names).items()
    }
    attach_hard_masks(model, masks)
    save_masks(model, tmp_path, {}, nm=(2, 4))
    weights = sum(keep.numel() for keep in masks.values())
    assert (tmp_path / "masks.safetensors").stat().st_size < weights / 4 + 4096  # one byte per group of 4


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 7),
    extra=st.integers(1, 3),
    rows=st.integers(1, 6),
    groups=st.integers(1, 6),
    seed=st.integers(0, 10_000),
)
def test_nm_encoding_round_trips_exactly(n, extra, rows, groups, seed):
    m = n + extra
    candidates = nm_candidates(n, m)
    choice = torch.randint(0, len(candidates), (rows * groups,), generator=torch.Generator().manual_seed(seed))
    keep = candidates[choice].reshape(rows, groups * m)
    index = encode_nm(keep, n, m)
    assert index is not None and index.dtype == torch.uint8
    assert torch.equal(decode_nm(index, n, m), keep)


def test_non_nm_mask_is_not_encoded_as_nm():
    keep = torch.ones(2, 8, dtype=torch.bool)
    assert encode_nm(keep, 2, 4) is None


def test_mismatched_masks_file_is_refused(tmp_path):
    llama = make_tiny_llama()
    attach_hard_masks(llama, random_masks(llama, select_targets(llama, None)))
    save_masks(llama, tmp_path, {"model": "tiny-llama"})
    with pytest.raises(UserInputError, match="do not match"):
        load_masks(make_tiny_gpt2(), tmp_path)


def test_corrupt_masks_file_is_refused(tmp_path):
    llama = make_tiny_llama()
    attach_hard_masks(llama, random_masks(llama, select_targets(llama, None)))
    save_masks(llama, tmp_path, {})
    (tmp_path / "masks.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(UserInputError, match="corrupt"):
        read_masks(tmp_path)


def test_missing_masks_file(tmp_path):
    with pytest.raises(UserInputError, match="no masks.safetensors"):
        read_masks(tmp_path)
