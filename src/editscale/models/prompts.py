"""Which tokens of a forward pass are the prompt, for a memory that routes on the prompt alone
(MEMOIR, editscale.edit.memoir: its residual memory is chosen from the prompt's activations and
then applies to every position, the target's included).

Scoring (editscale.evaluate.scoring.score_token_pairs) runs prompt + target in one pass; it
publishes each row's prompt length around the call. Any other pass (a corpus window, a prompt
alone) publishes nothing: there the whole input of the pass is the prompt.

    with prompt_lengths([7, 5]):   # row 0's first 7 real tokens are its prompt, row 1's first 5
        model(input_ids=ids, attention_mask=mask)
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

_PROMPT_LENGTHS: contextvars.ContextVar[tuple[int, ...] | None] = contextvars.ContextVar("editscale_prompt_lengths", default=None)


@contextlib.contextmanager
def prompt_lengths(lengths: Sequence[int]) -> Iterator[None]:
    """Per row of the batch the forward passes inside run: its number of prompt tokens, counted
    from its first real (unpadded) position."""
    token = _PROMPT_LENGTHS.set(tuple(int(n) for n in lengths))
    try:
        yield
    finally:
        _PROMPT_LENGTHS.reset(token)


def current_prompt_lengths() -> tuple[int, ...] | None:
    """The prompt lengths published around the running forward pass, or None."""
    return _PROMPT_LENGTHS.get()
