"""What every stage shares, without torch: errors, the serving contract, file I/O, the format
table, the export manifest, where runs and exports are found, plots."""
