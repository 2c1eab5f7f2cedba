"""`prune.oneshot`: the common job in one call, like llm-compressor's `oneshot(model=, dataset=, recipe=)`.

A model (object or name) and a one-shot method (a config, or a recipe as a path or dict) in; the pruned model,
merged into plain transformers weights, out (and saved when `output_dir` is given). Calibration data comes as a
`datasets.Dataset` or a list of strings (tokenized and drawn here, seeded: prune.data.blocks) or as token blocks;
without any, the calibration `prune run` reads: the recipe's data section, or its defaults (the train part of
CPython's documentation, `embedded-docs`). Learnable methods train, so they keep `attach` + `train`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from prune.core.atomic import save_pretrained_atomic
from prune.core.config import INT64, MethodConfig
from prune.core.errors import UserInputError, described
from prune.data.blocks import texts_of
from prune.data.config import DataConfig
from prune.data.text import TokenSplits, draw_blocks, interleave, prepare_mix, prepare_source, tokenize
from prune.methods.registry import METHODS, get_method, method_config
from prune.models.loading import check_seq_len
from prune.runs import api
from prune.runs.arguments import check_blocks, check_model, check_unmasked
from prune.runs.recipe import Recipe, load_recipe, parse_recipe
from prune.tasks.data_config import DEFAULT_TASK
from prune.training.config import TrainConfig


@dataclass(frozen=True)
class Plan:
    """What a recipe (or a bare method config) asks of `oneshot`: the method, the calibration data's defaults,
    the seed, the task a model name is loaded as, and how many validation windows a method that chooses on them
    (depth) reads (train.eval_windows)."""

    method: MethodConfig
    data: DataConfig
    seed: int
    task: str
    selection_windows: int


def oneshot(
    model: nn.Module | str,
    recipe: MethodConfig | Recipe | dict | str | Path,
    *,
    dataset=None,
    tokenizer=None,
    num_calibration_samples: int | None = None,
    seq_len: int | None = None,
    seed: int | None = None,
    text_column: str = "text",
    selection: Tensor | None = None,
    output_dir: str | Path | None = None,
) -> nn.Module:
    """Prune `model` with a one-shot method and return the pruned model, merged (plain transformers weights;
    config.json records the pruning); with `output_dir`, also saved there with its tokenizer.

    `model`: a model object, or a name `prune.load_model` takes (alias, directory, Hub id). `recipe`: a method
    config (`prune.method_config("sparsegpt", sparsity="2:4")`), a method section as a dict, or a recipe (a
    YAML path or a dict with a `method` section), whose `data.calibration_samples`, `data.seq_len` and `seed` are
    the defaults of the arguments below. `dataset`: a datasets.Dataset (its `text_column`), a list of strings, or
    token blocks [samples, seq_len]; None: the recipe's data source (default: embedded-docs). Text is tokenized
    with `tokenizer` (a model given by name brings its own) into one stream, and `num_calibration_samples` blocks
    of `seq_len` tokens are drawn from it with `seed`; token blocks are used whole unless
    `num_calibration_samples` asks for fewer. `selection`: token blocks a method that chooses on validation data
    (depth, with candidates > 1) chooses on; None: the validation part of the recipe's data source when
    calibration reads it (`train.eval_windows` windows; never the part calibration draws from). `output_dir` must
    be new or empty: nothing is overwritten.
    """
    plan = _plan(recipe)
    spec = get_method(plan.method.name)
    if spec.kind != "oneshot":
        oneshot_methods = ", ".join(sorted(name for name, other in METHODS.items() if other.kind == "oneshot"))
        raise UserInputError(
            f"recipe names {spec.name}, which learns its masks by training: more than one call can do; use "
            f"prune.attach + prune.train (or `prune run`). One-shot methods: {oneshot_methods}."
        )
    output = _output(output_dir)
    if isinstance(model, (str, Path)):
        model, loaded_tokenizer = api.load_model(str(model), task=plan.task)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    check_model(model)
    check_unmasked(model)
    calibration = source = None
    if spec.needs_calibration:
        calibration, source = _calibration(
            model, tokenizer, dataset, plan, num_calibration_samples, seq_len, seed, text_column
        )
    if selection is not None:
        selection = check_blocks(selection, model, "selection")
    elif spec.needs_selection and source is not None:  # what `prune run` chooses on, never calibration's part
        selection = source.validation_blocks(calibration.shape[1])[: plan.selection_windows]
    api.attach(model, plan.method, calibration, selection=selection)
    pruned = api.export(model, plan.method)
    if output is not None:
        save_pretrained_atomic(output, pruned, tokenizer)
    return pruned


def _plan(recipe) -> Plan:
    """The method and the calibration defaults of whatever `recipe` is (errors name the argument)."""
    if isinstance(recipe, MethodConfig):
        return Plan(recipe, DataConfig(), 0, DEFAULT_TASK, TrainConfig().eval_windows)
    if isinstance(recipe, dict) and "method" not in recipe:
        if "name" not in recipe:
            raise UserInputError(
                "recipe is a dict with neither `method` (a recipe) nor `name` (a method section), e.g. "
                "{'name': 'sparsegpt', 'sparsity': '2:4'}."
            )
        fields = {key: value for key, value in recipe.items() if key != "name"}
        return Plan(method_config(recipe["name"], **fields), DataConfig(), 0, DEFAULT_TASK, TrainConfig().eval_windows)
    if isinstance(recipe, dict):
        recipe = parse_recipe(recipe)
    elif isinstance(recipe, (str, Path)):
        if not Path(recipe).is_file():
            raise UserInputError(
                f"recipe {str(recipe)!r} is no file; pass a recipe YAML path, a dict, or a method config such as "
                f"prune.method_config({Path(recipe).name!r}, sparsity='2:4')."
            )
        recipe = load_recipe(recipe)
    elif not isinstance(recipe, Recipe):
        raise UserInputError(
            "recipe must be a method config (prune.method_config(...)), a recipe path or a dict, got "
            f"{described(recipe)}."
        )
    data = recipe.data if isinstance(recipe.data, DataConfig) else DataConfig()
    return Plan(recipe.method, data, recipe.seed, recipe.task, recipe.train.eval_windows)


def _output(output_dir) -> Path | None:
    """The directory the pruned model goes to, checked before any work: new or empty, never overwritten."""
    if output_dir is None:
        return None
    if not isinstance(output_dir, (str, Path)):
        raise UserInputError(f"output_dir must be a path (str or pathlib.Path), got {described(output_dir)}.")
    path = Path(output_dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserInputError(
            f"output_dir {str(path)!r} is {'a file' if not path.is_dir() else 'a directory that holds files'}; "
            "prune.oneshot writes only into a new or empty directory, so pass another one."
        )
    return path


def _calibration(
    model: nn.Module,
    tokenizer,
    dataset,
    plan: Plan,
    samples: int | None,
    seq_len: int | None,
    seed: int | None,
    text_column: str,
) -> tuple[Tensor, TokenSplits | None]:
    """Token blocks [samples, seq_len] from `dataset` (or the plan's data source), drawn with the seed; and the
    source's train / validation / test parts when the blocks came from it (else None)."""
    seed = plan.seed if seed is None else _count("seed", seed, minimum=0)
    if samples is not None:
        samples = _count("num_calibration_samples", samples)
    if isinstance(dataset, Tensor):
        blocks = check_blocks(dataset, model, "dataset")
        if seq_len is not None and seq_len != blocks.shape[1]:
            raise UserInputError(
                f"seq_len is {seq_len} but the dataset's token blocks are {blocks.shape[1]} tokens long; leave "
                "seq_len out for token blocks."
            )
        rows = blocks.flatten()
        return (blocks if samples is None else draw_blocks(rows, samples, blocks.shape[1], seed, "dataset")), None
    texts = texts_of(dataset, text_column) if dataset is not None else None
    samples = plan.data.calibration_samples if samples is None else samples
    seq_len = plan.data.seq_len if seq_len is None else _count("seq_len", seq_len)
    if not callable(tokenizer):
        raise UserInputError(
            "tokenizer is needed to turn the calibration text into token blocks; pass tokenizer= (e.g. the one "
            f"prune.load_model returns), or token blocks as dataset (got tokenizer {described(tokenizer)})."
        )
    name = getattr(getattr(model, "config", None), "name_or_path", None) or "the model"
    if hasattr(model, "config"):
        check_seq_len(model, seq_len, name, "seq_len")
    if texts is not None:
        blocks = draw_blocks(tokenize(tokenizer, texts), samples, seq_len, seed, "dataset")
        return check_blocks(blocks, model, "dataset"), None
    data = plan.data.model_copy(update={"seq_len": seq_len})
    source = interleave(prepare_source(tokenizer, data), prepare_mix(tokenizer, data), seq_len, data.source_share)
    blocks = source.calibration_blocks(samples, seq_len, seed)
    return check_blocks(blocks, model, f"the calibration text ({plan.data.source})"), source


def _count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value < INT64:
        raise UserInputError(f"{name} must be an integer from {minimum} to 2**63 - 1, got {described(value)}.")
    return value
