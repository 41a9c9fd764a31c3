"""Host input buffers: reuse, growth, and the page-locked allocator driven through a stand-in
CUDA runtime (the real one needs a GPU; the GPU bench runs it)."""

from __future__ import annotations

import ctypes
import gc

import numpy as np

from service.engine import host_buffers
from service.engine.host_buffers import HostBuffers, host_buffers_for, pinned_allocator

NAMES = ["input_ids", "attention_mask"]


def feeds(rows: int, width: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(0, 500, size=(rows, width), dtype=np.int64),
        "attention_mask": rng.integers(0, 2, size=(rows, width), dtype=np.int64),
    }


class CountingAllocator:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, nbytes: int) -> np.ndarray:
        self.sizes.append(nbytes)
        return np.empty(nbytes, dtype=np.uint8)


class FakeCudart:
    """Stands in for libcudart: cudaHostAlloc hands out ctypes buffers, cudaFreeHost records."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.live: dict[int, ctypes.Array[ctypes.c_char]] = {}
        self.freed: list[int] = []

    def cudaHostAlloc(self, pointer_ref: object, nbytes: int, flags: int) -> int:  # noqa: N802
        assert flags == 1  # portable: every session's context may read it
        if self.fail:
            return 2  # cudaErrorMemoryAllocation
        block = ctypes.create_string_buffer(int(nbytes))
        address = ctypes.addressof(block)
        self.live[address] = block
        pointer_ref._obj.value = address  # type: ignore[attr-defined]
        return 0

    def cudaFreeHost(self, address: int) -> int:  # noqa: N802
        self.freed.append(address)
        self.live.pop(address)
        return 0


def test_fill_copies_into_reused_views_and_grows_only_when_needed() -> None:
    allocate = CountingAllocator()
    buffers = HostBuffers(NAMES, allocate, pinned=False)
    big = feeds(8, 64)
    views = buffers.fill(big)
    assert list(views) == NAMES
    for name in NAMES:
        assert views[name].dtype == np.int64 and views[name].shape == (8, 64)
        np.testing.assert_array_equal(views[name], big[name])
    assert len(allocate.sizes) == 2  # one buffer per input

    small = feeds(3, 10, seed=1)
    views = buffers.fill(small)  # fits: no new memory
    assert len(allocate.sizes) == 2
    np.testing.assert_array_equal(views["input_ids"], small["input_ids"])

    huge = feeds(64, 512, seed=2)
    views = buffers.fill(huge)
    assert len(allocate.sizes) == 4 and min(allocate.sizes[2:]) >= 64 * 512 * 8
    np.testing.assert_array_equal(views["attention_mask"], huge["attention_mask"])
    assert buffers.nbytes >= 2 * 64 * 512 * 8


def test_fill_casts_narrower_integer_inputs() -> None:
    buffers = HostBuffers(["input_ids"], CountingAllocator(), pinned=False)
    ids = np.arange(12, dtype=np.int32).reshape(3, 4)
    view = buffers.fill({"input_ids": ids})["input_ids"]
    assert view.dtype == np.int64
    np.testing.assert_array_equal(view, ids)


def test_pinned_allocator_frees_with_the_array() -> None:
    cudart = FakeCudart()
    allocate = pinned_allocator(cudart)  # type: ignore[arg-type]
    array = allocate(4096)
    assert array.dtype == np.uint8 and array.nbytes == 4096
    (address,) = cudart.live
    array[:] = 7  # the memory cudaHostAlloc handed out is written through
    assert cudart.live[address].raw[:3] == b"\x07\x07\x07"
    assert cudart.freed == []
    del array
    gc.collect()
    assert cudart.freed == [address]


def test_pinned_allocator_failure_is_a_memory_error() -> None:
    allocate = pinned_allocator(FakeCudart(fail=True))  # type: ignore[arg-type]
    try:
        allocate(1024)
    except MemoryError as exc:
        assert "cudaHostAlloc" in str(exc)
    else:
        raise AssertionError("a failed cudaHostAlloc must raise")


def test_host_buffers_for_picks_pinned_memory_on_cuda_only(monkeypatch) -> None:
    cudart = FakeCudart()
    pinned = host_buffers_for("cuda", NAMES, cudart=cudart)  # type: ignore[arg-type]
    assert pinned.pinned
    data = feeds(2, 8)
    np.testing.assert_array_equal(pinned.fill(data)["input_ids"], data["input_ids"])
    assert cudart.live  # the feeds went into page-locked memory

    assert not host_buffers_for("cpu", NAMES).pinned
    monkeypatch.setattr(host_buffers, "load_cudart", lambda: None)
    assert not host_buffers_for("cuda", NAMES).pinned  # no CUDA runtime: pageable, not an error
