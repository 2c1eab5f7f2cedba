"""The public Python API (`import prune`): the example of docs/python-api.md, on a tiny Llama, by public names only."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import prune
from tests.conftest import save_tiny_model

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
