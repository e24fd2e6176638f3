"""Log-probabilities in streamed responses: each chunk carries those of the tokens it sends.

A token's raw log p and its top-k alternatives are known only once the choice has been
scored, which serving does after the decoder has finished (an engine sampling at a
temperature other than 1 does not report raw log p while sampling). So a stream that asks
for ``logprobs`` holds each choice's text back and sends it at the end, one chunk per token,
each with that token's entry -- the same text pieces a live stream would have sent, cut by
the same stop strings. Decoders that only know their answer at the end (``power_mcmc``)
stream this way anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

from powerserve.serving.runner import ChoiceResult, Delta, Runner
from powerserve.serving.state import ServerState
from powerserve.text import Detokenizer


@dataclass
class HeldRunner(Runner):
    """A runner whose stream carries only the finish of each choice; the text is sent from the
    outcome (see :func:`token_pieces`) once its log-probabilities are known."""

    def _emit(self, delta: Delta) -> None:
        if delta.finish_reason is not None:
            super()._emit(Delta(delta.index, "", [], delta.finish_reason))


def token_pieces(state: ServerState, stop: list[str], choice: ChoiceResult) -> list[str]:
    """The final text released by each token of ``choice``, in order (possibly empty strings).

    Replays the detokenizer the runner used, so ``"".join(pieces) == choice.text``: text held
    back for an incomplete character or a possible stop string is released with a later token,
    and whatever was held at the end joins the last piece.
    """
    detok = Detokenizer(state.tokenizer, stop, state.special_ids, incremental=True)
    pieces = []
    for token_id in choice.token_ids:
        pieces.append(detok.add(token_id) if not detok.stopped else "")
    tail = detok.finish()
    if pieces:
        pieces[-1] += tail
    return pieces
