"""Export: the format writers, verified publishing, parity offline and at an endpoint."""
