"""Recovery: training the kept weights of a pruned model with its masks fixed, after the method (the recipe's
`recover` section, `prune.recover` in Python)."""
