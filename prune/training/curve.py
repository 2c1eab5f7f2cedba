"""train_curve.png: the held-out score of the hard masks against training tokens or images."""

from __future__ import annotations

import json
from pathlib import Path

from prune.core.figures import is_finite_number, save_figure, subplots


def training_curve(log_path: Path, per_step: int, unit: str, path: Path) -> Path | None:
    """Held-out score of the hard masks vs training `unit`s (tokens, images: `per_step` per optimizer step),
    from the trainer's train_log.jsonl eval records; step 0 is the starting masks (e.g. the prior)."""
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    points = [
        (r["step"], key, r[key]) for r in records for key in r if key.startswith("eval_") and is_finite_number(r[key])
    ]
    if not points:
        return None
    metric = points[0][1]
    fig, ax = subplots(figsize=(7, 4.5))
    ax.plot([step * per_step for step, _, _ in points], [value for _, _, value in points], marker="o")
    ax.set_xlabel(f"training {unit}")
    ax.set_ylabel(f"held-out {metric.removeprefix('eval_')}")
    ax.set_title("Held-out score of the hard masks during training")
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)
