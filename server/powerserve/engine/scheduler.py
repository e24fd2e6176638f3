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
        """Queue ``row`` (from any thread); it joins a batch at the next step."""
        self.joining.append(row)
        self.wake()

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
        join the batch together, the batch's cache copied once for all of them."""
        live = sum(len(batch.rows) for batch in self.batches)
        admitted: list[tuple[Row, CachedSequence]] = []
        while self.joining and live + len(admitted) < self.max_batch_size:
            row = self.joining.popleft()
            if row.closed:
                continue
            try:
                seq = self.runner.prefill(row.prompt)
            except Exception as error:
                row.deliver(error)
                continue
            row.tokens, row.pending, row.reused = seq.tokens, row.prompt[-1], seq.reused
            admitted.append((row, seq))
        if not self.runner.full_attention:  # no shared padded cache: a batch each
            self.batches += [Batch(self.runner.config, row, seq) for row, seq in admitted]
        elif admitted:
            if not self.batches:
                self.batches.append(Batch(self.runner.config, *admitted.pop(0)))
            self.batches[0].join(admitted)

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
        try:
            steps = sample_rows(logits, [rows[b].spec for b in live], [rows[b].generator for b in live])
        except Exception as error:  # end these rows, not the engine
            steps = [error] * len(live)
        out: list[tuple[Row, Delivery]] = []
        for b, step in zip(live, steps, strict=True):
            row = rows[b]
            if isinstance(step, Exception):  # e.g. NaN logits: end this row, not every other one
                row.finished = True
                out.append((row, step))
                continue
            row.pending = step.token_id
            row.produced += 1
            row.finished = step.token_id in self.eos_token_ids or row.produced == row.spec.max_tokens
            out.append((row, (step, len(rows))))
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
