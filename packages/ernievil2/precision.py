"""Mixed precision: one autocast for inference, training and validation."""
import contextlib

import paddle

AMP_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


def autocast(amp="none"):
    """Context in which the towers run in fp16/bf16 (O1: matmuls and convolutions); a no-op for
    amp 'none'. Callers cast the outputs back to float32 before the loss or the output file."""
    if amp == "none":
        return contextlib.nullcontext()
    return paddle.amp.auto_cast(level="O1", dtype=AMP_DTYPES[amp])
