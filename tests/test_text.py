"""Incremental detokenising and OpenAI stop-string semantics, on the embedded tokenizer."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import AutoTokenizer

from powerserve.model_store import ensure_embedded_checkpoint
from powerserve.text import Detokenizer

TEXT = "Hello wörld! 7 + 5 = 12. 日本語 ok END more text"


@pytest.fixture(scope="module")
def tok() -> Any:
    return AutoTokenizer.from_pretrained(ensure_embedded_checkpoint())


def run(tok: Any, text: str, stop: list[str], incremental: bool = True) -> tuple[list[str], Detokenizer]:
    d = Detokenizer(tok, stop, frozenset([tok.eos_token_id]), incremental)
    deltas = []
    for token in [*tok.encode(text), tok.eos_token_id]:
        deltas.append(d.add(token))
        if d.stopped:
            break
    deltas.append(d.finish())
    return deltas, d


def test_round_trip_with_multibyte_characters(tok: Any) -> None:
    deltas, d = run(tok, TEXT, [])
    assert "".join(deltas) == TEXT == d.text
    assert not any("\ufffd" in piece for piece in deltas)  # incomplete UTF-8 is held back
    assert sum(1 for piece in deltas if piece) > 5  # released piece by piece


def test_non_incremental_gives_the_same_text(tok: Any) -> None:
    deltas, d = run(tok, TEXT, [], incremental=False)
    assert all(piece == "" for piece in deltas[:-1]) and deltas[-1] == TEXT == d.text


@pytest.mark.parametrize("stop", [["END"], ["12."], ["wör"], ["nope", "7 + 5"]])
def test_stop_string_cuts_before_it_and_never_leaks(tok: Any, stop: list[str]) -> None:
    deltas, d = run(tok, TEXT, stop)
    first = min(TEXT.index(s) for s in stop if s in TEXT)
    assert d.stopped and d.text == TEXT[:first]
    assert "".join(deltas) == TEXT[:first]  # no part of the stop string was ever released


def test_text_that_only_looks_like_a_stop_prefix_is_released(tok: Any) -> None:
    deltas, d = run(tok, "an EN and an E", ["END"])
    assert not d.stopped and "".join(deltas) == "an EN and an E"
