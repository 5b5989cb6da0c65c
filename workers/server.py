"""The setup of one `pygemma4 serve`: the model's checks, the layout and memory of the shared KV
pool, the workers' endpoints and configuration, the supervisor and the front end, and their
removal, which leaves nothing behind."""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from pygemma4.assistant_config import open_assistant
from pygemma4.config import ARCH, ModelConfig, open_model
from pygemma4.curve import KeyPair
from pygemma4.drafter import NGRAM
from pygemma4.engine import default_n_ctx
from pygemma4.kv import (
    DEFAULT_BLOCK_SIZE,
    KvExhaustedError,
    KvFootprint,
    KvLayout,
    resolve_kv_dtype,
)
from pygemma4.media.image import DEFAULT_SOFT_TOKENS
from pygemma4.media.kinds import AUDIO, IMAGE
from pygemma4.media.prepared import MediaPreprocessor, open_projector
from pygemma4.memory import MemoryBudget, memory_available_bytes
from pygemma4.protocol import KvPoolSpec, ServeLimits, ServerInfo
from pygemma4.runner import check_backend
from pygemma4.speculative import DEFAULT_DRAFT_TOKENS, check_draft_tokens
from pygemma4.tokenizer import carries_tokenizer
from pygemma4.workers.frontend import FrontEnd, ServerStartError
from pygemma4.workers.runtime import ServerConfig
from pygemma4.workers.supervisor import Supervisor

DEFAULT_KV_FRACTION = 0.4
"""The share of the memory available that a CPU server's KV pool takes by default."""


def _pool_layout(
    config: ModelConfig,
    backend: str,
    sequences: int,
    max_chunk: int,
    *,
    max_positions: int,
    kv_tokens: int | None,
    kv_memory: str | None,
    kv_dtype: str,
) -> KvLayout:
    """The KV pool's layout, entries of `kv_dtype`: rings for `sequences` sequences fed up to
    `max_chunk` tokens a call, and blocks for `kv_tokens` positions, for what `kv_memory`
    holds, or by default (see `Server`), never more than `max_positions`."""
    if kv_tokens is not None and kv_memory is not None:
        raise ServerStartError("--kv-tokens and --kv-memory are alternatives")
    n_ctx = min(config.n_ctx_train, max_positions)
    if kv_tokens is not None:
        n_blocks = -(-kv_tokens // DEFAULT_BLOCK_SIZE)
        return KvLayout.for_model(
            config, n_ctx, sequences, max_chunk, n_blocks=n_blocks, kv_dtype=kv_dtype
        )
    available = memory_available_bytes() if backend == "cpu" else None
    if kv_memory is not None:
        budget = MemoryBudget.parse(kv_memory).resolve(available)
    elif available is not None:
        budget = int(available * DEFAULT_KV_FRACTION)
    else:  # no figure to size by (a CUDA device): every sequence at the default context
        positions = min(max_positions, sequences * default_n_ctx(config))
        n_blocks = -(-positions // DEFAULT_BLOCK_SIZE)
        return KvLayout.for_model(
            config, n_ctx, sequences, max_chunk, n_blocks=n_blocks, kv_dtype=kv_dtype
        )
    try:
        return KvLayout.for_memory(
            config, budget, sequences, max_chunk, max_positions, kv_dtype=kv_dtype
        )
    except KvExhaustedError as e:
        raise ServerStartError(str(e)) from None


def _anonymous_memory(nbytes: int) -> int:
    """A descriptor of `nbytes` of shared memory that no path names: it is freed when the
    last process holding it exits, however that happens."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("pygemma4-kv")
    else:
        fd, path = tempfile.mkstemp(prefix="pygemma4-kv-")
        os.unlink(path)
    os.ftruncate(fd, nbytes)
    return fd


class Server:
    """Everything one `pygemma4 serve` holds; `close` leaves nothing behind."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        endpoint: str,
        threads: int,
        backend: str = "cpu",
        device: int = 0,
        max_batch: int,
        n_ctx: int | None,
        prefill_chunk: int,
        tokenizer_workers: int,
        max_pending: int,
        max_message_bytes: int,
        kv_tokens: int | None,
        kv_memory: str | None = None,
        kv_dtype: str | None = None,
        curve_secret_key: str | None = None,
        curve_clients: str | None = None,
        http: str | None = None,
        api_key: str | None = None,
        draft: str | None = None,
        draft_tokens: int = DEFAULT_DRAFT_TOKENS,
        limits: ServeLimits | None = None,
        mmproj: str | os.PathLike[str] | None = None,
        max_image_tokens: int = DEFAULT_SOFT_TOKENS,
    ) -> None:
        """`http` is HOST:PORT of the HTTP front end (None: none), `api_key` the key it
        requires (None: none); `draft` the drafter to decode with ("ngram", or an assistant
        GGUF made for the model), `draft_tokens` per step. The KV pool holds `kv_tokens`
        positions, or what `kv_memory` (a size, or a fraction of the memory available) holds;
        by default on the CPU what DEFAULT_KV_FRACTION of the memory available holds, up to
        every sequence at the model's trained context. KV entries are stored as `kv_dtype`
        (default: f16 on the CPU, f32 on CUDA). `n_ctx` (default: the model's trained
        context, where the pool holds it) bounds one sequence. `limits` bound what one client
        may ask (by default ServeLimits' defaults, prompts up to the context). With `mmproj`
        (the model's projector GGUF, checked against it) chats may hold images (each at most
        `max_image_tokens` soft tokens) and clips, as its towers take."""
        kv_dtype = resolve_kv_dtype(kv_dtype, backend)
        check_backend(backend, device)
        model_file = open_model(model)
        if not carries_tokenizer(model_file.gguf.metadata):
            raise ServerStartError(f"{model}: the file carries no tokenizer, which serving needs")
        if draft is not None:
            # Checked here, so that a wrong file is said before any worker starts.
            check_draft_tokens(draft_tokens, prefill_chunk)
            if draft != NGRAM:
                draft = str(open_assistant(draft, model_file).gguf.path.resolve())
        media = None
        if mmproj is not None:
            # Checked here, so that a wrong file is said before any worker starts.
            media = MediaPreprocessor(open_projector(mmproj, model_file), max_image_tokens)
            # Each image whose soft tokens attend to each other is prefilled in one call.
            prefill_chunk = max(prefill_chunk, media.image_call_tokens)
        config = model_file.config
        # A ring set per sequence, and as many again kept as prefix snapshots (none on CUDA,
        # where copying ring sets is not verified on a GPU yet).
        prefix_snapshots = max_batch if backend == "cpu" else 0
        layout = _pool_layout(
            config,
            backend,
            max_batch + prefix_snapshots,
            prefill_chunk,
            max_positions=max_batch * (config.n_ctx_train if n_ctx is None else n_ctx),
            kv_tokens=kv_tokens,
            kv_memory=kv_memory,
            kv_dtype=kv_dtype,
        )
        pool_positions = layout.n_blocks * layout.block_size
        if n_ctx is None:
            n_ctx = min(config.n_ctx_train, pool_positions)
        elif n_ctx > pool_positions:
            raise ServerStartError(
                f"--n-ctx {n_ctx}: one sequence of that length needs KV for {n_ctx} positions; "
                f"the pool holds {pool_positions} ({layout.nbytes / 2**30:.2f} GiB)"
            )
        limits = limits or ServeLimits()
        if limits.max_prompt_tokens is None or limits.max_prompt_tokens > n_ctx:
            limits = msgspec.structs.replace(limits, max_prompt_tokens=n_ctx)
        self.kv_layout = layout
        self.kv_footprint = KvFootprint.of(config, kv_dtype)
        self.socket_dir: Path | None = None
        ipc_base = self._ipc_base()
        self.kv_fd: int | None = None
        self.kv_pool: Any = None
        kv = self._share_kv_pool(layout, config, backend, device)
        # Under CURVE the HTTP front end is one more client: it gets a pair for this run.
        http_curve_keys = KeyPair.new() if http and curve_secret_key else None
        self.config = ServerConfig(
            model=str(Path(model).resolve()),
            endpoint=endpoint,
            ipc_base=ipc_base,
            backend=backend,
            device=device,
            threads=threads,
            max_batch=max_batch,
            n_ctx=n_ctx,
            prefill_chunk=prefill_chunk,
            tokenizer_workers=tokenizer_workers,
            max_pending=max_pending,
            max_message_bytes=max_message_bytes,
            kv=kv,
            supervisor_pid=os.getpid(),
            curve_secret_key=curve_secret_key,
            curve_clients=curve_clients,
            http=http,
            draft=draft,
            draft_tokens=draft_tokens if draft is not None else 0,
            prefix_snapshots=prefix_snapshots,
            http_curve_public=None if http_curve_keys is None else http_curve_keys.public.decode(),
            limits=limits,
            mmproj=None if mmproj is None else str(Path(mmproj).resolve()),
            max_image_tokens=max_image_tokens,
        )
        # The HTTP front end serves many clients over one connection, which the per-client
        # limit must spare (it limits each HTTP client address itself).
        http_routing_id = secrets.token_bytes(16) if http else None
        self.supervisor = Supervisor(
            self.config,
            http_api_key=api_key,
            http_curve_keys=http_curve_keys,
            http_routing_id=http_routing_id,
        )
        info = ServerInfo(
            id=None,
            model=Path(model).name,
            architecture=ARCH,
            vocab_size=config.vocab_size,
            n_ctx=n_ctx,
            max_batch=max_batch,
            max_pending=max_pending,
            max_message_bytes=max_message_bytes,
            draft=None if draft is None else Path(draft).name,
            draft_tokens=self.config.draft_tokens,
            limits=limits,
            vision=media is not None and media.takes(IMAGE),
            audio=media is not None and media.takes(AUDIO),
            max_image_tokens=max_image_tokens if media is not None and media.takes(IMAGE) else 0,
        )
        try:
            self.frontend = FrontEnd(self.config, self.supervisor, info, http_routing_id)
        except BaseException:
            self._free_memory_and_sockets()
            raise

    def _ipc_base(self) -> str:
        """The prefix of the workers' endpoints: sockets in Linux's abstract namespace, like
        the pool's memory file, leave nothing to clean up even when this process is killed;
        elsewhere they are files in a private directory (`socket_dir`)."""
        if sys.platform == "linux":
            return f"ipc://@pygemma4-{os.getpid()}-{secrets.token_hex(4)}"
        self.socket_dir = Path(tempfile.mkdtemp(prefix="pygemma4-"))
        return f"ipc://{self.socket_dir}"

    def _share_kv_pool(
        self, layout: KvLayout, config: ModelConfig, backend: str, device: int
    ) -> KvPoolSpec:
        """Make the KV pool the workers share, and say where it is. It lives as long as this
        process: in a nameless memory file the workers inherit (`kv_fd`), or on the GPU in an
        allocation (`kv_pool`) they open by its IPC handle."""
        if backend == "cuda":
            self.kv_pool = layout.new_pool(config, device=device)
            return KvPoolSpec(
                kind="cuda_ipc",
                ipc_handle=self.kv_pool.ipc_handle(),
                device=device,
                **dataclasses.asdict(layout),
            )
        self.kv_fd = _anonymous_memory(layout.nbytes)
        return KvPoolSpec(kind="shm", fd=self.kv_fd, **dataclasses.asdict(layout))

    def start(self, progress: Callable[[int, int], None]) -> None:
        """Start the workers and wait until they have loaded."""
        self.supervisor.start_all()
        self.frontend.wait_ready(progress)

    def serve(self, should_stop: Callable[[], bool]) -> None:
        """Answer clients until `should_stop()`."""
        self.frontend.serve(should_stop)

    def close(self) -> None:
        """Stop every process, close the sockets and free the KV pool."""
        self.supervisor.stop_all()
        self.frontend.close()
        self._free_memory_and_sockets()

    def _free_memory_and_sockets(self) -> None:
        """Free the KV pool and remove the socket directory, if any."""
        if self.kv_fd is not None:
            os.close(self.kv_fd)
        self.kv_pool = None
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
