"""Tokens → chunks with memory slots and beacons (see `chunks` for the layout)."""

from comet_ds.layout.chunks import (
    IGNORE_INDEX,
    Chunk,
    ChunkIndices,
    ChunkLayout,
    Role,
    attention_mask_from_roles,
    fifo_keep,
    fixed_chunk_sizes,
    position_ids_from_roles,
)

__all__ = [
    "IGNORE_INDEX",
    "Chunk",
    "ChunkIndices",
    "ChunkLayout",
    "Role",
    "attention_mask_from_roles",
    "fifo_keep",
    "fixed_chunk_sizes",
    "position_ids_from_roles",
]
