"""Scale benchmark (issue 12): cost of one-shot 2:4 pruning of real architectures, in memory and streamed from disk.

    python benchmarks/scale.py --presets smollm2-135m smollm2-360m --work /tmp/scale   # writes the `scale` section

Random bfloat16 weights (quality is meaningless; only cost is reported): each model is generated from its real
config shard by shard, every tensor from its own generator seeded by (seed, name), so generation never holds the
model. Each case runs in a fresh subprocess (`--case`) so its peak RSS is its own, with one torch thread.
Calibration: 8 x 128 random tokens. The streamed output is checked tensor by tensor to be exactly 2:4.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

PRESETS = {  # the models' own config.json numbers
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
}


def generate(directory: Path, preset: str, seed: int = 0) -> None:
    """Seeded random bfloat16 checkpoint of `preset`, written tensor by tensor."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    from prune.models.shards import ShardedWriter

    if (directory / "model.safetensors.index.json").is_file():
        return
    config = LlamaConfig(**PRESETS[preset], dtype="bfloat16")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in model.state_dict().items() if name not in tied]
    config.save_pretrained(directory)
    with ShardedWriter(directory, specs, max_shard_bytes=2 * 1024**3) as writer:
        for name, dtype, shape in specs:
            if name.endswith("norm.weight"):
                tensor = torch.ones(shape, dtype=dtype)
            else:
                key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1
                tensor = torch.empty(shape, dtype=dtype).normal_(0, 0.02, generator=torch.Generator().manual_seed(key))
            writer.write(name, tensor)


def run_case(source: Path, out: Path, method: str, mode: str) -> dict:
    """One pruning run in this process: streamed from disk, or the model loaded whole (then saved)."""
    from transformers import AutoModelForCausalLM

    from prune.calibration.streaming import stream_prune
    from prune.methods.oneshot import method as oneshot
    from prune.models.blocks import weight_matrix

    torch.set_num_threads(1)
    config = (oneshot.WandaConfig if method == "wanda" else oneshot.SparseGPTConfig)(name=method, sparsity="2:4")
    calibration = torch.randint(0, 32000, (8, 128), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    if mode == "stream":
        stream_prune(source, out, oneshot.targets_of(config), lambda name, module, stats:
                     oneshot.prune_from_stats(config, module, stats), oneshot.make_stats_for(config), calibration,
                     device=torch.device("cpu"), dtype=torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
        targets = oneshot.targets_of(config)(model)
        if method == "wanda":
            result = oneshot.wanda(model, targets, config.pattern, "row", calibration, progress=False)
        else:
            result = oneshot.sparsegpt(model, targets, config.pattern, calibration, progress=False)
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, mask in result.masks.items():
                weight = weight_matrix(modules[name])
                weight.copy_(result.weights.get(name, weight)).masked_fill_(~mask, 0)
        model.save_pretrained(out)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def exactly_2_4(directory: Path) -> bool:
    from prune.models.shards import ShardReader

    reader = ShardReader(directory)
    for name in reader.specs():
        if ".layers." in name and name.endswith("proj.weight"):
            groups = reader.get_tensor(name).reshape(-1, 4)
            if not bool(((groups != 0).sum(dim=1) <= 2).all()):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["smollm2-135m"])
    parser.add_argument("--methods", nargs="+", default=["wanda"])
    parser.add_argument("--modes", nargs="+", default=["memory", "stream"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/maskprune-scale"))
    parser.add_argument("--case", nargs=4, metavar=("SOURCE", "OUT", "METHOD", "MODE"))
    args = parser.parse_args()
    if args.case:
        source, out, method, mode = args.case
        print(json.dumps(run_case(Path(source), Path(out), method, mode)))
        return
    rows = []
    for preset in args.presets:
        source = args.work / preset
        generate(source, preset)
        size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
        layers = PRESETS[preset]["num_hidden_layers"]
        for method in args.methods:
            for mode in args.modes:
                out = args.work / f"{preset}-{method}-{mode}"
                done = subprocess.run([sys.executable, __file__, "--case", str(source), str(out), method, mode],
                                      capture_output=True, text=True, check=True)
                figures = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append({"model": preset, "GB (bf16)": round(size / 1e9, 2), "method": method, "mode": mode,
                             **figures, "s/block": round(figures["seconds"] / layers, 2),
                             "exactly 2:4": exactly_2_4(out)})
                print(json.dumps(rows[-1]), flush=True)
    from benchmarks.results import write_section

    header = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    body = header + "".join("| " + " | ".join(str(v) for v in row.values()) + " |\n" for row in rows)
    write_section("scale", "Random bf16 weights, 8x128 calibration, 1 thread, `python benchmarks/scale.py "
                  + " ".join(sys.argv[1:]) + "`:\n\n" + body)


if __name__ == "__main__":
    main()
