"""Training (run_train.sh): `loop.train(cfg)` and its parts: the run (output_dir, resume, final
model, signals), data, optimizer, checkpoints, GradCache, EMA, frozen-feature cache, validation."""
