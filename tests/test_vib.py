"""VIB structured pruning and the one-shot structured baselines on tiny Llama (GQA) and GPT-2 models."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from eval.flops import count_params
from prune.core.errors import UserInputError
from prune.methods.registry import get_method
from prune.methods.vib.method import VIBGate
from prune.runs.export import export_run
from prune.runs.loading import load_model
from prune.runs.pipeline import run
from prune.runs.recipe import parse_recipe
from prune.structural.config import FFN
from prune.structural.store import export_gated, gate_set, load_gates, save_gates
from prune.training.config import TrainConfig
from prune.training.trainer import train
from tests.conftest import docs_text, make_tiny_gpt2, make_tiny_llama, save_tiny_model

MODELS = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2}
ALL_UNITS = {"heads": True, "ffn": True, "hidden": True, "layers": True}


def vib_config(**fields):
    return get_method("vib").config_class.model_validate({"name": "vib", **fields})


def attach(model, **fields):
    config = vib_config(**fields)
    return config, get_method("vib").attach(model, config, None)


def importance_loss(objective, seed=0):
    """A toy task loss: each unit has an importance w and costs w * (1 - z)^2 when its gate z moves off 1."""
    generator = torch.Generator().manual_seed(seed)
    weights = {id(g): torch.exp(2 * torch.randn(g.size, generator=generator)) for g in objective.gates.all()}

    def task_loss(model, batch):
        return 1e-2 * sum((weights[id(g)] * (1 - g.value()) ** 2).sum() for g in objective.gates.all())

    return task_loss, weights


def test_kl_and_keep_rule_match_their_formulas():
    gate = VIBGate(FFN, 6, 0)
    with torch.no_grad():
        gate.mu.copy_(torch.tensor([1.0, 0.5, 0.01, -2.0, 0.2, 1e-3]))
        gate.log_sigma2.copy_(torch.tensor([-9.0, -1.0, -8.0, 0.5, -3.0, -20.0]))
    mu, log_sigma2 = gate.mu.tolist(), gate.log_sigma2.tolist()
    kl = sum(0.5 * math.log(1 + m * m / math.exp(s)) for m, s in zip(mu, log_sigma2))
    assert gate.kl().item() == pytest.approx(kl, rel=1e-5)
    log_alpha = [s - math.log(m * m) for m, s in zip(mu, log_sigma2)]
    assert gate.log_alpha().tolist() == pytest.approx(log_alpha, rel=1e-5)
    assert gate.hard().tolist() == [a < 0 for a in log_alpha]
    gate.eval()
    assert torch.equal(gate.value(), gate.mu.detach() * gate.hard())  # evaluation: mu on kept units, 0 elsewhere
    gate.train()
    torch.manual_seed(7)
    sample = gate.value()
    torch.manual_seed(7)
    eps = torch.randn(6)
    assert torch.allclose(sample, gate.mu + eps * torch.exp(0.5 * gate.log_sigma2))


def test_a_layer_keeps_one_head_unit_even_when_every_log_alpha_says_drop():
    model = make_tiny_llama()
    _, objective = attach(model)
    head = objective.gates.heads[0]
    with torch.no_grad():
        head.mu.fill_(1e-3)
        head.mu[1] = 2e-3  # the least-dropped unit stays
    assert head.natural_count() == 0 and head.hard().tolist() == [False, True]


@pytest.mark.slow
@pytest.mark.parametrize("budget_value", ["hard", "expected"])
def test_lagrangian_drives_the_expected_size_to_the_target_on_a_toy_problem(tmp_path, budget_value):
    torch.manual_seed(0)
    model = make_tiny_llama()
    _, objective = attach(model, target={"params": 0.4}, budget_value=budget_value)
    task_loss, weights = importance_loss(objective)
    train(
        model,
        objective,
        torch.zeros(4, 1, dtype=torch.long),
        TrainConfig(steps=200, lr=0.05, max_grad_norm=0, log_every=50),
        tmp_path,
        task_loss=task_loss,
    )
    # each mode meets the target in the share it constrains (in `expected` mode the hard share may lag: the
    # reason `hard`, which the exported model follows, is the default)
    expected, hard = objective.expected_removed().item(), objective.hard_removed()
    if budget_value == "hard":
        assert hard == pytest.approx(0.4, abs=0.02) and expected == pytest.approx(0.4, abs=0.06)
    else:
        assert expected == pytest.approx(0.4, abs=0.02)
    ffn = objective.gates.ffn[0]
    keep, importance = ffn.hard(), weights[id(ffn)]
    assert importance[keep].mean() > 10 * importance[~keep].mean()  # the unimportant units went
    log = [json.loads(line) for line in (tmp_path / "train" / "train_log.jsonl").read_text().splitlines()]
    # the log line after step n shows step n-1's target: linear over the first 100 steps, then flat
    assert [line["target"] for line in log] == pytest.approx([0.4 * 49 / 100, 0.4 * 99 / 100, 0.4, 0.4])


@pytest.mark.slow
def test_periodic_evaluation_keeps_best_masks_only_among_those_meeting_the_budget(tmp_path):
    torch.manual_seed(0)
    model = make_tiny_llama()
    _, objective = attach(model, target={"params": 0.4})
    task_loss, _ = importance_loss(objective)
    removed_at = {}

    def evaluate(masked) -> float:  # like perplexity: the less pruned, the better it scores
        removed_at[len(removed_at)] = objective.hard_removed()
        return 1.0 + objective.hard_removed()

    result = train(
        model,
        objective,
        torch.zeros(4, 1, dtype=torch.long),
        TrainConfig(steps=200, lr=0.05, max_grad_norm=0, log_every=50, eval_every=25),
        tmp_path,
        task_loss=task_loss,
        evaluate=evaluate,
    )
    log = [json.loads(line) for line in (tmp_path / "train" / "train_log.jsonl").read_text().splitlines()]
    evals = [line for line in log if "eval_perplexity" in line]
    assert len(evals) == len(removed_at) == 9  # steps 0, 25, ..., 200
    assert [line["selectable"] for line in evals] == [removed >= 0.39 for removed in removed_at.values()]
    assert evals[0]["selectable"] is False and evals[-1]["selectable"] is True  # warm-up, then the target
    assert result.best_step > 0 and result.best_score >= 1.39  # never the under-pruned start


@pytest.mark.parametrize("family", list(MODELS))
def test_exported_logits_equal_the_trained_gated_model(family, tmp_path):
    torch.manual_seed(0)
    model = MODELS[family]()
    config, objective = attach(model, target={"params": 0.5}, units=ALL_UNITS)
    train(model, objective, torch.randint(0, 128, (8, 16)), TrainConfig(steps=12, lr=0.3, batch_size=2), tmp_path)
    model.eval()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        gated = model(input_ids=ids).logits
    removed = objective.hard_removed()
    exported = export_gated(model, config)
    with torch.no_grad():
        logits = exported(input_ids=ids).logits
    assert 0.0 < removed and (logits - gated).abs().max().item() < 1e-4
    assert exported.maskprune_summary["params"]["removed"] == pytest.approx(removed)
    assert count_params(exported).total == exported.maskprune_summary["params"]["kept"]


def test_saved_gates_refuse_another_model(tmp_path):
    model = make_tiny_llama()
    config, _ = attach(model, units=ALL_UNITS)
    save_gates(model, tmp_path, config, {"model": "tiny", "method": "vib"})
    with pytest.raises(UserInputError, match="another model"):
        load_gates(make_tiny_gpt2(), tmp_path)


def test_config_labels_and_bad_input():
    config = vib_config(target={"flops": 0.3})
    assert config.target_label() == "flops 0.3" and config.sparsity is None
    assert vib_config(sparsity=0.5).target == {"params": 0.5}  # a plain fraction reads as a params target
    for bad in ({"params": 1.5}, {"latency": 0.5}, {"params": 0.3, "flops": 0.3}):
        with pytest.raises(ValueError, match="target"):
            vib_config(target=bad)
    with pytest.raises(ValueError, match="size budget"):
        vib_config(sparsity="2:4")
    with pytest.raises(UserInputError, match=r"cannot be reached.*layers"):  # layers off: attention stays
        attach(make_tiny_llama(), target={"flops": 0.99}, units={"layers": False})
    with pytest.raises(UserInputError, match="larger than the ffn dimension"):
        attach(make_tiny_llama(), round_to=256)
    recipe = parse_recipe({"method": {"name": "vib"}, "export": {"round_to": 8, "uniform": True}})
    assert (recipe.method.round_to, recipe.method.uniform) == (8, True)
    with pytest.raises(UserInputError, match="structural methods"):
        parse_recipe({"method": {"name": "wanda"}, "export": {"round_to": 8}})


def test_uniform_rounded_vib_export_loads_with_plain_transformers(tmp_path):
    torch.manual_seed(2)
    model = make_tiny_llama()
    config, objective = attach(model, target={"params": 0.4}, uniform=True, round_to=8)
    with torch.no_grad():
        for gate in objective.gates.all():
            gate.log_sigma2.copy_(torch.randn(gate.size) * 3)
    model.eval()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        gated = model(input_ids=ids).logits
    exported = export_gated(model, config)
    exported.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - gated).abs().max().item() < 1e-4
    assert reloaded.config.intermediate_size % 8 == 0 and reloaded.config.hidden_size % 8 == 0
    assert reloaded.config.hidden_size % reloaded.config.num_attention_heads == 0


@pytest.mark.parametrize("score", ["magnitude", "activation"])
def test_structured_baselines_meet_the_budget_with_the_same_share_per_layer(score):
    model = make_tiny_llama()
    spec = get_method("structured")
    config = spec.config_class.model_validate({"name": "structured", "score": score, "target": {"params": 0.3}})
    spec.attach(model, config, torch.randint(0, 128, (4, 16)))
    gates = gate_set(model)
    structure = gates.structure
    removed = 1 - structure.size(gates.counts()) / structure.size(structure.full_counts())
    assert 0.3 <= removed < 0.4
    assert len({g.count() for g in gates.by_kind(FFN)}) == 1  # the same share in every layer


def test_magnitude_score_is_the_l2_norm_of_a_units_weights():
    from prune.methods.structured.method import unit_weight_norms
    from prune.structural.layout import structure_of

    model = make_tiny_llama()
    mlp = model.model.layers[1].mlp
    expected = (
        mlp.gate_proj.weight[5].pow(2).sum()
        + mlp.up_proj.weight[5].pow(2).sum()
        + mlp.down_proj.weight[:, 5].pow(2).sum()
    ).sqrt()
    assert unit_weight_norms(model, structure_of(model), FFN, 1)[5].item() == pytest.approx(expected.item(), rel=1e-5)


def test_pipeline_run_writes_a_smaller_model_that_loads_in_one_line(tmp_path):
    corpus = tmp_path / "docs.txt"
    corpus.write_text(docs_text())
    base = save_tiny_model(tmp_path / "base", "llama")
    recipe = parse_recipe(
        {
            "model": str(base),
            "data": {"source": str(corpus), "seq_len": 32, "fraction": 0.5},
            "method": {"name": "vib", "target": {"params": 0.3}},
            "train": {"steps": 6, "batch_size": 2, "lr": 0.1},
            "eval": {"tasks": [], "latency": False},
            "output": str(tmp_path / "run"),
        }
    )
    report = run(recipe)
    assert report["sparsity"]["target"] == "params 0.3" and report["sparsity"]["measure"] == "params"
    assert report["params"]["total"] == report["structure"]["params"]["kept"] <= report["dense"]["params"]["total"]
    model, _ = load_model(str(tmp_path / "run" / "model"))
    assert count_params(model).total == report["params"]["total"]
    saved = json.loads((tmp_path / "run" / "masks.json").read_text())
    assert saved["method"] == "vib" and saved["structural"]["family"] == "llama"
    shutil.rmtree(tmp_path / "run" / "model")  # `prune export` rebuilds it from the base model + saved gates
    rebuilt, _ = load_model(str(export_run(tmp_path / "run")))
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        assert torch.allclose(rebuilt(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
