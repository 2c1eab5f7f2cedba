"""The comparison plots say no more than the rows do: accuracy with lm-eval's standard error on an axis from 0, and
the per-layer plot only where the layers differ (or a sensitivity scan adds its panel)."""

from __future__ import annotations

import pytest

from prune.sweep import plots

pytest.importorskip("matplotlib")


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plots would save, kept open for inspection instead of written."""
    figures = []

    def keep(fig, path):
        figures.append(fig)
        return path

    monkeypatch.setattr(plots, "save_figure", keep)
    return figures


def _row(method: str, sparsity: str, status: str, flops: float, accuracy: float, stderr: float) -> dict:
    return {
        "model": "tiny",
        "method": method,
        "sparsity": sparsity,
        "status": status,
        "flops.pruned": flops,
        "accuracy.lastword": accuracy,
        "accuracy_stderr.lastword": stderr,
    }


ROWS = [
    _row("dense", "0", "dense", 2e9, 0.60, 0.05),
    _row("wanda", "0.5", "done", 1e9, 0.50, 0.04),
    _row("wanda", "2:4", "done", 1e9, 0.45, 0.03),
]


def _error_bars(ax) -> set[tuple[float, float]]:
    """(low, high) of every vertical error bar on the axes."""
    from matplotlib.container import ErrorbarContainer

    spans = set()
    for container in ax.containers:
        if isinstance(container, ErrorbarContainer):
            for collection in container.lines[2]:
                for segment in collection.get_segments():
                    spans.add((round(float(segment[0][1]), 6), round(float(segment[1][1]), 6)))
    return spans


def test_accuracy_points_carry_their_standard_error_on_an_axis_from_zero(tmp_path, drawn):
    assert plots.accuracy_vs_flops(ROWS, tmp_path / "accuracy.png") is not None
    ax = drawn[0].axes[0]
    assert ax.get_ylim()[0] == 0
    assert _error_bars(ax) == {(0.55, 0.65), (0.46, 0.54), (0.42, 0.48)}


def _layers(*sparsities: float) -> dict[str, dict]:
    return {
        f"model.layers.{index}.mlp.up_proj": {"sparsity": value, "weights": 4096}
        for index, value in enumerate(sparsities)
    }


def test_layers_plot_only_where_the_layers_differ(tmp_path, drawn):
    assert plots.layer_profile(_layers(0.5, 0.5, 0.5), tmp_path / "layers.png", "uniform") is None
    assert plots.layer_profile(_layers(0.5, 0.5, 0.5 + 1 / 4096), tmp_path / "layers.png", "rounding") is None
    assert plots.layer_profile(_layers(0.3, 0.5, 0.7), tmp_path / "layers.png", "owl") is not None
    sensitivity = [{"kind": "block", "group": "block 0", "increase": 1.5}]
    assert plots.layer_profile(_layers(0.5, 0.5, 0.5), tmp_path / "layers.png", "uniform", sensitivity) is not None
    assert len(drawn) == 2
