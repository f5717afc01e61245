"""Datasets: the registry and IDX reader, augmentation, labelled image folders, styled digits."""
