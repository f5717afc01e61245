"""Training: the config and its checks, the loop, distributed runs."""
