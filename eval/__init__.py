"""The evaluation layer: perplexity, accuracy, FLOPs/params, latency, tables.

Import by submodule (`from eval.perplexity import perplexity`); it takes a model and data and never
reaches into `prune`'s internals.
"""
