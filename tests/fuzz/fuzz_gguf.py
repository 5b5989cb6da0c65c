"""Fuzz target: a GGUF file from its header through the tensor table to the core's model.

The bytes are written to a file and opened as the engine opens a model: pygemma4.gguf_file's
walk of the header, metadata and tensor table, the configuration and tensor checks, the
tokenizer, then the C++ core mapping the file and binding every tensor, and one forward call
of a few tokens through the KV pool (where the core reads every weight it bound).
"""

from __future__ import annotations

from harness import main, scratch_file

from pygemma4.engine import Engine

N_CTX = 32
N_BATCH = 8


def fuzz_one(data: bytes) -> None:
    """Open `data` as a model file and run three tokens through it."""
    engine = Engine(scratch_file(data), n_ctx=N_CTX, n_batch=N_BATCH, threads=1)
    if engine.has_tokenizer:
        engine.tokenizer.encode("fuzz")
    engine.forward([i % engine.vocab_size for i in (2, 7, 11)])


if __name__ == "__main__":
    main(fuzz_one)
