"""Layer-by-layer calibration on tiny Llama (GQA) and GPT-2 models built from config."""

import copy
import gc
import warnings

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from prune.calibration.input_norms import WandaStats
from prune.calibration.layerwise import collect_stats, prune_layerwise
from prune.core.errors import UserInputError
from prune.core.sparsity import parse_sparsity
from prune.methods.oneshot import method as methods
from prune.methods.oneshot.magnitude import magnitude_scores
from prune.methods.oneshot.masking import mask_from_scores, removed_count
from prune.methods.oneshot.stats import InputStats
from prune.models.blocks import LINEAR_TYPES, find_blocks, weight_matrix

N, SEQ, HIDDEN, VOCAB = 5, 7, 64, 128


def _llama(attn="sdpa"):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


def _gpt2(attn="sdpa"):
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=HIDDEN,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attn,
    )
    return GPT2LMHeadModel(config).eval()


MODELS = {"llama": _llama, "llama-eager": lambda: _llama("eager"), "gpt2": _gpt2, "gpt2-eager": lambda: _gpt2("eager")}


def _targets(model, with_head=False):
    prefix, _ = find_blocks(model)
    names = [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES) and n.startswith(prefix + ".")]
    return names + (["lm_head"] if with_head else [])


def _calib():
    return torch.randint(0, VOCAB, (N, SEQ), generator=torch.Generator().manual_seed(1))


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_identical(model, snapshot):
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for key, value in snapshot.items():
        assert torch.equal(state[key], value), key


def _assert_no_hooks(model):
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, module


RUNS = {
    "magnitude-0.5": lambda model, names: methods.magnitude(model, names, parse_sparsity(0.5), progress=False),
    "wanda-2:4": lambda model, names: methods.wanda(
        model, names, parse_sparsity("2:4"), calib_blocks=_calib(), batch_size=2, progress=False
    ),
    "wanda-0.3-layer": lambda model, names: methods.wanda(
        model, names, parse_sparsity(0.3), "layer", _calib(), batch_size=3, progress=False
    ),
    "sparsegpt-0.5": lambda model, names: methods.sparsegpt(
        model, names, parse_sparsity(0.5), _calib(), blocksize=32, batch_size=2, progress=False
    ),
    "sparsegpt-2:4-mask-only": lambda model, names: methods.sparsegpt(
        model, names, parse_sparsity("2:4"), _calib(), update_weights=False, progress=False
    ),
}


@pytest.mark.parametrize("run", sorted(RUNS))
@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_masks_exact_and_model_restored(model_name, run):
    model = MODELS[model_name]()
    names = _targets(model, with_head=True)
    snapshot = _snapshot(model)
    result = RUNS[run](model, names)
    _assert_identical(model, snapshot)
    _assert_no_hooks(model)
    assert set(result.masks) == set(names)
    sparsity = parse_sparsity(run.split("-")[1])
    modules = dict(model.named_modules())
    for name, keep in result.masks.items():
        weight = weight_matrix(modules[name])
        assert keep.dtype == torch.bool and keep.shape == weight.shape and keep.device.type == "cpu"
        if sparsity.is_nm:
            assert (keep.reshape(weight.shape[0], -1, sparsity.m).sum(-1) == sparsity.n).all(), name
        elif run.startswith("wanda-") and "layer" not in run:
            assert ((~keep).sum(1) == removed_count(sparsity.fraction, weight.shape[1])).all(), name
        else:
            assert (~keep).sum().item() == removed_count(sparsity.fraction, keep.numel()), name
    if run == "sparsegpt-0.5":
        assert set(result.weights) == set(names)
        for name, new in result.weights.items():
            assert new.shape == result.masks[name].shape and (new[~result.masks[name]] == 0).all()
            assert not torch.equal(new, weight_matrix(modules[name]) * result.masks[name])  # really updated
    else:
        assert result.weights == {}


def test_sparsegpt_in_place_leaves_what_the_restoring_run_returns():
    """A run's attach prunes SparseGPT in place (no copy of the originals, none of the re-fit weights): the same
    masks, and the model then holds exactly the weights the restoring call returns."""
    names = _targets(_llama())
    restoring = methods.sparsegpt(_llama(), names, parse_sparsity("2:4"), _calib(), batch_size=2, progress=False)
    model = _llama()
    in_place = methods.sparsegpt(
        model, names, parse_sparsity("2:4"), _calib(), batch_size=2, progress=False, in_place=True
    )
    assert in_place.weights == {} and in_place.masks.keys() == restoring.masks.keys()
    modules = dict(model.named_modules())
    for name, keep in restoring.masks.items():
        assert torch.equal(in_place.masks[name], keep)
        assert torch.equal(weight_matrix(modules[name]), restoring.weights[name])


class Recorder:
    """Stats that keep every input, to compare with a manual forward."""

    def __init__(self):
        self.inputs = []

    def add(self, x):
        self.inputs.append(x.detach().clone())

    def all(self):
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in self.inputs])


def _magnitude_half(name, module, stats):
    return mask_from_scores(magnitude_scores(weight_matrix(module)), parse_sparsity(0.5)), None


def _inputs_of(model, name, calib):
    seen = []
    handle = dict(model.named_modules())[name].register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    try:
        with torch.no_grad():
            model(calib, use_cache=False)
    finally:
        handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_block1_stats_come_from_pruned_block0(model_name):
    model = MODELS[model_name]()
    names = _targets(model, with_head=True)
    calib = _calib()
    recorders = {}

    def make_stats(module):
        recorders[module] = Recorder()
        return recorders[module]

    modules = dict(model.named_modules())
    snapshot = _snapshot(model)
    result = prune_layerwise(model, names, _magnitude_half, make_stats, calib, batch_size=2, progress=False)
    _assert_identical(model, snapshot)
    recorded = {name: recorders[modules[name]].all() for name in names}

    first0, first1 = names[0], next(n for n in names if ".1." in n)
    torch.testing.assert_close(recorded[first0], _inputs_of(model, first0, calib))  # block 0: the dense model
    dense1 = _inputs_of(model, first1, calib)

    pruned0 = copy.deepcopy(model)  # manual reference: only block 0 pruned
    with torch.no_grad():
        for name in names:
            if ".0." in name:
                weight_matrix(dict(pruned0.named_modules())[name]).mul_(result.masks[name])
    torch.testing.assert_close(recorded[first1], _inputs_of(pruned0, first1, calib), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(recorded[first1], dense1, atol=1e-3)

    everything = copy.deepcopy(model)  # lm_head sees the model with every block pruned
    with torch.no_grad():
        for name in names[:-1]:
            weight_matrix(dict(everything.named_modules())[name]).mul_(result.masks[name])
    torch.testing.assert_close(recorded["lm_head"], _inputs_of(everything, "lm_head", calib), rtol=1e-5, atol=1e-5)


class _Tee(Recorder):
    """Wanda's norms and SparseGPT's Hessian, accumulated as the methods do, beside the raw inputs they saw."""

    def __init__(self, in_features):
        super().__init__()
        self.stats = InputStats(in_features, hessian=True)

    def add(self, x):
        super().add(x)
        self.stats.add(x)


def _keep_all(name, module, stats):
    return torch.ones(weight_matrix(module).shape, dtype=torch.bool), None


DRIVERS = {
    "prune_layerwise": lambda model, names, make, calib: prune_layerwise(
        model, names, _keep_all, make, calib, batch_size=3, progress=False
    ),
    "collect_stats": lambda model, names, make, calib: collect_stats(
        model, names, make, calib, batch_size=3, progress=False
    ),
}


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_bfloat16_model_statistics_are_accumulated_in_full_precision(driver):
    """The inputs of a bfloat16 model are bfloat16, but its statistics must not be: summed over many tokens in
    bfloat16 (8 mantissa bits) the norms and the Hessian would be off by about 1e-2 relative, and Wanda's 2:4 choice
    between near-equal scores would follow the rounding. Norms float64, Hessian float32, as in float32."""
    model = _llama().to(torch.bfloat16)
    names = _targets(model)
    calib = torch.randint(0, VOCAB, (12, 64), generator=torch.Generator().manual_seed(2))
    tees = []

    def make_stats(module):
        tees.append(_Tee(weight_matrix(module).shape[1]))
        return tees[-1]

    DRIVERS[driver](model, names, make_stats, calib)
    assert len(tees) >= 4
    for tee in tees:
        assert {x.dtype for x in tee.inputs} == {torch.bfloat16}  # the model really ran in bfloat16
        x = tee.all().double()
        assert tee.stats.tokens == x.shape[0] == 12 * 64
        norms, hessian = tee.stats.input_sq_norm(), tee.stats.matrix()
        assert norms.dtype == torch.float64 and hessian.dtype == torch.float32
        torch.testing.assert_close(norms, x.pow(2).sum(0), rtol=1e-12, atol=0)
        torch.testing.assert_close(hessian.double(), 2 / x.shape[0] * x.t() @ x, rtol=1e-5, atol=1e-6)


def test_holds_one_activation_tensor():
    """Structural memory check: while a block is pruned, exactly one [n, seq, hidden] tensor is alive."""
    model = _llama()
    counts = []

    def prune(name, module, stats):
        if not name.endswith("q_proj"):  # one count per block: gc.get_objects() is slow
            return _magnitude_half(name, module, stats)
        gc.collect()
        with warnings.catch_warnings():  # isinstance() on some torch module objects warns
            warnings.simplefilter("ignore")
            alive = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.shape == (N, SEQ, HIDDEN)]
        counts.append(len(alive))
        return _magnitude_half(name, module, stats)

    prune_layerwise(
        model,
        _targets(model),
        prune,
        lambda m: WandaStats(weight_matrix(m).shape[1]),
        _calib(),
        batch_size=2,
        progress=False,
    )
    assert counts == [1, 1]


def test_a_pruned_block_frees_its_statistics_and_its_original_weights():
    """What a block needed is gone before the next block is pruned: its statistics (no accumulator of block 0 is
    alive when block 1's targets are pruned) and the copies that restore its weights (block 0 already holds its
    original weights again): the driver holds one block's statistics and copies, not the model's."""
    import weakref

    model = _llama()
    names = _targets(model)
    modules = dict(model.named_modules())
    snapshot = _snapshot(model)
    stats_of_block0, checked = [], []

    def make_stats(module):
        stats = WandaStats(weight_matrix(module).shape[1])
        if any(modules[name] is module for name in names if ".0." in name):
            stats_of_block0.append(weakref.ref(stats))
        return stats

    def prune(name, module, stats):
        if ".1." in name and not checked:
            gc.collect()
            checked.append(name)
            assert stats_of_block0 and all(ref() is None for ref in stats_of_block0)
            _assert_identical(model, snapshot)  # block 0 restored; block 1 not touched yet
        return _magnitude_half(name, module, stats)

    prune_layerwise(model, names, prune, make_stats, _calib(), batch_size=2, progress=False)
    assert checked
    _assert_identical(model, snapshot)


def test_restore_false_leaves_pruned_and_updated_weights():
    model = _gpt2()
    names = _targets(model)
    modules = dict(model.named_modules())

    def prune(name, module, stats):
        keep, _ = _magnitude_half(name, module, stats)
        return keep, weight_matrix(module) * 2  # a method that also updates weights

    original = {name: weight_matrix(modules[name]).clone() for name in names}
    result = prune_layerwise(
        model, names, prune, lambda m: WandaStats(weight_matrix(m).shape[1]), _calib(), restore=False, progress=False
    )
    assert result.weights == {}  # the model holds them: no second copy
    for name in names:
        weight, keep = weight_matrix(modules[name]), result.masks[name]
        assert torch.equal(weight[keep], 2 * original[name][keep]) and (weight[~keep] == 0).all()


def test_magnitude_runs_no_forward_and_writes_nothing():
    model = _llama()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    versions = {n: w._version for n, w in weights.items()}
    methods.magnitude(model, _targets(model), parse_sparsity("2:4"), progress=False)
    assert calls == [] and {n: w._version for n, w in weights.items()} == versions


def test_errors_restore_weights_and_remove_hooks():
    model = _llama().train()
    snapshot = _snapshot(model)
    names = _targets(model)

    def prune(name, module, stats):
        if ".1." in name:
            raise RuntimeError("boom")
        return _magnitude_half(name, module, stats)

    with pytest.raises(RuntimeError, match="boom"):
        prune_layerwise(model, names, prune, lambda m: WandaStats(weight_matrix(m).shape[1]), _calib(), progress=False)
    _assert_identical(model, snapshot)
    _assert_no_hooks(model)
    assert model.training
    with pytest.raises(UserInputError, match="not a module"):
        methods.magnitude(model, ["model.layers.9.mlp"], parse_sparsity(0.5))
    with pytest.raises(UserInputError, match="prune linears"):
        methods.magnitude(model, ["model.layers.0.mlp"], parse_sparsity(0.5))
