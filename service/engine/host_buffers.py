"""Reusable host-side input buffers for one model session, page-locked (pinned) on CUDA.

A copy from pageable host memory to the GPU goes through a driver staging buffer and blocks the
calling thread; from page-locked memory it is a DMA transfer the copy engine runs beside the
kernels of other streams. Each session slot keeps one grow-only buffer per graph input, so the
steady state allocates nothing: a batch is copied into a view of the right shape and bound as an
OrtValue.

Page-locked memory comes from the CUDA runtime (`cudaHostAlloc`) that the CUDA execution provider
already loaded into the process; where it cannot be had (no libcudart, or the CPU provider), the
buffers are ordinary numpy memory and `pinned` says so.
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

# Names under which the CUDA runtime may already be loaded (onnxruntime-gpu's preload_dlls
# loads the nvidia-cuda-runtime wheel's copy; dlopen by soname then finds that one).
_CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")
# cudaHostAllocPortable: usable from every CUDA context of the process (one per session).
_CUDA_HOST_ALLOC_PORTABLE = 1

# Returns a writable uint8 array of at least `nbytes` bytes.
Allocator = Callable[[int], np.ndarray]


def load_cudart() -> ctypes.CDLL | None:
    """The CUDA runtime library, or None where there is none."""
    for name in _CUDART_NAMES:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.cudaHostAlloc.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_size_t,
            ctypes.c_uint,
        ]
        lib.cudaHostAlloc.restype = ctypes.c_int
        lib.cudaFreeHost.argtypes = [ctypes.c_void_p]
        lib.cudaFreeHost.restype = ctypes.c_int
        return lib
    return None


def pageable_allocator(nbytes: int) -> np.ndarray:
    """Ordinary (pageable) host memory."""
    return np.empty(nbytes, dtype=np.uint8)


def pinned_allocator(cudart: ctypes.CDLL) -> Allocator:
    """An allocator of page-locked host memory from `cudart`; the memory is freed when the
    returned array is garbage-collected.

    Raises:
        MemoryError: cudaHostAlloc failed (its error code in the message).
    """

    def allocate(nbytes: int) -> np.ndarray:
        pointer = ctypes.c_void_p()
        status = cudart.cudaHostAlloc(
            ctypes.byref(pointer), max(1, nbytes), _CUDA_HOST_ALLOC_PORTABLE
        )
        if status != 0 or not pointer.value:
            raise MemoryError(f"cudaHostAlloc({nbytes}) failed with CUDA error {status}")
        raw = (ctypes.c_uint8 * max(1, nbytes)).from_address(pointer.value)
        array = np.frombuffer(memoryview(raw), dtype=np.uint8)
        weakref.finalize(raw, cudart.cudaFreeHost, pointer.value)
        return array

    return allocate


class HostBuffers:
    """One grow-only host buffer per graph input (int64 token ids, masks, segment ids).

    Args:
        input_names: the graph's inputs, in order.
        allocate: where the bytes come from (`pinned_allocator(...)` on CUDA).
        pinned: whether `allocate` gives page-locked memory (reported, not acted on).
    """

    def __init__(self, input_names: Sequence[str], allocate: Allocator, *, pinned: bool) -> None:
        self.input_names = list(input_names)
        self.pinned = pinned
        self._allocate = allocate
        self._raw: dict[str, np.ndarray] = {}

    def fill(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copies each input of `feeds` into its buffer and returns int64 views of the feeds'
        shapes over the buffers (valid until the next `fill`)."""
        views: dict[str, np.ndarray] = {}
        for name in self.input_names:
            source = np.asarray(feeds[name])
            nbytes = source.size * 8
            raw = self._raw.get(name)
            if raw is None or raw.nbytes < nbytes:
                # Grow to twice the need: a few reallocations cover every batch shape.
                raw = self._allocate(max(nbytes * 2, 4096))
                self._raw[name] = raw
            view = raw[:nbytes].view(np.int64).reshape(source.shape)
            np.copyto(view, source, casting="same_kind")
            views[name] = view
        return views

    @property
    def nbytes(self) -> int:
        """Bytes held across all inputs."""
        return sum(raw.nbytes for raw in self._raw.values())


def host_buffers_for(
    device: str, input_names: Sequence[str], cudart: ctypes.CDLL | None = None
) -> HostBuffers:
    """Pinned buffers on CUDA when the CUDA runtime is loadable, pageable ones otherwise."""
    if device == "cuda":
        lib = cudart if cudart is not None else load_cudart()
        if lib is not None:
            return HostBuffers(input_names, pinned_allocator(lib), pinned=True)
        logger.warning("no CUDA runtime library found: inputs are copied from pageable memory")
    return HostBuffers(input_names, pageable_allocator, pinned=False)
