"""Exponential moving average of the trained weights (`ema_decay`), used for validation and the
final model.

shadow <- d * shadow + (1 - d) * weight after every optimizer step, with the usual warm-up
d_t = min(decay, (1 + t) / (10 + t)) so the first steps are not dominated by the random init.
Only trainable tensors are averaged (a frozen tower is its own average). On small data the
average of the last few hundred steps is smoother than the last step: less sensitive to the seed
and to where in the epoch training stops.
"""
import contextlib

import paddle


class ModelEMA:
    def __init__(self, model, decay):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.params = {n: p for n, p in model.named_parameters() if not p.stop_gradient}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    def current_decay(self):
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @paddle.no_grad()
    def update(self):
        d = self.current_decay()
        for n, p in self.params.items():
            s = self.shadow[n]
            s.set_value(s * d + p.detach() * (1.0 - d))
        self.updates += 1

    @contextlib.contextmanager
    def applied(self):
        """The model holds the averaged weights inside the block, its own ones again after."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with paddle.no_grad():
            for n, p in self.params.items():
                p.set_value(self.shadow[n])
        try:
            yield
        finally:
            with paddle.no_grad():
                for n, p in self.params.items():
                    p.set_value(saved[n])

    def state_dict(self):
        return {"updates": self.updates, "decay": self.decay,
                "shadow": {n: s.numpy() for n, s in self.shadow.items()}}

    def set_state_dict(self, state):
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:5]} (was ema_decay or the model changed?)")
        self.updates = int(state["updates"])
        for n, s in self.shadow.items():
            s.set_value(paddle.to_tensor(state["shadow"][n], dtype=s.dtype))
