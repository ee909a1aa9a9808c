"""The processes of one run: one by default, several when a launcher starts them.

``torchrun --nproc_per_node N -m vlreason train ...`` and ``accelerate launch`` both start N
copies of the same command with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
address in the environment. ``processes()`` joins them into one process group (gloo for CPU
tensors, NCCL for CUDA tensors), pins each process to GPU ``LOCAL_RANK`` when there are GPUs, and
gives the stages the few collective operations they need. Without those variables it is a
single process and every operation is the identity.

Rank 0 is the main process: it holds the output folder's lock, writes logs, metrics, rollout
dumps and final models; the others compute and wait for it where it writes alone.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from vlreason.config import ConfigError
from vlreason.training import RankFailed

logger = logging.getLogger(__name__)
T = TypeVar("T")
# a rank waits this long for the others (the main one may be evaluating or writing a model);
# a rank that dies ends the whole job through the launcher, not through this timeout
GROUP_TIMEOUT = datetime.timedelta(hours=3)


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (the first ``n % world_size`` ranks get one more)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def per_rank(self, total: int, key: str) -> int:
        """``total`` (a global batch size, the config's ``key``) split evenly over the ranks.

        Raises:
            ConfigError: it does not split evenly, naming the key and the sizes that would.
        """
        if total % self.world_size:
            raise ConfigError(f"{key}: {total} does not split evenly over {self.world_size} processes; use a "
                              f"multiple of {self.world_size}")
        return total // self.world_size

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over all ranks (float64)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: Sequence[float]) -> list[float]:
        """Element-wise maxima over all ranks."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def gather(self, item: T) -> list[T]:
        """Every rank's ``item`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [item]
        items: list[Any] = [None] * self.world_size
        dist.all_gather_object(items, item)
        return items

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace every gradient by its sum over the ranks (one flat all-reduce per dtype and
        device). Each rank's loss is already divided by the whole batch's normaliser, so the sum
        is the gradient of the global batch."""
        if not self.distributed:
            return
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)  # a rank may not have reached every weight
            groups.setdefault((parameter.grad.dtype, parameter.grad.device), []).append(parameter.grad)
        for grads in groups.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            for grad, reduced in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                grad.copy_(reduced.view_as(grad))

    def on_main(self, work: Callable[[], T]) -> T | None:
        """Run ``work`` on the main process only while the others wait; an error there stops every
        rank (the others raise ``RankFailed`` with its message). Returns ``work``'s value on the
        main process, None elsewhere."""
        if not self.distributed:
            return work()
        result, error = None, None
        if self.is_main:
            try:
                result = work()
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                self._broadcast(error)
                raise
        error = self._broadcast(error)
        if error is not None:
            raise RankFailed(f"rank {self.rank}: the main process stopped: {error}")
        return result

    def _broadcast(self, item: Any) -> Any:
        box = [item]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _reduce(self, values: Sequence[float], op: Any) -> list[float]:
        if not self.distributed:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()


_CURRENT: Processes | None = None


def processes() -> Processes:
    """This run's processes, joined into a process group on first use when a launcher started
    several (see the module docstring)."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = _join()
    return _CURRENT


def ensure_process_group() -> None:
    """A process group even for one process (DeepSpeed needs one): a single rank over an in-memory
    store, no ports or launcher, with the variables a launcher would set; a no-op once a group
    exists."""
    if not dist.is_initialized():
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(name, value)
        _start_group(store=dist.HashStore(), rank=0, world_size=1)


def _start_group(**options: Any) -> None:
    """Join the process group, and leave it when the interpreter exits: a gloo group still alive
    then can take its process down with "terminate called without an active exception" (SIGABRT)
    after the run has finished."""
    dist.init_process_group(_backend(), **options)
    atexit.register(_leave_group)


def _leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def end_launched_process(code: int) -> None:
    """End this process now with ``code`` when a launcher started it as one of several; return
    otherwise (a single process, or code calling ``vlreason.cli.main`` in-process).

    The process leaves the process group while the interpreter is whole (after a garbage
    collection, so the last references DeepSpeed and the model hold to gloo work are gone),
    flushes the logs and the standard streams, and exits without the interpreter's teardown:
    gloo threads still holding work during that teardown can abort a process whose run has
    finished ("terminate called without an active exception", SIGABRT), and the launcher then
    reports the complete run as failed. Nothing is left to write by then: checkpoints, metrics,
    models and the folder lock are closed or released with the process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_initialized():
        return
    gc.collect()
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _backend() -> str:
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def _join() -> Processes:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # "cuda" and "auto" then mean this rank's GPU
    if not dist.is_initialized():
        _start_group(timeout=GROUP_TIMEOUT)
    if rank != 0:
        logging.getLogger("vlreason").setLevel(logging.WARNING)  # one copy of the progress lines
    logger.info("process group: %d processes (%s)", world_size, dist.get_backend())
    return Processes(rank=rank, world_size=world_size, local_rank=local_rank)
