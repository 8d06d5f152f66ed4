"""Test-wide settings: CPU kernels by the fixed rules of aqlm.ops.choose_cpu_kernel, not by timing.

Measured kernel choices (aqlm.kernel_choice) depend on the machine's load, so a test run would
not be reproducible and would write to the user's cache; tests of the measurement turn it back
on with a temporary cache directory.
"""
import os

os.environ.setdefault("AQLM_KERNEL_CALIBRATION", "0")
