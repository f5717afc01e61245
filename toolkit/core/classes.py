"""Class names shared by the torch side (datasets) and the serving side (no torch import)."""

DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
