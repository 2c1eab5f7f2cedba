"""Which blocks go: a greedy search on validation loss among the blocks the importance score ranks lowest.

Step by step, the `candidates` kept blocks of lowest importance are each tried removed together with the blocks
already chosen, and the one whose removal gives the lowest validation loss goes. Why greedy among the lowest:
the score alone (ShortGPT) rates each block in the dense model, blind to how removals interact (two adjacent
blocks of low importance may each be redundant only while the other stays); the validation loss of the actual
removal set sees that. Trying every set of `count` among the lowest-ranked blocks would cost C(count +
candidates - 1, count) evaluations (84 for 6 of 9); greedy costs at most count x candidates, and the score keeps
the search among plausible blocks. At the end the score-only set (the `count` lowest) is evaluated too and wins
if its validation loss is lower, so the search is never worse on validation than the score alone.
`candidates: 1` is the score alone, with no validation evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def greedy_removal(
    importance: Sequence[float], count: int, candidates: int, loss: Callable[[list[int]], float]
) -> tuple[list[int], dict]:
    """(the removed blocks, ascending; a record of every evaluation and of the chosen set's validation `loss`).
    `loss(blocks)` is the validation loss of the model with `blocks` removed; ties go to the less important block.
    """
    ranked = sorted(range(len(importance)), key=lambda block: (importance[block], block))
    removed: list[int] = []
    steps = []
    for _ in range(count):
        pool = [block for block in ranked if block not in removed][:candidates]
        tried = {block: loss([*removed, block]) for block in pool} if len(pool) > 1 else {}
        chosen = min(tried, key=lambda block: (tried[block], ranked.index(block))) if tried else pool[0]
        removed.append(chosen)
        steps.append({"tried": [{"block": block, "loss": value} for block, value in tried.items()], "removed": chosen})
    score_only = ranked[:count]
    record = {"steps": steps, "greedy": list(removed), "score_only": score_only}
    if tried:
        record["greedy_loss"] = record["loss"] = tried[chosen]
    if candidates > 1 and set(score_only) != set(removed):
        record["score_only_loss"] = loss(score_only)
        if record["score_only_loss"] < record["loss"]:
            removed, record["loss"] = score_only, record["score_only_loss"]
    record["removed"] = sorted(removed)
    return sorted(removed), record
