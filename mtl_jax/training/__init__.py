"""Training: TrainState, the pure step bodies, weighting, optimizer, sharding and the parallel
strategies that compile the steps, the loop and its metrics window, the modes (runner)."""
