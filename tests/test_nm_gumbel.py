"""MaskLLM's learnable N:M masks: soft/hard values, the fused autograd function, the prior, the regularizer,
mask transfer, storage, and a short optimization that must beat its prior."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch.nn import functional as F

from prune.core.errors import UserInputError
from prune.core.sparsity import parse_sparsity
from prune.masks.base import attach_hard_masks, hard_masks, mask_parameters, wrappers
from prune.masks.storage import nm_candidates, read_masks, save_masks
from prune.masks.targets import select_targets
from prune.methods.nm_gumbel.kernel import gumbel_noise, masked_linear
from prune.methods.nm_gumbel.method import NMGumbelConfig, NMGumbelMask, attach_nm_gumbel, prior_logits
from prune.methods.oneshot.method import magnitude, sparsegpt
from prune.methods.registry import get_method
from prune.models.blocks import weight_matrix
from tests.conftest import make_tiny_gpt2, make_tiny_llama


def config(**overrides) -> NMGumbelConfig:
    return NMGumbelConfig(**{"name": "nm_gumbel", "prior": "magnitude", **overrides})


def random_nm(shape, n=2, m=4, seed=0) -> torch.Tensor:
    candidates = nm_candidates(n, m)
    generator = torch.Generator().manual_seed(seed)
    choice = torch.randint(0, len(candidates), (shape[0] * shape[1] // m,), generator=generator)
    return candidates[choice].reshape(shape)


def train_masks(model, on: bool = True) -> None:
    for wrapper in wrappers(model).values():
        wrapper.mask.train(on)


def naive_soft(logits, noise, tau, kappa, n=2, m=4):
    """The reference formula by plain autograd: gumbel_softmax(kappa*logits, tau) @ candidates, [out, in]."""
    probs = torch.softmax((kappa * logits + noise) / tau, dim=0)  # [C, out, G]
    candidates = nm_candidates(n, m).to(probs.dtype)
    return torch.einsum("cog,cm->ogm", probs, candidates).reshape(logits.shape[1], -1)


# ------------------------------------------------------------------------------------------ soft and hard


@settings(max_examples=40, deadline=None)
@given(
    nm=st.sampled_from([(2, 4), (1, 4), (3, 4), (2, 8), (1, 2)]),
    out_features=st.integers(1, 6),
    groups=st.integers(1, 5),
    tau=st.floats(0.01, 10.0),
    kappa=st.floats(0.1, 1000.0),
    scale=st.floats(0.0, 5.0),
    seed=st.integers(0, 10_000),
)
def test_soft_mask_sums_to_n_per_group_at_any_temperature(nm, out_features, groups, tau, kappa, scale, seed):
    n, m = nm
    torch.manual_seed(seed)
    mask = NMGumbelMask(out_features, groups * m, n, m, tau=tau, kappa=kappa)
    with torch.no_grad():
        mask.logits.mul_(scale * 100)
    soft = mask.soft()
    assert soft.shape == (out_features, groups * m)
    assert torch.isfinite(soft).all() and soft.min() >= 0 and soft.max() <= 1 + 1e-5
    torch.testing.assert_close(
        soft.reshape(out_features, groups, m).sum(-1), torch.full((out_features, groups), float(n)), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_hard_mask_is_the_argmax_candidate_and_exactly_n_of_m(nm):
    n, m = nm
    torch.manual_seed(0)
    mask = NMGumbelMask(7, 4 * m, n, m)
    keep = mask.hard()
    assert keep.dtype == torch.bool and keep.shape == (7, 4 * m)
    assert torch.all(keep.reshape(7, 4, m).sum(-1) == n)
    best = mask.group_logits.argmax(-1)  # [out, G]
    assert torch.equal(keep, nm_candidates(n, m)[best].reshape(7, -1))
    mask.eval()
    assert torch.equal(mask(), keep)
    with torch.no_grad():
        mask.logits.copy_(mask.logits.round(decimals=1).abs())  # ties, and a tie at the top picks the first
    best = mask.group_logits.argmax(-1)
    assert (mask.logits == mask.logits.max(0).values).sum(0).max() > 1  # some group really has a tie at the top
    assert torch.equal(mask.hard(), nm_candidates(n, m)[best].reshape(7, -1))


def test_soft_mask_approaches_the_hard_mask_when_cold():
    torch.manual_seed(0)
    mask = NMGumbelMask(8, 16, 2, 4, tau=0.01, kappa=1e4, init_std=1.0)  # logit gaps >> Gumbel noise / kappa
    torch.testing.assert_close(mask.soft(), mask.hard().float(), atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------------ the fused function


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 4), (2, 8)])  # 2:8 has 28 candidates: the matmul path
def test_fused_function_passes_gradcheck_in_float64(nm):
    n, m = nm
    torch.manual_seed(0)
    out_features, in_features, count = 3, 2 * m, len(nm_candidates(n, m))
    x = torch.randn(2, 3, in_features, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(out_features, in_features, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(out_features, dtype=torch.float64, requires_grad=True)
    logits = (torch.randn(count, out_features, in_features // m, dtype=torch.float64) * 0.01).requires_grad_()
    noise = gumbel_noise(logits.shape, 7, "cpu", torch.float64)

    def function(x, weight, bias, logits):
        return masked_linear(x, weight, bias, logits, noise, 2.0, 50.0, n, m, want_sq=True)

    assert torch.autograd.gradcheck(function, (x, weight, bias, logits), fast_mode=count > 6)


def test_gumbel_noise_depends_on_the_seed_only_and_is_gumbel():
    shape = (3, 700, 1000)  # 2.1M values: filled in chunks by several threads
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = gumbel_noise(shape, 11, "cpu")
        torch.set_num_threads(2)
        parallel = gumbel_noise(shape, 11, "cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, parallel) and not torch.equal(single, gumbel_noise(shape, 12, "cpu"))
    assert torch.isfinite(single).all()
    assert float(single.mean()) == pytest.approx(0.5772, abs=0.01)  # Euler-Mascheroni
    assert float(single.var()) == pytest.approx(torch.pi**2 / 6, rel=0.01)


@pytest.mark.parametrize("store_noise", [True, False])
def test_fused_layer_equals_the_naive_formula_with_the_same_noise(store_noise):
    """Forward, input gradient, logit gradient and regularizer of the memory-light path equal plain autograd
    on W ⊙ soft with the very noise the layer drew (stored in bfloat16, or regenerated from its seed)."""
    torch.manual_seed(0)
    mask = NMGumbelMask(12, 16, 2, 4, tau=1.5, kappa=80.0, sparse_weight_reg=1e-2, store_noise=store_noise)
    mask.set_schedule(1.5, 80.0, 0.25)
    weight, bias = torch.randn(12, 16), torch.randn(12)
    x = torch.randn(3, 5, 16, requires_grad=True)

    torch.manual_seed(123)
    y = mask.linear(x, weight, bias)
    loss = (y * torch.linspace(-1, 1, 12)).sum() + mask.regularizer(weight)
    loss.backward()
    grad_x, grad_logits = x.grad.clone(), mask.logits.grad.clone()

    torch.manual_seed(123)
    noise = mask.sample_noise()
    if store_noise:
        noise = noise.to(torch.bfloat16).float()
    x.grad, mask.logits.grad = None, None
    soft = naive_soft(mask.logits, noise, 1.5, 80.0)
    y_ref = F.linear(x, weight * soft, bias)
    reference = (y_ref * torch.linspace(-1, 1, 12)).sum() - 1e-2 * 0.75 * (weight * soft).pow(2).sum()
    reference.backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, reference, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad_x, x.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_logits, mask.logits.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2])
def test_gradients_reach_the_logits_and_nothing_else(make, token_batch):
    model = make()
    objective = attach_nm_gumbel(model, config(), None)
    model.requires_grad_(False)
    params = mask_parameters(model)
    for param in params:
        param.requires_grad_(True)
    train_masks(model)
    objective.begin_step(0, 10)
    loss = model(input_ids=token_batch, labels=token_batch).loss + objective.regularizer(model)
    loss.backward()
    assert len(params) == len(wrappers(model)) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    mask_ids = {id(p) for p in params}
    assert all(p.grad is None for p in model.parameters() if id(p) not in mask_ids)
    assert all(w.base.weight.grad is None and not w.base.weight.requires_grad for w in wrappers(model).values())


# ---------------------------------------------------------------------------------------------- the prior


def test_prior_logits_follow_maskllm_rule_without_noise():
    prior = torch.tensor([[True, True, False, False]])  # candidate 0 of 2:4
    logits = prior_logits(prior, 2, 4, strength=3.0, sigma=0.01)[:, 0, 0]
    overlap = nm_candidates(2, 4).float() @ prior[0].float()
    torch.testing.assert_close(logits, 0.03 * (overlap - 1))  # +0.03 for the prior, 0 for one shared, -0.03 none
    assert logits.argmax() == 0


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_random_nm_prior_wins_every_group_at_step_zero(nm):
    n, m = nm
    prior = random_nm((16, 8 * m), n, m, seed=3)
    mask = NMGumbelMask(16, 8 * m, n, m)
    mask.init_from_prior(prior, strength=3.0, sigma=0.01)
    assert torch.equal(mask.hard(), prior)
    top2 = mask.group_logits.topk(2, dim=-1).values
    assert torch.all(top2[..., 0] - top2[..., 1] >= 3.0 * 0.01 - 1e-7)  # a margin, not a coin toss


def test_magnitude_prior_is_the_hard_mask_at_step_zero():
    model = make_tiny_llama()
    names = select_targets(model, None)
    expected = magnitude(model, names, parse_sparsity("2:4"), progress=False).masks
    attach_nm_gumbel(model, config(prior="magnitude"), None)
    masks = hard_masks(model)
    assert masks.keys() == expected.keys()
    assert all(torch.equal(masks[name], expected[name]) for name in names)


def test_sparsegpt_prior_and_optional_weight_update():
    calibration = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = make_tiny_llama()
    names = select_targets(reference, None)
    expected = sparsegpt(reference, names, parse_sparsity("2:4"), calibration, progress=False)
    for update in (False, True):
        model = make_tiny_llama()
        original = {n: weight_matrix(m).detach().clone() for n, m in model.named_modules() if n in names}
        attach_nm_gumbel(model, config(prior="sparsegpt", prior_update_weights=update), calibration)
        masks = hard_masks(model)
        assert all(torch.equal(masks[name], expected.masks[name]) for name in names)
        for name, wrapper in wrappers(model).items():
            target = expected.weights[name] if update else original[name]
            torch.testing.assert_close(weight_matrix(wrapper.base), target)


def test_prior_none_draws_small_random_logits():
    torch.manual_seed(0)
    model = make_tiny_llama()
    attach_nm_gumbel(model, config(prior="none"), None)
    logits = torch.cat([w.mask.logits.detach().flatten() for w in wrappers(model).values()])
    assert 0.008 < float(logits.std()) < 0.012


def _saved_run(tmp_path, masks: dict, sparsity="2:4", model=None, nm=(2, 4)):
    model = model or make_tiny_llama()
    attach_hard_masks(model, masks)
    save_masks(model, tmp_path, {"model": "tiny", "method": "magnitude", "config": {"sparsity": sparsity}}, nm=nm)
    return tmp_path


def test_prior_from_a_saved_run_is_the_hard_mask_at_step_zero(tmp_path):
    model = make_tiny_llama()
    modules = dict(model.named_modules())
    names = select_targets(model, None)
    masks = {name: random_nm(weight_matrix(modules[name]).shape, seed=i) for i, name in enumerate(names)}
    run = _saved_run(tmp_path / "run", masks)
    fresh = make_tiny_llama()
    attach_nm_gumbel(fresh, config(prior=str(run)), None)
    learned = hard_masks(fresh)
    assert all(torch.equal(learned[name], masks[name]) for name in names)


def test_prior_from_a_run_with_another_pattern_is_refused(tmp_path):
    model = make_tiny_llama()
    modules = dict(model.named_modules())
    names = select_targets(model, None)
    masks = {name: random_nm(weight_matrix(modules[name]).shape, 4, 8) for name in names}
    run = _saved_run(tmp_path / "run", masks, sparsity="4:8", nm=(4, 8))
    with pytest.raises(UserInputError, match="4:8.*not 2:4"):
        attach_nm_gumbel(make_tiny_llama(), config(prior=str(run)), None)


def test_prior_from_an_unstructured_run_is_refused(tmp_path):
    model = make_tiny_llama()
    modules = dict(model.named_modules())
    names = select_targets(model, None)
    masks = {name: torch.rand(weight_matrix(modules[name]).shape) < 0.5 for name in names}
    run = _saved_run(tmp_path / "run", masks, sparsity="0.5", nm=None)
    with pytest.raises(UserInputError, match="sparsity 0.5, not 2:4"):
        attach_nm_gumbel(make_tiny_llama(), config(prior=str(run)), None)
    (run / "masks.json").write_text((run / "masks.json").read_text().replace('"sparsity": "0.5"', '"other": 1'))
    with pytest.raises(UserInputError, match="not exactly 2:4"):  # no recorded pattern: the masks are checked
        attach_nm_gumbel(make_tiny_llama(), config(prior=str(run)), None)


def test_prior_from_a_run_of_another_model_is_refused(tmp_path):
    gpt2 = make_tiny_gpt2()
    modules = dict(gpt2.named_modules())
    names = select_targets(gpt2, None)
    masks = {name: random_nm(weight_matrix(modules[name]).shape) for name in names}
    run = _saved_run(tmp_path / "run", masks, model=gpt2)
    with pytest.raises(UserInputError, match="do not fit this model"):
        attach_nm_gumbel(make_tiny_llama(), config(prior=str(run)), None)
    with pytest.raises(UserInputError, match="no masks.safetensors"):
        attach_nm_gumbel(make_tiny_llama(), config(prior=str(tmp_path / "missing/")), None)


def test_prior_from_a_run_with_other_shapes_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    modules = dict(wider.named_modules())
    masks = {name: random_nm(weight_matrix(modules[name]).shape) for name in select_targets(wider, None)}
    run = _saved_run(tmp_path / "run", masks, model=wider)
    with pytest.raises(UserInputError, match="shapes differ"):
        attach_nm_gumbel(make_tiny_llama(), config(prior=str(run)), None)


# ------------------------------------------------------------------------------------- storage round trip


def test_learned_hard_masks_round_trip_through_compact_storage(tmp_path):
    torch.manual_seed(0)
    model = make_tiny_llama()
    attach_nm_gumbel(model, config(prior="none"), None)
    masks = hard_masks(model)
    save_masks(model, tmp_path, {"method": "nm_gumbel", "config": {"sparsity": "2:4"}}, nm=(2, 4))
    info = json.loads((tmp_path / "masks.json").read_text())["targets"]
    assert {entry["encoding"] for entry in info.values()} == {"nm_index"}
    loaded, _ = read_masks(tmp_path)
    assert loaded.keys() == masks.keys() and all(torch.equal(loaded[k], masks[k]) for k in masks)


# -------------------------------------------------------------------------------- schedule and regularizer


def test_schedule_values_at_start_and_end():
    model = make_tiny_llama()
    objective = attach_nm_gumbel(model, config(), None)
    start = objective.begin_step(0, 100)
    assert start["tau"] == 4.0 and start["kappa"] == 100.0 and start["reg_scale"] == pytest.approx(1e-5)
    middle = objective.begin_step(50, 100)
    assert middle["tau"] == pytest.approx(2.025) and middle["kappa"] == pytest.approx(300.0)
    end = objective.begin_step(100, 100)
    assert end["tau"] == pytest.approx(0.05) and end["kappa"] == pytest.approx(500.0) and end["reg_scale"] == 0
    mask = next(iter(wrappers(model).values())).mask
    assert (mask.tau, mask.kappa, mask.progress) == (pytest.approx(0.05), pytest.approx(500.0), 1.0)
    cosine = attach_nm_gumbel(make_tiny_llama(), config(schedule="cosine"), None).begin_step(25, 100)
    assert cosine["tau"] == pytest.approx(4.0 - 3.95 * (1 - 0.5**0.5) / 2)


def test_regularizer_is_the_hand_formula_and_vanishes_at_the_end():
    torch.manual_seed(0)
    mask = NMGumbelMask(6, 8, 2, 4, sparse_weight_reg=0.5)
    weight = torch.randn(6, 8)
    mask.set_schedule(2.0, 150.0, 0.3)
    torch.manual_seed(5)
    value = mask.regularizer(weight)  # no forward happened: a fresh sample
    torch.manual_seed(5)
    soft = naive_soft(mask.logits, mask.sample_noise(), 2.0, 150.0)
    torch.testing.assert_close(value, -0.5 * (1 - 0.3) * (weight * soft).pow(2).sum())
    value.backward()
    assert mask.logits.grad is not None
    mask.set_schedule(0.05, 500.0, 1.0)
    assert float(mask.regularizer(weight)) == 0.0
    assert float(NMGumbelMask(6, 8, 2, 4, sparse_weight_reg=0.0).regularizer(weight)) == 0.0


def test_objective_regularizer_uses_the_forwards_soft_masks(token_batch):
    torch.manual_seed(0)
    model = make_tiny_llama()
    objective = attach_nm_gumbel(model, config(sparse_weight_reg=1e-3), None)
    train_masks(model)
    for wrapper in wrappers(model).values():
        wrapper.mask.store_noise = False  # exact noise (the stored, bfloat16 path: test_fused_layer_equals_...)
    objective.begin_step(2, 10)
    torch.manual_seed(9)
    model(token_batch)
    value = objective.regularizer(model)
    torch.manual_seed(9)  # the same draws again, in the order of the forward
    expected = 0.0
    for wrapper in wrappers(model).values():
        mask = wrapper.mask
        noise = mask.sample_noise()
        soft = naive_soft(mask.logits, noise, mask.tau, mask.kappa)
        expected += (weight_matrix(wrapper.base) * soft).pow(2).sum()
    torch.testing.assert_close(value, -1e-3 * 0.8 * expected, rtol=1e-5, atol=1e-7)
    assert all(w.mask._sq_norm is None for w in wrappers(model).values())  # consumed by the regularizer
    objective.begin_step(10, 10)
    assert float(objective.regularizer(model)) == 0.0


# ------------------------------------------------------------------------------------------------ learning


def test_a_few_steps_beat_the_magnitude_prior():
    """The targets are the greedy tokens of the same tiny llama under another (random) 2:4 mask, so the
    magnitude prior is not optimal; 12 AdamW steps on the logits alone must lower the hard-masked loss."""
    torch.manual_seed(0)
    teacher = make_tiny_llama()
    names = select_targets(teacher, None)
    modules = dict(teacher.named_modules())
    attach_hard_masks(teacher, {n: random_nm(weight_matrix(modules[n]).shape, seed=i) for i, n in enumerate(names)})
    tokens = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        targets = teacher(tokens).logits.argmax(-1).flatten()

    model = make_tiny_llama()
    objective = attach_nm_gumbel(
        model, config(tau_start=1.0, tau_end=0.2, kappa_start=100.0, kappa_end=100.0, sparse_weight_reg=0.0), None
    )
    model.requires_grad_(False)
    params = mask_parameters(model)
    for param in params:
        param.requires_grad_(True)

    def hard_loss() -> float:
        train_masks(model, False)
        with torch.no_grad():
            return float(F.cross_entropy(model(tokens).logits.flatten(0, 1), targets))

    prior_loss = hard_loss()
    optimizer = torch.optim.AdamW(params, lr=0.05, weight_decay=0.0)
    train_masks(model)
    steps = 12
    for step in range(steps):
        objective.begin_step(step, steps)
        loss = F.cross_entropy(model(tokens).logits.flatten(0, 1), targets) + objective.regularizer(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    learned_loss = hard_loss()
    assert learned_loss < prior_loss - 0.1
    assert all(torch.all(k.reshape(k.shape[0], -1, 4).sum(-1) == 2) for k in hard_masks(model).values())


# ------------------------------------------------------------------------------------ config and registry


def test_registered_as_a_learnable_method_with_calibration():
    spec = get_method("nm_gumbel")
    assert spec.kind == "learnable" and spec.needs_calibration and spec.config_class is NMGumbelConfig
    defaults = config(prior="sparsegpt")
    assert (
        defaults.prior_strength,
        defaults.tau_start,
        defaults.tau_end,
        defaults.kappa_start,
        defaults.kappa_end,
        defaults.schedule,
        defaults.sparse_weight_reg,
        defaults.prior_update_weights,
    ) == (3.0, 4.0, 0.05, 100.0, 500.0, "linear", 1e-5, False)
    own = set(NMGumbelConfig.model_fields) - {"name", "sparsity", "targets", "skip_incompatible"}
    assert len(own) == 10 and all(NMGumbelConfig.model_fields[key].description for key in own)
    assert NMGumbelConfig(name="nm_gumbel", prior_update_weights=True).changes_weights


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sparsity": 0.5}, "nm_gumbel learns N:M masks; use 2:4"),
        ({"tau_end": 0.0}, "tau_end must be > 0"),
        ({"kappa_start": -1.0}, "kappa_start must be > 0"),
        ({"prior": "sparsgpt"}, "neither sparsegpt, wanda, magnitude, none, nor a run directory"),
        ({"prior": "wanda", "prior_update_weights": True}, "needs prior: sparsegpt"),
        ({"sparsity": "8:16"}, "candidate patterns"),
        ({"prior_strenght": 3}, "Extra inputs are not permitted"),
    ],
)
def test_config_refuses_bad_values(overrides, message):
    with pytest.raises(ValidationError, match=message):
        config(**overrides)
