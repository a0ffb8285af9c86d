"""Writing prepared samples as a `datasets` Arrow dataset with a manifest beside it."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import DatasetInfo, Features, List, Value
from datasets.arrow_writer import ArrowWriter

from data_prep.fs import file_sha256, output_directory
from data_prep.tokens import IGNORE_INDEX

MANIFEST = "manifest.json"
SHARD = "data-00000-of-00001.arrow"
TOKEN_COLUMNS = ("input_ids", "labels")


def row_features(row: dict[str, Any]) -> Features:
    """Arrow types for a command's rows: token ids as int32 (vocabularies fit; half of int64's bytes),
    the other columns from their Python types."""
    kinds = {str: Value("string"), int: Value("int64"), float: Value("float64"), bool: Value("bool")}
    features = {}
    for name, value in row.items():
        if name in TOKEN_COLUMNS:
            features[name] = List(Value("int32"))
        elif type(value) in kinds:
            features[name] = kinds[type(value)]
        else:
            raise TypeError(f"column {name!r}: no Arrow type for {type(value).__name__}")
    return Features(features)


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    """sha256 over the tokenizer's files, so a dataset names the exact vocabulary it was built with."""
    digest = hashlib.sha256()
    for path in sorted(Path(tokenizer_dir).glob("tokenizer*")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class DatasetWriter:
    """Streams samples into a `datasets` Arrow dataset, written atomically with its manifest and
    rejects.jsonl; memory holds one Arrow batch, never the whole dataset.

        with DatasetWriter(output, tokenizer_dir, "comet-prep passkey") as writer:
            writer.reject(file, line, reason)   # a malformed input record, kept with its reason
            writer.add(row)                     # input_ids, labels, source, sample_id, text, ...
            writer.finish(extra)                # nothing is published unless this runs

    Leaving the block without finish(), or with an exception, leaves `output` untouched. `output` is
    written as data_prep.fs.output_directory allows: new, empty, or an earlier output of `command` with
    `overwrite`, and outside the tokenizer and `inputs`. The rows go straight into the dataset's one
    shard in the layout `save_to_disk` writes (`load_from_disk` reads it): re-saving through
    `datasets` would read the whole file back through memory.
    """

    def __init__(self, output: str | Path, tokenizer_dir: str | Path, command: str, *, overwrite: bool = False,
                 inputs: Iterable[str | Path] = (), batch_rows: int = 64, keep_rejects: bool = True):
        self.output, self.tokenizer_dir, self.batch_rows = output, tokenizer_dir, batch_rows
        self.command, self.overwrite, self.inputs = command, overwrite, [tokenizer_dir, *inputs]
        self.keep_rejects = keep_rejects
        self.samples = self.tokens = self.trained_tokens = self.rejected = 0
        self.shortest, self.longest = None, 0
        self.manifest: dict[str, Any] | None = None
        self._rows: ArrowWriter | None = None
        self._pending: list[dict[str, Any]] = []

    def __enter__(self) -> DatasetWriter:
        self._scratch_context = output_directory(self.output, self.command, overwrite=self.overwrite,
                                                 inputs=self.inputs)
        self.scratch = self._scratch_context.__enter__()
        (self.scratch / "data").mkdir()
        self._rejects = open(self.scratch / "rejects.jsonl", "w", encoding="utf-8")
        return self

    def reject(self, file: str, line: int, reason: str) -> None:
        self.rejected += 1
        self._rejects.write(json.dumps({"file": file, "line": line, "reason": reason}, ensure_ascii=False) + "\n")

    def add(self, row: dict[str, Any]) -> None:
        if self._rows is None:  # the first row fixes the schema
            self.features = row_features(row)
            self._schema = self.features.arrow_schema
            self._rows = ArrowWriter(features=self.features, path=str(self.scratch / "data" / SHARD))
        row = {**row, **{name: np.asarray(row[name], dtype=np.int32) for name in TOKEN_COLUMNS}}
        length = len(row["input_ids"])
        self.samples += 1
        self.tokens += length
        self.trained_tokens += int(np.count_nonzero(row["labels"] != IGNORE_INDEX))
        self.shortest = length if self.shortest is None else min(self.shortest, length)
        self.longest = max(self.longest, length)
        self._pending.append(row)
        if len(self._pending) == self.batch_rows:
            self._write_pending()

    def _write_pending(self) -> None:
        """One Arrow record batch; token columns go in as one buffer each (pyarrow would convert
        Python int lists element by element)."""
        columns = {}
        for name, feature in self.features.items():
            values = [row[name] for row in self._pending]
            if name in TOKEN_COLUMNS:
                offsets = np.zeros(len(values) + 1, dtype=np.int32)
                np.cumsum([len(v) for v in values], out=offsets[1:])
                columns[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(values)))
            else:
                columns[name] = pa.array(values, type=feature.pa_type)
        self._rows.write_table(pa.table(columns, schema=self._schema))  # the writer's schema: no cast
        self._pending.clear()

    def finish(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Seal the dataset and manifest; they appear at `output` when the block exits."""
        if self._rows is None:
            raise ValueError("no samples to write")
        if self._pending:
            self._write_pending()
        self._rows.finalize()
        self._rows.close()
        self._rejects.close()
        if not self.keep_rejects:
            (self.scratch / "rejects.jsonl").unlink()
        data = self.scratch / "data"
        DatasetInfo(features=self.features).write_to_directory(str(data))
        state = {"_data_files": [{"filename": SHARD}],
                 "_fingerprint": file_sha256(data / SHARD)[:16],  # content, not path: same rows, same bytes
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                 "_output_all_columns": False, "_split": None}
        (data / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        self.manifest = {
            "samples": self.samples,
            "tokens": {"total": self.tokens, "min": self.shortest, "max": self.longest,
                       "mean": round(self.tokens / self.samples, 1)},
            "trained_tokens": self.trained_tokens,
            "tokenizer": str(Path(self.tokenizer_dir).absolute()),
            "tokenizer_sha256": tokenizer_fingerprint(self.tokenizer_dir),
            "command": sys.argv,
            **(extra or {}),
        }
        (self.scratch / MANIFEST).write_text(json.dumps(self.manifest, indent=2) + "\n")
        return self.manifest

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        self._rejects.close()
        if self._rows is not None:
            self._rows.close()
        if kind is None and self.manifest is None:  # left early: discard like a failure
            kind, error = RuntimeError, RuntimeError("DatasetWriter left without finish()")
        self._scratch_context.__exit__(kind, error, tb)
