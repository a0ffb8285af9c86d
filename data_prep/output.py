"""Writing prepared samples as a `datasets` Arrow dataset with a manifest beside it."""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from datasets import Dataset

from comet_ds.fs import atomic_directory

MANIFEST = "manifest.json"


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    """sha256 over the tokenizer's files, so a dataset names the exact vocabulary it was built with."""
    digest = hashlib.sha256()
    for path in sorted(Path(tokenizer_dir).glob("tokenizer*")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_dataset(rows: Iterable[dict[str, Any]], output: str | Path, tokenizer_dir: str | Path,
                  extra: dict[str, Any] | None = None, rejects: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Save rows (each with input_ids, labels, source, sample_id, text) atomically, with the manifest
    and, when given, rejects.jsonl (one line per rejected input record); return the manifest."""
    rows = list(rows)
    if not rows:
        raise ValueError("no samples to write")
    lengths = [len(r["input_ids"]) for r in rows]
    manifest = {
        "samples": len(rows),
        "tokens": {"total": sum(lengths), "min": min(lengths), "max": max(lengths),
                   "mean": round(statistics.fmean(lengths), 1)},
        "trained_tokens": sum(sum(1 for x in r["labels"] if x != -100) for r in rows),
        "tokenizer": str(Path(tokenizer_dir).absolute()),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer_dir),
        "command": sys.argv,
        **(extra or {}),
    }
    with atomic_directory(output) as scratch:
        Dataset.from_list(rows).save_to_disk(str(scratch / "data"))
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if rejects is not None:
            (scratch / "rejects.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                           for r in rejects))
    return manifest
