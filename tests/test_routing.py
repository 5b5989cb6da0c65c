"""Routing between the server's processes: each inbox takes only its own messages, over real
ipc sockets, and each process has a handler for exactly what its inbox takes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from pygemma4 import protocol
from pygemma4.protocol import EndedRequests, KvPoolSpec, StepTokens, TokenizedRequest
from pygemma4.workers.decode import DecodeWorker
from pygemma4.workers.frontend import FrontEnd
from pygemma4.workers.runtime import Mailbox, Process, ServerConfig
from pygemma4.workers.tokenizer import TokenizerWorker


def server_config(socket_dir: Path) -> ServerConfig:
    """A configuration whose only use here is naming the processes' endpoints."""
    return ServerConfig(
        model="unused.gguf",
        endpoint="tcp://127.0.0.1:0",
        ipc_base=f"ipc://{socket_dir}",
        backend="cpu",
        device=0,
        threads=1,
        max_batch=1,
        n_ctx=16,
        prefill_chunk=16,
        tokenizer_workers=1,
        max_pending=1,
        max_message_bytes=1024,
        kv=KvPoolSpec(
            kind="shm",
            block_size=16,
            n_blocks=1,
            n_ring_sets=1,
            ring_blocks=1,
            nbytes=0,
            kv_dtype="f32",
        ),
        supervisor_pid=0,
    )


def receive(mailbox: Mailbox, count: int, timeout: float = 10.0) -> list[Any]:
    """The next `count` messages the mailbox decodes (failing when they do not come)."""
    messages: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(messages) < count:
        assert time.monotonic() < deadline, f"got {messages}, not {count} messages"
        messages += mailbox.receive(50)
    return messages


@pytest.fixture
def decode_and_frontend(tmp_path: Path) -> Any:
    """The mailboxes of a decode worker and of a front end that sends to it."""
    config = server_config(tmp_path)
    decode = Mailbox(config, "decode", [], protocol.DecodeInbox)
    frontend = Mailbox(config, "frontend", ["decode"], protocol.FrontEndInbox)
    yield decode, frontend
    frontend.close()
    decode.close()


def test_an_inbox_receives_its_messages(decode_and_frontend: Any) -> None:
    decode, frontend = decode_and_frontend
    sent = [
        TokenizedRequest(
            rid=1,
            prompt_ids=[2, 3],
            max_tokens=4,
            sampling=protocol.Sampling(),
            stop_token_ids=[1],
            tokenizer=0,
        ),
        EndedRequests(rids=[1, 5]),
    ]
    for message in sent:
        frontend.send("decode", message)
    assert receive(decode, len(sent)) == sent


def test_a_message_for_another_process_is_reported_naming_it_and_the_process(
    decode_and_frontend: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    decode, frontend = decode_and_frontend
    frontend.send("decode", StepTokens(outputs=[]))
    frontend.send("decode", EndedRequests(rids=[7]))
    # Sent in order over one connection: the misrouted message was decoded before this one.
    assert receive(decode, 1) == [EndedRequests(rids=[7])]
    report = capsys.readouterr().err
    assert "StepTokens sent to decode" in report, report
    assert "TokenizedRequest, EndedRequests" in report, report


def test_a_frame_that_is_no_message_is_reported_by_the_process(
    decode_and_frontend: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    decode, frontend = decode_and_frontend
    frontend.outboxes["decode"].send(b"\xc1")
    frontend.send("decode", EndedRequests(rids=[7]))
    assert receive(decode, 1) == [EndedRequests(rids=[7])]
    report = capsys.readouterr().err
    assert "pygemma4 decode: dropped an internal message: undecodable" in report, report


@pytest.mark.parametrize(
    "process",
    [FrontEnd, TokenizerWorker, DecodeWorker],
    ids=lambda p: p.__name__,
)
def test_each_process_handles_exactly_what_its_inbox_takes(process: type[Process]) -> None:
    assert set(process.handlers) == set(protocol.message_types(process.takes))


def test_every_message_between_workers_goes_to_some_inbox() -> None:
    inboxes = (
        protocol.FrontEndInbox,
        protocol.TokenizerInbox,
        protocol.DecodeInbox,
    )
    taken = {t for inbox in inboxes for t in protocol.message_types(inbox)}
    assert taken == set(protocol.message_types(protocol.Internal))
    assert taken == set(protocol._Internal.__subclasses__())


def test_a_process_without_a_handler_for_a_message_it_takes_is_refused() -> None:
    with pytest.raises(TypeError, match=r"without a handler: EndedRequests; .*: none\)"):

        class Incomplete(Process):
            def queue(self, request: TokenizedRequest) -> None: ...

            takes = protocol.DecodeInbox
            handlers = {TokenizedRequest: queue}


def test_handle_calls_the_handler_of_the_message_type() -> None:
    class Recorder(Process):
        def __init__(self) -> None:
            self.seen: list[tuple[str, Any]] = []

        def queue(self, request: TokenizedRequest) -> None:
            self.seen.append(("queue", request))

        def end(self, ended: EndedRequests) -> None:
            self.seen.append(("end", ended))

        takes = protocol.DecodeInbox
        handlers = {TokenizedRequest: queue, EndedRequests: end}

    recorder = Recorder()
    request = TokenizedRequest(
        rid=1, prompt_ids=[2], max_tokens=1, sampling=protocol.Sampling(), stop_token_ids=[],
        tokenizer=0,
    )  # fmt: skip
    ended = EndedRequests(rids=[1])
    recorder.handle(ended)
    recorder.handle(request)
    assert recorder.seen == [("end", ended), ("queue", request)]
