"""The torch engine's scheduler: continuous batching of ``generate`` calls on one worker thread.

Calls queue as rows; each step admits waiting rows (prefilled by the model runner), runs one
batched decode forward per batch, samples every row's next token in one vectorised pass and
delivers the tokens, then retires the finished rows (their caches go to the prefix cache).
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from powerserve.engine.batch import Batch, Delivery, Row, deliver_all
from powerserve.engine.kv_cache import CachedSequence
from powerserve.engine.model_runner import ModelRunner
from powerserve.engine.sampling import sample_rows


class Scheduler:
    """Rows and batches: admit, step, retire.

    Calls queue in ``joining`` (appended on an event loop, taken on the worker); ``batches``
    lives on the worker; one :meth:`step` at a time is queued on ``worker``. Counters:
    ``decode_steps`` (batched decode forwards) and ``decoded_rows`` (rows over all of them).
    """

    def __init__(
        self, runner: ModelRunner, worker: ThreadPoolExecutor, max_batch_size: int, eos_token_ids: frozenset[int]
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.runner = runner
        self.worker = worker
        self.max_batch_size = max_batch_size
        self.eos_token_ids = eos_token_ids
        self.joining: deque[Row] = deque()
        self.batches: list[Batch] = []
        self.decode_steps = self.decoded_rows = 0
        self.closed = False
        self._lock = threading.Lock()
        self._scheduled = False

    def submit(self, row: Row) -> None:
        """Queue ``row``; it joins a batch at the next step. The worker is woken from the row's
        event loop once the callbacks already queued there have run, so calls started together
        (the K proposals of an MCMC step, the particles of an SMC run) are admitted together."""
        self.joining.append(row)
        row.loop.call_soon_threadsafe(self.wake)

    def wake(self) -> None:
        """Queue one :meth:`step` on the worker unless one is queued already."""
        with self._lock:
            if self._scheduled or self.closed:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # shut down in the meantime
            self.worker.submit(self.step)

    def close(self, error: BaseException) -> None:
        """Stop scheduling; every queued or running row receives ``error``. Call once the
        worker has stopped."""
        self.closed = True
        deliver_all([(row, error) for row in [*self.joining, *(r for b in self.batches for r in b.rows)]])
        self.joining.clear()
        self.batches.clear()

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduler step; it queues the next one while there is work.

        1. Drop the rows whose callers stopped listening (remembering their caches).
        2. Admit waiting calls up to ``max_batch_size`` rows: prefill each; they join a batch together.
        3. Per batch: one forward over every row's pending token; every row samples its next
           token with its own spec and generator, and all of them are delivered at once.
        4. Drop the finished rows (remembering their caches).

        Other worker jobs (scoring, ...) queued meanwhile run between two steps.
        """
        with self._lock:
            self._scheduled = False
        try:
            if self.closed:
                return
            self._retire()
            self._admit()
            for batch in list(self.batches):
                self._decode(batch)
            self._retire()
        finally:
            if self.joining or self.batches:
                self.wake()

    def _admit(self) -> None:
        """Prefill waiting calls (one at a time) up to ``max_batch_size`` live rows; then they
        join the batch together, the batch's cache copied once for all of them.

        Calls that all share one prompt and find the engine idle (:meth:`_first_step_shared`)
        run that prompt's last token once for all of them."""
        live = sum(len(batch.rows) for batch in self.batches)
        taken: list[Row] = []
        while self.joining and live + len(taken) < self.max_batch_size:
            row = self.joining.popleft()
            if not row.closed:
                taken.append(row)
        shared = not live and len(taken) > 1 and self.runner.full_attention
        if shared and all(row.prompt == taken[0].prompt for row in taken):
            admitted = self._first_step_shared(taken)
        else:
            admitted = []
            for row in taken:
                try:
                    seq = self.runner.prefill(row.prompt)
                except Exception as error:
                    row.deliver(error)
                    continue
                row.tokens, row.pending, row.reused = seq.tokens, row.prompt[-1], seq.reused
                admitted.append((row, seq))
        if not self.runner.full_attention:  # no shared padded cache: a batch each
            self.batches += [Batch(self.runner.config, row, seq, 1) for row, seq in admitted]
        elif admitted:
            if not self.batches:
                self.batches.append(Batch(self.runner.config, *admitted.pop(0), self.max_batch_size))
            self.batches[0].join(admitted)

    def _first_step_shared(self, rows: list[Row]) -> list[tuple[Row, CachedSequence]]:
        """First tokens of rows with one prompt, on an idle engine: one forward of one row.

        The prompt is prefilled once and its last token run once; every row then draws its first
        token from those logits with its own spec and generator, exactly as it would in a
        batched step (the same law, the same draws), instead of the first step running that
        token once per row. With nothing else decoding, that step would cost a forward over all
        the rows; beside a live batch, the rows ride along at a small marginal cost, so they do
        not take this path. Returns the rows that go on, each with the shared cache (a joining
        row's cache is copied into the batch's).
        """
        prompt = rows[0].prompt
        try:
            seq = self.runner.prefill(prompt)
            logits = self.runner.forward(seq, prompt[-1:], all_logits=False)  # [1, V]
        except Exception as error:
            deliver_all([(row, error) for row in rows])
            return []
        self.decode_steps += 1
        self.decoded_rows += 1
        for i, row in enumerate(rows):  # after the first, each row found the prompt prefilled
            row.tokens, row.reused = list(seq.tokens), seq.reused if i == 0 else len(prompt) - 1
        self._sample(rows, logits.expand(len(rows), -1), batch_rows=1)
        return [(row, seq) for row in rows if not row.finished]

    def _decode(self, batch: Batch) -> None:
        rows = batch.rows
        try:
            logits = self.runner.run(batch.step_inputs(self.runner.device), batch.cache, all_logits=False)[:, -1]
        except Exception as error:  # the batch's cache is no longer consistent: end its rows
            self.batches.remove(batch)
            deliver_all([(row, error) for row in rows])
            return
        batch.width += 1
        self.decode_steps += 1
        self.decoded_rows += len(rows)
        for row in rows:
            row.tokens.append(row.pending)
        live = [b for b, row in enumerate(rows) if not row.closed]
        if not live:
            return
        if len(live) < len(rows):
            logits = logits[torch.tensor(live, device=logits.device)]
        self._sample([rows[b] for b in live], logits, batch_rows=len(rows))

    def _sample(self, rows: list[Row], logits: torch.Tensor, batch_rows: int) -> None:
        """Draw each row's next token from its row of ``logits`` [len(rows), V] and deliver them
        all at once (``batch_rows``: the rows of the forward that made the logits); a row whose
        draw fails gets the error and ends, not the others."""
        try:
            steps = sample_rows(logits, [row.spec for row in rows], [row.generator for row in rows])
        except Exception as error:  # end these rows, not the engine
            steps = [error] * len(rows)
        out: list[tuple[Row, Delivery]] = []
        for row, step in zip(rows, steps, strict=True):
            if isinstance(step, Exception):  # e.g. NaN logits: end this row, not every other one
                row.finished = True
                out.append((row, step))
                continue
            row.pending = step.token_id
            row.produced += 1
            row.finished = step.token_id in self.eos_token_ids or row.produced == row.spec.max_tokens
            out.append((row, (step, batch_rows)))
        deliver_all(out)

    def _retire(self) -> None:
        for batch in list(self.batches):
            gone = {b for b, row in enumerate(batch.rows) if row.finished or row.closed}
            if not gone:
                continue
            if self.runner.prefix_reuse:
                for b in gone:
                    self.runner.keep(batch.snapshot(b))
            batch.drop(gone)
            if not batch.rows:
                self.batches.remove(batch)
