"""People's corrections as data, and promotion of a better model."""
