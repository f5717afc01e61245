"""Reports: evaluation, inspection of a model, comparisons."""
