"""The front end: the router of the process `pygemma4 serve` runs.

It binds the clients' endpoint (a ROUTER socket), checks every client message, tracks each
request in flight until it ends in exactly one of done, cancelled or error, answers health and
info, and reacts to the workers the supervisor watches: a worker that dies is restarted and the
requests it held fail at once. `server` sets up what it routes between.
"""

from __future__ import annotations

import errno
import itertools
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import zmq
from zmq.auth.thread import ThreadAuthenticator

from pygemma4 import curve, protocol
from pygemma4.errors import Gemma4Error
from pygemma4.protocol import (
    AdmittedRequest,
    Cancel,
    Cancelled,
    Chat,
    Completion,
    DecodeLoad,
    EncodedReply,
    EndedRequests,
    Error,
    ErrorCode,
    Health,
    HealthStatus,
    Info,
    ServerInfo,
    WorkerReady,
)
from pygemma4.workers.runtime import Mailbox, Process, ServerConfig
from pygemma4.workers.supervisor import Supervisor, WorkerProcess

# The front end answers messages up to `max_message_bytes` with an error naming the limit;
# ZeroMQ drops a peer that sends more than this many times that, before it is buffered whole.
HARD_SIZE_FACTOR = 4
LOOP_MS = 50
ZAP_DOMAIN = "pygemma4"  # the authentication domain of the clients' endpoint
DRAIN = 1000  # most messages taken from one socket before looking at the others
START_TIMEOUT_S = 600.0


class ServerStartError(Gemma4Error, RuntimeError):
    """The server could not start (a worker failed while loading, the endpoint is taken)."""


@dataclass
class Tracked:
    """A request in flight: who sent it, under which id, and which tokenizer worker has it."""

    identity: bytes
    client_id: int
    tokenizer: int


class FrontEnd(Process):
    """Routes client messages to the workers and replies back, and reacts to worker deaths."""

    def __init__(
        self,
        config: ServerConfig,
        supervisor: Supervisor,
        info: ServerInfo,
        http_routing_id: bytes | None = None,
    ) -> None:
        """`http_routing_id` is the connection of the server's own HTTP front end, which
        the per-client limit spares."""
        self.config = config
        self.http_routing_id = http_routing_id
        self.supervisor = supervisor
        self.info = info
        self.mail = Mailbox(config, "frontend", [*config.tokenizer_names(), "decode"], self.takes)
        self.router = self.mail.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes * HARD_SIZE_FACTOR)
        self.authenticator: ThreadAuthenticator | None = None
        if config.curve_secret_key is not None:
            self.require_curve(
                config.curve_secret_key, config.curve_clients, config.http_curve_public
            )
        try:
            if _ipc_in_use(config.endpoint):
                raise zmq.ZMQError(errno.EADDRINUSE)
            self.router.bind(config.endpoint)
        except zmq.ZMQError as e:
            self.close()
            raise ServerStartError(f"cannot listen on {config.endpoint}: {e}") from None
        self.requests: dict[int, Tracked] = {}
        self.by_client: dict[tuple[bytes, int], int] = {}
        self.rids = itertools.count()
        self.decode_load = DecodeLoad(kv_blocks_used=0, kv_blocks_total=config.kv.n_blocks)
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(self.mail.inbox, zmq.POLLIN)

    def require_curve(self, secret_key: str, clients: str | None, also: str | None) -> None:
        """Admit only clients that authenticate with CURVE keys found in `clients` (read
        now), or with the public key `also`; without a running authenticator, ZeroMQ then
        admits no one (it fails closed)."""
        try:
            public, secret = curve.load_secret(secret_key)
            if clients is None:
                raise curve.CurveKeyError("CURVE needs the directory of admitted clients' keys")
            admitted = curve.admitted_keys(clients)
        except curve.CurveKeyError:
            self.mail.close()
            raise
        if also is not None:
            admitted.add(also.encode())
        self.authenticator = ThreadAuthenticator(self.mail.context)
        self.authenticator.start()
        self.authenticator.configure_curve_callback(ZAP_DOMAIN, _AdmittedKeys(admitted))
        self.router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        self.router.zap_domain = ZAP_DOMAIN.encode()
        self.router.curve_publickey = public
        self.router.curve_secretkey = secret
        self.router.curve_server = True

    def wait_ready(self, progress: Callable[[int, int], None]) -> None:
        """Return once every worker has loaded; `progress(ready, total)` after each one."""
        workers = self.supervisor.workers
        reported = 0
        progress(reported, len(workers))
        deadline = time.monotonic() + START_TIMEOUT_S
        while reported < len(workers):
            for message in self.mail.receive(LOOP_MS):
                self.handle(message)
            ready = sum(w.ready for w in workers.values())
            if ready != reported:
                reported = ready
                progress(ready, len(workers))
            dead = [w for w in workers.values() if w.process is not None and not w.alive()]
            if dead:
                raise ServerStartError(
                    f"the {dead[0].name} worker exited with code {dead[0].process.returncode} "
                    "while loading (its error is printed above)"
                )
            if time.monotonic() > deadline:
                raise ServerStartError(f"workers not ready after {START_TIMEOUT_S:.0f} s")

    def mark_ready(self, message: WorkerReady) -> None:
        """Note that a worker (this incarnation of it) has loaded."""
        worker = self.supervisor.workers.get(message.name)
        if worker is not None and worker.pid == message.pid:
            worker.ready = True

    def serve(self, should_stop: Callable[[], bool]) -> None:
        """Serve until `should_stop()` says so."""
        while not should_stop():
            events = dict(self.poller.poll(LOOP_MS))
            if self.router in events:
                self.drain_clients()
            if self.mail.inbox in events:
                for message in self.mail.receive(0):
                    self.handle(message)
            died = self.supervisor.reap()
            if died:
                self.fail_held(died)
            self.supervisor.restart_due()

    def drain_clients(self) -> None:
        """Handle the client messages waiting (a bounded number, so workers get their turn)."""
        for _ in range(DRAIN):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.handle_client(frames[0], frames[1:])

    def handle_client(self, identity: bytes, frames: list[bytes]) -> None:
        """Check one client message and act on it; anything wrong gets an error reply."""
        if len(frames) != 1:
            self.refuse(
                identity, None, "bad_request", f"a message is exactly one frame, got {len(frames)}"
            )
            return
        payload = frames[0]
        if len(payload) > self.config.max_message_bytes:
            self.refuse(
                identity,
                protocol.request_id_of(payload),
                "too_large",
                f"message of {len(payload)} bytes exceeds the limit of "
                f"{self.config.max_message_bytes} bytes",
            )
            return
        try:
            message = protocol.decode_request(payload)
        except protocol.ProtocolError as e:
            self.refuse(identity, protocol.request_id_of(payload), "bad_request", str(e))
            return
        if message.v != protocol.PROTOCOL_VERSION:
            self.refuse(
                identity,
                message.id,
                "version",
                f"protocol version {message.v} is not supported; this server speaks version "
                f"{protocol.PROTOCOL_VERSION}",
            )
        elif isinstance(message, (Completion, Chat)):
            self.submit(identity, message)
        elif isinstance(message, Cancel):
            rid = self.by_client.get((identity, message.id))
            if rid is not None:
                self.end(rid, Cancelled(id=message.id))
        elif isinstance(message, Health):
            states = self.supervisor.states()
            self.reply(
                identity,
                HealthStatus(
                    id=message.id,
                    ok=all(s.alive for s in states),
                    workers=states,
                    requests_in_flight=len(self.requests),
                    kv_blocks_used=self.decode_load.kv_blocks_used,
                    kv_blocks_total=self.decode_load.kv_blocks_total,
                    speculation=self.decode_load.speculation,
                    prefix_looked_up=self.decode_load.prefix_looked_up,
                    prefix_hit=self.decode_load.prefix_hit,
                ),
            )
        elif isinstance(message, Info):
            info = msgspec.structs.replace(
                self.info, id=message.id, speculation=self.decode_load.speculation
            )
            self.reply(identity, info)

    def submit(self, identity: bytes, request: Completion | Chat) -> None:
        """Hand a new request to a tokenizer worker, unless it cannot be taken now."""
        key = (identity, request.id)
        if key in self.by_client:
            self.refuse(
                identity,
                request.id,
                "bad_request",
                f"request id {request.id} is already in flight on this connection",
            )
            return
        if len(self.requests) >= self.config.max_pending:
            self.refuse(
                identity,
                request.id,
                "busy",
                f"server busy: {len(self.requests)} requests in flight, the limit; retry later",
            )
            return
        per_client = self.config.limits.max_pending_per_client
        if identity != self.http_routing_id:
            mine = sum(1 for t in self.requests.values() if t.identity == identity)
            if mine >= per_client:
                self.refuse(
                    identity,
                    request.id,
                    "busy",
                    f"this connection has {mine} requests in flight, the limit per client "
                    f"(--max-pending-per-client {per_client}); retry when one ends",
                )
                return
        rid = next(self.rids)
        tokenizer = rid % self.config.tokenizer_workers
        self.requests[rid] = Tracked(identity, request.id, tokenizer)
        self.by_client[key] = rid
        self.mail.send(
            self.config.tokenizer_names()[tokenizer], AdmittedRequest(rid=rid, request=request)
        )

    def pass_reply(self, message: EncodedReply) -> None:
        """Pass a reply from a tokenizer worker on to its client (unless the request has
        already ended here)."""
        tracked = self.requests.get(message.rid)
        if tracked is None:
            return
        if message.final:
            self.forget(message.rid)
        self.send(tracked.identity, bytes(message.reply))

    def note_decode_load(self, load: DecodeLoad) -> None:
        """Keep the decode worker's latest counts, for health and info."""
        self.decode_load = load

    def fail_held(self, died: list[WorkerProcess]) -> None:
        """Fail, at once, every request a dead worker (or its group) held."""
        names = ", ".join(f"{w.name} (pid {w.pid or '?'})" for w in died)
        if any(w.group == "kv" for w in died):
            # The pool is recreated with the group: nothing holds any of it, and the new
            # decode worker counts its drafts afresh.
            self.decode_load = DecodeLoad(
                kv_blocks_used=0, kv_blocks_total=self.decode_load.kv_blocks_total
            )
            rids = list(self.requests)
            for tokenizer in self.config.tokenizer_names():
                self.mail.send(tokenizer, EndedRequests(rids=rids))
        else:
            lost = {self.config.tokenizer_names().index(w.name) for w in died}
            rids = [rid for rid, t in self.requests.items() if t.tokenizer in lost]
            self.mail.send("decode", EndedRequests(rids=rids))
        for rid in rids:
            tracked = self.requests[rid]
            self.end(
                rid,
                Error(
                    id=tracked.client_id,
                    code="worker_failed",
                    message=(
                        f"worker {names} died while holding this request; it is being restarted, "
                        "retry the request"
                    ),
                ),
                abort=False,
            )

    def end(self, rid: int, reply: protocol.ServerReply, abort: bool = True) -> None:
        """End a request from here with `reply`; with `abort`, the workers drop it too."""
        tracked = self.requests[rid]
        if abort:
            self.drop(rid)
        else:
            self.forget(rid)
        self.reply(tracked.identity, reply)

    def drop(self, rid: int) -> None:
        """Stop tracking a request and have the workers stop it and free its KV."""
        tracked = self.requests[rid]
        self.forget(rid)
        self.mail.send("decode", EndedRequests(rids=[rid]))
        self.mail.send(self.config.tokenizer_names()[tracked.tokenizer], EndedRequests(rids=[rid]))

    def forget(self, rid: int) -> None:
        """Stop tracking a request."""
        tracked = self.requests.pop(rid)
        del self.by_client[(tracked.identity, tracked.client_id)]

    def refuse(
        self, identity: bytes, request_id: int | None, code: ErrorCode, message: str
    ) -> None:
        """Answer a client message with an error."""
        self.reply(identity, Error(id=request_id, code=code, message=message))

    def reply(self, identity: bytes, reply: protocol.ServerReply) -> None:
        """Send a reply to a client."""
        self.send(identity, protocol.encode(reply))

    def send(self, identity: bytes, payload: bytes) -> None:
        """Send to a client; one that is gone, or does not read its replies, loses its
        requests (the workers stop them and free their KV)."""
        try:
            self.router.send_multipart([identity, payload], zmq.NOBLOCK)
        except zmq.ZMQError:
            for rid in [r for r, t in self.requests.items() if t.identity == identity]:
                self.drop(rid)

    def close(self) -> None:
        """Close every socket (and stop the authenticator)."""
        if self.authenticator is not None:
            self.authenticator.stop()
        self.mail.close()

    takes = protocol.FrontEndInbox
    handlers = {WorkerReady: mark_ready, EncodedReply: pass_reply, DecodeLoad: note_decode_load}


@dataclass(frozen=True)
class _AdmittedKeys:
    """The authenticator's credentials check: a client's public key (Z85) is admitted."""

    keys: set[bytes]

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


def _ipc_in_use(endpoint: str) -> bool:
    """Whether a process accepts connections on the socket file of an ipc:// endpoint: ZeroMQ
    would silently take the path over from it, where a taken tcp port fails to bind."""
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(endpoint.removeprefix("ipc://"))
        except OSError:
            return False  # no file, or a stale one nothing listens on
    return True
