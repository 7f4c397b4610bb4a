"""Training: the model, the one training loop for proxies and larger runs, and where they run."""
