"""Recovery training after pruning (the recipe's `recover` section, prune.recover): the kept weights train with
the masks fixed, and the model that comes out keeps the pruned pattern exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, CLIPModel

import prune
from prune.masks.base import weight_masks, wrappers
from prune.masks.masked_lora import masked_delta
from prune.masks.storage import encode_nm, read_masks
from prune.masks.targets import select_targets
from prune.models.blocks import weight_matrix
from prune.recovery.config import RecoverConfig
from prune.recovery.stage import recover
from prune.runs.pipeline import run
from prune.runs.recipe import parse_recipe
from prune.tasks.causal_lm import CausalLM
from tests.conftest import make_tiny_gpt2, make_tiny_llama


def blocks(count: int = 16, seq: int = 32) -> torch.Tensor:
    """Token blocks with a learnable pattern (each block counts up from a seeded start), so training moves."""
    starts = torch.randint(0, 96, (count, 1), generator=torch.Generator().manual_seed(0))
    return (starts + torch.arange(seq)) % 128


def pruned_tiny(family: str, sparsity) -> torch.nn.Module:
    model = make_tiny_llama() if family == "llama" else make_tiny_gpt2()
    prune.attach(model, prune.method_config("magnitude", sparsity=sparsity))
    return model


def assert_pattern(model: torch.nn.Module, masks: dict[str, torch.Tensor], sparsity) -> None:
    """Every targeted weight is zero exactly where its mask removed it and nowhere else; 2:4 stays exactly 2:4."""
    for name, keep in masks.items():
        weight = weight_matrix(model.get_submodule(name)).detach()
        assert torch.equal(weight != 0, keep), name
        if sparsity == "2:4":
            assert encode_nm(weight != 0, 2, 4) is not None, name


def pattern_held_while_training(masks: dict[str, torch.Tensor], checks: list[int]):
    """An `evaluate` callback that, at every periodic evaluation, checks what the model trains with: the raw weights
    of a full fine-tune (zero where pruned, AdamW's decay and moments notwithstanding) or a LoRA update (zero
    where pruned)."""

    def evaluate(model) -> float:
        for name, wrapper in wrappers(model).items():
            assert torch.equal(weight_matrix(wrapper.base) != 0, masks[name]), name
        for name, keep in masks.items():
            layer = model.get_submodule(name)
            if hasattr(layer, "lora_A"):
                delta = masked_delta(layer, "default").detach()
                assert not delta[~keep].any() and torch.equal(layer.keep, keep), name
        checks.append(len(checks))
        return 1.0 / (1 + len(checks))  # each evaluation "better": the last one is kept

    return evaluate


@pytest.mark.parametrize("sparsity", ["2:4", 0.5])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_recovery_keeps_the_exact_pattern_through_training_merge_save_and_reload(
    mode, family, sparsity, tmp_path, one_thread
):
    model = pruned_tiny(family, sparsity)
    masks = {name: keep.clone() for name, keep in weight_masks(model).items()}
    before = {name: weight_matrix(wrapper.merged()).detach().clone() for name, wrapper in wrappers(model).items()}
    checks: list[int] = []
    config = RecoverConfig(steps=4, lr=1e-2, weight_decay=0.1, mode=mode, eval_every=2, rank=4)
    result = recover(model, config, blocks(), tmp_path, evaluate=pattern_held_while_training(masks, checks))

    assert result.steps == 4 and len(checks) == 3  # steps 0, 2 and 4 were checked
    assert not wrappers(model) and not any("lora_" in name for name, _ in model.named_parameters())  # plain again
    assert_pattern(model, masks, sparsity)
    moved = [name for name in masks if not torch.equal(weight_matrix(model.get_submodule(name)), before[name])]
    assert moved == list(masks)  # every targeted layer trained

    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    assert_pattern(reloaded, masks, sparsity)
    tokens = blocks(2)
    assert torch.equal(reloaded(tokens).logits, model(tokens).logits)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_recovery_trains_only_the_targets_and_never_a_pruned_away_structure(mode, tmp_path, one_thread):
    """A structurally shrunk model: recovery trains the smaller layers as they are (no unit comes back, every shape
    and size stays) and leaves every other parameter (embeddings, norms, head) bit for bit."""
    model = make_tiny_llama()
    config = prune.method_config("structured", target={"params": 0.3})
    prune.attach(model, config, calibration=blocks(4))
    smaller = prune.export(model, config)
    shapes = {name: param.shape for name, param in smaller.named_parameters()}
    sizes = (smaller.config.intermediate_size, smaller.config.num_key_value_heads, smaller.config.hidden_size)
    untouched = {name: param.detach().clone() for name, param in smaller.named_parameters() if "layers." not in name}
    untouched.update(
        {n: p.detach().clone() for n, p in smaller.named_parameters() if "norm" in n}  # norms inside the blocks
    )
    targets = select_targets(smaller, None)
    linear_before = {name: weight_matrix(smaller.get_submodule(name)).detach().clone() for name in targets}

    recover(smaller, RecoverConfig(steps=3, lr=1e-2, mode=mode, rank=4), blocks(), tmp_path)

    assert {name: param.shape for name, param in smaller.named_parameters()} == shapes
    assert (smaller.config.intermediate_size, smaller.config.num_key_value_heads, smaller.config.hidden_size) == sizes
    assert all(torch.equal(smaller.get_parameter(name), value) for name, value in untouched.items())
    changed = [
        name for name in targets if not torch.equal(weight_matrix(smaller.get_submodule(name)), linear_before[name])
    ]
    assert changed == targets


def test_recovery_leaves_layers_it_does_not_target_as_they_were(tmp_path, one_thread):
    model = pruned_tiny("llama", "2:4")
    masks = {name: keep.clone() for name, keep in weight_masks(model).items()}
    mlp = [name for name in masks if ".mlp." in name]
    others = {
        name: wrapper.merged().weight.detach().clone() for name, wrapper in wrappers(model).items() if name not in mlp
    }
    recover(model, RecoverConfig(steps=2, lr=1e-2, targets=["*.mlp.*"]), blocks(), tmp_path)
    assert all(torch.equal(model.get_submodule(name).weight, weight) for name, weight in others.items())
    assert_pattern(model, masks, "2:4")


def test_recovery_refuses_a_model_whose_masks_act_on_outputs(tmp_path):
    model = make_tiny_llama()
    prune.attach(model, prune.method_config("structured", target={"params": 0.3}), calibration=blocks(4))
    with pytest.raises(prune.UserInputError, match="Export a structural method's model first"):
        recover(model, RecoverConfig(steps=1), blocks(), tmp_path)


def recipe(model_dir, corpus, output, method=None, **recover_settings):
    return parse_recipe(
        {
            "model": str(model_dir),
            "data": {"source": str(corpus), "calibration_samples": 4, "seq_len": 32},
            "method": method or {"name": "sparsegpt", "sparsity": "2:4"},
            "recover": {"steps": 6, "batch_size": 2, "lr": 1e-2, "log_every": 2, **recover_settings},
            "eval": {"tasks": [], "latency": False, "flops": False},
            "output": str(output),
        }
    )


def test_the_report_shows_every_figure_before_and_after_recovery_and_masks_describe_the_saved_model(
    tmp_path, llama_dir, corpus, one_thread
):
    report = run(recipe(llama_dir, corpus, tmp_path / "run", distill=0.5))
    section = report["recover"]
    assert section["mode"] == "lora" and section["steps"] == 6 and section["best_step"] is None  # the last kept
    before = section["before"]
    assert before["perplexity"]["value"] != report["perplexity"]["value"]
    assert before["perplexity"]["window_nll"] != report["perplexity"]["window_nll"]
    assert set(section["paired"]) == {"perplexity", "moby-dick", "sotu"}
    for text, entry in section["paired"].items():
        now = report["perplexity"] if text == "perplexity" else report["extra_texts"][text]["perplexity"]
        was = before["perplexity"] if text == "perplexity" else before["extra_texts"][text]["perplexity"]
        assert entry["ratio"] == pytest.approx(now["value"] / was["value"], rel=1e-6)
        assert entry["ci95"][0] <= entry["ratio"] <= entry["ci95"][1]
        assert entry["verdict"] in {"better", "worse", "not distinguishable"}
    assert report["data"]["used"]["recovery"]["part"] == "train"
    assert before["params"]["nonzero"] == report["params"]["nonzero"]  # no pruned weight came back
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "| sparsegpt 2:4 |" in markdown and "| sparsegpt 2:4 + recovery (lora) |" in markdown
    assert "Perplexity after / before recovery, paired over the same windows: test part" in markdown
    assert section["tokens_seen"] == 6 * 2 * 32  # steps x batch_size x seq_len
    assert section["processes"] == 1 and section["seconds"] > 0  # a training stage's figures, as `train` has them
    record = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["pruning"]
    assert (record["method"], record["recovered"]) == ("sparsegpt", "lora")

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", dtype=torch.float32)
    masks, meta = read_masks(tmp_path / "run")
    assert meta["weights_changed"] is True and len(masks) == 14
    assert_pattern(saved, masks, "2:4")
    log = [json.loads(line) for line in (tmp_path / "run" / "recover" / "train_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [2, 4, 6]
    assert all(record["changed"] in (None, 0.0) for record in log)  # the masks never moved


@pytest.mark.parametrize("method", [None, {"name": "activation", "mode": "cats", "sparsity": 0.5}])
def test_resume_of_an_interrupted_recovery_equals_an_uninterrupted_run(
    method, tmp_path, llama_dir, corpus, monkeypatch, one_thread
):
    settings = {"eval_every": 2, "eval_windows": 2, "checkpoint_every": 2, "distill": 0.5}
    run(recipe(llama_dir, corpus, tmp_path / "a", method, **settings))

    calls = {"n": 0}
    loss = CausalLM.loss

    def interrupting(self, model, batch, stage):
        calls["n"] += 1
        if calls["n"] == 4:  # in step 4: the checkpoint holds the 3 finished steps
            raise KeyboardInterrupt
        return loss(self, model, batch, stage)

    monkeypatch.setattr(CausalLM, "loss", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run(recipe(llama_dir, corpus, tmp_path / "b", method, **settings))
    assert (tmp_path / "b" / "recover" / "checkpoints" / "latest").read_text() == "step-3"
    monkeypatch.setattr(CausalLM, "loss", loss)
    resumed = run(recipe(llama_dir, corpus, tmp_path / "b", method, **settings), resume=True)

    uninterrupted = json.loads((tmp_path / "a" / "report.json").read_text())
    assert resumed["recover"]["best_step"] == uninterrupted["recover"]["best_step"]
    assert resumed["perplexity"]["window_nll"] == uninterrupted["perplexity"]["window_nll"]
    for name in ("model/model.safetensors", "recover/last.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), name


def test_vib_recovers_the_smaller_exported_model(tmp_path, llama_dir, corpus, one_thread):
    method = {"name": "vib", "target": {"params": 0.3}}
    settings = recipe(llama_dir, corpus, tmp_path / "run", method, mode="full", eval_every=3, eval_windows=2)
    settings.train.steps, settings.train.batch_size, settings.train.lr = 12, 2, 0.3
    report = run(settings)
    assert report["params"]["total"] < report["dense"]["params"]["total"] and report["recover"]["steps"] == 6
    assert report["params"]["total"] == report["recover"]["before"]["params"]["total"]  # the same smaller model
    assert report["recover"]["before"]["perplexity"]["value"] != report["perplexity"]["value"]
    assert (tmp_path / "run" / "recover_curve.png").is_file()


def test_clip_recovers_on_its_classification_loss(tmp_path, clip_dir, one_thread):
    settings = parse_recipe(
        {
            "model": str(clip_dir),
            "task": "zero-shot-classification",
            "data": {"source": "digits", "shots": 4},
            "method": {"name": "binary", "targets": ["*vision_model.encoder.layers.*.self_attn.*_proj"]},
            "train": {"steps": 2, "batch_size": 8, "lr": 0.05},
            "recover": {"steps": 3, "batch_size": 8, "lr": 1e-2, "rank": 4},
            "eval": {"limit": 64},
            "output": str(tmp_path / "run"),
        }
    )
    report = run(settings)
    assert report["recover"]["steps"] == 3 and "accuracy" in report["recover"]["before"]
    masks, _ = read_masks(tmp_path / "run")
    saved = CLIPModel.from_pretrained(tmp_path / "run" / "model")
    for name, keep in masks.items():
        assert torch.equal(saved.get_submodule(name).weight != 0, keep), name


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"method": {"name": "gating"}}, "leaves no plain model to recover"),
        (
            {"method": {"name": "activation", "sparsity": 0.4}, "export": {"save_model": False}},
            "model/ is where activation's trained weights are kept",
        ),
        ({"runtime": {"offload": "cpu"}}, "trains the whole pruned model on the device"),
        ({"recover": {"steps": 2, "mode": "half"}}, "recover.mode"),
        ({"recover": {"steps": 2, "rank": 0}}, "recover.rank"),
        ({"recover": {"steps": 2, "bogus": 1}}, "unknown key 'recover.bogus'; allowed keys in recover: steps"),
    ],
)
def test_bad_recover_settings_are_refused_when_the_recipe_is_read(settings, message):
    raw = {"method": {"name": "wanda", "sparsity": "2:4"}, "recover": {"steps": 2}, **settings}
    with pytest.raises(prune.UserInputError, match=message):
        parse_recipe(raw)


def test_distillation_in_recovery_needs_a_language_model():
    raw = {
        "task": "zero-shot-classification",
        "model": "clip-tiny-random",
        "method": {"name": "binary"},
        "recover": {"steps": 2, "distill": 0.5},
    }
    with pytest.raises(prune.UserInputError, match="recover.distill applies to task causal-lm"):
        parse_recipe(raw)


def test_a_recipe_without_recovery_keeps_its_fingerprint():
    plain = parse_recipe({"method": {"name": "wanda"}})
    assert plain.fingerprint() == parse_recipe({"method": {"name": "wanda"}, "recover": {"lr": 0.5}}).fingerprint()
    assert plain.fingerprint() != parse_recipe({"method": {"name": "wanda"}, "recover": {"steps": 1}}).fingerprint()


def test_the_python_api_recovers_a_pruned_model_in_one_call(tmp_path, one_thread):
    model = make_tiny_llama()
    config = prune.method_config("wanda", sparsity="2:4")
    prune.attach(model, config, calibration=blocks(4))
    masks = {name: keep.clone() for name, keep in weight_masks(model).items()}
    result = prune.recover(model, {"steps": 2, "lr": 1e-2}, blocks(), tmp_path)
    assert result.steps == 2 and (tmp_path / "recover" / "last.safetensors").is_file()
    assert_pattern(model, masks, "2:4")
    model.save_pretrained(tmp_path / "saved")  # plain now: the guard against saving attached masks is gone
    record = json.loads((tmp_path / "saved" / "config.json").read_text())["pruning"]
    assert (record["method"], record["sparsity"], record["recovered"]) == ("wanda", "2:4", "lora")


def test_the_python_api_recovers_an_exported_model_keeping_its_zeros(tmp_path, one_thread):
    """prune.oneshot's model is merged, with no masks left: its config.pruning says it was pruned, and the zeros of
    the targets it names are what recovery keeps."""
    model = prune.oneshot(make_tiny_llama(), prune.method_config("magnitude", sparsity="2:4"))
    masks = {name: model.get_submodule(name).weight != 0 for name in select_targets(model, None)}
    before = {name: model.get_submodule(name).weight.detach().clone() for name in masks}
    prune.recover(model, {"steps": 2, "lr": 1e-2, "mode": "full"}, blocks(), tmp_path)
    assert_pattern(model, masks, "2:4")
    assert all(not torch.equal(model.get_submodule(name).weight, weight) for name, weight in before.items())
    assert model.config.pruning["recovered"] == "full" and model.config.pruning["method"] == "magnitude"


def test_the_python_api_names_a_bad_recover_key():
    with pytest.raises(prune.UserInputError, match="unknown key 'rnak'; allowed keys: steps"):
        prune.recover(make_tiny_llama(), {"steps": 1, "rnak": 4}, blocks(), "unused")


def test_two_processes_recover_like_one_with_the_same_global_batch(tmp_path, llama_dir, corpus):
    """`accelerate launch` with 2 CPU processes (gloo) runs the whole pipeline: both prune and recover, the main
    process measures and writes; the saved model equals a one-process run's with the same global batch."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    def recipe_file(name: str, batch: int) -> Path:
        raw = recipe(llama_dir, corpus, tmp_path / name, mode="full", steps=3, batch_size=batch).to_dict()
        raw["eval"]["extra_texts"] = []
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    root = Path(__file__).parent.parent
    result = subprocess.run(
        [*launch, "-m", "prune.cli", "run", str(recipe_file("two", 2))],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run(
        [sys.executable, "-m", "prune.cli", "run", str(recipe_file("one", 4))], capture_output=True, text=True, cwd=root
    )
    assert result.returncode == 0, result.stderr[-3000:]
    two, one = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("two", "one"))
    assert two.keys() == one.keys()
    for name in two:  # summed in another order, a gradient differs in its last bits, and where it is ~0 Adam's
        # update (~lr times its sign) can flip for an element or two; processes that did not average would differ
        # by ~lr (1e-2) everywhere, half the weights' norm
        assert (two[name] - one[name]).norm() <= 1e-3 * one[name].norm(), name
    masks, _ = read_masks(tmp_path / "two")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model", dtype=torch.float32)
    assert_pattern(saved, masks, "2:4")


@pytest.mark.parametrize("mode, copies", [("full", 3), ("lora", 2)])
def test_the_memory_preflight_counts_recovery(mode, copies):
    """Recovery is a stage of the memory estimate: its micro-batch, what it trains (full: a gradient and two AdamW
    moments per targeted weight; lora: each masked layer's update and its gradient) and the teacher."""
    from prune.methods.registry import get_method
    from prune.models.runtime import Runtime
    from prune.runs import preflight

    model = make_tiny_llama()
    settings = parse_recipe(
        {"method": {"name": "wanda"}, "data": {"seq_len": 64}, "recover": {"steps": 2, "mode": mode, "distill": 1}}
    )
    runtime = Runtime(torch.device("cpu"), torch.float32, "none")
    stages = {
        stage.name.split(" ")[0]: stage
        for stage in preflight.memory_stages(settings, get_method("wanda"), runtime, model)
    }
    parts = stages["recovery"].parts
    targeted = sum(weight_matrix(model.get_submodule(name)).numel() for name in select_targets(model, None))
    assert parts[f"recovery state ({mode})"][0] == targeted * copies * 4
    assert parts["distillation teacher"][0] == sum(param.numel() for param in model.parameters()) * 4
    assert "training" not in stages  # wanda trains no masks


# ------------------------------------------------------------------------- recovery under activation sparsity


def sparse_tiny(mode: str) -> torch.nn.Module:
    """A tiny Llama with activation sparsity attached (teal: every projection's input; cats: the FFN gates)."""
    model = make_tiny_llama()
    prune.attach(model, prune.method_config("activation", mode=mode, sparsity=0.5), calibration=blocks(4))
    return model


def lm_loss_on(model: torch.nn.Module, batch: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=batch, labels=batch).loss)


@pytest.mark.parametrize("mode, activation", [("lora", "cats"), ("full", "teal"), ("full", "cats")])
def test_recovery_trains_the_weights_under_fixed_activation_thresholds(mode, activation, tmp_path, one_thread):
    """The linears the thresholds wrap train with the thresholds in the forward: their weights move, the loss of
    the sparse model falls, nothing else moves, and the wrappers and their cuts come out as they went in."""
    from prune.methods.activation.layers import thresholded

    model = sparse_tiny(activation)
    cuts = {name: layer.mask.cut.clone() for name, layer in thresholded(model).items()}
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    data = blocks()
    loss_before = lm_loss_on(model, data)
    prune.recover(model, {"steps": 6, "batch_size": 4, "lr": 1e-2, "mode": mode}, data, tmp_path)
    layers = thresholded(model)
    assert layers.keys() == cuts.keys() and all(torch.equal(layers[name].mask.cut, cut) for name, cut in cuts.items())
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()  # adapters merged, no new parameter left
    inside = {name for name in before if any(name.startswith(f"{wrapper}.base.") for wrapper in cuts)}
    linear_weights = {name for name in inside if name.endswith(".weight")}
    assert linear_weights and all(not torch.equal(after[name], before[name]) for name in linear_weights)
    assert all(torch.equal(after[name], before[name]) for name in before.keys() - inside)  # embeddings, norms, ...
    assert lm_loss_on(model, data) < loss_before


def test_save_masks_after_recovery_under_activation_keeps_the_weights_and_load_masks_puts_both_back(
    tmp_path, one_thread
):
    """The thresholds alone would rebuild the model before recovery: save_masks also writes the recovered weights
    (model/, a plain checkpoint recording the recovery), and load_masks on a fresh base model gives the recovered
    sparse model's logits; masks of an unrecovered model are written alone, as before."""
    torch.manual_seed(0)
    model = sparse_tiny("cats")
    unrecovered = prune.save_masks(model, tmp_path / "before")
    assert not (unrecovered / "model").exists()
    prune.recover(model, {"steps": 4, "batch_size": 4, "lr": 1e-2, "mode": "full"}, blocks(), tmp_path / "run")
    saved = prune.save_masks(model, tmp_path / "after")
    assert json.loads((saved / "thresholds.json").read_text())["weights_changed"] is True
    plain = AutoModelForCausalLM.from_pretrained(saved / "model")
    assert plain.config.pruning["recovered"] == "full" and not list(wrappers(plain))
    torch.manual_seed(0)
    fresh = make_tiny_llama()
    assert not torch.equal(fresh.model.layers[0].mlp.up_proj.weight, plain.model.layers[0].mlp.up_proj.weight)
    prune.load_masks(fresh, saved)
    batch = blocks(2)
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=batch).logits, model(input_ids=batch).logits, atol=1e-6)
    assert fresh.config.pruning["recovered"] == "full"


def test_load_masks_refuses_recovered_weights_of_another_architecture(tmp_path, one_thread):
    model = sparse_tiny("cats")
    prune.recover(model, {"steps": 2, "lr": 1e-2, "mode": "full"}, blocks(), tmp_path / "run")
    saved = prune.save_masks(model, tmp_path / "masks")
    with pytest.raises(prune.UserInputError, match="another architecture; pass the base model"):
        prune.load_masks(make_tiny_gpt2(), saved)


def test_recovery_targets_under_activation_are_named_as_in_the_unwrapped_model(tmp_path, one_thread):
    """recover.targets globs match the plain model's names (`mlp.up_proj`), not the wrapper's `mlp.base.up_proj`."""
    model = sparse_tiny("cats")
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    prune.recover(model, {"steps": 2, "lr": 1e-2, "mode": "full", "targets": ["*.mlp.up_proj"]}, blocks(), tmp_path)
    moved = {name for name, param in model.named_parameters() if not torch.equal(param, before[name])}
    assert moved == {"model.layers.0.mlp.base.up_proj.weight", "model.layers.1.mlp.base.up_proj.weight"}


def test_recovery_under_activation_refuses_a_tied_lm_head_named_in_its_targets(tmp_path, one_thread):
    """Training a tied lm_head would train the input embeddings with it; named in recover.targets, it is refused."""
    model = make_tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight
    prune.attach(model, prune.method_config("activation", mode="cats", sparsity=0.5), calibration=blocks(4))
    with pytest.raises(prune.UserInputError, match="lm_head share their weight.*leave them out of `recover.targets`"):
        prune.recover(model, {"steps": 2, "mode": "full", "targets": ["lm_head", "*.mlp.up_proj"]}, blocks(), tmp_path)


def test_an_activation_run_recovers_saves_its_weights_and_reloads_the_same_sparse_model(
    tmp_path, llama_dir, corpus, monkeypatch, one_thread
):
    """A `prune run` with method activation and recover: the report compares before and after recovery and measures
    the activation section on the recovered model; model/ holds the recovered weights as a plain checkpoint whose
    config records the recovery, the thresholds (as calibrated) lie beside it, and prune.load_model(run_dir) puts
    them back on those weights: the logits of the in-process recovered model, prefill and decode."""
    from prune.methods.activation import method as activation
    from prune.methods.activation.layers import thresholded
    from prune.runs.loading import load_model

    measured = {}
    measure_zeroed = activation.measure_zeroed

    def spy(model, samples):
        measured["model"] = model
        measured["weights"] = {name: param.detach().clone() for name, param in model.named_parameters()}
        return measure_zeroed(model, samples)

    monkeypatch.setattr(activation, "measure_zeroed", spy)
    method = {"name": "activation", "mode": "cats", "sparsity": 0.5}
    report = run(recipe(llama_dir, corpus, tmp_path / "run", method, distill=0.5))
    section = report["recover"]
    assert section["before"]["perplexity"]["value"] != report["perplexity"]["value"]
    assert set(section["paired"]) == {"perplexity", "moby-dick", "sotu"}
    assert all(entry["verdict"] in {"better", "worse", "not distinguishable"} for entry in section["paired"].values())
    assert set(report["activation"]["layers"]) == {"model.layers.0.mlp", "model.layers.1.mlp"}

    directory = tmp_path / "run"
    saved = AutoModelForCausalLM.from_pretrained(directory / "model", dtype=torch.float32)
    assert not any(".base." in name for name in saved.state_dict())
    recovered = {name.replace(".base.", "."): weight for name, weight in measured["weights"].items()}
    assert all(torch.equal(weight, recovered[name]) for name, weight in saved.state_dict().items())  # measured on
    base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    assert not torch.equal(saved.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    record = json.loads((directory / "model" / "config.json").read_text())["pruning"]
    assert (record["method"], record["sparsity"], record["recovered"]) == ("activation", "cats 0.5", "lora")
    info = json.loads((directory / "thresholds.json").read_text())
    assert info["weights_changed"] is True
    cuts = load_file(directory / "thresholds.safetensors")
    in_process = measured["model"]
    assert all(torch.equal(layer.mask.cut, cuts[name]) for name, layer in thresholded(in_process).items())

    loaded, _ = load_model(str(directory))
    assert set(thresholded(loaded)) == set(cuts)
    assert all(torch.equal(param, recovered[name.replace(".base.", ".")]) for name, param in loaded.named_parameters())
    prompt = blocks(2, 16)
    with torch.no_grad():  # the same weights and cuts; a matmul's last bit may follow its operands' alignment
        for tokens in (prompt, prompt[:1, :1]):  # prefill (masked dense) and one decode token (the kernel)
            torch.testing.assert_close(
                loaded(input_ids=tokens).logits, in_process(input_ids=tokens).logits, rtol=0, atol=1e-6
            )

    import shutil

    shutil.rmtree(directory / "model")
    with pytest.raises(prune.UserInputError, match="trains its weights in recovery"):
        load_model(str(directory))


def test_gating_is_still_refused_recovery_and_activation_is_accepted():
    accepted = parse_recipe({"method": {"name": "activation", "mode": "cats"}, "recover": {"steps": 2}})
    assert accepted.recover.steps == 2
    with pytest.raises(prune.UserInputError, match="gating chooses what to compute per input.*predictors were fitted"):
        parse_recipe({"method": {"name": "gating"}, "recover": {"steps": 2}})


def test_the_memory_preflight_counts_the_ffn_linears_cats_recovers():
    """cats wraps whole FFNs: recovery trains (and the estimate counts) their three linears, nothing else."""
    from prune.methods.registry import get_method
    from prune.models.runtime import Runtime
    from prune.runs import preflight

    model = make_tiny_llama()
    settings = parse_recipe(
        {"method": {"name": "activation", "mode": "cats"}, "data": {"seq_len": 64}, "recover": {"steps": 2}}
    )
    runtime = Runtime(torch.device("cpu"), torch.float32, "none")
    stages = {
        s.name.split(" ")[0]: s for s in preflight.memory_stages(settings, get_method("activation"), runtime, model)
    }
    targeted = sum(weight_matrix(model.get_submodule(name)).numel() for name in select_targets(model, ["*.mlp.*"]))
    assert stages["recovery"].parts["recovery state (lora)"][0] == targeted * 2 * 4
