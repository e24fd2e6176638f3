"""Turning output tokens into text incrementally, with OpenAI stop-string semantics.

Decoders work in token ids; serving detokenises here, once, for every decoder. Text is
released only when it is final: an incomplete UTF-8 sequence (decoded as U+FFFD) and a tail
that could still grow into a stop string are held back. When a stop string appears, the text
is cut before it and :attr:`Detokenizer.stopped` is set, so the caller stops the decoder.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class Detokenizer:
    """Accumulates token ids of one choice and yields text deltas.

    Uses the usual offset trick: decode a short window of recent tokens twice (with and
    without the new ones) so each step costs O(window), not O(length).
    """

    def __init__(self, tokenizer: Any, stop: list[str], special_ids: frozenset[int], incremental: bool = True) -> None:
        """``incremental=False`` (nobody reads the text before the end, and there are no stop
        strings to watch for) skips the per-token decoding: :meth:`finish` decodes once."""
        assert incremental or not stop, "stop strings need incremental decoding"
        self.incremental = incremental
        self.tokenizer = tokenizer
        self.stop = stop
        self.special_ids = special_ids
        self.ids: list[int] = []
        self.text = ""  # all final text so far (before any stop string)
        self.emitted = 0  # characters of self.text already released
        self.stopped = False
        self._prefix_offset = 0
        self._read_offset = 0
        self._max_stop = max((len(s) for s in stop), default=0)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def add(self, token_id: int) -> str:
        """Add one token; return the text that became final (possibly empty)."""
        assert not self.stopped, "no tokens after a stop string"
        self.ids.append(token_id)
        if token_id in self.special_ids or not self.incremental:
            return ""
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return ""  # nothing new yet, or an incomplete multi-byte character
        self.text += full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The sequence ended: release whatever is still held back."""
        if not self.stopped and self._read_offset < len(self.ids):
            prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
            full = self._decode(self.ids[self._prefix_offset :])
            if len(full) > len(prefix):
                self.text += full[len(prefix) :]
            self._read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop and not self.stopped:
            # Search only where a stop string could begin: from just before released text.
            start = max(0, self.emitted - self._max_stop + 1)
            hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                final = True
        end = len(self.text)
        if not final and self.stop:
            end = max(self.emitted, end - self._held_tail())
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta

    def _held_tail(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string.

        For each stop string s only the last len(s) - 1 characters can matter; the tail
        starting at the first position j where tail[j:] is a prefix of s is the longest. Only
        positions holding s[0] are tried (``str.find`` jumps between them), so a step costs
        far less than trying every length k (16 stop strings of 256 characters: about 2 ms per
        token that way, which adds up to seconds on the event loop for a long output).
        """
        longest = 0
        for s in self.stop:
            tail = self.text[len(self.text) - min(len(s) - 1, len(self.text)) :]
            j = tail.find(s[0])
            while j >= 0 and len(tail) - j > longest:
                if s.startswith(tail[j:]):
                    longest = len(tail) - j
                    break
                j = tail.find(s[0], j + 1)
        return longest
