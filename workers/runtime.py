"""What every server process shares: its configuration, its sockets, the KV pool in shared
memory, and how a worker process starts, runs and stops."""

from __future__ import annotations

import argparse
import mmap
import os
import signal
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import msgspec
import numpy as np
import zmq

from pygemma4 import protocol
from pygemma4.config import ModelConfig, open_model
from pygemma4.kv import KvLayout
from pygemma4.media.kinds import MEDIA_KINDS, PreparedMedia
from pygemma4.protocol import KvPoolSpec, MediaFeatures, ServeLimits
from pygemma4.runner import ModelRunner

HTTP_API_KEY_ENV = "PYGEMMA4_API_KEY"
HTTP_CURVE_KEYS_ENV = "PYGEMMA4_HTTP_CURVE_KEYS"
HTTP_ROUTING_ID_ENV = "PYGEMMA4_HTTP_ROUTING_ID"
"""The environment variables that give the HTTP front end its API key and, under CURVE, its
key pair (not its command line, which any user of the host can read)."""
# How long a worker waits on its inbox before checking that its supervisor still lives.
POLL_MS = 200
# Most messages queued towards one peer before sends block: bounded, so a stalled peer cannot
# exhaust memory, yet far above what a healthy step produces.
QUEUE_LIMIT = 100_000


class ServerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything a worker needs to know, passed by the supervisor to each process."""

    model: str
    endpoint: str
    ipc_base: str
    """Prefix of the workers' ipc endpoints (the Linux abstract namespace where there is one:
    sockets without files)."""
    backend: str
    device: int
    threads: int
    max_batch: int
    n_ctx: int
    prefill_chunk: int
    tokenizer_workers: int
    max_pending: int
    max_message_bytes: int
    kv: KvPoolSpec
    supervisor_pid: int
    curve_secret_key: str | None = None
    """The server's CURVE secret key file: clients must then authenticate."""
    curve_clients: str | None = None
    """The directory of the public key files of the clients admitted under CURVE."""
    http: str | None = None
    """HOST:PORT of the HTTP front end (the OpenAI API); None runs none."""
    draft: str | None = None
    """The drafter the decode worker drafts with ("ngram", or an assistant GGUF's path);
    None decodes one token per step."""
    draft_tokens: int = 0
    """Tokens drafted per step, with `draft`."""
    mmproj: str | None = None
    """The model's projector GGUF (checked against it), whose towers take images and audio;
    None takes neither."""
    max_image_tokens: int = 280
    """Soft tokens an image becomes at most, with `mmproj`."""
    prefix_snapshots: int = 0
    """Ring sets of the pool beyond `max_batch`, kept as snapshots by the prefix cache."""
    http_curve_public: str | None = None
    """Under CURVE, the public key of the HTTP front end's pair (made for this run; the
    secret reaches it in its environment), admitted beside the clients' keys."""
    limits: ServeLimits = msgspec.field(default_factory=ServeLimits)
    """What one client may ask of the server."""

    def inbox(self, name: str) -> str:
        """The ipc endpoint of the process called `name` (e.g. "decode", "tokenizer-0")."""
        return f"{self.ipc_base}/{name}"

    def tokenizer_names(self) -> list[str]:
        """The names of the tokenizer workers."""
        return [f"tokenizer-{i}" for i in range(self.tokenizer_workers)]


def encode_config(config: ServerConfig) -> str:
    """The configuration as the text a worker gets on its command line."""
    return msgspec.json.encode(config).decode()


def decode_config(text: str) -> ServerConfig:
    """The configuration the supervisor passed."""
    return msgspec.json.decode(text, type=ServerConfig)


class Mailbox:
    """A process's one inbox (PULL, bound), which takes the messages of the union `takes`,
    and its outboxes (PUSH, connected), by name."""

    def __init__(self, config: ServerConfig, name: str, peers: Iterable[str], takes: Any) -> None:
        self.name = name
        self.decoder = protocol.InboxDecoder(name, takes)
        self.context = zmq.Context()
        self.inbox = self.context.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.setsockopt(zmq.RCVHWM, QUEUE_LIMIT)
        self.inbox.bind(config.inbox(name))
        self.outboxes: dict[str, zmq.Socket[Any]] = {}
        for peer in peers:
            out = self.context.socket(zmq.PUSH)
            out.setsockopt(zmq.LINGER, 0)
            out.setsockopt(zmq.SNDHWM, QUEUE_LIMIT)
            out.connect(config.inbox(peer))
            self.outboxes[peer] = out

    def send(self, peer: str, message: msgspec.Struct) -> None:
        """Queue `message` for `peer` (delivered when it is up, even after a restart)."""
        self.outboxes[peer].send_multipart(protocol.encode_frames(message))

    def receive(self, timeout_ms: int) -> list[Any]:
        """Every message waiting, after waiting up to `timeout_ms` for the first."""
        messages: list[Any] = []
        if not self.inbox.poll(timeout_ms):
            return messages
        while True:
            try:
                frames = self.inbox.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return messages
            try:
                messages.append(self.decoder.decode_frames(frames))
            except protocol.ProtocolError as e:
                # Only our own processes can reach an inbox; a bad or misrouted message is a
                # bug to report, not a reason to stop serving.
                print(f"pygemma4 {self.name}: dropped an internal message: {e}", file=sys.stderr)

    def close(self) -> None:
        """Close every socket."""
        self.context.destroy(linger=0)


Handler = Callable[[Any, Any], None]
"""A method of a process that acts on one message (`handler(process, message)`)."""


class Process:
    """A server process's inbox and how it acts on what arrives there: `takes` is the union
    of the messages its inbox takes, `handlers` the table of the method that acts on each of
    them (checked to match `takes` when the class is made)."""

    takes: ClassVar[Any]
    handlers: ClassVar[Mapping[type, Handler]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not hasattr(cls, "takes") and not hasattr(cls, "handlers"):
            return  # a base of processes, not a process
        taken = set(protocol.message_types(getattr(cls, "takes", ())))
        handled = set(getattr(cls, "handlers", {}))
        if taken != handled:
            unhandled = ", ".join(sorted(t.__name__ for t in taken - handled)) or "none"
            not_taken = ", ".join(sorted(t.__name__ for t in handled - taken)) or "none"
            raise TypeError(
                f"{cls.__name__}: its handlers do not match what its inbox takes (messages "
                f"without a handler: {unhandled}; handlers of messages it does not take: "
                f"{not_taken})"
            )

    def handle(self, message: Any) -> None:
        """Act on one message of the inbox."""
        self.handlers[type(message)](self, message)


def media_features(offset: int, media: PreparedMedia) -> MediaFeatures:
    """An image or clip of a prompt, its soft tokens at `offset`, as the decode worker gets
    it."""
    features = np.ascontiguousarray(media.features, dtype=np.float32)
    rows, cols = features.shape
    return MediaFeatures(
        kind=media.kind.name,  # type: ignore[arg-type]  # "image" or "audio"
        offset=offset,
        n_tokens=media.n_tokens,
        digest=media.digest,
        rows=rows,
        cols=cols,
        grid=media.grid,
        bidirectional=media.bidirectional,
        data=features.tobytes(),
    )


def prepared_media(media: MediaFeatures) -> PreparedMedia:
    """The image or clip a `MediaFeatures` carries, as its tower reads it."""
    features = np.frombuffer(media.data, dtype=np.float32).reshape(media.rows, media.cols)
    return PreparedMedia(
        MEDIA_KINDS[media.kind],
        features,
        media.n_tokens,
        media.digest,
        media.grid,
        media.bidirectional,
    )


def kv_layout(spec: KvPoolSpec) -> KvLayout:
    """The layout of the shared pool `spec` describes."""
    return KvLayout(
        block_size=spec.block_size,
        n_blocks=spec.n_blocks,
        n_ring_sets=spec.n_ring_sets,
        ring_blocks=spec.ring_blocks,
        nbytes=spec.nbytes,
        kv_dtype=spec.kv_dtype,
    )


def map_kv_pool(spec: KvPoolSpec, model_config: ModelConfig) -> Any:
    """The shared KV pool as a `_core.KvPool` over the memory every worker maps (or, on a GPU,
    opens)."""
    if spec.kind == "cuda_ipc":
        return kv_layout(spec).new_pool(
            model_config, device=spec.device, ipc_handle=spec.ipc_handle
        )
    memory = mmap.mmap(spec.fd, spec.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return kv_layout(spec).new_pool(model_config, memory)


def shared_pool_runner(config: ServerConfig, n_batch: int, threads: int) -> ModelRunner:
    """A runner of the server's model over the shared KV pool, for calls of up to `n_batch`
    tokens computed by `threads` threads (on the CPU)."""
    model = open_model(config.model)
    pool = map_kv_pool(config.kv, model.config)
    return ModelRunner(model, pool, n_batch, threads, config.backend, config.device)


def supervisor_alive(config: ServerConfig) -> bool:
    """Whether the process that started this one still runs (a worker must not outlive it)."""
    return os.getppid() == config.supervisor_pid


class Worker(Process):
    """A worker process: its mailbox, and the loop that serves it until the supervisor goes.

    Subclasses declare what their inbox `takes` and their `handlers`, and do their own work
    between messages in `work` (at most `wait_ms` after the last)."""

    def __init__(self, config: ServerConfig, name: str, peers: Iterable[str]) -> None:
        self.config = config
        self.name = name
        self.mail = Mailbox(config, name, peers, self.takes)

    def run(self) -> None:
        """Say the worker is ready, then serve its inbox as long as the supervisor runs."""
        self.mail.send("frontend", protocol.WorkerReady(name=self.name, pid=os.getpid()))
        while supervisor_alive(self.config):
            for message in self.mail.receive(self.wait_ms()):
                self.handle(message)
            self.work()

    def wait_ms(self) -> int:
        """How long the loop may wait for a message before `work` is due: 0 where it has
        something to do without one."""
        return POLL_MS

    def work(self) -> None:
        """What the worker does between messages."""

    def close(self) -> None:
        """Close the worker's sockets."""
        self.mail.close()


def run_worker(worker_type: Callable[[ServerConfig, str, int], Worker]) -> None:
    """The entry point of a worker process: `python -m pygemma4.workers.MODULE NAME EPOCH CONFIG`.

    SIGTERM ends the worker cleanly; SIGINT is left to the supervisor, which stops everything
    in order.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("epoch", type=int)
    parser.add_argument("config", type=decode_config)
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    worker = worker_type(args.config, args.name, args.epoch)
    try:
        worker.run()
    finally:
        worker.close()
