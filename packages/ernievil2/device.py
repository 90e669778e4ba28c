"""Device choice with the official meaning of `device` (gpu, else CPU), falling back with a warning."""
import logging

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
    if amp != "none" and place != "gpu":
        log.warning("amp: %s is for GPUs; running fp32 on CPU", amp)
        amp = "none"
    return place, amp
