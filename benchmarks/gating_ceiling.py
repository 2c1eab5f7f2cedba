"""How well can a cheap per-token predictor choose a frozen SwiGLU FFN's neurons at all? An offline probe.

For a few decoder layers of SmolLM2-135M, the FFN inputs of `--train-blocks` training windows and
`--heldout-blocks` held-out windows are cached from the dense model. Targets are the mass rule at r (the BCE
targets of `method.name: gating`). Fitted on the cached training tokens and measured on the held-out ones:
- linear (full rank) and linear (rank `--rank`): the FTWT predictor, trained by BCE with Adam for `--epochs`
  passes -- the best a linear map can do here, with far more tokens than the trainer sees;
- an MLP (one ReLU layer of `--mlp-width`, costlier than any predictor worth running): is nonlinearity enough?
- low-rank activation estimate: h^ = act(gate(P P^T x)) * up(P P^T x), P the top `--rank` principal directions
  of the cached inputs (a nonlinear predictor at rank-`--rank` cost), keeping the top-k(x) of |h^|;
- random, and the oracle itself (the top-k(x) of |h| from the full activations).
Figures per layer: neurons kept, recall of the oracle's choice at the same count, and the FFN output's
relative error ||y_kept - y|| / ||y|| (mean over tokens). Writes the `gating_ceiling` section of RESULTS.md.

    python benchmarks/gating_ceiling.py --threads 1      # 269 s on one core (RESULTS.md, `gating_ceiling`)
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import write_section  # noqa: E402
from prune.data.text import prepare  # noqa: E402
from prune.methods.gating.layers import oracle_overlap  # noqa: E402
from prune.methods.gating.predictor import mass_labels  # noqa: E402
from prune.runs.loading import load_model  # noqa: E402


@torch.no_grad()
def cache_inputs(model, layers: list[int], blocks: Tensor, batch: int = 8) -> dict[int, Tensor]:
    """The FFN input of every token of `blocks` at each layer in `layers`: {layer: [tokens, hidden]}."""
    cached: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    hooks = [
        model.model.layers[layer].mlp.register_forward_hook(
            lambda module, args, out, layer=layer: cached[layer].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for layer in layers
    ]
    try:
        for start in range(0, len(blocks), batch):
            model(input_ids=blocks[start : start + batch])
    finally:
        for hook in hooks:
            hook.remove()
    return {layer: torch.cat(parts) for layer, parts in cached.items()}


def activations(mlp: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


def make_predictor(kind: str, width: int | None, hidden: int, channels: int) -> nn.Module:
    """linear (full rank when width is None, else a rank-`width` pair) or mlp (one ReLU layer of `width`)."""
    if kind == "mlp":
        return nn.Sequential(nn.Linear(hidden, width), nn.ReLU(), nn.Linear(width, channels))
    if width is None:
        return nn.Linear(hidden, channels)
    return nn.Sequential(nn.Linear(hidden, width, bias=False), nn.Linear(width, channels))


def fit(net: nn.Module, x: Tensor, targets: Tensor, epochs: int) -> nn.Module:
    """BCE against the targets on cached tokens, minibatches of 512, Adam lr 1e-3."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        for rows in torch.randperm(len(x)).split(512):
            loss = F.binary_cross_entropy_with_logits(net(x[rows]), targets[rows].float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


def top_counts(scores: Tensor, counts: Tensor) -> Tensor:
    """Bool: per row, the `counts[row]` highest scores."""
    rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
    return rank < counts.unsqueeze(-1)


def quality(keep: Tensor, h: Tensor, down: Tensor) -> dict:
    """Kept share, recall of the oracle's top-|h| choice at the same count, FFN output relative error."""
    counts = keep.sum(dim=-1)
    y = h @ down.T
    error = ((h * keep) @ down.T - y).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-12)
    recall = oracle_overlap(h.abs(), keep, counts) / counts.sum().clamp_min(1)
    return {"keep": float(keep.float().mean()), "recall": float(recall), "output_error": float(error.mean())}


def probe_layer(mlp: nn.Module, train_x: Tensor, test_x: Tensor, args) -> dict:
    h_train, h_test = activations(mlp, train_x), activations(mlp, test_x)
    targets_train, targets_test = mass_labels(h_train.abs(), args.threshold), mass_labels(h_test.abs(), args.threshold)
    counts = targets_test.sum(dim=-1)
    down = mlp.down_proj.weight.detach()
    generator = torch.Generator().manual_seed(args.seed)
    rows = {
        "oracle": quality(targets_test, h_test, down),
        "random": quality(top_counts(torch.rand(h_test.shape, generator=generator), counts), h_test, down),
    }
    predictors = (
        ("linear, full rank", "linear", None),
        (f"linear, rank {args.rank}", "linear", args.rank),
        (f"MLP, one ReLU layer of {args.mlp_width}", "mlp", args.mlp_width),
    )
    for label, kind, width in predictors:
        torch.manual_seed(args.seed)
        net = fit(make_predictor(kind, width, train_x.shape[1], h_train.shape[1]), train_x, targets_train, args.epochs)
        with torch.no_grad():
            rows[label] = quality(net(test_x) > 0, h_test, down)
    covariance = train_x.T @ train_x / len(train_x)
    basis = torch.linalg.eigh(covariance).eigenvectors[:, -args.rank :]
    estimate = activations(mlp, test_x @ basis @ basis.T).abs()
    rows[f"low-rank activation estimate, rank {args.rank}"] = quality(top_counts(estimate, counts), h_test, down)
    return rows


def render(result: dict) -> str:
    a = result["args"]
    lines = [
        "## Gating ceiling: how predictable are a frozen SwiGLU FFN's neurons?",
        "",
        f"Command: `{result['command']}`",
        "",
        (
            f"SmolLM2-135M, FFN inputs cached from the dense model: {result['train_tokens']:,} training tokens "
            f"(fit) and {result['heldout_tokens']:,} held-out tokens (measured), mass rule r={a['threshold']}. "
            f"Predictors trained by BCE, {a['epochs']} passes (far more tokens than the gating benchmark's "
            "trainer sees). Recall: share of the chosen neurons among the oracle's top-|h| choice of the same "
            "count (random = the kept share). Output error: ||y_kept - y|| / ||y|| of the FFN output."
        ),
        "",
        "| layer | predictor | neurons kept | recall of oracle | FFN output error |",
        "|---|---|---|---|---|",
    ]
    for layer, rows in result["layers"].items():
        for label, row in rows.items():
            lines.append(
                f"| {layer} | {label} | {100 * row['keep']:.1f}% | {row['recall']:.3f} | {row['output_error']:.3f} |"
            )
    lines += ["", f"Took {result['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", type=int, default=[3, 15, 27])
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--mlp-width", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-blocks", type=int, default=160)
    parser.add_argument("--heldout-blocks", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    splits = prepare(tokenizer, "embedded-docs")
    train_x = cache_inputs(model, args.layers, splits.train_blocks(args.seq_len)[: args.train_blocks])
    test_x = cache_inputs(model, args.layers, splits.test_blocks(args.seq_len)[: args.heldout_blocks])
    result = {
        "command": "python benchmarks/gating_ceiling.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args),
        "train_tokens": len(train_x[args.layers[0]]),
        "heldout_tokens": len(test_x[args.layers[0]]),
        "layers": {},
    }
    for layer in args.layers:
        result["layers"][layer] = probe_layer(model.model.layers[layer].mlp, train_x[layer], test_x[layer], args)
        print(layer, result["layers"][layer], flush=True)
    result["seconds"] = time.perf_counter() - start
    print(f"wrote {write_section('gating_ceiling', render(result))}")


if __name__ == "__main__":
    main()
