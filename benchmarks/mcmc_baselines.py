"""The two outside sides of the long-answer benchmark (``bench_power_mcmc.py``, issue 11 item 4).

1. :func:`reference_style_chain` -- the naive baseline, written to do what Karan & Du's
   reference code does and nothing more: every proposal is one transformers ``model.generate``
   call from the full prefix (prompt + kept tokens prefilled again, a fresh KV cache each time),
   ``do_sample`` at temperature 1/alpha, ``output_scores`` / ``output_logits`` for per-token
   log q (processed scores) / log p (raw logits), then the Metropolis-Hastings test

       log A = alpha * (S_p(x') - S_p(x)) + S_q(x) - S_q(x') + log(n(x) / n(x'))

   over the suffixes from the resampled position i (``power_mcmc.log_acceptance``; the last
   term is the index-selection correction the reference omits; it costs nothing). Blocks of
   B tokens, ``mcmc_steps`` steps per block, stop after a block that ended in EOS: the
   reference's loop. The only Python per token is the reference's own (a ``.tolist()``).
   Every ``generate`` call is recorded (:class:`GenerateCall`) so that
2. :func:`replay_plain_generate` can time plain ``generate`` -- no scores, no logits, no MH --
   on exactly the same contexts and lengths, in the same run: the baseline's seconds per
   generated token divided by plain ``generate``'s is the faithfulness ratio (target <= 1.10).
3. :func:`run_reference` imports the reference checkout's own ``power_samp_utils`` and calls
   its ``mcmc_power_samp`` (nothing of it is copied here). Adaptations, all from outside:
   - its ``AutoregressiveSampler`` gets our already-loaded model (wrapped in
     :class:`CountingModel`, which forwards everything and counts the tokens each ``generate``
     call prefills and generates) and tokenizer, ``device="cpu"`` (or the model's device);
   - ``temp`` = 1/alpha, ``mcmc_steps``, ``max_new_tokens`` = T and ``block_num`` = T / B,
     so its block ``jump_size`` is B (T must be a multiple of B, as the reference asserts);
   - its randomness is global: ``random.seed``, ``np.random.seed`` and ``torch.manual_seed``
     are set to the request's seed before the call;
   - its ``print`` output goes to stderr (its tqdm bars already do);
   - its ``generate`` calls pass no ``top_k``/``top_p``, so its proposal uses the model's
     generation-config defaults (transformers: ``top_k`` 50 unless the config says otherwise),
     and it stops on ``tokenizer.eos_token_id`` only. Both are the reference's behaviour and
     are left as they are.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from powerserve.decoders.power_mcmc import block_limits, log_acceptance


@dataclass(frozen=True, slots=True)
class GenerateCall:
    """One ``model.generate`` call: its context and how many tokens it generated."""

    context: tuple[int, ...]
    generated: int


@dataclass(slots=True)
class ChainRun:
    """One completion of an outside chain: wall time, output and the work it took."""

    wall: float
    output: list[int]
    calls: list[GenerateCall] = field(default_factory=list)
    acceptance: float = float("nan")

    @property
    def generated(self) -> int:
        return sum(c.generated for c in self.calls)

    @property
    def prefilled(self) -> int:
        """Tokens prefilled again: every call's full context (no cache reuse across calls)."""
        return sum(len(c.context) for c in self.calls)


def proposal(
    model: Any, context: Sequence[int], max_new: int, alpha: float, eos: Sequence[int]
) -> tuple[list[int], list[float], list[float]]:
    """One reference-style proposal: ``generate`` from ``context``; the new tokens, log p, log q.

    log q_t = log_softmax(processed score_t)[x_t] (temperature 1/alpha, nothing else: top_k 0,
    top_p 1); log p_t = log_softmax(raw logit_t)[x_t].
    """
    ids = torch.tensor([list(context)])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        do_sample=True,
        temperature=1.0 / alpha,
        top_k=0,
        top_p=1.0,
        eos_token_id=list(eos),
        pad_token_id=eos[0],
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    new = out.sequences[0, ids.shape[1] :]
    idx = new[:, None]  # [n, 1]
    logq = torch.log_softmax(torch.stack(out.scores)[:, 0], -1).gather(-1, idx)[:, 0]  # [n]
    logp = torch.log_softmax(torch.stack(out.logits)[:, 0], -1).gather(-1, idx)[:, 0]  # [n]
    return new.tolist(), logp.tolist(), logq.tolist()


@torch.no_grad()
def reference_style_chain(
    model: Any,
    prompt: Sequence[int],
    eos: Sequence[int],
    max_tokens: int,
    alpha: float,
    block_size: int,
    mcmc_steps: int,
    seed: int,
) -> ChainRun:
    """The naive baseline (module docstring, 1). Steps per block:

    1. extend x by ``generate`` to the block's limit L_k = min(k B, T) (unless x ended in EOS);
    2. ``mcmc_steps`` times: i ~ U{0..|x|-1}; x' = x[:i] + generate(prompt + x[:i], L_k - i);
       accept with probability min(1, exp(log A)) (formula in the module docstring);
    3. stop if x ends in EOS.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    eos_set = frozenset(eos)
    run = ChainRun(0.0, [])
    accepted = attempts = 0

    def propose(prefix: list[int], limit: int) -> tuple[list[int], list[float], list[float]]:
        context = (*prompt, *prefix)
        new, p, q = proposal(model, context, limit - len(prefix), alpha, eos)
        run.calls.append(GenerateCall(context, len(new)))
        return new, p, q

    t0 = time.perf_counter()
    x: list[int] = []
    lp: list[float] = []
    lq: list[float] = []
    for limit in block_limits(max_tokens, block_size):
        if not (x and x[-1] in eos_set) and len(x) < limit:
            new, p, q = propose(x, limit)
            x, lp, lq = x + new, lp + p, lq + q
        for _ in range(mcmc_steps):
            i = int(rng.integers(len(x)))
            new, p, q = propose(x[:i], limit)
            attempts += 1
            log_a = log_acceptance(alpha, lp[i:], lq[i:], p, q, len(x), i + len(new))
            if log_a >= 0 or rng.random() < math.exp(log_a):
                x, lp, lq = x[:i] + new, lp[:i] + p, lq[:i] + q
                accepted += 1
        if x and x[-1] in eos_set:
            break
    run.wall = time.perf_counter() - t0
    run.output = x
    run.acceptance = accepted / attempts if attempts else float("nan")
    return run


def replay_plain_generate(model: Any, calls: Sequence[GenerateCall], alpha: float) -> float:
    """Seconds plain ``generate`` takes for the same calls: same contexts, exactly the same
    numbers of new tokens, sampling at 1/alpha, no scores or logits kept. Calls that generated
    nothing are skipped (the baseline made none)."""
    return sum(plain_generate(model, list(c.context), c.generated, alpha) for c in calls if c.generated)


@torch.no_grad()
def plain_generate(model: Any, context: list[int], new_tokens: int, alpha: float, rows: int = 1) -> float:
    """Seconds of one plain ``generate`` of ``rows`` samples of exactly ``new_tokens`` tokens each
    (``min_new_tokens`` = ``max_new_tokens``) after ``context``, at temperature 1/alpha without
    truncation, no scores or logits kept. With ``rows`` > 1 (``num_return_sequences``) it is what
    the model itself costs to decode that many rows side by side."""
    ids = torch.tensor([context])
    t0 = time.perf_counter()
    model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=True,
        temperature=1.0 / alpha,
        top_k=0,
        top_p=1.0,
        num_return_sequences=rows,
        pad_token_id=0,
    )
    return time.perf_counter() - t0


class CountingModel:
    """Forwards every attribute to ``model``; records each ``generate`` call's context and
    number of new tokens (``sequences`` minus the input) in ``calls``."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.calls: list[GenerateCall] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        out = self._model.generate(*args, **kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        context = tuple(int(t) for t in ids[0].tolist())
        self.calls.append(GenerateCall(context, int(sequences.shape[1]) - len(context)))
        return out


def load_reference(repo: Path) -> Any:
    """The reference checkout's ``power_samp_utils`` module (``llm_experiments`` on sys.path)."""
    folder = repo / "llm_experiments"
    if not (folder / "power_samp_utils.py").is_file():
        raise SystemExit(f"--reference-repo {repo}: no llm_experiments/power_samp_utils.py there")
    sys.path.insert(0, str(folder))
    module: Any = importlib.import_module("power_samp_utils")
    return module


def run_reference(
    module: Any,
    model: Any,
    tokenizer: Any,
    prompt: Sequence[int],
    max_tokens: int,
    alpha: float,
    block_size: int,
    mcmc_steps: int,
    seed: int,
) -> ChainRun:
    """The reference's own ``mcmc_power_samp`` on one prompt (adaptations: module docstring, 3)."""
    if max_tokens % block_size:
        raise SystemExit(f"the reference needs max_tokens ({max_tokens}) to be a multiple of block_size")
    counting = CountingModel(model)
    sampler = module.AutoregressiveSampler(counting, tokenizer, str(next(model.parameters()).device))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        gen, _, _, acceptance = module.mcmc_power_samp(
            sampler, list(prompt), 1.0 / alpha, mcmc_steps, max_tokens, block_num=max_tokens // block_size
        )
    wall = time.perf_counter() - t0
    return ChainRun(wall, list(gen[len(prompt) :]), counting.calls, float(acceptance))
