"""The public Python API (`import prune`), run with nothing but its names: the one-call `oneshot` from each kind of
calibration data, the step-by-step path of learnable methods, and the traps a user falls into (a wrapped model
saved, a config that differs from the masks', wrong argument types), each refused with a UserInputError."""

from __future__ import annotations

import copy
import json

import datasets
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import prune
from prune.data.text import prepare
from prune.masks.base import wrappers
from prune.runs.recipe import parse_recipe
from tests.conftest import docs_text, make_tiny_llama, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


def test_prune_train_save_restore_and_export_with_the_public_api(tiny_dir, tmp_path):
    blocks = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    ids = blocks[:2]

    # one-shot: Wanda 2:4 from calibration blocks
    model, _ = prune.load_model(str(tiny_dir))
    assert prune.attach(model, prune.method_config("wanda", sparsity="2:4"), calibration=blocks[:4]) is None
    wanda = prune.export(model, prune.method_config("wanda", sparsity="2:4"))
    weight = wanda.get_submodule("model.layers.0.mlp.up_proj").weight
    assert torch.all((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) == 2)

    # learnable: nm_gumbel masks, two steps of a hand-written loop
    model, tokenizer = prune.load_model(str(tiny_dir))
    config = prune.method_config("nm_gumbel", sparsity="2:4", prior="magnitude")
    objective = prune.attach(model, config)
    masks = prune.mask_parameters(model)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in masks}
    optimizer = torch.optim.AdamW(masks + objective.extra_parameters(), lr=0.5)
    model.eval()
    start = model(input_ids=ids).logits
    model.train()
    for step in range(2):
        objective.begin_step(step, 2)
        loss = model(input_ids=blocks[2:6], labels=blocks[2:6]).loss + objective.regularizer(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        learned = model(input_ids=ids).logits
    assert not torch.equal(learned, start)  # the masks moved

    # save the masks, restore them into a fresh model: identical logits
    prune.save_masks(model, tmp_path / "masks", config)
    fresh, _ = prune.load_model(str(tiny_dir))
    prune.load_masks(fresh, tmp_path / "masks", config)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, learned)

    # export: a plain transformers checkpoint with the same logits
    prune.export(model, config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, learned)


def test_a_bad_method_config_names_the_key():
    with pytest.raises(prune.UserInputError, match="granularity"):
        prune.method_config("wanda", granularity="column")
    with pytest.raises(prune.UserInputError, match="unknown method 'wandaa'"):
        prune.method_config("wandaa")


TEXTS = docs_text(20_000).split("\n\n")  # a list of strings, the way a user holds their own text
MAGNITUDE = {"name": "magnitude", "sparsity": "2:4"}


def fresh(directory):
    return prune.load_model(str(directory))[0]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_two_four(model, names):
    for name in names:
        weight = model.get_submodule(name).weight
        assert torch.all((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2), name


def block_linears(model):
    return [
        name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and ".layers." in name
    ]


def assert_same_weights(first, second):
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


# ------------------------------------------------------------------------------------------- one call: oneshot


def test_oneshot_from_a_list_of_strings_saves_a_2of4_checkpoint_plain_transformers_loads(tiny_dir, tmp_path):
    config = prune.method_config("sparsegpt", sparsity="2:4")
    pruned = prune.oneshot(
        str(tiny_dir), config, dataset=TEXTS, num_calibration_samples=4, seq_len=32, output_dir=tmp_path / "out"
    )
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(plain, ids), logits(pruned, ids))
    assert len(block_linears(plain)) == 14
    assert_two_four(plain, block_linears(plain))
    assert plain.config.pruning == {
        "tool": "maskprune",
        "version": plain.config.pruning["version"],
        "method": "sparsegpt",
        "sparsity": "2:4",
        "targets": None,
        "config": config.model_dump(mode="json"),
        "recovered": None,
    }
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("def f():")["input_ids"]  # saved beside the model
    again = prune.oneshot(str(tiny_dir), config, dataset=TEXTS, num_calibration_samples=4, seq_len=32)
    assert_same_weights(again, pruned)  # seeded: the same blocks, the same model


def test_a_dataset_a_list_of_strings_and_token_blocks_calibrate_alike(tiny_dir):
    _, tokenizer = prune.load_model(str(tiny_dir))
    config = prune.method_config("wanda", sparsity=0.5)
    drawn = {"tokenizer": tokenizer, "num_calibration_samples": 4, "seq_len": 32, "seed": 3}
    from_texts = prune.oneshot(fresh(tiny_dir), config, dataset=TEXTS, **drawn)
    table = datasets.Dataset.from_dict({"body": TEXTS})
    from_dataset = prune.oneshot(fresh(tiny_dir), config, dataset=table, text_column="body", **drawn)
    blocks = prune.calibration_blocks(tokenizer, TEXTS, 4, 32, seed=3)
    from_blocks = prune.oneshot(fresh(tiny_dir), config, dataset=blocks)
    assert_same_weights(from_texts, from_dataset)
    assert_same_weights(from_texts, from_blocks)
    assert not torch.equal(prune.calibration_blocks(tokenizer, TEXTS, 4, 32, seed=4), blocks)


def test_token_blocks_are_used_whole_unless_fewer_are_asked_for(tiny_dir):
    blocks = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(0))
    config = prune.method_config("wanda", sparsity=0.5)
    drawn = prune.oneshot(fresh(tiny_dir), config, dataset=blocks, num_calibration_samples=3, seed=1)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(1))[:3]  # the seeded draw of every path
    assert_same_weights(drawn, prune.oneshot(fresh(tiny_dir), config, dataset=blocks[order]))


def test_oneshot_without_a_dataset_calibrates_on_the_recipes_data(tiny_dir, corpus, tmp_path):
    recipe = {
        "model": str(tiny_dir),
        "data": {"source": str(corpus), "calibration_samples": 4, "seq_len": 32},
        "method": {"name": "wanda", "sparsity": "2:4"},
        "seed": 1,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    from_recipe = prune.oneshot(str(tiny_dir), str(path))
    _, tokenizer = prune.load_model(str(tiny_dir))
    blocks = prepare(tokenizer, str(corpus)).calibration_blocks(4, 32, 1)  # what `prune run` calibrates on
    assert_same_weights(from_recipe, prune.oneshot(str(tiny_dir), recipe["method"], dataset=blocks))
    assert_same_weights(from_recipe, prune.oneshot(str(tiny_dir), recipe))  # the recipe as a dict


def test_oneshot_depth_chooses_on_the_validation_part_or_on_the_selection_given(tiny_dir, corpus):
    recipe = {
        "model": str(tiny_dir),
        "data": {"source": str(corpus), "calibration_samples": 4, "seq_len": 32},
        "method": {"name": "depth", "remove": 1, "candidates": 2},
        "train": {"eval_windows": 3},
    }
    from_recipe = prune.oneshot(str(tiny_dir), recipe)
    assert from_recipe.config.num_hidden_layers == fresh(tiny_dir).config.num_hidden_layers - 1
    _, tokenizer = prune.load_model(str(tiny_dir))
    splits = prepare(tokenizer, str(corpus))
    calibration, validation = splits.calibration_blocks(4, 32, 0), splits.validation_blocks(32)[:3]
    given = prune.oneshot(str(tiny_dir), recipe["method"], dataset=calibration, selection=validation)
    assert_same_weights(from_recipe, given)  # what `prune run` chooses on: validation, never calibration's part
    with pytest.raises(prune.UserInputError, match="pass them as `selection`"):
        prune.oneshot(str(tiny_dir), recipe["method"], dataset=calibration)  # the user's text has no validation


def test_calibration_blocks_are_seeded_windows_of_the_text(tiny_dir):
    _, tokenizer = prune.load_model(str(tiny_dir))
    blocks = prune.calibration_blocks(tokenizer, TEXTS, 5, 16, seed=0)
    assert blocks.shape == (5, 16) and blocks.dtype == torch.long
    assert torch.equal(blocks, prune.calibration_blocks(tokenizer, TEXTS, 5, 16, seed=0))
    stream = torch.tensor(tokenizer("\n\n".join(TEXTS), add_special_tokens=False)["input_ids"])
    windows = stream[: len(stream) // 16 * 16].reshape(-1, 16)
    assert all(any(torch.equal(row, window) for window in windows) for row in blocks)
    assert len({tuple(row.tolist()) for row in blocks}) == 5  # distinct windows
    with pytest.raises(prune.UserInputError, match=f"holds only {len(windows)}"):
        prune.calibration_blocks(tokenizer, TEXTS, len(windows) + 1, 16)


# -------------------------------------------------------------------------------- saving, loading, exporting


def test_save_pretrained_refuses_while_masks_are_attached_and_export_saves_what_runs(tiny_dir, tmp_path):
    model = fresh(tiny_dir)
    prune.attach(model, prune.method_config(**MAGNITUDE))
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    masked = logits(model, ids)
    for saving in (model, copy.deepcopy(model)):  # a copy carries the refusal too
        with pytest.raises(prune.UserInputError, match=r"prune\.export"):
            saving.save_pretrained(tmp_path / "wrapped")
    assert not (tmp_path / "wrapped").exists()
    plain = prune.export(model)
    assert plain is model and not wrappers(model)  # in place
    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded, ids), masked)
    assert reloaded.config.pruning["method"] == "magnitude"


def test_load_masks_reads_their_config_and_refuses_another(tiny_dir, tmp_path):
    config = prune.method_config("wanda", sparsity=0.5)
    blocks = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    model = fresh(tiny_dir)
    prune.attach(model, config, calibration=blocks)
    ids = blocks[:1, :16]
    masked = logits(model, ids)
    prune.save_masks(model, str(tmp_path / "masks"))  # the config attach was given; a str path
    restored = prune.load_masks(fresh(tiny_dir), str(tmp_path / "masks"))  # the config masks.json holds
    torch.testing.assert_close(logits(restored, ids), masked)

    other = fresh(tiny_dir)
    with pytest.raises(prune.UserInputError, match=r"sparsity: '2:4' given, 0\.5 made with"):
        prune.load_masks(other, tmp_path / "masks", prune.method_config("wanda", sparsity="2:4"))
    assert not wrappers(other)  # refused before anything was attached
    with pytest.raises(prune.UserInputError, match="config differs"):
        prune.export(restored, prune.method_config("magnitude", sparsity=0.5))
    with pytest.raises(prune.UserInputError, match="config differs"):
        prune.save_masks(model, tmp_path / "again", prune.method_config("wanda", sparsity=0.6))
    assert prune.export(restored, config).config.pruning["sparsity"] == "0.5"


def test_gating_predictors_round_trip_with_their_config_read_from_gating_json(tmp_path):
    model = make_tiny_llama()
    prune.attach(model, prune.method_config("gating", sparsity=0.5))
    prune.save_masks(model, tmp_path)
    restored = prune.load_masks(make_tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(restored, IDS), logits(model, IDS))
    with pytest.raises(prune.UserInputError, match="cannot be exported as a plain checkpoint"):
        prune.export(restored)
    with pytest.raises(prune.UserInputError, match=r"prune\.export"):
        restored.save_pretrained(tmp_path / "gated")


def test_export_of_a_model_without_masks_is_an_error_not_the_dense_model(tiny_dir):
    with pytest.raises(prune.UserInputError, match="carries no MaskPrune masks"):
        prune.export(fresh(tiny_dir), prune.method_config(**MAGNITUDE))


def test_train_takes_a_str_run_dir(tiny_dir, tmp_path):
    model = fresh(tiny_dir)
    objective = prune.attach(model, prune.method_config("nm_gumbel", sparsity="2:4", prior="magnitude"))
    blocks = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    result = prune.train(model, objective, blocks, prune.TrainConfig(steps=1, batch_size=2), str(tmp_path / "run"))
    assert result.steps == 1 and (tmp_path / "run" / "train" / "train_log.jsonl").is_file()


# ---------------------------------------------------------------------------- every wrong argument, named

WANDA = prune.method_config("wanda", sparsity="2:4")
IDS = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))


def attach_twice(model):
    prune.attach(model, WANDA, calibration=IDS)
    prune.attach(model, WANDA, calibration=IDS)


BAD_ARGUMENTS = {
    "a string where a model goes": (lambda m, t, d: prune.attach("smollm2-135m", WANDA), "model is the name"),
    "a dict where a config goes": (lambda m, t, d: prune.attach(m, {"name": "wanda"}), "config is a dict"),
    "text as calibration": (
        lambda m, t, d: prune.attach(m, WANDA, calibration=["some text"]),
        r"calibration must be token blocks.*prune\.calibration_blocks",
    ),
    "float token ids": (lambda m, t, d: prune.attach(m, WANDA, calibration=IDS.float()), "torch.float32 values"),
    "token ids beyond the vocabulary": (
        lambda m, t, d: prune.attach(m, WANDA, calibration=IDS + 1000),
        "embeds ids 0 to 127",
    ),
    "blocks longer than the positions": (
        lambda m, t, d: prune.attach(m, WANDA, calibration=torch.zeros(1, 300, dtype=torch.long)),
        "300 tokens long, more than the 256 positions",
    ),
    "one row of ids": (lambda m, t, d: prune.attach(m, WANDA, calibration=IDS[0]), r"shape \[32\]"),
    "attaching twice": (lambda m, t, d: attach_twice(m), "already carries MaskPrune's masks"),
    "save_masks without masks": (lambda m, t, d: prune.save_masks(m, d, WANDA), "carries no MaskPrune masks"),
    "load_masks from a number": (lambda m, t, d: prune.load_masks(m, 42), "directory must be a path"),
    "load_masks from a directory without masks": (lambda m, t, d: prune.load_masks(m, d), "holds no saved masks"),
    "train without an objective": (
        lambda m, t, d: prune.train(m, None, IDS, prune.TrainConfig(), d),
        "objective must be what prune.attach returned",
    ),
    "train with a dict config": (
        lambda m, t, d: prune.train(m, prune.Objective(), IDS, {"steps": 1}, d),
        r"prune\.TrainConfig\(\*\*config\)",
    ),
    "a method name as the recipe": (lambda m, t, d: prune.oneshot(m, "wanda"), "recipe 'wanda' is no file"),
    "a learnable method in one call": (
        lambda m, t, d: prune.oneshot(m, prune.method_config("nm_gumbel", sparsity="2:4")),
        r"recipe names nm_gumbel, which learns its masks by training.*use prune\.attach \+ prune\.train",
    ),
    "a dataset name as the dataset": (
        lambda m, t, d: prune.oneshot(m, WANDA, dataset="wikitext", tokenizer=t, seq_len=32),
        "dataset is the string 'wikitext'",
    ),
    "a DatasetDict as the dataset": (
        lambda m, t, d: prune.oneshot(
            m, WANDA, dataset=datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]})}), tokenizer=t
        ),
        r"pass one split, e.g. dataset=ds\['train'\]",
    ),
    "text without a tokenizer": (lambda m, t, d: prune.oneshot(m, WANDA, dataset=TEXTS), "tokenizer is needed"),
    "seq_len beyond the positions": (
        lambda m, t, d: prune.oneshot(m, WANDA, dataset=TEXTS, tokenizer=t, seq_len=1000),
        "seq_len 1000 is longer than the 256 positions",
    ),
    "a float sample count": (
        lambda m, t, d: prune.oneshot(m, WANDA, dataset=TEXTS, tokenizer=t, num_calibration_samples=2.0),
        "num_calibration_samples must be an integer",
    ),
    "an output_dir holding files": (
        lambda m, t, d: (d / "mine.txt").write_text("x") and prune.oneshot(m, WANDA, dataset=IDS, output_dir=d),
        "holds files",
    ),
    "a model where a name goes": (lambda m, t, d: prune.load_model(m), "name_or_path must name a model"),
    "a non-string method name": (lambda m, t, d: prune.method_config(3), "name must be a method's name"),
    "float samples for calibration_blocks": (
        lambda m, t, d: prune.calibration_blocks(t, TEXTS, 2.0, 8),
        "samples must be a positive integer",
    ),
    "a string as calibration_blocks' texts": (
        lambda m, t, d: prune.calibration_blocks(t, "one text", 1, 8),
        r"texts is the string 'one text'; pass a list of strings \(\[text\] for one text\)",
    ),
    "recovery of a model that was never pruned": (
        lambda m, t, d: prune.recover(m, {"steps": 1}, IDS, d),
        r"model is not pruned: it carries no MaskPrune masks and its config records no pruning",
    ),
    "recovery with a TrainConfig": (
        lambda m, t, d: prune.recover(m, prune.TrainConfig(steps=1), IDS, d),
        r"config must be a dict of a recipe's recover keys",
    ),
    "recovery of zero steps": (lambda m, t, d: prune.recover(m, {}, IDS, d), "steps: 0, so recovery would train"),
    "recovery from text": (lambda m, t, d: prune.recover(m, {"steps": 1}, TEXTS, d), "data is text"),
    "recovery into a number": (lambda m, t, d: prune.recover(m, {"steps": 1}, IDS, 7), "run_dir must be a path"),
    "recovery masks beside attached ones": (
        lambda m, t, d: (
            prune.attach(m, WANDA, calibration=IDS)
            or prune.recover(m, {"steps": 1}, IDS, d, masks={"model.layers.0.mlp.up_proj": None})
        ),
        "leave masks out",
    ),
    "recovery masks of the wrong shape": (
        lambda m, t, d: prune.recover(
            m, {"steps": 1}, IDS, d, masks={"model.layers.0.mlp.up_proj": torch.ones(3, 3, dtype=torch.bool)}
        ),
        r"must be a bool tensor of the layer's weight shape \[128, 64\].*torch.bool tensor of shape \[3, 3\]",
    ),
    "recovery masks on a layer that is no linear": (
        lambda m, t, d: prune.recover(m, {"steps": 1}, IDS, d, masks={"model.embed_tokens": torch.ones(1)}),
        "'model.embed_tokens', which is no linear layer",
    ),
    "recovery of a model whose masks gate structures": (
        lambda m, t, d: (
            prune.attach(m, prune.method_config("structured", target={"params": 0.3}), calibration=IDS)
            or prune.recover(m, {"steps": 1}, IDS, d)
        ),
        r"Export a structural method's model first \(prune\.export\)",
    ),
    "2:4 kernels on a model without 2:4 weights": (
        lambda m, t, d: prune.to_semi_structured(m),
        "no nn.Linear whose weight is 2:4 sparse",
    ),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS, ids=list(BAD_ARGUMENTS))
def test_a_wrong_argument_is_a_user_input_error_naming_it(case, tiny_dir, tmp_path):
    call, message = BAD_ARGUMENTS[case]
    _, tokenizer = prune.load_model(str(tiny_dir))
    with pytest.raises(prune.UserInputError, match=message):
        call(make_tiny_llama(), tokenizer, tmp_path)


def test_2of4_kernels_are_refused_clearly_on_cpu(tiny_dir):
    pruned = prune.oneshot(fresh(tiny_dir), prune.method_config(**MAGNITUDE))
    with pytest.raises(prune.UserInputError, match=r"model is on cpu; PyTorch's 2:4 kernels run on NVIDIA GPUs"):
        prune.to_semi_structured(pruned)


# ------------------------------------------------------------------------------ llm-compressor's key names


def test_llm_compressor_spellings_are_read_as_ours_and_written_canonically():
    ours = prune.method_config("sparsegpt", sparsity="2:4", blocksize=64, dampening=0.05)
    theirs = {"mask_structure": "2:4", "sparsity": 0.5, "block_size": 64, "dampening_frac": 0.05}
    assert prune.method_config("sparsegpt", **theirs) == ours
    resolved = parse_recipe({"method": {"name": "sparsegpt", **theirs}}).to_dict()["method"]
    assert resolved == ours.model_dump(mode="json")  # what recipe.yaml and masks.json hold
    assert prune.method_config("wanda", mask_structure="1:4").sparsity == "3:4"  # theirs zeroes N of M, ours keeps N
    assert prune.method_config("wanda", mask_structure="0:0", sparsity=0.6).sparsity == 0.6  # 0:0: unstructured
    for fields, message in (
        ({"mask_structure": "2:4", "sparsity": 0.7}, "drop one of the two"),
        ({"block_size": 64, "blocksize": 32}, "give only one of them"),
        ({"mask_structure": "0:0"}, "give sparsity as a fraction"),
    ):
        with pytest.raises(prune.UserInputError, match=message):
            prune.method_config("sparsegpt", **fields)
    with pytest.raises(prune.UserInputError, match="unknown key 'block_size'"):  # wanda has no block size
        prune.method_config("wanda", block_size=64)


# ----------------------------------------------------------------------------------- the real model (SmolLM2)


@pytest.mark.integration
def test_oneshot_on_smollm2_from_each_kind_of_data_saves_what_plain_transformers_loads(smollm2_dir, tmp_path):
    texts = docs_text(100_000).split("\n\n")
    _, tokenizer = prune.load_model(str(smollm2_dir))
    config = prune.method_config("wanda", sparsity="2:4")
    drawn = {"num_calibration_samples": 4, "seq_len": 64}
    table = datasets.Dataset.from_dict({"text": texts})
    from_dataset = prune.oneshot(str(smollm2_dir), config, dataset=table, output_dir=tmp_path / "out", **drawn)
    from_texts = prune.oneshot(str(smollm2_dir), config, dataset=texts, **drawn)
    blocks = prune.calibration_blocks(tokenizer, texts, 4, 64)
    from_blocks = prune.oneshot(str(smollm2_dir), config, dataset=blocks)
    assert_same_weights(from_dataset, from_texts)
    assert_same_weights(from_dataset, from_blocks)
    del from_texts, from_blocks
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    targets = block_linears(plain)
    assert len(targets) == 30 * 7
    assert_two_four(plain, targets)
    zeros = sum(int((plain.get_submodule(name).weight == 0).sum()) for name in targets)
    assert zeros / sum(plain.get_submodule(name).weight.numel() for name in targets) >= 0.5
    torch.testing.assert_close(logits(plain, blocks[:1]), logits(from_dataset, blocks[:1]))
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["pruning"]["method"], saved["pruning"]["sparsity"]) == ("wanda", "2:4")
