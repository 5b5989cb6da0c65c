"""The prefill worker: computes prompts into the KV blocks the decode worker hands it.

Jobs are packed into forward calls of up to `prefill_chunk` tokens, oldest first: a long
prompt is cut into chunks, and several short ones share a call. A job is answered once its
last token is written. The worker writes only the blocks of its jobs and owns nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from pygemma4 import protocol
from pygemma4.config import open_model
from pygemma4.engine import load_core_model
from pygemma4.protocol import PrefillResult, PromptToPrefill
from pygemma4.workers.runtime import (
    ServerConfig,
    Worker,
    map_kv_pool,
    run_worker,
)


@dataclass
class Job:
    """A prefill job and how much of it is written."""

    message: PromptToPrefill
    done: int = 0


class PrefillWorker(Worker):
    """Packs and runs prefill jobs."""

    def __init__(self, config: ServerConfig, name: str, epoch: int) -> None:
        super().__init__(config, name, ["frontend", "decode"])
        model = open_model(config.model)
        self.model = load_core_model(
            model, config.prefill_chunk, config.prefill_threads, config.backend, config.device
        )
        self.pool = map_kv_pool(config.kv, model.config)
        self.jobs: deque[Job] = deque()

    def busy(self) -> bool:
        """Whether jobs are queued."""
        return bool(self.jobs)

    def queue(self, prompt: PromptToPrefill) -> None:
        """Queue a job."""
        self.jobs.append(Job(prompt))

    def work(self) -> None:
        """Run the next chunk of the queued jobs."""
        if self.jobs:
            self.run_chunk()

    def run_chunk(self) -> None:
        """One forward call over the next `prefill_chunk` tokens of the queued jobs."""
        budget = self.config.prefill_chunk
        packed: list[tuple[Job, int]] = []
        for job in self.jobs:
            take = min(budget, len(job.message.token_ids) - job.done)
            packed.append((job, take))
            budget -= take
            if budget == 0:
                break
        if not self.forward(packed) and len(packed) > 1:
            # The core checks a whole call before writing anything: run the jobs one by one
            # so that only the one it refuses fails.
            for part in packed:
                self.forward([part])

    def forward(self, packed: list[tuple[Job, int]]) -> bool:
        """Write the next tokens of each packed job; a job whose call the core refuses
        fails when it is alone in it. Whether the call ran."""
        tokens, positions, seqs = [], [], []
        for index, (job, take) in enumerate(packed):
            first = job.message.start + job.done
            tokens.extend(job.message.token_ids[job.done : job.done + take])
            positions.extend(range(first, first + take))
            seqs.extend([index] * take)
        width = max(len(job.message.block_table) for job, _ in packed)
        tables = np.full((len(packed), width), -1, dtype=np.int32)
        for index, (job, _) in enumerate(packed):
            tables[index, : len(job.message.block_table)] = job.message.block_table
        try:
            self.model.forward(
                self.pool,
                np.array(tokens, dtype=np.int32),
                np.array(positions, dtype=np.int32),
                np.array(seqs, dtype=np.int32),
                tables,
                np.array([job.message.ring_set for job, _ in packed], dtype=np.int32),
                np.empty(0, dtype=np.int32),
            )
        except ValueError as e:
            if len(packed) == 1:
                self.jobs.remove(packed[0][0])
                self.answer(packed[0][0], str(e))
            return False
        for job, take in packed:
            job.done += take
            if job.done == len(job.message.token_ids):
                self.jobs.remove(job)
                self.answer(job, None)
        return True

    def answer(self, job: Job, error: str | None) -> None:
        """Tell the decode worker the job is written, or why it failed."""
        self.mail.send(
            "decode", PrefillResult(rid=job.message.rid, epoch=job.message.epoch, error=error)
        )

    takes = protocol.PrefillInbox
    handlers = {PromptToPrefill: queue}


if __name__ == "__main__":
    run_worker(PrefillWorker)
