"""Generation and evaluation: loading weights, sampling, export, sample grids, FID."""
