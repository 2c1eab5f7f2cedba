"""Dynamic channel gating (FTWT): targets, decoupled gradients, FLOPs accounting, the sparse FFN path, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, ResNetConfig, ResNetForImageClassification

from prune.core.errors import UserInputError
from prune.masks.base import unwrap
from prune.methods.gating.layers import GatedConv, GatedFFN, accounting, gated_layers, oracle, summarize
from prune.methods.gating.method import GatingConfig, attach_gating, measure_gating, restore_gating, save_gating
from prune.methods.gating.predictor import mass_labels, uniform_labels
from prune.methods.gating.sparse_ffn import masked_dense, sparse_ffn
from prune.runs.recipe import parse_recipe
from prune.tasks.classification import classification_loss, conv_flops
from prune.training.config import TrainConfig
from prune.training.trainer import lm_loss, set_mask_training, train
from tests.conftest import docs_text, make_tiny_gpt2, make_tiny_llama, make_tiny_resnet, save_tiny_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: a second thread only adds synchronization, which stalls on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(**overrides) -> GatingConfig:
    return GatingConfig(name="gating", **overrides)


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def set_predictor(layer, bias: list[float] | torch.Tensor) -> None:
    """Make a gate choose a fixed set of channels for every input: zero weights, +-5 biases."""
    with torch.no_grad():
        for param in layer.mask.predictor.parameters():
            param.zero_()
        layer.mask.predictor.proj.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))


# ------------------------------------------------------------------------------------------------ targets


def test_mass_labels_keep_the_largest_k_whose_mass_stays_within_r():
    scores = torch.tensor([[1.0, 4.0, 2.0, 3.0]])  # shares .1 .4 .2 .3; sorted cumulative .4 .7 .9 1.0
    expected = {
        1.0: [True, True, True, True],
        0.9: [False, True, True, True],
        0.8: [False, True, False, True],
        0.7: [False, True, False, True],
        0.5: [False, True, False, False],
        0.3: [False, False, False, False],
    }
    for r, keep in expected.items():
        assert mass_labels(scores, r).tolist() == [keep], r
    # per input: a peaked row keeps fewer channels than a flat one; channels scoring zero are never targets
    rows = torch.tensor([[10.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert mass_labels(rows, 0.9).sum(dim=1).tolist() == [1, 3]
    assert mass_labels(rows, 1.0).tolist()[0] == [True, True, True, False]


def test_uniform_labels_keep_a_fixed_fraction():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9], [4.0, 3.0, 2.0, 1.0]])
    assert uniform_labels(scores, 0.5).tolist() == [[False, True, False, True], [True, True, False, False]]


def test_conv_labels_come_from_max_abs_activation_over_positions():
    unit = nn.Sequential(nn.Conv2d(1, 3, 1, bias=False), nn.BatchNorm2d(3)).eval()
    with torch.no_grad():
        unit[0].weight.copy_(torch.tensor([1.0, -1.0, 0.25]).view(3, 1, 1, 1))
    model = nn.Sequential(unit)
    attach_gating(model, config(threshold=0.9))
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0], x[0, 0, 1, 1] = 4.0, -1.0
    set_mask_training(model, True)
    model(x)
    record = model[0].mask.take_record()
    # per channel max |BN(conv(x))| = (4, 4, 1) / sqrt(1 + eps): shares 4/9, 4/9, 1/9 -> r = .9 keeps two
    assert record.labels.tolist() == [[True, True, False]]
    assert record.logits.shape == (1, 3)


def test_ffn_labels_are_per_token_from_the_intermediate_activations():
    model = make_tiny_llama()
    attach_gating(model, config(threshold=0.5))
    set_mask_training(model, True)
    layer = gated_layers(model)["model.layers.0.mlp"]
    x = torch.randn(1, 3, 64)
    layer(x)
    mlp = layer.base
    h = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).reshape(3, -1).abs()
    assert torch.equal(layer.mask.take_record().labels, mass_labels(h, 0.5))


@pytest.mark.parametrize("bad", [0.0, -0.2, 1.5, float("nan")])
def test_threshold_outside_zero_one_is_refused(bad):
    with pytest.raises(UserInputError, match=r"outside \(0, 1\]"):
        mass_labels(torch.ones(1, 4), bad)
    with pytest.raises(UserInputError, match=r"outside \(0, 1\]|nan is not a finite number"):
        parse_recipe({"method": {"name": "gating", "threshold": bad}})


# ----------------------------------------------------------------------------------------- training signal


def _grads(model, objective, batch, with_task: bool) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if ".mask." in n}
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    set_mask_training(model, True)
    objective.begin_step(0, 10)
    task = lm_loss(model, batch)
    loss = objective.regularizer(model) + (task if with_task else 0.0)
    loss.backward()
    return {n: p.grad.clone() for n, p in params.items()}


def test_decoupled_predictors_get_gradient_from_the_bce_loss_only(token_batch):
    model = make_tiny_llama()
    model.requires_grad_(False)
    objective = attach_gating(model, config(init_bias=0.1, predictor_rank=8))
    with torch.no_grad():  # a mixed mask, so the task loss depends on what the gates chose
        for layer in gated_layers(model).values():
            layer.mask.predictor.proj.weight.normal_()
    both = _grads(model, objective, token_batch, with_task=True)
    bce_only = _grads(model, objective, token_batch, with_task=False)
    assert both.keys() == bce_only.keys() and len(both) == 6  # 2 layers x (reduce, proj.weight, proj.bias)
    for name in both:
        assert torch.equal(both[name], bce_only[name]), name
        assert both[name].abs().sum() > 0
    keep = gated_layers(model)["model.layers.0.mlp"].mask.hard()
    assert 0 < keep.float().mean() < 1


def test_joint_mode_sends_the_bce_gradient_into_the_backbone(token_batch):
    model = make_tiny_llama()
    objective = attach_gating(model, config(mode="joint"))
    assert objective.extra_parameters() and config(mode="joint").changes_weights
    _grads(model, objective, token_batch, with_task=False)
    assert model.model.embed_tokens.weight.grad is not None  # through the predictors' undetached inputs


def test_cooldown_drops_the_loss_weight_to_zero():
    objective = attach_gating(make_tiny_llama(), config(loss_weight=2.0, cooldown=0.5))
    assert [objective.begin_step(step, 10)["bce_weight"] for step in (0, 4, 5, 9)] == [2.0, 2.0, 0.0, 0.0]


def test_the_one_trainer_teaches_the_gates_their_labels(tmp_path):
    model = make_tiny_llama()
    objective = attach_gating(model, config(threshold=0.6, softmax=False, init_bias=0.5))
    data = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(0))
    before = measure_gating(model, data[:4])
    train(model, objective, data, TrainConfig(steps=40, batch_size=4, lr=0.05, log_every=10), tmp_path)
    after = measure_gating(model, data[:4])
    assert before["keep_fraction"] == 1.0 and after["keep_fraction"] < 0.9
    assert after["target_precision"] > before["target_precision"] + 0.1
    assert after["flops_per_input"]["reduction"] > before["flops_per_input"]["reduction"]
    log = [json.loads(line) for line in (tmp_path / "train" / "train_log.jsonl").read_text().splitlines()]
    assert "bce" in log[-1] and "bce_weight" in log[-1]


# -------------------------------------------------------------------------------------------------- FLOPs


def test_conv_flops_count_chosen_channels_zero_inputs_and_the_predictor():
    model = nn.Sequential(conv_bn(2, 4), conv_bn(4, 3)).eval()
    attach_gating(model)
    set_predictor(model[0], [5.0, -5.0, 5.0, -5.0])  # keeps 2 of 4 channels
    set_predictor(model[1], [5.0, 5.0, -5.0])  # keeps 2 of 3; its input has the 2 zeroed channels
    x = torch.randn(3, 2, 5, 5)
    summary = measure_gating(model, [x], forward=lambda m, batch: m(batch))
    per_pixel = 2 * 9 * 25  # 2 FLOPs per MAC, 3x3 kernel, 5x5 output
    dense = per_pixel * (4 * 2 + 3 * 4)
    gated = per_pixel * (2 * 2 + 2 * 2) + (2 * 2 * 4 + 2 * 25) + (2 * 4 * 3 + 4 * 25)  # + predictors (map + pool)
    assert summary["inputs"] == 3
    assert summary["flops_per_input"]["dense"] == dense == conv_flops(model, x).dense
    assert summary["flops_per_input"]["gated"] == gated
    assert summary["flops_per_input"]["reduction"] == pytest.approx(1 - gated / dense)
    assert summary["keep_fraction"] == pytest.approx(4 / 7)


def test_ffn_flops_count_gate_up_down_of_kept_neurons_plus_the_predictor(token_batch):
    model = make_tiny_llama()  # hidden 64, intermediate 128, 2 layers
    attach_gating(model, config(predictor_rank=4))
    for layer in gated_layers(model).values():
        set_predictor(layer, [5.0] * 32 + [-5.0] * 96)
    summary = measure_gating(model, token_batch)
    assert summary["inputs"] == token_batch.numel()
    assert summary["flops_per_input"]["dense"] == 2 * (2 * 3 * 64 * 128)
    assert summary["flops_per_input"]["gated"] == 2 * (2 * 3 * 64 * 32 + 2 * 4 * (64 + 128))
    assert summary["keep_fraction"] == 0.25


def test_the_oracle_keeps_each_tokens_largest_activations(token_batch):
    model = make_tiny_llama()
    attach_gating(model)
    with oracle(model, 0.25), accounting(model) as stats, torch.no_grad():
        model(input_ids=token_batch)
    summary = summarize(stats)
    assert summary["keep_fraction"] == 0.25 and summary["oracle_recall"] == 1.0
    assert gated_layers(model)["model.layers.0.mlp"].oracle_fraction is None  # restored on exit


# ------------------------------------------------------------------------------------------ sparse FFN path


@pytest.mark.parametrize("family", ["llama", "llama_bias", "gpt2"])
@pytest.mark.parametrize("tokens", [1, 7])
def test_sparse_ffn_path_equals_the_masked_dense_path(family, tokens):
    if family == "gpt2":
        model = make_tiny_gpt2()
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=128,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=1,
                num_attention_heads=4,
                mlp_bias=family == "llama_bias",
            )
        ).eval()
    attach_gating(model)
    layer = next(iter(gated_layers(model).values()))
    x = torch.randn(tokens, 64)
    keep = torch.rand(tokens, layer.mask.channels, generator=torch.Generator().manual_seed(tokens)) < 0.3
    packed = layer.packed()
    reference = masked_dense(x, keep, packed)
    mlp = layer.base  # the masked dense path itself agrees with the module's own math on an all-on mask
    torch.testing.assert_close(masked_dense(x, torch.ones_like(keep), packed), mlp(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_ffn(x, keep, packed, max_union=1.0), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_ffn(x, keep, packed, max_union=0.0), reference, rtol=1e-5, atol=1e-5)
    none = torch.zeros_like(keep)
    torch.testing.assert_close(sparse_ffn(x, none, packed), masked_dense(x, none, packed), rtol=0, atol=1e-6)


def test_gated_model_in_eval_mode_equals_its_accounting_path(tiny_model, token_batch):
    attach_gating(tiny_model, config(init_bias=0.0, softmax=False))
    with torch.no_grad():
        for layer in gated_layers(tiny_model).values():
            layer.mask.predictor.proj.weight.normal_(std=0.2)
        sparse = tiny_model(input_ids=token_batch[:, :1]).logits  # decode-sized: the gather path
        with accounting(tiny_model) as stats:
            dense = tiny_model(input_ids=token_batch[:, :1]).logits
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)
    assert 0.05 < summarize(stats)["keep_fraction"] < 0.95


# ------------------------------------------------------------------------------------------- save / restore


def test_restore_refuses_predictors_of_other_settings(tmp_path):
    model = make_tiny_llama()
    attach_gating(model, config(predictor_rank=4))
    save_gating(model, tmp_path, config(predictor_rank=4), {"model": "tiny"})
    with pytest.raises(UserInputError, match="do not fit"):
        restore_gating(make_tiny_llama(), tmp_path, config(predictor_rank=8))


def test_joint_mode_saves_the_trained_backbone_too(tmp_path):
    model = make_tiny_resnet()
    images, labels = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    rows = [{"pixel_values": image, "labels": label} for image, label in zip(images, labels)]
    cfg = config(mode="joint", backbone_lr_scale=1.0)
    objective = attach_gating(model, cfg)
    train(
        model,
        objective,
        rows,
        TrainConfig(steps=3, batch_size=8, lr=0.01),
        tmp_path / "run",
        task_loss=classification_loss,
    )
    save_gating(model, tmp_path, cfg, {})
    restored = restore_gating(make_tiny_resnet(seed=1), tmp_path, cfg)
    with torch.no_grad():
        torch.testing.assert_close(restored(images).logits, model.eval()(images).logits, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.txt"
    path.write_text(docs_text())
    return path


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pipeline_run_dir_restores_the_gated_model_and_export_refuses(tmp_path, corpus, family):
    """The pipeline end to end: the report's gated FLOPs, no model/, load_model(run_dir) reproduces the perplexity."""
    from eval.perplexity import perplexity
    from prune.data.text import prepare
    from prune.runs.export import export_run
    from prune.runs.loading import load_model
    from prune.runs.pipeline import run

    model_dir = save_tiny_model(tmp_path / "tiny", family)
    recipe = parse_recipe(
        {
            "model": str(model_dir),
            "data": {"source": str(corpus), "seq_len": 32},
            "method": {"name": "gating", "threshold": 0.8, "softmax": False, "init_bias": 0.5},
            "train": {"steps": 4, "batch_size": 2, "lr": 0.05},
            "eval": {"tasks": [], "latency": False},
            "output": str(tmp_path / "run"),
        }
    )
    report = run(recipe)
    run_dir = tmp_path / "run"
    assert (run_dir / "predictors.safetensors").is_file() and not (run_dir / "model").exists()
    per_token = report["gating"]["flops_per_input"]
    assert per_token["gated"] > per_token["predictors"] > 0 and per_token["dense"] > 0
    assert report["sparsity"]["achieved"] == pytest.approx(1 - report["gating"]["keep_fraction"])
    assert report["flops"]["dense"] == report["dense"]["flops"]["dense"]
    saved = 32 * (per_token["dense"] - per_token["gated"])  # per window of seq_len tokens
    assert report["flops"]["pruned"] == pytest.approx(report["flops"]["dense"] - saved, abs=1)
    model, tokenizer = load_model(str(run_dir))
    assert len(gated_layers(model)) == 2
    heldout = prepare(tokenizer, str(corpus)).test_blocks(32)
    assert perplexity(model, heldout).value == pytest.approx(report["perplexity"]["value"], rel=1e-5)
    with pytest.raises(UserInputError, match="no plain-checkpoint form"):
        export_run(run_dir)
    from prune.cli import main

    assert main(["eval", str(run_dir), "--data", str(corpus), "--seq-len", "32", "--tasks", "--no-latency"]) == 0


# ---------------------------------------------------------------------------------------------- bad input


def test_a_target_without_the_expected_structure_is_named():
    with pytest.raises(UserInputError, match=r"model.layers.0.self_attn.q_proj \(Linear"):
        attach_gating(make_tiny_llama(), config(targets=["*.q_proj"]))
    with pytest.raises(UserInputError, match=r"cannot gate FFN \(Linear"):
        GatedFFN(nn.Linear(4, 4), None)
    with pytest.raises(UserInputError, match="nothing gating can target"):
        attach_gating(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))


def test_a_gated_layer_refuses_to_merge_into_a_plain_model():
    model = make_tiny_llama()
    attach_gating(model)
    with pytest.raises(UserInputError, match=r"prune\.load_model"):
        gated_layers(model)["model.layers.0.mlp"].merged()


# ------------------------------------------------------------------------------------------------ CNNs


def test_hf_resnet_gates_every_conv_bn_block_and_counts_its_flops():
    model = ResNetForImageClassification(
        ResNetConfig(
            num_channels=1,
            embedding_size=8,
            hidden_sizes=[8, 16],
            depths=[1, 1],
            layer_type="basic",
            num_labels=3,
        )
    ).eval()
    x = torch.randn(2, 1, 16, 16)
    expected = model(x).logits
    attach_gating(model)
    layers = gated_layers(model)
    assert len(layers) == 6 and all(isinstance(layer, GatedConv) for layer in layers.values())
    assert "resnet.encoder.stages.1.layers.0.shortcut" in layers
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected)  # every gate starts open
    summary = measure_gating(model, [x], forward=lambda m, batch: m(batch))
    assert summary["flops_per_input"]["dense"] == conv_flops(model, x).dense


def test_torchvision_style_conv_bn_pairs_are_gated_in_place():
    class Block(nn.Module):  # conv1/bn1/relu/conv2/bn2 as siblings, like torchvision's BasicBlock
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    block = Block().eval()
    x = torch.randn(2, 3, 6, 6)
    expected = block(x)
    attach_gating(block)
    assert isinstance(block.conv1, GatedConv) and isinstance(block.bn1, nn.Identity)
    torch.testing.assert_close(block(x), expected)
    set_predictor(block.conv2, [5.0, -5.0, -5.0, 5.0])
    assert block(x)[:, 1:3].abs().sum() == 0
    unwrap(block)
    torch.testing.assert_close(block(x), expected)
