"""Training (run_train.sh): `loop.train(cfg)` and its parts: data, optimizer, checkpoints, GradCache,
EMA, frozen-feature cache, validation."""
