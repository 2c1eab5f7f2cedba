"""R-AMT binary mask tuning: gradient dropout, the straight-through mask, step 0 = zero-shot, the objective's
gradient hook, bad input, and composition with a peft LoRA adapter (each training only what it should; save/load)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn import functional as F

from prune.core.errors import UserInputError
from prune.masks.base import ConvWeightMasked, WeightMasked, masked_fractions, wrappers
from prune.masks.storage import load_masks
from prune.masks.with_peft import load_with_adapter, save_with_adapter, set_trainable
from prune.methods.binary.method import (
    BinaryConfig,
    BinaryScoreMask,
    attach_binary,
    gradient_dropout,
    keep_probability,
    kl_to_reference,
)
from prune.models.clip import load_clip
from prune.runs.recipe import parse_recipe
from prune.tasks.classification import classification_loss
from prune.tasks.zero_shot import ZeroShotClassifier

CLASSES = ["cat", "dog", "bird"]
pytestmark = pytest.mark.usefixtures("one_thread")


def classifier(clip_dir, templates=("{}.",)):
    clip, processor = load_clip(str(clip_dir))
    return ZeroShotClassifier(clip, processor.tokenizer, CLASSES, list(templates))


def images(count: int = 6, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(count, 3, 32, 32, generator=generator),
        "labels": torch.randint(0, len(CLASSES), (count,), generator=generator),
    }


def scramble(masks, seed: int = 1) -> None:
    """Scores around the threshold, so that some weights are masked and the model differs from zero-shot."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mask in masks:
            mask.scores.copy_(torch.rand(mask.scores.shape, generator=generator) * 0.01)


# ------------------------------------------------------------------------------------------ gradient dropout


def test_agreeing_signs_keep_every_gradient():
    a = torch.tensor([3.0, -2.0, 0.5, -1e-3, 7.0])
    b = torch.tensor([1.0, -5.0, 0.25, -4.0, 1e-6])
    assert torch.all(keep_probability(a, b) > 0.999)
    for seed in range(20):
        assert torch.equal(gradient_dropout(a, b, 0.3, torch.Generator().manual_seed(seed)), a)


def test_conflicting_signs_keep_with_probability_a_over_a_plus_b():
    a, b = torch.tensor([3.0, -1.0, 2.0]), torch.tensor([-1.0, 4.0, -2.0])
    assert torch.allclose(keep_probability(a, b), torch.tensor([0.75, 0.2, 0.5]), atol=1e-6)
    for value_a, value_b, expected in ((3.0, -1.0, 0.75), (-1.0, 4.0, 0.2)):
        big_a, big_b = torch.full((200_000,), value_a), torch.full((200_000,), value_b)
        out = gradient_dropout(big_a, big_b, 0.3, torch.Generator().manual_seed(0))
        kept = torch.isclose(out, big_a)
        assert torch.all(kept | torch.isclose(out, 0.7 * big_a))  # kept whole, or scaled by (1 - lambda)
        assert kept.float().mean().item() == pytest.approx(expected, abs=0.005)


# ------------------------------------------------------------------------------------------ the mask itself


def test_straight_through_mask_forward_is_hard_and_gradient_is_identity():
    torch.manual_seed(0)
    linear = nn.Linear(5, 4)
    mask = BinaryScoreMask(linear.weight.shape, 1e-2, 5e-3)
    with torch.no_grad():
        mask.scores.copy_(torch.rand(4, 5) * 0.01)
    wrapped = WeightMasked(linear, mask)
    x = torch.randn(3, 5)
    keep = mask.scores.detach() > 5e-3
    assert 0 < keep.sum() < keep.numel()
    assert torch.equal(mask.soft(), keep.float())
    y = wrapped(x)
    assert torch.equal(y, F.linear(x, linear.weight * keep, linear.bias))
    upstream = torch.randn_like(y)
    y.backward(upstream)
    # d y / d M = (upstream^T x) ⊙ W, passed to the score unchanged, masked weights included (they can return)
    assert torch.allclose(mask.scores.grad, (upstream.t() @ x) * linear.weight, atol=1e-6)
    assert linear.weight.grad is None


def test_conv_mask_forward_is_the_masked_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, kernel_size=4, stride=4, bias=False)
    model = nn.Sequential(conv)
    objective = attach_binary(model, BinaryConfig(targets=["0"]))
    scramble(objective.masks)
    assert isinstance(model[0], ConvWeightMasked) and model[0].weight is conv.weight
    x = torch.randn(2, 3, 16, 16)
    keep = objective.masks[0].hard()
    expected = F.conv2d(x, conv.weight * keep, stride=4)
    assert torch.equal(model(x), expected)


def test_step_zero_is_the_zero_shot_model_exactly(clip_dir):
    model = classifier(clip_dir, ("a photo of a {}.", "{}."))
    batch = images()
    with torch.no_grad():
        zero_shot = model(batch["pixel_values"]).logits
    objective = attach_binary(
        model.clip,
        BinaryConfig(
            targets=[
                "*vision_model.encoder.layers.*.self_attn.*_proj",
                "*vision_model.embeddings.patch_embedding",
                "*text_model.encoder.layers.*.mlp.*",
            ]
        ),
    )
    assert len(objective.masks) == 2 * 4 + 1 + 2 * 2
    for training in (True, False):
        for wrapper in wrappers(model).values():
            wrapper.mask.train(training)
        with torch.no_grad():
            assert torch.equal(model(batch["pixel_values"]).logits, zero_shot)
    assert masked_fractions(model.clip) == {"targeted": 0.0, "all": 0.0}


def test_regularizer_is_the_l2_norm_not_squared(clip_dir):
    model = classifier(clip_dir)
    objective = attach_binary(model.clip, BinaryConfig(score_reg=1e-4))
    count = sum(mask.scores.numel() for mask in objective.masks)
    assert objective.regularizer(model).item() == pytest.approx(1e-4 * 1e-2 * count**0.5, rel=1e-5)


def test_masked_fractions_count_targeted_and_all_parameters():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2))
    objective = attach_binary(model, BinaryConfig(targets=["0"]))
    with torch.no_grad():
        objective.masks[0].scores.view(-1)[:6] = 0.0  # 6 of 16 targeted weights masked
    assert masked_fractions(model) == pytest.approx({"targeted": 6 / 16, "all": 6 / (16 + 8 + 2)})


# ------------------------------------------------------------------------------------------- gradient hook


def test_dropout_backward_accumulates_exactly_the_dropped_out_task_gradient(clip_dir):
    model = classifier(clip_dir)
    objective = attach_binary(model.clip, BinaryConfig(gradient_dropout=0.3))
    scramble(objective.masks)
    model.requires_grad_(False)
    for mask in objective.masks:
        mask.scores.requires_grad_(True)
    scores = [param for param in model.parameters() if param.requires_grad]  # the hook draws U in this order
    assert len(scores) == len(objective.masks)
    batch = images()
    # a and b by hand
    output = model(**batch)
    with torch.no_grad():
        for mask in objective.masks:
            mask.bypass = True
        reference = model(batch["pixel_values"]).logits
        for mask in objective.masks:
            mask.bypass = False
    a = torch.autograd.grad(output.loss + objective.regularizer(model), scores, retain_graph=True)
    b = torch.autograd.grad(kl_to_reference(output.logits, reference), scores)
    assert any(grad.abs().sum() > 0 for grad in b)
    torch.manual_seed(5)
    expected = [0.5 * gradient_dropout(ga, gb, 0.3) for ga, gb in zip(a, b)]
    torch.manual_seed(5)
    task, regularizer = objective.backward(model, batch, classification_loss, Accelerator(cpu=True), 0.5)
    assert task.item() == pytest.approx(output.loss.item())
    for score, grad in zip(scores, expected):
        assert torch.allclose(score.grad, grad, atol=1e-7)
    assert not torch.equal(scores[0].grad, 0.5 * a[0])  # some conflicting elements were damped


def test_gradient_dropout_off_leaves_the_plain_trainer_backward():
    assert (
        attach_binary(nn.Sequential(nn.Linear(2, 2)), BinaryConfig(targets=["0"], gradient_dropout=0)).backward is None
    )


# ---------------------------------------------------------------------------------------------- bad input


def test_a_target_pattern_that_matches_nothing_is_named(clip_dir):
    model = classifier(clip_dir)
    with pytest.raises(UserInputError, match=r"'\*vision_model\.nope\*' matches no Linear/Conv2d.*vision_model"):
        attach_binary(
            model.clip, BinaryConfig(targets=["*vision_model.encoder.layers.*.self_attn.q_proj", "*vision_model.nope*"])
        )
    assert not wrappers(model)


@pytest.mark.parametrize(
    "method, message",
    [
        ({"init_score": 0.004}, "must exceed threshold"),
        ({"sparsity": 0.5}, "remove method.sparsity"),
        ({"targets": []}, "at least one pattern"),
    ],
)
def test_bad_method_config_is_refused(method, message):
    with pytest.raises(UserInputError, match=message):
        parse_recipe({"task": "zero-shot-classification", "method": {"name": "binary", **method}})


# --------------------------------------------------------------------------------------------------- peft


def lora_classifier(clip_dir):
    model = classifier(clip_dir)
    peft_model = get_peft_model(
        model.clip, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    objective = attach_binary(peft_model, BinaryConfig())  # masks after the adapter: on each LoRA base_layer
    model.clip = peft_model.get_base_model()
    return model, peft_model, objective


def test_masks_wrap_the_frozen_base_layer_inside_each_lora_layer(clip_dir):
    _, peft_model, objective = lora_classifier(clip_dir)
    names = set(wrappers(peft_model))
    assert "base_model.model.vision_model.encoder.layers.0.self_attn.q_proj.base_layer" in names  # LoRA + mask
    assert "base_model.model.vision_model.encoder.layers.0.self_attn.k_proj" in names  # mask only
    assert not any("lora_" in name for name in names)
    assert len(objective.masks) == 2 * 4 + 1


@pytest.mark.parametrize("masks, adapter", [(True, False), (False, True), (True, True)])
def test_masks_only_adapter_only_or_both_train_only_what_they_should(clip_dir, masks, adapter):
    model, peft_model, objective = lora_classifier(clip_dir)
    before = {name: param.detach().clone() for name, param in peft_model.named_parameters()}
    params = set_trainable(peft_model, masks=masks, adapter=adapter)
    optimizer = torch.optim.SGD(params, lr=1.0)
    classification_loss(model, images()).backward()
    optimizer.step()
    scores = {f"{name}.mask.scores" for name in wrappers(peft_model)}
    changed = {name for name, param in peft_model.named_parameters() if not torch.equal(param, before[name])}
    allowed = {name for name in before if (name in scores and masks) or ("lora_" in name and adapter)}
    assert changed <= allowed  # base weights and whatever was not chosen stay exactly as they were
    assert bool(changed & scores) == masks
    assert any("lora_" in name for name in changed) == adapter


def test_masks_and_lora_save_and_load_to_identical_logits(clip_dir, tmp_path):
    model, peft_model, objective = lora_classifier(clip_dir)
    scramble(objective.masks)
    model.eval()
    pixels = images()["pixel_values"]
    with torch.no_grad():
        expected = model(pixels).logits
    save_with_adapter(peft_model, tmp_path)
    for name in ("adapter_config.json", "adapter_model.safetensors", "masks.safetensors", "masks.json"):
        assert (tmp_path / name).is_file()
    fresh_clip, processor = load_clip(str(clip_dir))
    restored = load_with_adapter(fresh_clip, tmp_path)
    again = ZeroShotClassifier(restored.get_base_model(), processor.tokenizer, CLASSES, ["{}."]).eval()
    with torch.no_grad():
        assert torch.equal(again(pixels).logits, expected)
    # the masks alone, under the plain model's names, load into the plain CLIP too
    plain_clip, _ = load_clip(str(clip_dir))
    load_masks(plain_clip, tmp_path)
    assert set(wrappers(plain_clip)) == {
        name.removeprefix("base_model.model.").removesuffix(".base_layer") for name in wrappers(peft_model)
    }
