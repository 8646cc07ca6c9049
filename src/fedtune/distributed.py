"""Clustered mode: one client's local training spread over several processes (torch DDP).

FS-LLM's "clustered" mode, done with the standard tool: ``torch.distributed`` (gloo on CPU, NCCL on
GPUs) and :class:`~torch.nn.parallel.DistributedDataParallel` over the adapter parameters (DDP only
registers parameters that require grad, so the frozen base model is never all-reduced).

* **Leader** (rank 0): the client process that talks to the server (in simulation, the process
  running the whole simulation). Before each local training it sends the followers the instruction
  and the client's state (plain safetensors bytes over ``torch.distributed``, never pickle).
* **Followers** (ranks 1..N-1): same model and data, no network of their own; they run the same
  :meth:`FedClient.fit` on the same inputs and throw their copy of the result away.
* Inside :func:`fedtune.training.train_local`, :class:`DataParallel` is the whole seam: each rank
  takes a disjoint, strided slice of every step's examples, DDP all-reduces the gradients, and the
  token counts that normalise the loss are summed over ranks first, so every rank applies the same
  update as single-process training on the whole step (up to float summation order).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

_STOP, _FIT = 0, 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(device: torch.device, choice: str = "auto") -> str:
    if choice != "auto":
        return choice
    return "nccl" if device.type == "cuda" else "gloo"


def init_group(rank: int, world: int, addr: str, backend: str, timeout_s: float = 1800) -> None:
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=addr, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


class DataParallel:
    """The seam :func:`~fedtune.training.train_local` uses to train on several processes."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = device
        ids = [device.index] if device.type == "cuda" and device.index is not None else None
        # No buffer sync in forward: the base model's buffers (rotary tables, ...) are identical on
        # every rank and never change. Every parameter that requires grad is used in every step.
        # (torch >= 2.10 renamed broadcast_buffers to forward_sync_buffers.)
        import inspect

        key = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else "broadcast_buffers")
        self.model = DistributedDataParallel(model, device_ids=ids, **{key: False})

    def shard(self, micro: list[list[int]], batch_size: int) -> tuple[list[list[int]], bool]:
        """This rank's micro-batches of one optimizer step: examples ``rank, rank + world, ...`` of
        the step, in micro-batches of at most ``batch_size``. A rank left without an example (the
        short last batch of an epoch) gets the step's first example with its labels masked
        (``True``): it must still take part in the gradient all-reduce, contributing zero."""
        examples = [i for b in micro for i in b]
        mine = examples[self.rank :: self.world]
        if not mine:
            return [examples[:1]], True
        return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)], False

    def no_sync(self, last: bool):
        """Accumulate locally; all-reduce only with the step's last micro-batch (DDP ``no_sync``)."""
        return contextlib.nullcontext() if last else self.model.no_sync()

    def all_sum(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


@dataclass
class Cluster:
    """One client's group of processes, as seen by one of them."""

    rank: int
    world: int
    parallel: DataParallel

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def _broadcast_bytes(self, op: int, blobs: list[bytes]) -> tuple[int, list[bytes]]:
        import torch.distributed as dist

        dev = self.parallel.device
        head = torch.zeros(1 + 3, dtype=torch.int64, device=dev)
        if self.leader:
            head[0] = op
            head[1:] = torch.tensor([len(b) for b in blobs])
        dist.broadcast(head, 0)
        op, sizes = int(head[0]), [int(x) for x in head[1:]]
        if op == _STOP:
            return op, []
        buf = torch.empty(sum(sizes), dtype=torch.uint8, device=dev)
        if self.leader:
            buf.copy_(torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8))
        dist.broadcast(buf, 0)
        data = buf.cpu().numpy().tobytes()
        out, pos = [], 0
        for n in sizes:
            out.append(data[pos : pos + n])
            pos += n
        return op, out

    def dispatch(self, cid: str, instruction: bytes, state: bytes) -> None:
        """Leader: start the followers on the same local training."""
        assert self.leader
        self._broadcast_bytes(_FIT, [cid.encode(), instruction, state])

    def receive(self) -> tuple[str, bytes, bytes] | None:
        """Follower: the next job, or None when the leader is done."""
        op, blobs = self._broadcast_bytes(_STOP, [])
        if op == _STOP:
            return None
        return blobs[0].decode(), blobs[1], blobs[2]

    def stop(self) -> None:
        """Leader: release the followers and leave the process group."""
        import torch.distributed as dist

        if self.leader:
            self._broadcast_bytes(_STOP, [b"", b"", b""])
        dist.destroy_process_group()


def follow(cluster: Cluster, clients: dict, store) -> None:
    """A follower's life: mirror each local training the leader starts, until it stops."""
    from fedtune.messages import decode
    from fedtune.state import ClientState

    while (job := cluster.receive()) is not None:
        cid, instruction, state = job
        # a deployed client's config usually holds one client's data, whatever the leader calls it
        client = clients[cid] if cid in clients or len(clients) != 1 else next(iter(clients.values()))
        store.put(client.cid, ClientState.from_bytes(state))
        client.fit(decode(instruction))
    cluster.stop()


def spawn_followers(world: int, target: Callable, args: tuple) -> list:
    """Start ranks 1..world-1 as fresh processes (``spawn``: no fork of a threaded parent)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(1, world):
        p = ctx.Process(target=target, args=(rank, world, *args), daemon=True)
        p.start()
        procs.append(p)
    return procs


def threads_per_rank(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)
