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
from pygemma4.kv import SequenceKv
from pygemma4.protocol import PrefillResult, PromptToPrefill
from pygemma4.runner import Feed
from pygemma4.workers.runtime import (
    ServerConfig,
    Worker,
    run_worker,
    shared_pool_runner,
)


@dataclass
class Job:
    """A prefill job, and the place in the pool its tokens are written to."""

    message: PromptToPrefill
    kv: SequenceKv

    @classmethod
    def of(cls, message: PromptToPrefill) -> Job:
        """The job of a message: its tokens go into the blocks it names, from its `start`."""
        kv = SequenceKv(
            block_table=message.block_table, ring_set=message.ring_set, length=message.start
        )
        return cls(message, kv)

    @property
    def done(self) -> int:
        """Tokens of the job written so far."""
        return self.kv.length - self.message.start

    def rest(self) -> np.ndarray:
        """The tokens not yet written."""
        return np.array(self.message.token_ids[self.done :], dtype=np.int32)


class PrefillWorker(Worker):
    """Packs and runs prefill jobs."""

    def __init__(self, config: ServerConfig, name: str, epoch: int) -> None:
        super().__init__(config, name, ["frontend", "decode"])
        self.runner = shared_pool_runner(config, config.prefill_chunk, config.prefill_threads)
        self.jobs: deque[Job] = deque()

    def busy(self) -> bool:
        """Whether jobs are queued."""
        return bool(self.jobs)

    def queue(self, prompt: PromptToPrefill) -> None:
        """Queue a job."""
        self.jobs.append(Job.of(prompt))

    def work(self) -> None:
        """Run the next chunk of the queued jobs."""
        if self.jobs:
            self.run_chunk()

    def run_chunk(self) -> None:
        """One forward call over the next `prefill_chunk` tokens of the queued jobs."""
        jobs = list(self.jobs)
        feeds = self.runner.next_prefill([(job.kv, job.rest()) for job in jobs])
        packed = list(zip(jobs, feeds, strict=False))
        if not self.forward(packed) and len(packed) > 1:
            # The core checks a whole call before writing anything: run the jobs one by one
            # so that only the one it refuses fails.
            for part in packed:
                self.forward([part])

    def forward(self, packed: list[tuple[Job, Feed]]) -> bool:
        """Write the packed feeds of their jobs; a job whose call the core refuses fails when it
        is alone in it. Whether the call ran."""
        try:
            self.runner.forward([feed for _, feed in packed])
        except ValueError as e:
            if len(packed) == 1:
                self.jobs.remove(packed[0][0])
                self.answer(packed[0][0], str(e))
            return False
        for job, _ in packed:
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
