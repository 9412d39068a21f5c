"""What a job needs, what a worker advertises, and why a job fits none of the live workers.

Pure (no torch, no SQL): the store's claim filter, the API's submission check, the waiting reason
of a queued job and the worker's own fit check all read their rules and their wording from here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from service.settings import DeviceInfo

# What a real job too large for the memory at hand can do instead.
TRACED_HINT = ('Submit it with "mode": "traced" to measure the same step exactly under '
               "FakeTensorMode without allocating it.")


@dataclass(frozen=True)
class Requirements:
    """What running a job takes; workers claim only jobs whose requirements they meet."""

    ranks: int = 1
    peak_bytes: int = 0  # per device, allocator reserve included; 0 for a traced job
    needs: str = "any"  # 'any', 'cpu' or 'cuda' (the request's device)
    gpu_kind: str | None = None


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as its last heartbeat advertised it."""

    id: str
    kind: str  # 'cpu' or a GPU catalog name
    count: int
    memory_bytes: int
    sole: bool = False  # takes every job of its device class and refuses what it cannot run
    host: str = ""
    pid: int = 0
    heartbeat_at: float = 0.0

    @property
    def device(self) -> DeviceInfo:
        return DeviceInfo(kind=self.kind, count=self.count, memory_bytes=self.memory_bytes)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB ({n:,} bytes)"


def bytes_needed(peak_bytes: int, ranks: int, kind: str) -> int:
    """Memory one device must hold: CPU ranks share the host's memory (ranks x peak); each CUDA
    rank has a device of its own (peak)."""
    return peak_bytes * ranks if kind == "cpu" else peak_bytes


def too_large(peak_bytes: int, ranks: int, kind: str, where: str, available: int) -> str:
    """The refusal of a real job whose estimated peak exceeds ``available`` bytes."""
    need = bytes_needed(peak_bytes, ranks, kind)
    per_rank = f" = {ranks} ranks x {gib(peak_bytes)}" if kind == "cpu" and ranks > 1 else ""
    return (f"the estimated peak ({gib(need)}{per_rank}, allocator reserve included) exceeds the "
            f"{where} ({gib(available)}). {TRACED_HINT}")


# ---- one worker ---------------------------------------------------------------------------------
def device_mismatch(req: Requirements, device: DeviceInfo) -> str | None:
    """What the job asks for that this device is not ('a cuda device', 'a device of kind
    h100-80gb')."""
    if req.gpu_kind is not None and device.kind != req.gpu_kind:
        return f"a device of kind {req.gpu_kind}"
    if req.needs == "cuda" and device.kind == "cpu":
        return "a cuda device"
    return None


def shortfall(req: Requirements, device: DeviceInfo, sole: bool = False) -> str | None:
    """Why this device (of a matching kind) cannot hold the job: too few devices or too little
    memory per device; None when it can. A sole CPU worker runs ranks beyond its core count (they
    share the cores), as it claims every job of its device class."""
    if req.ranks > device.count and not (sole and device.kind == "cpu"):
        return (f"{req.ranks} ranks (data x tensor x pipeline parallel) need as many devices and "
                f"it has {device.count}")
    need = bytes_needed(req.peak_bytes, req.ranks, device.kind)
    if need > device.memory_bytes:
        return f"needs {gib(need)} per device and it has {gib(device.memory_bytes)}"
    return None


def claimable(req: Requirements, worker: WorkerInfo) -> bool:
    """Whether ``worker`` claims the job (the store's claim filter says the same in SQL)."""
    if device_mismatch(req, worker.device):
        return False
    return worker.sole or shortfall(req, worker.device) is None


# ---- the live workers ---------------------------------------------------------------------------
def describe_workers(workers: Iterable[WorkerInfo]) -> str:
    """'1 worker with 2 x cpu (16.0 GiB each); 2 workers with 8 x h100-80gb (80.0 GiB each)'."""
    groups = Counter(str(w.device) for w in workers)
    return "; ".join(f"{n} worker{'s' if n > 1 else ''} with {device}"
                     for device, n in sorted(groups.items()))


def waiting_reason(req: Requirements, workers: list[WorkerInfo], lease_s: float) -> str | None:
    """Why no live worker will claim this queued job; None when one will."""
    if not workers:
        return (f"no live worker (none has sent a heartbeat in the last {lease_s:g} s); the job "
                "waits for one to start")
    if any(claimable(req, w) for w in workers):
        return None
    live = f"live workers: {describe_workers(workers)}"
    matching = [w for w in workers if not device_mismatch(req, w.device)]
    if not matching:
        return f"no live worker has {device_mismatch(req, workers[0].device)}; {live}"
    why = sorted({shortfall(req, w.device) or "" for w in matching} - {""})
    return f"no live worker can hold it ({'; '.join(why)}); {live}"


def submission_refusal(req: Requirements, workers: list[WorkerInfo]) -> tuple[str, str] | None:
    """(field, reason) when no live worker of the job's device class can run it, given what
    each advertises: the field is ``body.mode`` when memory is short (traced mode allocates
    nothing), ``body.parallelism`` when devices are. None when one can, when no worker is live,
    or when none of its class is (a worker of that class may still start: the job waits, see
    ``waiting_reason``)."""
    matching = [w for w in workers if not device_mismatch(req, w.device)]
    if not matching or any(shortfall(req, w.device, w.sole) is None for w in matching):
        return None
    live = describe_workers(matching)
    over_memory = [w for w in matching
                   if bytes_needed(req.peak_bytes, req.ranks, w.kind) > w.memory_bytes]
    if req.peak_bytes > 0 and len(over_memory) == len(matching):
        # The worker that comes closest, in the words of the worker's own fit check.
        best = min(matching, key=lambda w: bytes_needed(req.peak_bytes, req.ranks, w.kind)
                   - w.memory_bytes)
        where = ("host memory" if best.kind == "cpu" else "memory of each device") + \
            f" of the {'largest ' if len(matching) > 1 else ''}live {best.kind} worker"
        return ("body.mode", "no live worker can run this real job: "
                + too_large(req.peak_bytes, req.ranks, best.kind, where, best.memory_bytes)
                + f" Live workers: {live}.")
    why = sorted({shortfall(req, w.device, w.sole) or "" for w in matching} - {""})
    return ("body.parallelism",
            f"no live worker can run this job: {'; '.join(why)}. Live workers: {live}.")


__all__ = ["Requirements", "WorkerInfo", "TRACED_HINT", "gib", "bytes_needed", "too_large",
           "device_mismatch", "shortfall", "claimable", "describe_workers", "waiting_reason",
           "submission_refusal"]
