"""Weight sync: the trainer's Megatron-layout policy -> Hugging Face tensors -> flat buckets -> a rollout engine.

After each policy update every rank walks :func:`iter_hf_tensors` (each parameter broadcast
over PP, all-gathered over TP, un-fused into its Hugging Face tensors, one at a time), packs
the stream into flat byte buckets with :func:`pack_buckets`, and hands each bucket to its
colocated engine as one CUDA-IPC handle (:class:`IpcBucketSender`). The engine process opens
the handle, takes views of the tensors (:func:`unpack_bucket`) and gives them to its own
``load_weights``, which fuses and reshards them for its layout (:func:`load_ipc_bucket`).
Memory on the sending side stays at one bucket plus one full tensor.
"""

from __future__ import annotations

import inspect
import os
import pickle
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from orz_fast.models.checkpoint import iter_hf_tensors

__all__ = [
    "BUCKET_ALIGN",
    "DEFAULT_BUCKET_BYTES",
    "Bucket",
    "BucketEntry",
    "IpcBucket",
    "IpcBucketSender",
    "iter_hf_tensors",
    "load_ipc_bucket",
    "pack_buckets",
    "unpack_bucket",
]

BUCKET_ALIGN = 256
"""Byte alignment of every tensor inside a bucket (any dtype's views, and vectorised GPU copies, stay aligned)."""

DEFAULT_BUCKET_BYTES = 512 << 20
"""Default bucket size: large enough that the per-bucket handshake is negligible, small beside a 7B model."""


def _align(n: int) -> int:
    return -(-n // BUCKET_ALIGN) * BUCKET_ALIGN


@dataclass(frozen=True)
class BucketEntry:
    """Where one tensor lies in a flat bucket."""

    name: str
    """Hugging Face tensor name."""
    shape: tuple[int, ...]
    """The tensor's shape."""
    dtype: torch.dtype
    """The tensor's dtype."""
    offset: int
    """Byte offset in the bucket (a multiple of :data:`BUCKET_ALIGN`)."""

    @property
    def nbytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * self.dtype.itemsize


@dataclass(frozen=True)
class Bucket:
    """Tensors packed back to back into one flat byte buffer."""

    flat: torch.Tensor
    """uint8 [nbytes], contiguous; the last entry ends at its end."""
    entries: tuple[BucketEntry, ...]
    """The tensors it holds, in stream order."""


def _check_bucket_bytes(bucket_bytes: object) -> int:
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
    return bucket_bytes


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as flat uint8 [nbytes] (a view, no copy when already contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _empty_bytes(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def pack_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int,
    *,
    alloc: Callable[[int, torch.device], torch.Tensor] | None = None,
) -> Iterator[Bucket]:
    """Pack a stream of named tensors into flat byte buckets of at most ``bucket_bytes`` bytes each.

    Tensors keep stream order; each starts at a multiple of :data:`BUCKET_ALIGN` bytes, and a
    bucket closes when the next tensor would end past ``bucket_bytes``. A tensor larger than
    ``bucket_bytes`` travels alone: without ``alloc`` in a bucket that is a view of its own bytes
    (no copy when it is contiguous), with ``alloc`` copied into a buffer of its size.
    Without ``alloc`` a bucket lives on the device of its first tensor and is a fresh buffer, so
    buckets may be kept; the stream is consumed lazily (one bucket plus one tensor in memory at
    a time).

    Args:
        named_tensors: ``(name, tensor)`` pairs of any dtype, shape and contiguity.
        bucket_bytes: largest bucket in bytes, an int >= 1.
        alloc: ``alloc(nbytes, device)`` -> uint8 [>= nbytes] buffer a bucket is packed into (e.g.
            a shared-memory mapping reused for every bucket: a bucket is then valid only until
            the next one is requested). Default: a fresh ``torch.empty`` on the tensor's device.
    Yields:
        :class:`Bucket` with ``flat`` uint8 [nbytes] and the entries locating each tensor.
    """
    bucket_bytes = _check_bucket_bytes(bucket_bytes)
    buf: torch.Tensor | None = None
    entries: list[BucketEntry] = []
    end = 0
    for name, tensor in named_tensors:
        entry = BucketEntry(name, tuple(tensor.shape), tensor.dtype, 0)
        if entry.nbytes > bucket_bytes:
            if entries:
                yield Bucket(buf[:end], tuple(entries))
                buf, entries, end = None, [], 0
            if alloc is None:
                yield Bucket(_as_bytes(tensor), (entry,))
            else:
                alone = alloc(entry.nbytes, tensor.device)[: entry.nbytes]
                alone.copy_(_as_bytes(tensor))
                yield Bucket(alone, (entry,))
            continue
        offset = _align(end) if entries else 0
        if offset + entry.nbytes > bucket_bytes:
            yield Bucket(buf[:end], tuple(entries))
            buf, entries, offset = None, [], 0
        if buf is None:
            buf = (alloc or _empty_bytes)(bucket_bytes, tensor.device)
        buf[offset : offset + entry.nbytes].copy_(_as_bytes(tensor))
        entries.append(BucketEntry(name, entry.shape, entry.dtype, offset))
        end = offset + entry.nbytes
    if entries:
        yield Bucket(buf[:end], tuple(entries))


def unpack_bucket(flat: torch.Tensor, entries: Iterable[BucketEntry]) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a bucket as ``(name, view into flat)`` pairs, in order (no copy).

    Args:
        flat: uint8 [nbytes] contiguous, as :func:`pack_buckets` made it (or a received copy).
        entries: the bucket's :class:`BucketEntry` list.
    """
    if flat.dtype != torch.uint8 or flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError(
            f"flat must be a contiguous 1-D uint8 tensor, got dtype={flat.dtype} shape={tuple(flat.shape)}"
        )
    out = []
    for e in entries:
        if e.offset < 0 or e.offset + e.nbytes > flat.numel() or e.offset % e.dtype.itemsize:
            raise ValueError(
                f"entry {e.name!r} ({e.nbytes} bytes of {e.dtype} at offset {e.offset}) "
                f"does not fit a bucket of {flat.numel()} bytes"
            )
        out.append((e.name, flat[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape)))
    return out


# ---------------------------------------------------------------------------
# CUDA IPC transport

_DEVICE_ARG = list(inspect.signature(rebuild_cuda_tensor).parameters).index("storage_device")
"""Position of the device index in the argument tuple of a reduced CUDA tensor."""


def _device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


@dataclass(frozen=True)
class IpcBucket:
    """A picklable reference to a CUDA bucket in another process, and the tensors it holds."""

    handle: tuple
    """``(rebuild_cuda_tensor, args)`` from ``torch.multiprocessing.reductions.reduce_tensor``."""
    device_uuid: str
    """UUID of the GPU holding the bucket (device indices differ between processes; UUIDs do not)."""
    sender_pid: int
    """The exporting process (CUDA cannot open an IPC handle in the process that made it)."""
    entries: tuple[BucketEntry, ...]
    """The bucket's tensors."""

    def to_bytes(self) -> bytes:
        """Plain bytes, so an RPC layer that only moves simple types (vLLM's msgpack) can carry it."""
        return pickle.dumps(self)

    @staticmethod
    def from_bytes(payload: bytes) -> IpcBucket:
        msg = pickle.loads(payload)
        if not isinstance(msg, IpcBucket):
            raise ValueError(f"payload is not an IpcBucket, got {type(msg).__name__}")
        return msg

    def open(self) -> torch.Tensor:
        """The bucket as uint8 [nbytes] mapped into this process (the GPU is found by UUID)."""
        if self.sender_pid == os.getpid():
            raise RuntimeError(
                "a CUDA-IPC bucket cannot be opened in the process that exported it; the receiver must be "
                "another process (for vLLM: VLLM_ENABLE_V1_MULTIPROCESSING=1, the default)"
            )
        visible = [_device_uuid(i) for i in range(torch.cuda.device_count())]
        if self.device_uuid not in visible:
            raise RuntimeError(f"the bucket's GPU {self.device_uuid} is not visible here (visible: {visible})")
        func, args = self.handle
        args = list(args)
        args[_DEVICE_ARG] = visible.index(self.device_uuid)
        return func(*args)


class IpcBucketSender:
    """Sends CUDA buckets to another process on the same node, one at a time.

    ``deliver(payload: bytes)`` carries one bucket's :class:`IpcBucket` bytes to the receiver
    and must return only once the receiver has loaded it and synchronised its stream
    (:func:`load_ipc_bucket` does both); that is what lets the sender free or reuse the bucket.
    torch keeps a freed shared block until the receiver drops its mapping; :meth:`close`
    releases those blocks.
    """

    def __init__(self, deliver: Callable[[bytes], object]) -> None:
        self.deliver = deliver
        self.buckets_sent = 0
        self.bytes_sent = 0

    def send(self, bucket: Bucket) -> None:
        """Export ``bucket.flat`` (uint8 [nbytes] on CUDA) and deliver it; blocks until the receiver has loaded it."""
        flat = bucket.flat
        if flat.device.type != "cuda":
            raise ValueError(
                f"CUDA IPC sends CUDA buckets, got one on {flat.device} "
                f"(dtype={flat.dtype}, shape={tuple(flat.shape)}); move the model to a GPU"
            )
        # reduce_tensor records an event on the current stream; the receiver waits on it before reading.
        msg = IpcBucket(reduce_tensor(flat.detach()), _device_uuid(flat.device.index), os.getpid(), bucket.entries)
        self.deliver(msg.to_bytes())
        self.buckets_sent += 1
        self.bytes_sent += flat.numel()

    def send_all(self, buckets: Iterable[Bucket]) -> int:
        """Send every bucket in order, then :meth:`close`; returns how many were sent."""
        try:
            for bucket in buckets:
                self.send(bucket)
        finally:
            self.close()
        return self.buckets_sent

    def close(self) -> None:
        """Free the shared blocks the receiver has released."""
        if torch.cuda.is_initialized():
            torch.cuda.ipc_collect()


def load_ipc_bucket(payload: bytes, load: Callable[[list[tuple[str, torch.Tensor]]], object]) -> int:
    """Receiver side: open a delivered bucket, ``load`` its ``(hf_name, tensor view)`` pairs, release it.

    ``load`` must copy what it keeps (the views die with the mapping). The device is synchronised
    before returning, so the sender may free the bucket as soon as this returns. Returns the
    number of tensors loaded.
    """
    msg = IpcBucket.from_bytes(payload)
    flat = msg.open()
    weights = unpack_bucket(flat, msg.entries)
    load(weights)
    torch.cuda.synchronize()  # the loader's copies, queued on this process's device
    if flat.device.index != torch.cuda.current_device():
        torch.cuda.synchronize(flat.device)
    del weights, flat
    return len(msg.entries)
