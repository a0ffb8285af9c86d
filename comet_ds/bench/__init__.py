"""Benchmarks: the streaming forward, pipeline training, the pipeline schedule replay, data preparation, and
CoMeT against full attention at real shapes on a GPU (`gpu`, with its own shapes and settings)."""

from comet_ds.config import CometConfig

# the CoMeT shape both model benchmarks (forward, pipeline) run, so that their figures describe one model
BENCH_CONFIG = CometConfig(chunk_size=512, global_slots=16, temp_stride=8, temp_budget=256)
