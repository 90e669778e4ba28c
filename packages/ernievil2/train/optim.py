"""AdamW with the usual exclusions, per-tower learning rates, tower freezing, warmup + cosine."""
import math

import paddle

# Never decayed: norms and biases (1-D), embeddings and temperatures (by name).
_NO_DECAY_WORDS = ("emb", "embedding", "temperature")


def _decays(name, param):
    return param.ndim >= 2 and not any(w in name for w in _NO_DECAY_WORDS)


def freeze(layer):
    for p in layer.parameters():
        p.stop_gradient = True


def param_groups(model, cfg):
    """Groups with a learning-rate multiplier each (Paddle scales the global lr by it)."""
    towers = {"visual": cfg.image_lr, "text_model": cfg.text_lr}
    groups, decay_names = {}, set()
    for name, p in model.named_parameters():
        if p.stop_gradient:
            continue
        lr = towers.get(name.split(".")[0]) or cfg.lr
        groups.setdefault(lr, []).append(p)
        if _decays(name, p):
            decay_names.add(p.name)
    base = cfg.lr if cfg.lr > 0 else 1.0
    return ([{"params": ps, "learning_rate": lr / base} for lr, ps in groups.items()],
            decay_names)


def build_optimizer(model, cfg):
    """AdamW over the model's trainable parameters (temperatures included); returns it and the
    generated names of the decayed tensors."""
    groups, decay_names = param_groups(model, cfg)
    clip = paddle.nn.ClipGradByGlobalNorm(cfg.grad_clip_norm) if cfg.grad_clip_norm > 0 else None
    opt = paddle.optimizer.AdamW(
        learning_rate=cfg.lr, parameters=groups, beta1=cfg.adam_beta1, beta2=cfg.adam_beta2,
        epsilon=cfg.adam_eps, weight_decay=cfg.weight_decay, grad_clip=clip,
        apply_decay_param_fun=lambda n: n in decay_names)
    return opt, decay_names


def lr_at(step, cfg):
    """Linear warmup to cfg.lr, then cosine to cfg.min_lr_ratio * lr at max_steps (step is 0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
