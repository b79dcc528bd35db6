"""The equal-token split shared by the stretch view and the rationale generator.

Both sides must cut a document at the same token offsets, so this is the only place that
computes them.
"""

from __future__ import annotations


def equal_token_split(num_tokens: int, generations: int) -> list[int]:
    """Split points that cut ``num_tokens`` content tokens into ``generations + 1`` equal segments.

    Returns G offsets b_1 < ... < b_G; segment i is tokens[b_i:b_{i+1}] with b_0 = 0 and
    b_{G+1} = num_tokens. Segment lengths differ by at most one token. G is capped at
    num_tokens - 1 so that every segment is non-empty (a 1-token document gets no split).
    """
    if generations < 0:
        raise ValueError(f"generations must be >= 0, got {generations}")
    g = min(generations, max(num_tokens - 1, 0))
    return [(i * num_tokens) // (g + 1) for i in range(1, g + 1)]
