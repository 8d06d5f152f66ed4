"""Pick the CPU kernel of a quantized matmul by measuring it on the machine at hand.

Which CPU path is fastest (quantized tables ``lutq``, exact tables ``lut``, decoding codewords
``decode``, dequantizing into a dense dtype and calling torch's matmul ``dequantize`` /
``dequantize_bf16``) depends on the CPU, its caches and vector extensions, and the thread count:
crossovers measured on one CPU are wrong on another. At the first call for a key (scheme, shape
class, token class, dtypes, SIMD level, threads, exact or not), every kernel that applies runs a
few times on the layer's own tensors, each run timed alone with the weight out of L2 (as between a
model's calls of one layer), and the fastest wins. Choices persist in a JSON file under
:func:`aqlm.paths.cache_dir`, one section per CPU model, so later processes skip the measurement.

Environment:
    ``AQLM_CPU_KERNEL=<kernel>``: use that kernel wherever it applies (tests, experiments).
    ``AQLM_KERNEL_CALIBRATION=0``: no measurement and no file; the fixed rules of
    :func:`aqlm.ops.choose_cpu_kernel` decide.
Every choice is logged at DEBUG level on ``logging.getLogger("aqlm")``.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .paths import cache_dir

logger = logging.getLogger("aqlm")

FORCE_ENV = "AQLM_CPU_KERNEL"
CALIBRATION_ENV = "AQLM_KERNEL_CALIBRATION"
# A new name whenever kernels or the fixed rules change, so that no earlier measurement is reused
# (v2: quantized tables of 15-bit entries, and fixed rules that use them less; v3: the quantized
# tables use every thread on small layers, where v2 had measured them on one; v4: a new candidate,
# the exact wide-token tables "lutw"; v5: lutw looks up codebooks of 16 codewords a pair at a time;
# v6: each run timed with its weight out of L2, and no candidate dropped after a single round;
# v7: the AVX2 and AVX-512 quantized tables sum offset bytes, 3-10% faster; AVX2 8x8g8 decoding 1.7x faster;
# v8: a new candidate where the CPU has AMX or AVX-512 BF16, the bfloat16 tiles "bf16";
# v9: the quantized tables prefetch the codes they read next, up to 1.5x faster when they come from memory;
# v10: the quantized tables split each entry into bytes by its bits (radix 256), 15-20% faster a call;
# v11: the AVX2 quantized tables pick 16-entry slices by a tree of blends, half the operations a lookup;
# v12: the quantized tables' entries from integer products (AVX-512 VNNI), 25-30% faster on small layers;
# v13: a new candidate for codebooks of more than 256 codewords, the int8 codebooks "decodeq";
# v14: the bfloat16 tiles "bf16" are candidates wherever "decodeq" is, for any activations).
CACHE_FILE = "kernel_choice-v14.json"
ROUNDS = 5  # timed runs per candidate (after one warm-up), interleaved; the minimum counts
HOPELESS = 4.0  # a candidate this many times slower than the best after PRUNE_AFTER rounds is not run again
PRUNE_AFTER = 3  # rounds before any pruning: one run can be slowed 10-200x by a descheduled thread
EVICT_BYTES_DEFAULT = 8 << 20  # read before each timed run when the L2 size is unknown (4x a 2 MiB L2)
EVICT_BYTES_MAX = 64 << 20
MARGIN = 1.5  # another candidate replaces the fixed rules' pick only when this many times faster


def token_class(tokens: int) -> int:
    """Token counts measured alike: 1..8 exactly, then powers of two (16, 32, ...)."""
    return tokens if tokens <= 8 else 1 << (tokens - 1).bit_length()


def shape_class(features: int) -> int:
    """Feature counts measured alike: the next power of two."""
    return 1 << (max(features, 1) - 1).bit_length()


def calibration_enabled() -> bool:
    """False when ``AQLM_KERNEL_CALIBRATION=0``."""
    return os.environ.get(CALIBRATION_ENV, "1") != "0"


def forced_kernel() -> Optional[str]:
    """The kernel named by ``AQLM_CPU_KERNEL``, or None."""
    return os.environ.get(FORCE_ENV) or None


@functools.lru_cache(maxsize=None)
def cpuinfo_field(name: str) -> Optional[str]:
    """The first ``name : value`` line of Linux's /proc/cpuinfo (e.g. "model name", "flags"), or None."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def evict_bytes() -> int:
    """Bytes to read between timed runs so that the candidate finds its weight out of the core's
    L2 cache, as it does in a model's forward (other layers ran in between): 4x the L2 size."""
    try:
        l2 = os.sysconf("SC_LEVEL2_CACHE_SIZE")
    except (ValueError, OSError, AttributeError):
        l2 = 0
    return min(EVICT_BYTES_MAX, 4 * l2) if l2 > 0 else EVICT_BYTES_DEFAULT


def cpu_model() -> str:
    """The CPU's model name, the section of the cache file."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


class KernelChooser:
    """Measured kernel choices, loaded from and saved to one JSON file (``path``)."""

    def __init__(self, path: Optional[Path] = None):
        self._path = path
        self._choices: Optional[dict] = None

    @property
    def path(self) -> Path:
        return self._path if self._path is not None else cache_dir() / CACHE_FILE

    def _load(self) -> dict:
        if self._choices is None:
            try:
                with open(self.path) as file:
                    self._choices = json.load(file).get(cpu_model(), {})
            except (OSError, ValueError, AttributeError):
                self._choices = {}
        return self._choices

    def _save(self) -> None:
        try:
            with open(self.path) as file:
                everything = json.load(file)
        except (OSError, ValueError):
            everything = {}
        if not isinstance(everything, dict):
            everything = {}
        everything[cpu_model()] = self._choices
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".kernel_choice-")
        with os.fdopen(handle, "w") as file:
            json.dump(everything, file, indent=1, sort_keys=True)
        os.replace(temporary, self.path)

    @staticmethod
    def _measure(calls: dict, evict: torch.Tensor, times: dict) -> dict:
        """Lower ``times[kernel]`` to the fastest of ROUNDS runs of ``calls[kernel]()``, each run
        after reading ``evict``; candidates HOPELESS after PRUNE_AFTER rounds stop early. Returns
        the calls of the candidates still in the running."""
        alive = list(calls)
        for round_number in range(1, ROUNDS + 1):
            for kernel in alive:  # interleaved, so that a burst of load elsewhere hits every candidate
                evict.sum()  # the weight leaves L2, as between a model's calls of one layer
                start = time.perf_counter()
                calls[kernel]()
                times[kernel] = min(times[kernel], time.perf_counter() - start)
            if round_number >= PRUNE_AFTER:
                best = min(times.values())
                alive = [kernel for kernel in alive if times[kernel] <= HOPELESS * best]
        return {kernel: calls[kernel] for kernel in alive}

    def choose(self, key: str, candidates: list[str], prepare: Callable[[str], Callable[[], object]],
               prior: Optional[str] = None) -> str:
        """The fastest of ``candidates`` for ``key``: from the cache, else measured by timing the
        call ``prepare(kernel)`` returns (its arguments bound, so that only the kernel is timed).

        ``prior`` (the fixed rules' pick) is kept unless another candidate beats it by MARGIN in two
        measurements, the second one's times merged into the first: on a machine whose cores are
        shared, every timing of a multi-threaded kernel can be inflated by waits for a descheduled
        thread for a while, and a near tie says more about the load than the kernels."""
        choices = self._load()
        known = choices.get(key)
        if known in candidates:
            return known
        if len(candidates) == 1:
            return candidates[0]
        calls = {kernel: prepare(kernel) for kernel in candidates}
        for call in calls.values():  # warm-up: faults pages in, builds caches
            call()
        evict = torch.ones(evict_bytes() // 8, dtype=torch.float64)  # summed by torch's threads: every core's L2
        times = {kernel: float("inf") for kernel in candidates}
        for _ in range(2):  # a second pass, later, of those still in the running must confirm a win over the prior
            calls = self._measure(calls, evict, times)
            chosen = min(times, key=times.get)
            if prior in times and times[chosen] * MARGIN > times[prior]:
                chosen = prior
            if chosen == prior or prior not in times:
                break
        choices[key] = chosen
        try:
            self._save()
        except OSError as error:
            logger.debug("aqlm: could not save kernel choices to %s: %s", self.path, error)
        logger.debug(
            "aqlm: measured %s: %s -> %s", key, ", ".join(f"{k} {t * 1e3:.3f} ms" for k, t in times.items()), chosen
        )
        return chosen
