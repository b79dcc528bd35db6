"""LightningDataModule: training windows by global index + named validation sets.

Data order is a pure function of (recipe, seed, global window index); ranks take indices:

- Step s trains on global windows ``[s * G, (s + 1) * G)`` with ``G = train.global_batch_size``.
- With W ranks, micro-batch m and accumulation A (``G = W * m * A``), rank r's micro-batch j
  of step s is windows ``s*G + r*m*A + j*m + [0, m)``. The set of windows of every step, and
  so the optimisation, is the same for any number of ranks and nodes.
- Resume: ``state_dict`` records the windows consumed (global step x G at checkpoint time)
  and the dataset fingerprint; ``load_state_dict`` refuses a checkpoint whose fingerprint
  differs. Lightning saves/restores both with the checkpoint, and the sampler starts at the
  restored position whenever the training dataloader is iterated.

The Trainer must run with ``use_distributed_sampler=False`` (the sampler shards by index
itself) and ``accumulate_grad_batches = accumulation_steps(G, m, W)``.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from megadoc_pl.data.batch import SLOT, packed_bytes, unpack
from megadoc_pl.data.mixture import MixturePlan
from megadoc_pl.data.windows import Windows
from megadoc_pl.errors import BadInput


def accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per rank per optimizer step; one-line error when G is not divisible."""
    per = micro_batch_size * world_size
    if micro_batch_size < 1 or global_batch_size % per:
        raise ValueError(
            f"train.global_batch_size ({global_batch_size}) must be a multiple of train.micro_batch_size "
            f"({micro_batch_size}) x world size ({world_size}) = {per}"
        )
    return global_batch_size // per


def _worker_init(worker_id: int) -> None:
    # A loader worker assembles batches with single-threaded numpy; torch's default of one
    # intra-op thread per core in every worker oversubscribes the cores the trainer needs.
    import torch

    torch.set_num_threads(1)


def loader_kwargs(num_workers: int) -> dict[str, Any]:
    """DataLoader settings for batches of window indices: pinned memory on a GPU machine and,
    with workers, persistent workers (forked once, sharing the memory-mapped views), four
    batches prefetched per worker and one torch thread each."""
    import torch

    kw: dict[str, Any] = {"num_workers": int(num_workers), "pin_memory": torch.cuda.is_available()}
    if num_workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=_worker_init)
    return kw


class TrainBatchSampler(Sampler):
    """This rank's micro-batches of global window indices, from the current position to ``end_step``."""

    def __init__(self, start_window: Callable[[], int], end_step: int, global_batch_size: int,
                 micro_batch_size: int, rank: int = 0, world_size: int = 1):
        self.start_window, self.end_step = start_window, int(end_step)
        self.G, self.m, self.rank, self.world = global_batch_size, micro_batch_size, rank, world_size
        self.A = accumulation_steps(global_batch_size, micro_batch_size, world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")

    def _start_step(self) -> int:
        start = int(self.start_window())
        if start % self.G:
            raise ValueError(
                f"resume position {start} windows is not a whole number of global batches of {self.G} "
                "(train.global_batch_size changed since the checkpoint; restore it)"
            )
        return start // self.G

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self._start_step(), self.end_step):
            base = step * self.G + self.rank * self.m * self.A
            for j in range(self.A):
                lo = base + j * self.m
                yield list(range(lo, lo + self.m))

    def __len__(self) -> int:
        # The whole run is one Lightning epoch: its length counts from step 0, so that after a
        # resume Lightning's restored batch count plus what is left ends the epoch at end_step.
        return self.end_step * self.A


class PaddingBatch(list):
    """Window indices of a validation batch that only keeps ranks in step: computed, never counted."""


class ValBatchSampler(Sampler):
    """Batches of ``[0, n)`` in order; batch b goes to rank ``b % world`` (disjoint, complete).

    Every rank gets the same number of batches, ``ceil(batches / world)``, so a set smaller than
    the world (even one window on many ranks) never leaves a rank with an empty loader, and every
    rank runs the same number of forward passes (FSDP's collectives stay in step). A rank with no
    batch left gets a :class:`PaddingBatch` (a repeat of batch 0) that validation computes but does
    not count: each window is scored exactly once on any world size.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.n, self.bs, self.rank, self.world = int(n), int(batch_size), rank, world_size
        if self.n < 1:
            raise ValueError("a validation set needs at least one window")

    def __iter__(self) -> Iterator[list[int]]:
        nb = -(-self.n // self.bs)
        for j in range(len(self)):
            b = self.rank + j * self.world
            if b < nb:
                yield list(range(b * self.bs, min((b + 1) * self.bs, self.n)))
            else:
                yield PaddingBatch(range(min(self.bs, self.n)))

    def __len__(self) -> int:
        return -(-(-(-self.n // self.bs)) // self.world)


# Buffers a loader worker keeps per worker: more than the batches it can have in flight
# (prefetch_factor 4, the batch in use, Lightning's one-batch look-ahead).
SLOTS_PER_WORKER = 8
_POOLS: "weakref.WeakValueDictionary[int, SlotPool]" = weakref.WeakValueDictionary()  # by key, in the main process
_POOL_KEYS = itertools.count()


class _SlotBuffer:
    """A worker's slot on its way to the main process, the first time a batch uses it. An
    object, not a tensor: the DataLoader's pin-memory thread would replace a tensor by a pinned
    copy that the worker no longer writes into."""

    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor


class SlotPool:
    """Shared-memory buffers that a DataLoader's workers pack batches into and reuse.

    torch hands a worker's tensor to the main process through shared memory, and even a buffer
    it has handed over before costs a file-descriptor exchange between the two processes (~0.3 ms
    of CPU in the main process per batch, measured, and as much in the worker). So a slot's
    tensor travels once, with the first batch packed into it (and again if a larger batch makes
    the worker regrow it); later batches in that slot carry only its number, and the main
    process reads the batch from the tensor it kept (:func:`receive_slot`, which
    :class:`SlotLoader` applies to every batch). ``busy`` (shared, one flag per slot) says which
    slots are in use: a worker sets a slot's flag when it packs into it, and the main process
    clears it once the batch is unpacked (:func:`release_slot`, called by
    :class:`MegadocDataModule` after ``unpack``), or at once when it copies the batch into pinned
    memory. A worker with no free slot (a consumer that never releases) packs into a fresh
    buffer, as without a pool: a batch in use is never overwritten.
    """

    def __init__(self, num_workers: int):
        import torch

        self.busy = torch.zeros(num_workers * SLOTS_PER_WORKER, dtype=torch.int32).share_memory_()
        self.key = next(_POOL_KEYS)
        self.slots: list = []  # this worker's buffers (made in the worker, on first use)
        self.sent: list[bool] = []  # whether the main process has been sent each of them
        self.received: dict[int, Any] = {}  # main process: the slots' tensors, by slot number
        _POOLS[self.key] = self

    def take(self, nbytes: int) -> Optional[tuple[int, Any, Optional[Any]]]:
        """(slot, uint8 tensor of ``nbytes`` in it, the slot's whole tensor if the main process
        has not been sent it yet, else None) for a free buffer of this worker, or None."""
        import torch
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        if info is None:
            return None
        busy, first = self.busy.numpy(), info.id * SLOTS_PER_WORKER
        for k in range(SLOTS_PER_WORKER):
            if busy[first + k]:
                continue
            if k == len(self.slots) or self.slots[k].numel() < nbytes:  # released: the main process is done with it
                buf = torch.empty(nbytes + nbytes // 4, dtype=torch.uint8).share_memory_()  # room for larger batches
                self.slots[k:k + 1], self.sent[k:k + 1] = [buf], [False]
            busy[first + k] = 1
            whole = None if self.sent[k] else self.slots[k]
            self.sent[k] = True
            return first + k, self.slots[k][:nbytes], whole
        return None

    def __getstate__(self) -> dict:  # a spawned worker gets the flags, not the main process's registry entry
        return {"busy": self.busy, "key": self.key, "slots": [], "sent": [], "received": {}}


def receive_slot(batch: Any, pin: bool = False) -> Any:
    """In the main process, a batch from a worker as it was packed: one packed into a slot gets
    its buffer back (the slot's tensor, kept from the first batch that brought it). ``pin``
    copies it into pinned memory (for a GPU) and frees the slot at once. Other batches pass."""
    got = batch.get(SLOT) if isinstance(batch, Mapping) else None
    if got is None or len(got) != 3:
        return batch
    key, k, sent = got
    pool = _POOLS.get(key)
    if pool is None:
        raise RuntimeError(f"a batch packed into slot {k} of loader pool {key} reached a process that does not "
                           "hold that pool (fix: iterate the loader of the PackedWindows that made it)")
    if sent is not None:
        pool.received[k] = sent.tensor
    if k not in pool.received:
        raise RuntimeError(f"a batch packed into slot {k} of loader pool {key} arrived before that slot's buffer "
                           "(fix: iterate PackedWindows through SlotLoader, which receives every batch)")
    batch["buffer"] = pool.received[k][:packed_bytes(batch)]
    batch[SLOT] = (key, k)
    if pin:
        batch["buffer"] = batch["buffer"].pin_memory()
        release_slot(batch)
        del batch[SLOT]
    return batch


def release_slot(batch: Mapping) -> None:
    """Mark a packed batch's worker buffer free for reuse (after it has been unpacked)."""
    pool_slot = batch.get(SLOT) if isinstance(batch, Mapping) else None
    if pool_slot is not None and pool_slot[0] in _POOLS:
        _POOLS[pool_slot[0]].busy[pool_slot[1]] = 0


class PackedWindows(Dataset):
    """Windows fetched a batch of indices at a time as :func:`~megadoc_pl.data.batch.pack`-ed
    batches (the module unpacks them on its device); a :class:`PaddingBatch` comes back marked
    ``padding=True``. Iterated by a :class:`SlotLoader` with workers, they pack into its
    :class:`SlotPool`; any other loader gets a fresh buffer per batch."""

    def __init__(self, windows: Windows):
        self.windows = windows
        self.pool: Optional[SlotPool] = None  # set by the SlotLoader whose workers are forked next

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: list[int]) -> dict:
        slot: list = []

        def alloc(nbytes: int):
            got = self.pool.take(nbytes) if self.pool is not None else None
            if got is None:
                return None
            slot.append(got)
            return got[1]

        batch = self.windows.packed(list(index), alloc=alloc)
        if slot:
            k, _, whole = slot[0]
            batch["buffer"] = None  # the main process reads it from the slot (receive_slot)
            batch[SLOT] = (self.pool.key, k, None if whole is None else _SlotBuffer(whole))
        if isinstance(index, PaddingBatch):
            batch["padding"] = True
        return batch


class SlotLoader(DataLoader):
    """The DataLoader of :class:`PackedWindows`: its workers pack into a :class:`SlotPool` of
    their own (made whenever it starts workers, so two loaders of one dataset never share slots)
    and its batches come out whole (each batch packed into a slot gets its buffer back, see
    :func:`receive_slot`)."""

    def __iter__(self):
        starts_workers = self.num_workers and (getattr(self, "_iterator", None) is None or not self.persistent_workers)
        if starts_workers and isinstance(self.dataset, PackedWindows):
            self._pool = self.dataset.pool = SlotPool(self.num_workers)  # the workers fork (or pickle) it next
        batches = super().__iter__()
        if not self.num_workers:
            return batches
        pin = bool(self.pin_memory)
        return (receive_slot(b, pin) for b in batches)


class _TrainLoader(SlotLoader):
    """A DataLoader that tells Lightning it is resumable: its position lives in the datamodule
    (restored from the same checkpoint), so its own state is informational only."""

    def __init__(self, *args: Any, position: Callable[[], int], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._position = position

    def state_dict(self) -> dict[str, Any]:
        return {"windows_consumed": int(self._position())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass  # MegadocDataModule.load_state_dict restored the position already


class MegadocDataModule(pl.LightningDataModule):
    """Training windows (map-style by global index) and named validation sets."""

    def __init__(self, train: Windows, val: Mapping[str, Windows], plan: MixturePlan, *, micro_batch_size: int,
                 max_steps: Optional[int] = None, num_workers: int = 0, fingerprint: str = "",
                 val_batch_size: Optional[int] = None):
        super().__init__()
        self.train_windows = train
        self.val_windows = dict(val)
        self.plan = plan
        self.global_batch_size = plan.global_batch_size
        self.micro_batch_size = int(micro_batch_size)
        self.max_steps = int(max_steps if max_steps is not None else plan.steps)
        self.num_workers = int(num_workers)
        self.fingerprint = fingerprint
        self.val_batch_size = int(val_batch_size or micro_batch_size)
        self._base_windows = 0  # windows consumed at the restored checkpoint
        self._base_step = 0  # trainer.global_step at that checkpoint
        self._resumed = False

    # ------------------------------------------------------------------------- topology

    @property
    def val_set_names(self) -> list[str]:
        return list(self.val_windows)

    def _topology(self) -> tuple[int, int]:
        trainer = self._trainer_or_none()
        if trainer is None:
            return 0, 1
        world = int(trainer.world_size)
        if world > 1 and getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
            raise ValueError("run the Trainer with use_distributed_sampler=False: megadoc_pl shards windows by index")
        return int(trainer.global_rank), world

    def _trainer_or_none(self):
        try:
            return self.trainer
        except RuntimeError:
            return None

    # ------------------------------------------------------------------------- position

    def windows_consumed(self) -> int:
        """Training windows consumed so far (global, all ranks)."""
        trainer = self._trainer_or_none()
        step = int(trainer.global_step) if trainer is not None else self._base_step
        return self._base_windows + (step - self._base_step) * self.global_batch_size

    @property
    def restored_step(self) -> Optional[int]:
        """The global step of the checkpoint this run resumed from (None when it did not resume)."""
        return self._base_step if self._resumed else None

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer_or_none()
        return {
            "fingerprint": self.fingerprint,
            "windows_consumed": self.windows_consumed(),
            "global_step": int(trainer.global_step) if trainer is not None else self._base_step,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        theirs = state.get("fingerprint", "")
        if theirs != self.fingerprint:
            raise ValueError(
                f"cannot resume: the checkpoint's dataset fingerprint {str(theirs)[:12]} differs from this run's "
                f"{self.fingerprint[:12]} (the data recipe, token stores or data_seed changed) "
                "(fix: resume with the original recipe and data, or start a new run)"
            )
        self._resumed = True
        self._base_windows = int(state["windows_consumed"])
        self._base_step = int(state.get("global_step", self._base_windows // self.global_batch_size))

    # ------------------------------------------------------------------------- loaders

    def _loader(self, dataset: Dataset, sampler: Sampler) -> DataLoader:
        # batch_size=None: each sampler item is a list of indices, fetched as one vectorised batch.
        return SlotLoader(dataset, batch_size=None, sampler=sampler, **loader_kwargs(self.num_workers))

    def train_sampler(self, rank: Optional[int] = None, world_size: Optional[int] = None) -> TrainBatchSampler:
        r, w = self._topology()
        return TrainBatchSampler(self.windows_consumed, self.max_steps, self.global_batch_size, self.micro_batch_size,
                                 r if rank is None else rank, w if world_size is None else world_size)

    def train_dataloader(self) -> DataLoader:
        trainer = self._trainer_or_none()
        if trainer is not None:  # a researcher's own Trainer must step where the windows are counted
            want = accumulation_steps(self.global_batch_size, self.micro_batch_size, int(trainer.world_size))
            if int(trainer.accumulate_grad_batches) != want:
                raise BadInput(
                    f"the Trainer accumulates {trainer.accumulate_grad_batches} micro-batches per step, but "
                    f"train.global_batch_size {self.global_batch_size} / (micro {self.micro_batch_size} x world "
                    f"{trainer.world_size}) needs {want} (fix: Trainer(accumulate_grad_batches={want}), as "
                    "megadoc_pl.trainer_kwargs sets it)")
        # batch_size=None: each sampler item is a list of indices, fetched as one vectorised batch.
        return _TrainLoader(PackedWindows(self.train_windows), batch_size=None,
                            sampler=self.train_sampler(), position=self.windows_consumed,
                            **loader_kwargs(self.num_workers))

    def val_dataloader(self) -> list[DataLoader]:
        r, w = self._topology()
        return [self._loader(PackedWindows(ws), ValBatchSampler(len(ws), self.val_batch_size, r, w))
                for ws in self.val_windows.values()]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # On the device: the loaders ship packed batches (tokens and offsets, ~2 bytes a token
        # instead of the contract's 36); the per-token arrays of the contract are built here,
        # where they cost next to nothing, before any LightningModule sees the batch.
        if not isinstance(batch, Mapping):
            return batch
        out = unpack(batch)
        release_slot(batch)  # the contract's tensors are new: the worker may reuse the buffer
        return out

    # ------------------------------------------------------------------------- inspection

    def describe_windows(self, windows: Sequence[int]) -> list[dict]:
        """Sources of training windows (NaN reports, dump_windows)."""
        return [self.train_windows.describe(int(k)) for k in np.asarray(windows).ravel()]
