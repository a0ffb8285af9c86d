"""Training: the run config, data order, optimiser, checkpoints, tracking and the loop (`comet-ds train`)."""
