"""The DP fine-tuning loop under Accelerate: latent cache, EMA, checkpoints, logging."""
