"""train.distill: masks trained against the dense model's next-token distribution (causal-lm)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

from prune.core.errors import UserInputError
from prune.methods.registry import get_method
from prune.runs.loading import load_model
from prune.runs.pipeline import run
from prune.runs.recipe import parse_recipe
from prune.tasks.causal_lm import CausalLM, distillation_kl


def recipe(model_dir, corpus, output, method: dict, **train):
    return parse_recipe(
        {
            "model": str(model_dir),
            "data": {"source": str(corpus), "calibration_samples": 4, "seq_len": 32},
            "method": method,
            "train": {"steps": 2, "batch_size": 2, "lr": 0.05, "log_every": 1, **train},
            "eval": {"tasks": [], "latency": False, "flops": False, "extra_texts": [], "dense_baseline": False},
            "output": str(output),
        }
    )


def test_kl_is_zero_against_itself_and_is_torchs_kl_div_per_position():
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert distillation_kl(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    expected = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="sum") / 10
    assert distillation_kl(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_kl(student, teacher) > 0


def test_the_teacher_is_the_dense_model_even_when_the_prior_updated_the_weights(
    tmp_path, llama_dir, corpus, one_thread
):
    method = {"name": "nm_gumbel", "sparsity": "2:4", "prior": "sparsegpt", "prior_update_weights": True}
    settings = recipe(llama_dir, corpus, tmp_path / "run", method, distill=0.25)
    model, tokenizer = load_model(str(llama_dir))
    task = CausalLM(model, tokenizer, settings)
    get_method("nm_gumbel").attach(model, settings.method, task.calibration())
    dense = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    teacher = dict(task.teacher.named_parameters())
    assert all(torch.equal(teacher[name], tensor) for name, tensor in dense.named_parameters())
    updated = model.get_submodule("model.layers.0.mlp.down_proj").base.weight
    assert not torch.equal(updated, dense.get_submodule("model.layers.0.mlp.down_proj").weight)  # the prior's update
    assert not any(tensor.requires_grad for tensor in teacher.values())

    batch = task.train_data()[:2]
    torch.manual_seed(0)
    loss = task.loss(model, batch, settings.train)
    torch.manual_seed(0)  # the same Gumbel draw
    output = model(input_ids=batch, labels=batch)
    kl = distillation_kl(output.logits[:, :-1], dense(input_ids=batch).logits[:, :-1])
    assert loss.item() == pytest.approx((0.75 * output.loss + 0.25 * kl).item(), rel=1e-5)
    assert kl.item() > 0


def test_a_run_trains_on_the_distillation_loss(tmp_path, llama_dir, corpus, one_thread):
    method = {"name": "nm_gumbel", "sparsity": "2:4", "prior": "magnitude"}
    logs = {}
    for distill in (0.0, 1.0):
        output = tmp_path / f"distill-{distill}"
        report = run(recipe(llama_dir, corpus, output, method, distill=distill))
        assert report["train"]["steps"] == 2
        lines = (output / "train" / "train_log.jsonl").read_text().splitlines()
        logs[distill] = [json.loads(line)["task_loss"] for line in lines]
    assert logs[0.0][0] > 2.0 > logs[1.0][0]  # cross-entropy of a random tiny model vs its KL from the dense one


@pytest.mark.parametrize(
    "method, task, message",
    [
        ({"name": "wanda", "sparsity": "2:4"}, {}, "train.distill needs a method that trains masks"),
        (
            {"name": "binary"},
            {"task": "zero-shot-classification", "data": {"source": "digits"}},
            "train.distill applies to task causal-lm",
        ),
    ],
)
def test_distill_without_mask_training_on_text_is_refused(tmp_path, method, task, message):
    raw = {"model": "smollm2-135m", "method": method, "train": {"distill": 0.5}, "output": str(tmp_path / "r"), **task}
    with pytest.raises(UserInputError, match=message):
        parse_recipe(raw)


def test_distill_at_zero_leaves_the_fingerprint_of_runs_made_before_it(llama_dir, corpus, tmp_path):
    method = {"name": "nm_gumbel", "sparsity": "2:4"}
    plain, distilled = (recipe(llama_dir, corpus, tmp_path, method, distill=value) for value in (0.0, 0.5))
    content = {key: value for key, value in plain.to_dict().items() if key != "output"}
    del content["train"]["distill"], content["data"]["source_share"], content["data"]["stream_tokens"]  # later keys
    del content["recover"]  # a section added later, without steps
    assert plain.fingerprint() == hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    assert distilled.fingerprint() != plain.fingerprint()
