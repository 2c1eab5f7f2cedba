"""The one trainer of every training stage: learnable masks over frozen weights, and recovery of the kept weights
after pruning (prune.recovery). What trains is the stage's decision (its Objective's `trainable`); everything else
stays frozen.

Reads top to bottom like a nanoGPT loop: seeded batches, forward, task loss + the method's regularizer,
backward (averaged across processes by accelerate), clip, AdamW step, cosine schedule; every `log_every`
steps a log line (tqdm + train_log.jsonl), every `eval_every` steps (and before the first) the held-out
score of the hard masks (the best and last trained parameters kept), every `checkpoint_every` steps an atomic
checkpoint. A stage writes into its own sub-directory of the run (`train/` for masks, `recover/` for recovery).
Ctrl-C (or SIGTERM) finishes the step in progress, checkpoints it and stops (prune.training.interrupt), so
`--resume` continues exactly as the uninterrupted run would have; a non-finite loss, gradient or parameter
stops training before anything of its step is saved (prune.training.finite).
The same code runs on CPU, one GPU or many: `accelerate launch -m prune.cli run RECIPE`, with DDP or with
FSDP (sharded masks, see prune.training.sharded; accelerate config files in recipes/accelerate/).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import send_to_device
from torch import Tensor, nn
from torch.utils.data import default_collate
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from eval.metric_errors import NonFiniteError
from prune.core import rng
from prune.core.atomic import naming, write_safetensors_atomic, write_text_atomic
from prune.core.distributed import whole
from prune.masks.base import Objective, hard_masks, wrappers
from prune.training.checkpoint import load_checkpoint, load_params, save_checkpoint
from prune.training.config import TrainConfig
from prune.training.finite import FiniteGuard
from prune.training.interrupt import stop_at_step_boundary
from prune.training.sharded import (
    copy_into,
    finish_backward,
    full,
    full_optimizer_state,
    gather,
    in_model_order,
    is_sharded,
    model_names,
    prepare_sharded,
    rebind,
    sharded_copy,
)

TaskLoss = Callable[[nn.Module, Any], Tensor]
Evaluate = Callable[[nn.Module], float]


def lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """Next-token cross-entropy of a causal LM on a [batch, seq] block of token ids."""
    return model(input_ids=batch, labels=batch).loss


@dataclass
class TrainResult:
    steps: int
    best_score: float | None  # lowest held-out score (perplexity, error) of the periodic evaluations, when evaluated
    best_step: int | None
    seconds: float
    processes: int = 1  # how many processes trained (an `accelerate launch`: each took its share of every batch)


def trainable_parameters(model: nn.Module, objective: Objective) -> dict[str, nn.Parameter]:
    """Freeze everything, then unfreeze what the stage trains (`objective.trainable`: the masks' parameters for
    mask training, LoRA factors or kept weights for recovery): nothing else can move."""
    model.requires_grad_(False)
    params = objective.trainable(model)
    for param in params.values():
        param.requires_grad_(True)
    assert params, f"{objective.label}: the model has nothing to train"
    return params


def param_groups(params: dict[str, nn.Parameter], lr: float) -> list[dict]:
    """One AdamW group per `lr_scale` attribute a method set on its parameters (default 1): a method whose
    parameters need different step sizes (e.g. Lagrange multipliers) says so without its own optimizer."""
    groups: dict[float, list[nn.Parameter]] = {}
    for param in params.values():
        groups.setdefault(float(getattr(param, "lr_scale", 1.0)), []).append(param)
    return [{"params": members, "lr": lr * scale} for scale, members in sorted(groups.items())]


def set_mask_training(model: nn.Module, training: bool) -> None:
    """Masks in training mode (soft values) while the frozen model stays in eval mode (no dropout, fixed BN)."""
    model.eval()
    for wrapper in wrappers(model).values():
        wrapper.mask.train(training)


def make_batch(data: Tensor | Sequence, rows: Tensor, device) -> Any:
    """Rows of a Tensor (token blocks) are sliced at once; rows of any other indexable dataset (e.g. dicts of
    pixel_values and labels) are collated with torch's default_collate. Either way the batch lands on `device`."""
    if isinstance(data, Tensor):
        return data[rows].to(device)
    return send_to_device(default_collate([data[int(index)] for index in rows]), device)


def batch_indices(step: int, micro: int, config: TrainConfig, rank: int, world: int, count: int) -> Tensor:
    """The sample indices of one micro-batch: a seeded permutation per epoch, sharded over processes."""
    start = (step * config.grad_accum + micro) * config.batch_size * world + rank * config.batch_size
    positions = [divmod(start + i, count) for i in range(config.batch_size)]
    orders = {
        epoch: torch.randperm(count, generator=torch.Generator().manual_seed(config.seed + epoch))
        for epoch in {epoch for epoch, _ in positions}
    }
    return torch.stack([orders[epoch][offset] for epoch, offset in positions])


def resolved_precision(config: TrainConfig, device: torch.device) -> str:
    """`train.mixed_precision: auto` follows the device the run trains on: bf16 on a CUDA GPU with bfloat16, none
    elsewhere (CPU autocast to bf16 is slower than float32 on most CPUs)."""
    if config.mixed_precision != "auto":
        return config.mixed_precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(config: TrainConfig, device: torch.device | None = None) -> Accelerator:
    """The accelerator of a run on `device` (runtime.device): accelerate's CPU mode for `cpu`, so a machine with a
    GPU still trains where the recipe says; otherwise accelerate's device (None: the first accelerator, else the
    CPU; under `accelerate launch` each process's own). `train.mixed_precision: auto` resolves to that device."""
    if device is not None and device.type == "cpu":
        return Accelerator(cpu=True, mixed_precision=resolved_precision(config, device))
    return Accelerator(mixed_precision=resolved_precision(config, device or PartialState().device))


def _logged_step(line: str) -> int | None:
    """The step of a train_log.jsonl line; None for a line a crash cut short mid-write."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if type(step) is int else None


class _Log:
    """train_log.jsonl plus the share of hard masks that changed since the previous log line."""

    def __init__(self, path: Path, resume_step: int):
        """Keep the lines of the steps the checkpoint covers; drop later ones and a line cut short by a crash."""
        self.path = path
        steps = [(line, _logged_step(line)) for line in self._lines()]
        kept = [line for line, step in steps if step is not None and step <= resume_step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))
        self.previous: dict[str, Tensor] | None = None

    def _lines(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.exists() else []

    def changed_fraction(self, model: nn.Module) -> float | None:
        current = {name: mask.detach().clone() for name, mask in hard_masks(model).items()}
        previous, self.previous = self.previous, current
        if previous is None:
            return None
        changed = sum(int((current[name] != previous[name]).sum()) for name in current)
        return changed / max(1, sum(mask.numel() for mask in current.values()))

    def write(self, record: dict) -> None:
        """Append one line (a line a full disk cuts short is dropped on resume, see __init__)."""
        try:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as error:  # a write or flush error names no file
            raise naming(error, self.path) from error


def train(
    model: nn.Module,
    objective: Objective,
    data: Tensor | Sequence,
    config: TrainConfig,
    run_dir: Path,
    *,
    task_loss: TaskLoss = lm_loss,
    evaluate: Evaluate | None = None,
    eval_metric: str = "perplexity",
    resume: bool = False,
    accelerator: Accelerator | None = None,
    device: torch.device | None = None,
    shaping: Sequence[str] = (),
    stage: str = "train",
) -> TrainResult:
    """Train what `objective.trainable` names on rows of `data` (a Tensor of token blocks, or any indexable
    dataset whose rows collate into the batch `task_loss` takes). `stage` is the recipe section whose settings
    `config` holds (train for masks, recover for recovery): checkpoints, logs and the best and last trained
    parameters go to `run_dir/<stage>/`, and a divergence message names its settings. `evaluate` returns a
    held-out score where lower is better, logged as `eval_<eval_metric>`. Without an `accelerator`, training runs
    on `device` (runtime.device; None: accelerate's choice, the first accelerator). `shaping`: the run's other
    settings that shape the loss, named when it turns non-finite (prune.training.finite)."""
    accelerator = accelerator or make_accelerator(config, device)
    plain, sharded = model, is_sharded(accelerator)
    if sharded:  # FSDP shards a copy; `plain` (the caller's model) receives the gathered masks
        model, objective = sharded_copy(model, objective)
    params = trainable_parameters(model, objective)
    names = model_names(params, model)
    optimizer = torch.optim.AdamW(param_groups(params, config.lr), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(config.warmup_fraction * config.steps), config.steps)
    prepare = partial(prepare_sharded, accelerator) if sharded else accelerator.prepare
    model, optimizer = prepare(model, optimizer)
    params = rebind(params, accelerator.unwrap_model(model), names)
    plain_params = rebind(params, plain, names)  # the same parameters unless sharded
    clipped_params = in_model_order(params, accelerator.unwrap_model(model))
    train_dir = run_dir / stage
    train_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = train_dir / "checkpoints"
    state = load_checkpoint(checkpoints, params, optimizer, scheduler) if resume else {"step": 0}
    step, best = state["step"], state.get("best", {"score": None, "step": None})
    log = _Log(train_dir / "train_log.jsonl", step) if accelerator.is_main_process else None
    guard = FiniteGuard(
        checkpoints, config.lr, step if resume else None, partial(_any_process, accelerator), shaping, stage
    )
    if not resume:
        rng.seed_all(config.seed)  # on resume the checkpoint restored every generator

    def checkpoint() -> None:
        masks, optimizer_state = gather(params), full_optimizer_state(optimizer)  # every process gathers
        if accelerator.is_main_process:
            save_checkpoint(checkpoints, step, masks, optimizer_state, scheduler, {"best": best})
        accelerator.wait_for_everyone()
        guard.saved_step = step

    start, tokens, window_start = time.perf_counter(), 0, time.perf_counter()
    rate_key = "tokens_per_s" if isinstance(data, Tensor) else "samples_per_s"
    progress = tqdm(total=config.steps, initial=step, desc=objective.label, disable=not accelerator.is_main_process)
    if evaluate is not None and config.eval_every and step == 0:  # the starting masks (e.g. the prior) compete too
        best = _evaluate(
            model, objective, accelerator, evaluate, step, best, train_dir, params, log, guard, eval_metric
        )
    set_mask_training(model, True)
    with stop_at_step_boundary() as stop:
        rewind_to, updating = rng.capture(), False
        try:
            while step < config.steps and not _any_process(accelerator, stop.signal is not None):
                # until the update nothing but the random state moves: an interrupt before it rewinds to here
                rewind_to, updating = rng.capture(), False
                schedule = objective.begin_step(step, config.steps)
                try:
                    parts, seen = _accumulate_gradients(model, objective, data, config, accelerator, step, task_loss)
                except RuntimeError as error:  # torch refusing a scale beyond float32 (e.g. 1 / a tiny temperature)
                    if "overflow" not in str(error):
                        raise
                    raise guard.error(step + 1, f"a value overflowed float32 ({error})") from None
                tokens += seen
                clipped = (
                    accelerator.clip_grad_norm_(clipped_params, config.max_grad_norm) if config.max_grad_norm else None
                )
                guard.before_update(step + 1, parts["loss"], params, clipped)
                updating = True
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                guard.after_update(step, params)
                progress.update(1)

                if step % config.log_every == 0 or step == config.steps:
                    elapsed, window_start = time.perf_counter() - window_start, time.perf_counter()
                    record = {
                        "step": step,
                        **parts,
                        **schedule,
                        "lr": scheduler.get_last_lr()[0],
                        rate_key: tokens / elapsed,
                    }
                    tokens = 0
                    if sharded:  # the plain model's masks (the log reads whole masks) follow the shards
                        copy_into(plain_params, gather(params))
                    if log is not None:
                        record["changed"] = log.changed_fraction(plain if sharded else accelerator.unwrap_model(model))
                        guard.record(step, record)
                        log.write(record)
                        progress.set_postfix(
                            {
                                key: f"{value:.4g}"
                                for key, value in record.items()
                                if isinstance(value, float) and key != "lr"
                            }
                        )
                if (
                    evaluate is not None
                    and config.eval_every
                    and (step % config.eval_every == 0 or step == config.steps)
                ):
                    best = _evaluate(
                        model, objective, accelerator, evaluate, step, best, train_dir, params, log, guard, eval_metric
                    )
                if step % config.checkpoint_every == 0 or step == config.steps:
                    checkpoint()
        except KeyboardInterrupt:  # raised mid-step: a second signal, or code that raises it itself
            # before the update the parameters are those of the last finished step: checkpoint it exactly (with
            # one process: a checkpoint is collective, and the others are not here)
            if not updating and accelerator.num_processes == 1:
                rng.restore(rewind_to)
                if guard.saved_step != step:
                    checkpoint()
            raise  # otherwise the last periodic checkpoint stays in force
        finally:
            progress.close()
        if _any_process(accelerator, stop.signal is not None):
            if guard.saved_step != step:
                checkpoint()
            raise KeyboardInterrupt(
                f"{stop.signal or 'a stop signal to another process'}: stopped after step "
                f"{step}, checkpoint in {checkpoints}; continue with --resume"
            )
    set_mask_training(model, False)
    last = gather(params)
    if sharded:
        copy_into(plain_params, last)
    if accelerator.is_main_process:
        _save_tensors(train_dir / "last.safetensors", last)
    return TrainResult(step, best["score"], best["step"], time.perf_counter() - start, accelerator.num_processes)


def keep_best(model: nn.Module, objective: Objective, run_dir: Path, result: TrainResult, stage: str = "train"):
    """Load the parameters of the best periodic evaluation (when there was one) back into the model."""
    best = run_dir / stage / "best.safetensors"
    if result.best_step is not None and best.is_file():
        load_params(best, trainable_parameters(model, objective), "Start the run over with --overwrite.")


def _accumulate_gradients(model, objective, data, config, accelerator, step, task_loss) -> tuple[dict, int]:
    """Forward and backward of the step's micro-batches, gradients summed in `.grad`; returns the loss parts for
    the log and the tokens (or samples) seen by all processes."""
    parts = {"loss": 0.0, "task_loss": 0.0, "regularizer": 0.0}
    seen = 0
    custom_backward = objective.backward
    for micro in range(config.grad_accum):
        rows = batch_indices(step, micro, config, accelerator.process_index, accelerator.num_processes, len(data))
        batch = make_batch(data, rows, accelerator.device)
        with accelerator.autocast():
            if custom_backward is None:
                task = task_loss(model, batch)
                regularizer = whole(objective.regularizer(accelerator.unwrap_model(model)))  # a sum over shards
            else:  # the method computes and accumulates its own gradients (e.g. gradient dropout)
                task, regularizer = custom_backward(model, batch, task_loss, accelerator, 1.0 / config.grad_accum)
            loss = (task + regularizer) / config.grad_accum
        if custom_backward is None:
            accelerator.backward(loss)
            if is_sharded(accelerator) and not task.requires_grad:  # only the regularizer trains: see finish_backward
                finish_backward(model)
        parts["loss"] += loss.item()
        parts["task_loss"] += task.item() / config.grad_accum
        parts["regularizer"] += float(regularizer.detach()) / config.grad_accum
        seen += (batch.numel() if isinstance(batch, Tensor) else len(rows)) * accelerator.num_processes
    return parts, seen


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any process, so that all of them take the same branch (a stop signal that
    reached one rank, a NaN in one rank's shard); a collective when there are several processes."""
    if accelerator.num_processes == 1:
        return flag
    count = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(count.item() > 0)


def _evaluate(
    model,
    objective,
    accelerator,
    evaluate,
    step,
    best,
    train_dir,
    params,
    log,
    guard: FiniteGuard,
    eval_metric="perplexity",
) -> dict:
    """Score the hard masks on held-out data (main process; every process under FSDP, whose forward is
    collective); keep the best masks' parameters among those the objective calls selectable (e.g. meeting a
    size budget)."""
    sharded = is_sharded(accelerator)
    if sharded or accelerator.is_main_process:
        set_mask_training(model, False)
        try:
            score = evaluate(accelerator.unwrap_model(model))
        except NonFiniteError as error:
            raise guard.error(step, f"the held-out evaluation failed ({error})") from None
        set_mask_training(model, True)
        selectable = objective.selectable()  # may read whole masks: a collective under FSDP
    masks = gather(params) if sharded else params
    if accelerator.is_main_process:
        record = {"step": step, f"eval_{eval_metric}": score, "selectable": selectable}
        guard.record(step, record)
        if log is not None:
            log.write(record)
        if selectable and (best["score"] is None or score < best["score"]):
            best = {"score": score, "step": step}
            _save_tensors(train_dir / "best.safetensors", masks)
    accelerator.wait_for_everyone()
    return best


def _save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    write_safetensors_atomic(path, {name: full(tensor) for name, tensor in tensors.items()})
