"""Exact live-memory accounting of a training step on any device, including FakeTensorMode.

``LiveMemoryMeter`` is a TorchDispatchMode that sees every tensor an op returns, keys it by its
storage (views share one storage, so nothing is counted twice) and frees it when the storage is
garbage-collected, the approach of torch.distributed._tools.mem_tracker.MemTracker. Unlike
MemTracker it classifies a storage by what it *turned out to be*, after the fact: the record kept
in the peak snapshot is the same object that is later marked "gradient" or "optimizer state", so
the breakdown at the peak uses the planner's categories exactly:

- parameters: model parameters and buffers (registered up front);
- gradients: storages that end up as ``param.grad``;
- optimizer_states: storages that end up in ``optimizer.state`` (and fp32 master weights);
- activations: everything allocated during forward, or during a checkpointed block's recompute;
- temporaries: everything else (backward temporaries, the optimizer step's scratch).

A test checks that the total peak equals MemTracker's to the byte.

The peak snapshot is taken lazily: an op that raises the peak records only its total, op and
phase, and the storages allocated and freed after it are logged; the snapshot (the live set then)
is rebuilt from the live set and that log when ``peak`` is read. Copying the live set at every new
peak instead cost time quadratic in the live tensors (most forward ops raise the peak).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

CATEGORIES = ("parameters", "gradients", "optimizer_states", "activations", "temporaries")


@dataclass(eq=False)
class Record:
    nbytes: int
    phase: str  # forward | recompute | backward | optimizer | other
    op: str
    category: str | None = None  # set once known: parameters, gradients, optimizer_states

    def resolved(self) -> str:
        if self.category is not None:
            return self.category
        return "activations" if self.phase in ("forward", "recompute") else "temporaries"


@dataclass
class Peak:
    total_bytes: int = 0
    records: list[Record] = field(default_factory=list)
    op: str | None = None
    phase: str | None = None

    def breakdown(self) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for r in self.records:
            out[r.resolved()] += r.nbytes
        out["total"] = sum(out[c] for c in CATEGORIES)
        return out


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    # Wrapper subclasses (e.g. DTensor) expose their inner tensors; plain tensors one storage.
    if hasattr(t, "__tensor_flatten__") and not isinstance(t, torch._subclasses.FakeTensor):
        names, _ = t.__tensor_flatten__()
        out: list[torch.UntypedStorage] = []
        for n in names:
            inner = getattr(t, n)
            if isinstance(inner, torch.Tensor):  # DTensor also names its device_mesh
                out += _storages(inner)
        return out
    return [t.untyped_storage()]


class LiveMemoryMeter(TorchDispatchMode):
    """Tracks live storages per device and snapshots the peak (see module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._live: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> (Record, weakref)
        self.current_bytes = 0
        self.phase = "other"
        self._peak = Peak()
        self._top = 0  # the window's peak bytes, snapshotted or pending
        self._pending: tuple[int, str, str] | None = None  # (bytes, op, phase) of a new peak
        self._since: list[tuple[bool, Record]] = []  # (allocated?, record) after the pending peak
        self.last_op: str | None = None

    @property
    def peak(self) -> Peak:
        """The window's peak: its bytes, op and phase, and the records live then."""
        if self._pending is not None:
            total, op, phase = self._pending
            live = set(self._live_records())  # before the log: a free meanwhile is logged
            since, self._pending, self._since = self._since, None, []
            added = {r for allocated, r in since if allocated}
            freed = {r for allocated, r in since if not allocated} - added
            self._peak = Peak(total, list((live - added) | freed), op, phase)
        return self._peak

    @peak.setter
    def peak(self, value: Peak) -> None:
        self._peak, self._top, self._pending, self._since = value, value.total_bytes, None, []

    # ---- registration of tensors created outside the meter --------------------------------
    def register(self, tensors: Any, category: str) -> None:
        for t in _flat_tensors(tensors):
            for st in _storages(t):
                rec = self._record_for(st, op="(external)")
                rec.category = category

    def mark(self, tensors: Any, category: str) -> None:
        """Classify already-tracked storages (e.g. grads after backward, states after step)."""
        for t in _flat_tensors(tensors):
            for st in _storages(t):
                entry = self._live.get(st)
                if entry is None:  # created outside dispatch (rare): count it from now on
                    entry = (self._record_for(st, op="(untracked)"), None)
                entry[0].category = category

    @contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        old, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = old

    def reset_peak(self) -> None:
        """Start a new peak window at the current live set."""
        self._top = self.current_bytes
        self._pending, self._since = (self.current_bytes, "(window start)", self.phase), []

    def live_breakdown(self) -> dict[str, int]:
        return Peak(self.current_bytes, self._live_records()).breakdown()

    # ---- internals -------------------------------------------------------------------------
    def _live_records(self) -> list[Record]:
        return [rec for rec, _ in self._live.values()]

    def _record_for(self, st: torch.UntypedStorage, op: str) -> Record:
        entry = self._live.get(st)
        if entry is not None:
            return entry[0]
        rec = Record(int(st.nbytes()), self.phase, op)
        self._add(st, rec)
        return rec

    def _add(self, st: torch.UntypedStorage, rec: Record) -> None:
        """Count ``rec`` live until ``st`` is garbage-collected (or ``_drop``ped)."""

        def _free(_: Any, rec: Record = rec) -> None:
            self.current_bytes -= rec.nbytes
            if self._pending is not None:
                self._since.append((False, rec))

        self._live[st] = (rec, weakref.ref(st, _free))
        self.current_bytes += rec.nbytes
        if self._pending is not None:
            self._since.append((True, rec))

    def _drop(self, st: torch.UntypedStorage) -> Record | None:
        """Stop counting ``st``'s record (its free callback never runs); the record, if any."""
        entry = self._live.get(st)
        if entry is None:
            return None
        del self._live[st]  # drops the weakref with its callback
        self.current_bytes -= entry[0].nbytes
        if self._pending is not None:
            self._since.append((False, entry[0]))
        return entry[0]

    def _raise_peak(self, op: str) -> None:
        if self.current_bytes > self._top:
            self._top = self.current_bytes
            self._pending, self._since = (self.current_bytes, op, self.phase), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__)
        if isinstance(out, torch.Tensor):  # most ops: one tensor, no tree to walk
            for st in _storages(out):
                if st not in self._live:
                    self._record_for(st, name)
        else:
            def track(t: torch.Tensor) -> None:
                for st in _storages(t):
                    if st not in self._live:
                        self._record_for(st, name)

            tree_map_only(torch.Tensor, track, out)
        self._raise_peak(name)
        return out


def _flat_tensors(obj: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    if isinstance(obj, torch.nn.Module):
        return list(obj.parameters()) + list(obj.buffers())
    if isinstance(obj, torch.optim.Optimizer):
        return [v for s in obj.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    leaves, _ = tree_flatten(obj)
    return [x for x in leaves if isinstance(x, torch.Tensor)]
