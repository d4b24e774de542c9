"""Transport layer of the Ray backend: how one agent's buffer reaches its neighbours in a gossip round.

The topology says who talks to whom and the mixing matrix with which weights; a :class:`Transport`
only moves flat buffers and is chosen per neighbour:

* **same node, shared memory** (``transport: auto``, POSIX): every agent owns, per buffer size, two
  slots in a file under ``/dev/shm`` (reserved with ``posix_fallocate``, so a full ``/dev/shm`` is a
  clean fallback instead of a ``SIGBUS``). A round copies the buffer once into the slot ``r mod 2`` and
  writes a 32-byte record into each neighbour's inbox FIFO; the neighbour sums straight from its
  mapping of the sender's slot, then acknowledges. A slot is rewritten only after every reader of
  its previous round acknowledged, which keeps time-varying graphs safe.
* **other nodes, or** ``transport: object_store``: the buffer is ``ray.put`` once (inline with the call
  up to :data:`INLINE_BYTES`) and handed to each neighbour's ``deliver``; the neighbour reads it
  zero-copy from the object store. ``deliver`` files a record in the same inbox.

All notifications arrive in one inbox per agent (a FIFO the owner holds open read-write), so the
mixing thread blocks in ``os.read`` with the GIL released. Records carry the gossip epoch; the driver
bumps it on every restore, so messages of an aborted round are dropped, and ``abort`` writes a record
that wakes a round waiting for a dead neighbour.
"""

from __future__ import annotations

import errno
import glob
import os
import struct
import tempfile
import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["Transport", "RoundAborted", "INLINE_BYTES", "TRANSPORTS", "shm_dir"]

#: buffers up to this size are sent inline with the ``deliver`` call instead of through ``ray.put``
INLINE_BYTES = 100 * 1024
TRANSPORTS = ("auto", "object_store")

_RECORD = struct.Struct("<iiiiqq")  # kind, epoch, round, src, slot, numel  (32 bytes: divides PIPE_BUF)
_DATA, _ACK, _ABORT, _REMOTE = range(4)
_READ = _RECORD.size * 128


def shm_dir() -> str:
    """Where the shared-memory slots and inbox FIFOs live (``/dev/shm`` when the OS has it)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class RoundAborted(RuntimeError):
    """A gossip round gave up because a neighbour failed or is gone (a symptom, never the cause)."""


class _Slots:
    """Two slots of ``numel`` elements owned by one agent, with the readers each slot still waits for."""

    def __init__(self, path: str, numel: int, dtype: np.dtype, create: bool):
        if create:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, 2 * numel * dtype.itemsize)
            finally:
                os.close(fd)
        self.array = np.memmap(path, dtype=dtype, mode="r+" if create else "r", shape=(2, numel))
        self.readers: list[tuple[int, list[int]]] = [(-1, []), (-1, [])]  # per slot: (round, readers)


class Transport:
    """One agent's end of the gossip (lives inside the agent actor)."""

    def __init__(self, name: str, rank: int, mode: str = "auto"):
        if mode not in TRANSPORTS:
            raise ValueError(f"decentralized.transport: {mode!r} is not one of {', '.join(TRANSPORTS)}")
        self.name, self.rank = name, rank
        self.shm = mode == "auto" and hasattr(os, "posix_fallocate")
        self.dir = shm_dir()
        for stale in glob.glob(self._path(rank, "*")):  # left by a previous incarnation of this agent
            os.unlink(stale)
        inbox = self._path(rank, "inbox")
        os.mkfifo(inbox, 0o600)
        self.inbox = os.open(inbox, os.O_RDWR)  # a reader always exists: writes never EOF/EPIPE
        self.epoch = 0
        self.peers: dict[int, Any] = {}
        self.local: set[int] = set()  # peers reached through shared memory
        self.outs: dict[int, int] = {}  # peer -> write end of its inbox
        self.own: dict[tuple[int, str], _Slots | None] = {}  # None: no room, use the object store
        self.views: dict[tuple[int, int, str], _Slots] = {}
        self.box: dict[tuple[int, int], tuple[int, int, int]] = {}  # (round, src) -> (kind, slot, numel)
        self.acks: set[tuple[int, int]] = set()  # (round, src)
        self.remote: dict[tuple[int, int, int], np.ndarray] = {}  # (epoch, round, src) -> payload
        self.aborted = False
        self.bytes_sent = 0
        self.bytes_shared = 0  # the part of bytes_sent that went through shared memory

    def _path(self, rank: int, what: str) -> str:
        return os.path.join(self.dir, f"{self.name}-{rank}-{what}")

    # ---- wiring (driver calls, between rounds) ----

    def connect(self, peers: dict[int, Any], nodes: dict[int, str]) -> None:
        """Neighbour handles and node ids; drops every old mapping (peers may have restarted)."""
        self.close_peers()
        self.peers = peers
        me = nodes.get(self.rank)
        self.local = {j for j, node in nodes.items() if self.shm and j != self.rank and node == me}

    def reset(self, epoch: int) -> None:
        """Start gossip epoch ``epoch``: forget every message and pending acknowledgement."""
        self.epoch, self.aborted = epoch, False
        self.box.clear()
        self.acks.clear()
        self.remote.clear()
        for slots in self.own.values():
            if slots is not None:
                slots.readers = [(-1, []), (-1, [])]

    # ---- called from Ray's threads while a round may be waiting ----

    def deliver(self, epoch: int, gossip_round: int, src: int, payload: np.ndarray) -> None:
        """File ``src``'s object-store buffer of round ``gossip_round`` (dropped if from an old epoch)."""
        if epoch == self.epoch:  # a message of an aborted round is dropped
            self.remote[(epoch, gossip_round, src)] = payload
            self._post(self.inbox, _REMOTE, epoch, gossip_round, src, 0, 0)

    def abort(self) -> None:
        """Wake a round waiting on the inbox and make it raise :class:`RoundAborted`."""
        self._post(self.inbox, _ABORT, self.epoch, -1, self.rank, 0, 0)

    @staticmethod
    def _post(fd: int, *record: int) -> None:
        os.write(fd, _RECORD.pack(*record))  # atomic (≤ PIPE_BUF): concurrent writers never interleave

    # ---- one gossip round ----

    def exchange(self, gossip_round: int, flat: torch.Tensor, neighbors: list[int]) -> list[torch.Tensor]:
        """Send ``flat`` to ``neighbors`` and return theirs (read-only, valid until :meth:`release`)."""
        import ray

        e, r = self.epoch, gossip_round
        buf = flat.numpy()
        far = [j for j in neighbors if j not in self.local]
        near = [j for j in neighbors if j in self.local]
        slots = self._own_slots(buf) if near else None
        if slots is None:
            far, near = neighbors, []
        if far:  # small buffers travel inline with the call; large ones once through the object store
            payload = buf if buf.nbytes <= INLINE_BYTES else ray.put(buf)
            for j in far:
                self.peers[j].deliver.remote(e, r, self.rank, payload)
        if near:
            slot = r % 2
            old, readers = slots.readers[slot]  # wait until the last readers of this slot are done
            self._pump(lambda: all((old, j) in self.acks for j in readers))
            self.acks.difference_update((old, j) for j in readers)
            np.copyto(slots.array[slot], buf)
            slots.readers[slot] = (r, near)
            for j in near:
                self._post(self._out(j), _DATA, e, r, self.rank, slot, buf.size)
        self.bytes_sent += buf.nbytes * len(neighbors)
        self.bytes_shared += buf.nbytes * len(near)
        self._pump(lambda: all((r, j) in self.box for j in neighbors))
        received = []
        for j in neighbors:
            kind, slot, numel = self.box.pop((r, j))
            if kind == _DATA:
                if numel != buf.size:
                    raise RuntimeError(f"agent {self.rank}: round {r} mixes {buf.size} values, "
                                       f"neighbour {j} sent {numel}")
                array = self._peer_slots(j, buf).array[slot]
            else:
                array = self.remote.pop((e, r, j))
            with warnings.catch_warnings():  # read-only buffers: only read by the weighted sum
                warnings.simplefilter("ignore", UserWarning)
                received.append(torch.from_numpy(array))
        return received

    def release(self, gossip_round: int, neighbors: list[int]) -> None:
        """Tell same-node senders of round ``gossip_round`` that their slot may be reused."""
        for j in neighbors:
            if j in self.local:
                self._post(self._out(j), _ACK, self.epoch, gossip_round, self.rank, 0, 0)

    def _pump(self, done: Any) -> None:
        """Read inbox records until ``done()`` (raises if the round was aborted)."""
        while not done():
            if self.aborted:
                raise RoundAborted(f"agent {self.rank}: round aborted (a neighbour failed)")
            data = os.read(self.inbox, _READ)  # whole records: writes of ≤ PIPE_BUF bytes are atomic
            for kind, epoch, r, src, slot, numel in _RECORD.iter_unpack(data):
                if epoch != self.epoch:
                    continue
                if kind == _ACK:
                    self.acks.add((r, src))
                elif kind == _ABORT:
                    self.aborted = True
                else:
                    self.box[(r, src)] = (kind, slot, numel)
        if self.aborted:
            raise RoundAborted(f"agent {self.rank}: round aborted (a neighbour failed)")

    def _own_slots(self, buf: np.ndarray) -> _Slots | None:
        key = (buf.size, buf.dtype.str)
        if key not in self.own:
            try:
                self.own[key] = _Slots(self._path(self.rank, f"{buf.size}{buf.dtype.str[1:]}"), buf.size,
                                       buf.dtype, create=True)
            except OSError as exc:  # /dev/shm too small: this buffer size goes through the object store
                if exc.errno not in (errno.ENOSPC, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                self.own[key] = None
        return self.own[key]

    def _peer_slots(self, j: int, buf: np.ndarray) -> _Slots:
        key = (j, buf.size, buf.dtype.str)
        if key not in self.views:
            self.views[key] = _Slots(self._path(j, f"{buf.size}{buf.dtype.str[1:]}"), buf.size, buf.dtype,
                                     create=False)
        return self.views[key]

    def _out(self, j: int) -> int:
        if j not in self.outs:
            try:  # non-blocking open: fails at once instead of hanging if the peer's inbox has no reader
                fd = os.open(self._path(j, "inbox"), os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                raise RoundAborted(f"agent {self.rank}: neighbour {j} is gone ({exc})") from None
            os.set_blocking(fd, True)
            self.outs[j] = fd
        return self.outs[j]

    # ---- teardown ----

    def close_peers(self) -> None:
        """Close the write ends of the peers' inboxes and drop the mappings of their slots."""
        for fd in self.outs.values():
            os.close(fd)
        self.outs.clear()
        self.views.clear()

    def close(self) -> None:
        """Close every descriptor and remove this agent's files."""
        self.close_peers()
        self.own.clear()
        if self.inbox >= 0:
            os.close(self.inbox)
            self.inbox = -1
        for path in glob.glob(self._path(self.rank, "*")):
            os.unlink(path)
