"""Train small MNIST-like vision models, export them with proven parity, and serve them."""

__version__ = "0.1.0"
