"""Device choice with the official meaning of `device` (gpu, else CPU), falling back with a warning."""
import logging
import os

import paddle

log = logging.getLogger(__name__)


def select_device(device, amp="none"):
    """Set Paddle's device; returns ("gpu"|"cpu", amp actually used)."""
    want_gpu = str(device).lower() == "gpu"
    has_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if want_gpu and not has_gpu:
        log.warning("device: gpu requested but no GPU is available; running on CPU")
    place = "gpu" if want_gpu and has_gpu else "cpu"
    paddle.set_device(place)
    if place == "cpu" and use_fast_mkl_kernels_on_amd():
        log.info("AMD CPU: MKL_DEBUG_CPU_TYPE=5 (MKL's fast kernels)")
    if amp != "none" and place != "gpu":
        log.warning("amp: %s is for GPUs; running fp32 on CPU", amp)
        amp = "none"
    return place, amp


def use_fast_mkl_kernels_on_amd():
    """MKL (Paddle's CPU BLAS for eager and to_static) picks slow generic kernels on AMD CPUs;
    MKL_DEBUG_CPU_TYPE=5 makes it use its AVX2 ones (measured 2-2.5x faster matmuls on the dev
    machine's AMD EPYC). Read by MKL at its first call, so this must run before any compute.
    A value set by the user is left alone; Intel CPUs ignore it; oneDNN does not use it."""
    if "MKL_DEBUG_CPU_TYPE" in os.environ:
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            amd = any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in f)
    except OSError:
        return False
    if amd:
        os.environ["MKL_DEBUG_CPU_TYPE"] = "5"
    return amd
