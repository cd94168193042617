"""Layer 2, torch: sampling on grids (:mod:`.warp` is the one place that calls ``grid_sample`` and converts world ↔ normalized coordinates), transforms and resampling."""
