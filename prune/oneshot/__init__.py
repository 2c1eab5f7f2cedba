"""One-shot pruning: pure tensor math (scores, masks, SparseGPT's OBS update) kept apart from calibration
plumbing (`prune.calibration`) and from the lifecycle entry points in `prune.oneshot.methods`."""
