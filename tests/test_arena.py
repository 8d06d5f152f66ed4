"""Huge-page storage for what decoding reads once per token (aqlm.arena)."""
import gc
from pathlib import Path

import pytest
import torch

from aqlm import QuantizedLinear, arena, ops
from test_inference import random_layer

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def mapping_of(address: int) -> dict:
    """The /proc/self/smaps fields of the mapping that holds ``address`` ({} when none does)."""
    fields, inside = {}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(part, 16) for part in head.split("-"))
            if inside:
                break
            inside = low <= address < high
            if inside:
                fields["range"] = (low, high)
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def thp_available() -> bool:
    return THP_MODE.exists() and "[never]" not in THP_MODE.read_text()


def layer():
    return QuantizedLinear.from_parts(*random_layer(320, 256, 2, 8, 1, 8))


def test_small_buffers_share_a_chunk_aligned_and_large_ones_get_their_own_mapping():
    pool = arena.PackedArena(chunk_bytes=4 << 20, own_mapping_bytes=1 << 20)
    first, second = pool.empty(100), pool.empty(1000)
    assert first.dtype == torch.uint8 and first.shape == (100,) and second.shape == (1000,)
    assert first.data_ptr() % arena.HUGE_PAGE_BYTES == 0  # a chunk starts on a huge-page boundary
    assert second.data_ptr() == first.data_ptr() + 128  # the next 64-byte boundary, same chunk
    chunk = mapping_of(first.data_ptr())["range"]
    large = pool.empty((1 << 20) + 1)  # over own_mapping_bytes: a mapping of its own
    assert large.data_ptr() % arena.HUGE_PAGE_BYTES == 0 and mapping_of(large.data_ptr())["range"] != chunk
    filling = [pool.empty(1 << 20) for _ in range(3)]  # 1152 + 3 MiB bytes: still the first chunk
    assert all(mapping_of(t.data_ptr())["range"] == chunk for t in filling)
    assert mapping_of(pool.empty(1 << 20).data_ptr())["range"] != chunk  # no room left: a new chunk
    second[:] = 7
    assert int(second.sum()) == 7000 and int(first.sum()) == 0  # fresh anonymous memory is zero


def test_a_mapping_is_freed_with_its_last_tensor():
    pool = arena.PackedArena(chunk_bytes=4 << 20, own_mapping_bytes=1 << 20)
    big = pool.empty(3 << 20)
    address = big.data_ptr()
    view = big[10:20]
    del big
    gc.collect()
    assert mapping_of(address)  # the view keeps it
    del view
    gc.collect()
    assert not mapping_of(address)


@pytest.mark.skipif(not thp_available(), reason="transparent huge pages are off on this kernel")
def test_packed_codes_scales_and_the_int8_head_are_on_huge_page_memory(monkeypatch):
    monkeypatch.delenv(arena.HUGE_PAGES_ENV, raising=False)
    weight = layer()
    plan = ops._cpu_plan(weight.codes, weight.codebooks, weight.scales, weight.bias)
    for array in (plan.packed, plan.prepared, plan.kernel_arrays[2], plan.kernel_arrays[3]):
        assert mapping_of(array.ctypes.data).get("THPeligible") == "1"
    q, _ = ops.int8_quantize_rows(torch.randn(3000, 1000))
    assert mapping_of(q.data_ptr()).get("THPeligible") == "1"


def test_turned_off_by_the_environment_and_same_bits_either_way(monkeypatch):
    x = torch.randn(3, 256)
    results = {}
    for setting in ("0", "1"):
        monkeypatch.setenv(arena.HUGE_PAGES_ENV, setting)
        weight = layer()  # fresh tensors: a fresh plan and packing under this setting
        plan = ops._cpu_plan(weight.codes, weight.codebooks, weight.scales, weight.bias)
        own_chunk = arena._ARENA._chunk
        in_chunk = own_chunk is not None and any(
            own_chunk.ctypes.data <= array.ctypes.data < own_chunk.ctypes.data + own_chunk.size
            for array in (plan.packed, plan.prepared))
        assert in_chunk == (setting == "1")
        for kernel in ("lutq", "lut", "decode"):
            monkeypatch.setenv("AQLM_CPU_KERNEL", kernel)
            with torch.no_grad():
                results[setting, kernel] = weight(x)
    for kernel in ("lutq", "lut", "decode"):
        assert torch.equal(results["0", kernel], results["1", kernel])
