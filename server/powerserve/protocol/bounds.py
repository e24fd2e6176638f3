"""Upper bounds on every number, string and list a client controls (see the block below)."""

from __future__ import annotations

from typing import Any

from pydantic import BeforeValidator

# --------------------------------------------------------------------------------------------
# Upper bounds on what a client controls: what a real request could need, and no more. The
# server's own caps (max_n, max_tokens_limit, the context length) are usually tighter; these
# make every field finite in the schema, so no value can make validation or planning slow.
# --------------------------------------------------------------------------------------------

MAX_N = 128  # OpenAI's own limit on n
MAX_TOKENS = 2**20  # beyond any model's context
MAX_TOP_K = 2**20  # beyond any vocabulary
MAX_TIMEOUT_S = 86_400.0  # one day
MAX_STOP = 16
MAX_STOP_CHARS = 256  # each stop string
MAX_PROMPTS = 128  # a batch of prompts (n x prompts is capped by the server's max_n)
MAX_PROMPT_IDS = 2**20  # a token-id prompt (the context length caps it further)
MAX_TEXT_CHARS = 2**23  # a prompt or message text: 8 Mi characters (the context length caps it further)
MAX_MESSAGES = 4096
MAX_CONTENT_PARTS = 4096
MAX_NAME_CHARS = 256  # model, user, message name, decoder name
MAX_LOGIT_BIAS = 300
MAX_DECODER_PARAMS = 64


def at_most(limit: int) -> BeforeValidator:
    """Refuse a list or object longer than ``limit`` before its items are validated.

    ``Field(max_length=...)`` shows the bound in the schema but is checked after every item
    (and, in a union, after every member has failed on every item): 10^5 items cost seconds of
    the event loop. This check costs one ``len``.
    """

    def check(value: Any) -> Any:
        if isinstance(value, list | dict) and len(value) > limit:
            raise ValueError(f"at most {limit} items, not {len(value)}")
        return value

    return BeforeValidator(check)
