"""Fuzz target: a GGUF's tokenizer metadata to a working Tokenizer.

The bytes are read as a GGUF file (pygemma4.gguf_file) and its metadata built into a Tokenizer
as Tokenizer.from_gguf does; a tokenizer that builds must then encode, decode and render a
chat without failing other than with a Gemma4Error.
"""

from __future__ import annotations

from harness import main, scratch_file

from pygemma4.gguf_file import read_gguf
from pygemma4.tokenizer import Tokenizer

SAMPLE = "Hello <|turn>user\n wörld\n\n🙂 <0x41> ▁x"


def fuzz_one(data: bytes) -> None:
    """Build the tokenizer `data`'s metadata describes and use it once."""
    tokenizer = Tokenizer.from_metadata(read_gguf(scratch_file(data)).metadata)
    ids = tokenizer.encode(SAMPLE, add_bos=tokenizer.bos_id is not None)
    tokenizer.decode(ids)
    tokenizer.decode(range(tokenizer.vocab_size), skip_special=True)
    tokenizer.apply_chat_template([{"role": "user", "content": SAMPLE}])


if __name__ == "__main__":
    main(fuzz_one)
