"""Activation sparsity (method `activation`, TEAL and CATS): cuts reach their target on held-out tokens, the
sparse decode kernel computes what the masked dense model computes (batch 1 and batch > 1, float32 and
bfloat16), saved thresholds rebuild the same model, and bad input is refused or served by the dense path."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch.nn import functional as F

from eval.flops import count_flops
from prune import method_config
from prune.cli import main
from prune.core.errors import UserInputError
from prune.methods.activation import kernel
from prune.methods.activation.layers import ThresholdedFFN, ThresholdedLinear, thresholded
from prune.methods.activation.method import ACTIVATION, measure_zeroed, report_activation
from prune.methods.spec import HeldOut
from prune.runs import run_dir
from prune.runs.loading import load_model
from tests.conftest import docs_text, make_tiny_gpt2, make_tiny_llama, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 128
CASES = [("llama", "teal"), ("llama", "cats"), ("gpt2", "teal")]


def tokens(rows: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def sparse_model(family: str, mode: str, dtype=torch.float32, **config):
    model = (make_tiny_llama() if family == "llama" else make_tiny_gpt2()).to(dtype)
    settings = {"mode": mode, "sparsity": 0.5, **config}
    ACTIVATION.attach(model, method_config("activation", **settings), tokens(8, 32, seed=1))
    return model


@pytest.fixture
def cpp():
    """The C++ kernel, built (once per machine) or the test skipped where no compiler can build it."""
    try:
        with kernel.use_backend("cpp"):
            yield
    except RuntimeError as error:
        pytest.skip(str(error))


@torch.no_grad()
def decode_logits(model, batch: int, steps: int = 3) -> torch.Tensor:
    """Logits of `steps` single-token decode calls after an 8-token prefill, with the KV cache: [steps, batch, V]."""
    prompt = tokens(batch, 8, seed=3)
    out = model(input_ids=prompt, use_cache=True)
    cache, logits = out.cache, []
    for step in range(steps):
        out = model(input_ids=tokens(batch, 1, seed=10 + step), cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits[:, -1])
    return torch.stack(logits)


# --------------------------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("score", ["magnitude", "weighted"])
@pytest.mark.parametrize(("family", "mode"), CASES)
def test_cuts_reach_their_target_on_heldout_tokens(family, mode, score):
    """Calibrated on one set of windows, the share of entries zeroed on other windows is the target (overall and
    per layer, within a tolerance: the cuts come from the dense model, and upstream sparsity shifts what follows)."""
    model = sparse_model(family, mode, sparsity=0.4, score=score)
    zeroed = measure_zeroed(model, tokens(8, 32, seed=2))
    assert zeroed["entries_zeroed"] == pytest.approx(0.4, abs=0.04)
    for name, layer in zeroed["layers"].items():
        assert layer["target"] == 0.4 and layer["zeroed"] == pytest.approx(0.4, abs=0.1), name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_allocation_spreads_each_blocks_target_over_its_inputs(family):
    """TEAL's greedy: every block skips exactly the target share of its wrapped weights, unevenly over its groups
    (q/k/v share one share, gate/up another), and held-out tokens skip about that share."""
    model = sparse_model(family, "teal", sparsity=0.4, allocation="greedy")
    layers = thresholded(model)
    for index in range(2):
        block = {name: layer for name, layer in layers.items() if f".{index}." in name}
        weights = {name: layer.base.weight.numel() for name, layer in block.items()}
        skipped = sum(layer.mask.target * weights[name] for name, layer in block.items())
        assert skipped == pytest.approx(0.4 * sum(weights.values()), rel=1e-6)
        assert len({round(layer.mask.target, 6) for layer in block.values()}) > 1
    if family == "llama":
        attention = [layers[f"model.layers.0.self_attn.{p}_proj"].mask.target for p in "qkv"]
        assert len(set(attention)) == 1
    assert measure_zeroed(model, tokens(8, 32, seed=2))["weights_skipped"] == pytest.approx(0.4, abs=0.06)


def test_teal_wraps_every_projection_and_cats_every_gated_ffn():
    teal = thresholded(sparse_model("llama", "teal"))
    cats = thresholded(sparse_model("llama", "cats"))
    assert len(teal) == 2 * 7 and all(isinstance(layer, ThresholdedLinear) for layer in teal.values())
    assert list(cats) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(isinstance(layer, ThresholdedFFN) for layer in cats.values())
    gpt2 = thresholded(sparse_model("gpt2", "teal"))
    assert {name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1] for name in gpt2} == {
        "attn.c_attn",
        "attn.c_proj",
        "mlp.c_fc",
        "mlp.c_proj",
    }


# ------------------------------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_kernels_equal_the_masked_dense_computation(cpp, rows, dtype):
    """Against the float32 computation from the same inputs: the kernels accumulate in float32 and round once."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 48, generator=generator).to(dtype)
    weight = torch.randn(40, 48, generator=generator).to(dtype)
    bias = torch.randn(40, generator=generator).to(dtype)
    cut = torch.rand(48, generator=generator)
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    expected = F.linear(kernel.masked(x, cut).float(), weight.float(), bias.float()).to(dtype)
    torch.testing.assert_close(kernel.threshold_linear(x, weight.t().contiguous(), cut, bias), expected, **tolerance)
    nothing = torch.full((48,), float("inf"))
    assert torch.equal(kernel.threshold_linear(x, weight.t().contiguous(), nothing, bias), bias.expand(rows, -1))

    gate, up, down = (torch.randn(*shape, generator=generator).to(dtype) for shape in ((32, 48), (32, 48), (48, 32)))
    act = F.silu(F.linear(x, gate))
    neurons = torch.rand(32, generator=generator) * 0.5
    expected = F.linear(kernel.masked(act, neurons).float() * F.linear(x.float(), up.float()), down.float()).to(dtype)
    got = kernel.threshold_ffn(x, act, neurons, up, None, down.t().contiguous(), None)
    torch.testing.assert_close(got, expected, **tolerance)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(("family", "mode"), CASES)
def test_sparse_decode_equals_the_masked_dense_model(cpp, family, mode, batch, monkeypatch):
    """Decode through the kernel (which must run: every call counted) gives the masked dense model's logits."""
    model = sparse_model(family, mode)
    calls = Counter()
    for name in ("threshold_linear", "threshold_ffn"):
        original = getattr(kernel, name)
        monkeypatch.setattr(
            kernel, name, lambda *args, name=name, original=original: calls.update([name]) or original(*args)
        )
    sparse = decode_logits(model, batch)
    ffns = sum(isinstance(layer, ThresholdedFFN) for layer in thresholded(model).values())
    linears = len(thresholded(model)) - ffns
    # every decode call of every wrapper (3 tokens), none of the prefill; a cats FFN reads its gate through the
    # linear kernel too
    assert calls == Counter({"threshold_linear": 3 * (linears + ffns), "threshold_ffn": 3 * ffns})
    with kernel.use_backend("dense"):
        dense = decode_logits(model, batch)
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        prefill = model(input_ids=tokens(batch, 8, seed=3)).logits
    assert not torch.allclose(prefill, make_logits(family, batch), atol=1e-4)  # the cuts change the model


def make_logits(family: str, batch: int) -> torch.Tensor:
    model = make_tiny_llama() if family == "llama" else make_tiny_gpt2()
    with torch.no_grad():
        return model(input_ids=tokens(batch, 8, seed=3)).logits


@pytest.mark.parametrize("mode", ["teal", "cats"])
def test_bfloat16_decode_equals_the_masked_dense_model(cpp, mode):
    model = sparse_model("llama", mode, dtype=torch.bfloat16)
    assert all(layer.mask.cut.dtype == torch.float32 for layer in thresholded(model).values())
    sparse = decode_logits(model, batch=2)
    with kernel.use_backend("dense"):
        dense = decode_logits(model, batch=2)
    assert sparse.dtype == torch.bfloat16
    torch.testing.assert_close(sparse.float(), dense.float(), rtol=5e-2, atol=5e-2)
    zeroed = measure_zeroed(model, tokens(4, 32, seed=2))
    assert zeroed["entries_zeroed"] == pytest.approx(0.5, abs=0.05)


def test_calls_beyond_max_tokens_run_masked_dense(cpp, monkeypatch):
    """The documented fallback: a call of more tokens than method.max_tokens (prefill, a large batch) never
    reaches the kernel, and computes what the kernel would."""
    model = sparse_model("llama", "teal", max_tokens=2)
    reached = []
    original = kernel.threshold_linear
    monkeypatch.setattr(kernel, "threshold_linear", lambda *args: reached.append(args[0].shape[0]) or original(*args))
    wide = decode_logits(model, batch=3)
    assert reached == []
    narrow = decode_logits(model, batch=2)
    assert reached and set(reached) == {2}
    with kernel.use_backend("dense"):
        torch.testing.assert_close(wide, decode_logits(model, batch=3))
        torch.testing.assert_close(narrow, decode_logits(model, batch=2), rtol=1e-4, atol=1e-5)


def test_float64_decode_runs_masked_dense(cpp, monkeypatch):
    """A dtype the kernel does not serve takes the documented dense path instead of failing in the kernel."""
    model = sparse_model("llama", "teal", dtype=torch.float64)
    monkeypatch.setattr(kernel, "threshold_linear", lambda *args: pytest.fail("the kernel ran on float64"))
    assert decode_logits(model, batch=1).dtype == torch.float64


def test_without_a_compiler_decode_runs_masked_dense(monkeypatch):
    monkeypatch.setattr(kernel.shutil, "which", lambda name: None)
    monkeypatch.setitem(kernel._state, "loaded", None)
    monkeypatch.setitem(kernel._state, "forced", None)
    assert kernel.backend() == "dense"
    with pytest.raises(RuntimeError, match="cannot be built"):
        with kernel.use_backend("cpp"):
            pass
    model = sparse_model("llama", "cats")
    assert torch.isfinite(decode_logits(model, batch=1)).all()


def test_calls_that_train_or_run_through_an_adapter_never_reach_the_kernel(cpp, monkeypatch):
    """Recovery trains the wrapped weights (or LoRA adapters on them) with the thresholds in the forward: a
    one-token call then takes the masked dense path, whose weight gradient is zero exactly in the columns of the
    entries cut, and an adapted projection is never served by the kernel, which reads the plain weight alone."""
    from prune.masks.masked_lora import add_lora

    model = sparse_model("llama", "teal")
    layer = thresholded(model)["model.layers.0.mlp.down_proj"]
    x = torch.randn(1, layer.base.in_features, generator=torch.Generator().manual_seed(4))
    kept = x.abs()[0] > layer.mask.cut
    assert 0 < int(kept.sum()) < kept.numel()
    original = kernel.threshold_linear
    monkeypatch.setattr(kernel, "threshold_linear", lambda *args: pytest.fail("the kernel served a training call"))
    layer.base.weight.requires_grad_(True)
    layer(x).square().sum().backward()
    grad = layer.base.weight.grad
    assert not grad[:, ~kept].any() and grad[:, kept].abs().sum(0).all()
    layer.base.weight.requires_grad_(False)
    add_lora(model, ["model.layers.0.mlp.down_proj.base"], {}, rank=2, alpha=4.0)
    with torch.no_grad():
        layer(x)

    monkeypatch.setattr(kernel, "threshold_linear", original)
    other = thresholded(model)["model.layers.1.mlp.down_proj"]
    with torch.no_grad():
        first = other(x)
        other.base.weight.data = other.base.weight.data * 2  # new data, version counter unmoved (peft's merge)
        torch.testing.assert_close(other(x), 2 * first)


def test_a_cats_decode_call_reads_the_current_gate_up_and_down(cpp):
    """The kernel's copies of an FFN's weights (W_gate^T, W_down^T) are remade when any of the three changes in
    place (recovery's updates, a merge): the decode call then equals the masked dense computation with the new
    weights."""
    model = sparse_model("llama", "cats")
    layer = thresholded(model)["model.layers.0.mlp"]
    x = torch.randn(1, layer.base.gate_proj.in_features, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        layer(x)  # the operands made
        for name, scale in (("gate_proj", 1.5), ("up_proj", -2.0), ("down_proj", 0.5)):
            getattr(layer.base, name).weight.mul_(scale)
            sparse = layer(x)
            with kernel.use_backend("dense"):
                dense = layer(x)
            torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize(("family", "mode"), CASES)
def test_saved_thresholds_rebuild_the_same_sparse_decode(cpp, family, mode, tmp_path):
    model = sparse_model(family, mode)
    config = method_config("activation", mode=mode, sparsity=0.5)
    expected = decode_logits(model, batch=1)
    ACTIVATION.save(model, tmp_path, config, {"model": family})
    fresh = make_tiny_llama() if family == "llama" else make_tiny_gpt2()
    restored = ACTIVATION.load(fresh, tmp_path, config)
    assert torch.equal(decode_logits(restored, batch=1), expected)
    assert (tmp_path / "thresholds.safetensors").is_file() and (tmp_path / "thresholds.json").is_file()


def test_the_public_api_saves_and_loads_thresholds_with_their_config(tmp_path):
    import prune

    model = make_tiny_llama()
    config = prune.method_config("activation", mode="cats", sparsity=0.5, score="weighted")
    assert prune.attach(model, config, calibration=tokens(4, 32, seed=1)) is None
    prune.save_masks(model, tmp_path)
    restored = prune.load_masks(make_tiny_llama(), tmp_path)  # the config read from thresholds.json
    with torch.no_grad():
        assert torch.equal(restored(tokens(2, 16, seed=2)).logits, model(tokens(2, 16, seed=2)).logits)
    with pytest.raises(UserInputError, match="plain checkpoint"):
        prune.export(restored)


def test_thresholds_that_do_not_fit_are_refused(tmp_path):
    model = sparse_model("llama", "teal")
    config = method_config("activation", mode="teal", sparsity=0.5)
    with pytest.raises(UserInputError, match="no thresholds.safetensors"):
        ACTIVATION.load(make_tiny_llama(), tmp_path, config)
    ACTIVATION.save(model, tmp_path, config, {"model": "tiny"})
    with pytest.raises(UserInputError, match="mode 'teal'"):
        ACTIVATION.load(make_tiny_llama(), tmp_path, method_config("activation", mode="cats", sparsity=0.5))
    with pytest.raises(UserInputError, match="do not fit"):
        ACTIVATION.load(make_tiny_gpt2(), tmp_path, config)
    (tmp_path / "thresholds.json").write_text("{not json")
    with pytest.raises(UserInputError, match="corrupt"):
        ACTIVATION.load(make_tiny_llama(), tmp_path, config)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"sparsity": 1.0}, "strictly between 0 and 1"),
        ({"sparsity": 1.5}, "strictly between 0 and 1"),
        ({"sparsity": "2:4"}, "not an N:M pattern"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"mode": "deja"}, "mode"),
        ({"mode": "cats", "allocation": "greedy"}, "use allocation uniform"),
    ],
)
def test_bad_settings_are_clear_errors(settings, words):
    with pytest.raises(UserInputError, match=words):
        method_config("activation", **settings)


def test_cats_refuses_a_model_without_a_gated_ffn():
    with pytest.raises(UserInputError, match="gated FFN.*GPT2LMHeadModel has none.*mode: teal"):
        sparse_model("gpt2", "cats")


def test_targets_outside_the_decoder_blocks_are_refused():
    with pytest.raises(UserInputError, match="lm_head lie outside them"):
        sparse_model("llama", "teal", targets=["lm_head"])


def test_attach_without_calibration_is_refused():
    with pytest.raises(UserInputError, match="calibrat"):
        ACTIVATION.attach(make_tiny_llama(), method_config("activation"), None)


# --------------------------------------------------------------------------------------------------- report


def test_report_has_zeroed_shares_flops_and_side_by_side_speed():
    model = sparse_model("llama", "teal", sparsity=0.4)
    samples = tokens(4, 32, seed=2)
    heldout = HeldOut(samples, "windows", "tokens", 32, flops=lambda m: count_flops(m, 32).dense)
    entries = report_activation(model, method_config("activation", sparsity=0.4), heldout, {"flops": {}, "latency": {}})
    assert entries["sparsity"]["target"] == "teal 0.4"
    assert 0.3 < entries["sparsity"]["achieved"] < 0.5
    assert set(entries["activation"]["layers"]) == set(thresholded(model))
    assert 0 < entries["flops"]["pruned"] < entries["flops"]["dense"] == count_flops(make_tiny_llama(), 32).dense
    speed = entries["speed"]
    assert speed["kernel"] in ("cpp", "dense")
    for label in ("dense", "sparse"):
        assert speed[label]["decode_tokens_per_s"] > 0 and speed[label]["prefill_tokens_per_s"] > 0
    assert speed["decode_speedup"] == pytest.approx(
        speed["sparse"]["decode_tokens_per_s"] / speed["dense"]["decode_tokens_per_s"]
    )


def test_a_run_reports_speed_side_by_side_and_prune_eval_loads_the_sparse_model(tmp_path, capsys):
    """`prune run` writes the thresholds (no model/) and a report with per-layer zeroed shares and dense vs sparse
    speed; `prune eval RUN_DIR` rebuilds the sparse model from the base model and the thresholds."""
    corpus = tmp_path / "docs.txt"
    corpus.write_text(docs_text(20_000))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {save_tiny_model(tmp_path / 'tiny')}\n"
        f"data: {{source: {corpus}, calibration_samples: 4, seq_len: 32}}\n"
        "method: {name: activation, mode: cats, sparsity: 0.5}\n"
        "eval: {tasks: [], extra_texts: [], semi_structured_kernel: false}\n"
    )
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--output", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert not (run / "model").exists() and (run / "thresholds.safetensors").is_file()
    assert set(report["activation"]["layers"]) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert report["sparsity"]["target"] == "cats 0.5" and 0 < report["sparsity"]["achieved"] < 1
    assert report["speed"]["sparse"]["decode_tokens_per_s"] > 0 and report["speed"]["dense"]["decode_tokens_per_s"] > 0
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(corpus), "--seq-len", "32", "--tasks", "--no-latency"]) == 0
    assert "perplexity" in capsys.readouterr().out
    model, _ = load_model(str(run))
    assert all(isinstance(layer, ThresholdedFFN) for layer in thresholded(model).values())
    written = {entry.name for entry in run.iterdir()}
    assert written <= run_dir.RUN_FILES, f"files --overwrite would leave behind: {written - run_dir.RUN_FILES}"
