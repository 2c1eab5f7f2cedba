"""benchmarks/gpu_check.py without a GPU (this machine): a clear message, exit 0, nothing run or written; and the
section it writes on a GPU, from figures shaped like `prune run` reports."""

from __future__ import annotations

import subprocess

import pytest

from benchmarks import gpu_check, results


def test_without_a_gpu_it_says_so_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(results, "RESULTS", tmp_path / "RESULTS.md")

    def no_child(*args, **kwargs):
        raise AssertionError("gpu_check started a run without a GPU")

    monkeypatch.setattr(subprocess, "run", no_child)
    assert gpu_check.main([]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
    assert not (tmp_path / "RESULTS.md").exists()


def report(perplexity: float, prune_seconds: float, kernel: dict | None = None) -> dict:
    return {
        "perplexity": {"value": perplexity},
        "timings": {"prune": prune_seconds},
        **({"semi_structured_kernel": kernel} if kernel else {}),
    }


@pytest.mark.parametrize("gpu_perplexity, within", [(20.5, True), (21.0, False)])
def test_section_reports_the_perplexity_verdict_block_times_and_kernel(gpu_perplexity, within):
    kernel = {
        "available": True,
        "layers": 210,
        "dtype": "float16",
        "batch": 8,
        "seq_len": 512,
        "dense_ms": 10.0,
        "sparse_ms": 8.0,
        "speedup": 1.25,
        "max_abs_logit_diff": 0.01,
    }
    figures = {
        "blocks": 30,
        "calibration_samples": 128,
        "cpu_threads": 16,
        "gpu": "GPU",
        "gpus": 1,
        "sparsegpt_gpu": report(gpu_perplexity, 15.0, kernel),
        "sparsegpt_cpu": report(20.0, 300.0),
        "nm_gumbel_tokens_per_s": 5000.0,
        "activation": {
            "available": True,
            "rows": [
                {
                    "shape": "576 -> 1536",
                    "label": "gate/up",
                    "sparsity": 0.5,
                    "dense_ms": 0.02,
                    "triton_ms": 0.025,
                    "speedup": 0.8,
                    "max_abs_error": 1e-3,
                }
            ],
        },
    }
    assert gpu_check.within_tolerance(figures) is within
    body = gpu_check.section(figures, "cmd")
    assert ("NOT within 3%" in body) is not within
    assert "| CPU, float32 | 20.000 | 300.0 | 10.00 |" in body
    assert "| GPU, bfloat16 |" in body and "| 0.50 |" in body
    assert "speed-up 1.25x" in body and "5000 tokens/s" in body and "not run (one GPU)" in body
    assert "| 576 -> 1536 | gate/up | 50% | 0.0200 | 0.0250 | 0.80x (slower) |" in body
