"""Training pieces: gradient caching for large contrastive batches (gradcache)."""
