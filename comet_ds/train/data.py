"""Training data: a data_prep Arrow dataset, read in a seeded order that every rank computes alike.

Every rank (all stages, all replicas) derives the same global batch for a step from the seed and
the step number, so the first and last stage see the same chunks in the same order without any
communication, every rank knows the step's global count of trained tokens, and resuming at step
s continues exactly where the run stopped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, load_from_disk

from comet_ds.config import CometInputError
from comet_ds.layout import IGNORE_INDEX

REQUIRED_COLUMNS = ("input_ids", "labels")


class DatasetError(CometInputError):
    """A training dataset that cannot be used as it is."""


def load_training_dataset(path: str | Path) -> Dataset:
    """Load a `save_to_disk` dataset (a data_prep output directory or its data/ folder)."""
    path = Path(path)
    data_dir = path / "data" if (path / "data").is_dir() else path
    if not (data_dir / "dataset_info.json").is_file() and not (data_dir / "state.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a saved dataset; build one with comet-prep "
                                "(e.g. comet-prep passkey ... --output DIR)")
    state = data_dir / "state.json"
    if state.is_file() and json.loads(state.read_text()).get("_data_files") == []:
        # `datasets` saves 0 rows as no Arrow file at all, and then fails to load it with an IndexError
        raise DatasetError(f"dataset {path} has no rows")
    dataset = load_from_disk(str(data_dir))
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise DatasetError(f"dataset {path} lacks the column(s) {', '.join(missing)} (has: "
                         f"{', '.join(dataset.column_names)}); comet-ds train needs input_ids and labels")
    if len(dataset) == 0:
        raise DatasetError(f"dataset {path} has no rows")
    return dataset


def check_has_targets(dataset: Dataset, source: str | Path, max_tokens: int | None = None) -> None:
    """Refuse a dataset with nothing to train on: no label other than IGNORE_INDEX after the first
    position of a row (labels shift by one, so the first never counts) and within max_tokens."""
    for chunk in dataset.with_format("arrow")["labels"].chunks:
        if pc.any(pc.not_equal(pc.list_flatten(pc.list_slice(chunk, 1, max_tokens)), IGNORE_INDEX)).as_py():
            return
    within = f" within train.max_tokens ({max_tokens})" if max_tokens else ""
    raise DatasetError(f"dataset {source} has no labelled tokens{within} to train on (every label is {IGNORE_INDEX}); "
                       "build it with a comet-prep command that labels targets" +
                       (", or raise train.max_tokens" if max_tokens else ""))


def check_token_ids(dataset: Dataset, vocab_size: int, inserted: Mapping[int, str], source: str | Path) -> None:
    """Refuse ids that no text encodes to: negative ones, ones outside the vocabulary (base tokens plus
    CoMeT's), and CoMeT's inserted tokens (`inserted`, id → name), which in a dataset would be trained
    on as text and drive the loss to infinity. One vectorised pass over the Arrow columns."""
    for column in REQUIRED_COLUMNS:
        first_row = 0
        for chunk in dataset.with_format("arrow")[column].chunks:
            values = pc.list_flatten(chunk)
            bad = pc.or_(pc.or_(pc.less(values, 0), pc.greater_equal(values, vocab_size)),
                         pc.is_in(values, value_set=pa.array(sorted(inserted), type=values.type)))
            if column == "labels":
                bad = pc.and_(bad, pc.not_equal(values, IGNORE_INDEX))
            if pc.any(bad).as_py():
                at = pc.index(bad, True).as_py()
                row = first_row + pc.list_parent_indices(chunk)[at].as_py()
                value = values[at].as_py()
                what = ("is negative" if value < 0 else f"is the CoMeT token {inserted[value]}" if value in inserted
                        else f"is outside the vocabulary of {vocab_size} tokens")
                sample = dataset[row].get("sample_id")
                raise DatasetError(f"dataset {source} row {row}{'' if sample is None else f' (sample_id {sample!r})'}"
                                   f": {column} holds {value}, which {what}; rebuild it with comet-prep, which "
                                   "encodes text as text, with the base model's tokenizer")
            first_row += len(chunk)


def dataset_manifest(path: str | Path) -> dict | None:
    """The manifest.json comet-prep wrote beside a dataset (given as its output directory or its data/
    folder), or None for a dataset built otherwise."""
    path = Path(path)
    manifest = path / "manifest.json"
    if not manifest.is_file() and path.name == "data":
        manifest = path.parent / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.is_file() else None


def check_dataset_tokenizer(path: str | Path, tokenizer_dirs: list[str | Path], allow_mismatch: bool) -> None:
    """Refuse a comet-prep dataset built with a tokenizer other than the run's (the base model's, or the
    CoMeT tokenizer of the adapter the run starts from, which adds only CoMeT's tokens): its ids would
    mean other words to this model."""
    from data_prep.output import tokenizer_fingerprint

    manifest = dataset_manifest(path)
    if manifest is None or allow_mismatch:
        return
    if manifest["tokenizer_sha256"] not in {tokenizer_fingerprint(d) for d in tokenizer_dirs}:
        raise DatasetError(
            f"dataset {path} was built with tokenizer {manifest['tokenizer']} (sha256 {manifest['tokenizer_sha256']})"
            f" but this run's base model {tokenizer_dirs[0]} has tokenizer sha256 "
            f"{tokenizer_fingerprint(tokenizer_dirs[0])}; rebuild it with comet-prep --tokenizer {tokenizer_dirs[0]},"
            " or set allow_tokenizer_mismatch: true if the two tokenizers give the same ids")


@dataclass(frozen=True)
class StepBatch:
    """One replica's sequences for one step, and what the whole step trains on."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    global_trained_tokens: int
    global_text_tokens: int
    documents: list[list[int]]  # per sequence, the lengths of the rows packed into it (one row unless packing)


def trained_tokens(labels: list[int]) -> int:
    """Tokens with a target once labels are shifted: labels[1:] that are not ignored."""
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


def sequence_lengths(dataset: Dataset, max_tokens: int | None = None) -> list[int]:
    """Tokens per row (after truncation to max_tokens), read from the Arrow list offsets alone."""
    lengths = pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_pylist()
    return [min(n, max_tokens) if max_tokens else n for n in lengths]


def pack_rows(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive rows packed greedily into sequences of at most max_tokens tokens (a longer row, truncated,
    is a sequence of its own): the row indices of each sequence. Every row is kept, with or without targets."""
    packs: list[list[int]] = []
    size = 0
    for index, length in enumerate(lengths):
        length = min(length, max_tokens)
        if not packs or size + length > max_tokens:
            packs.append([])
            size = 0
        packs[-1].append(index)
        size += length
    return packs


class StepSampler:
    """Seeded epoch permutations of the dataset's sequences, cut into global batches of replicas × sequences.

    A sequence is a row, or with `packing` several consecutive rows packed into one of at most max_tokens
    tokens (pack_rows): memory then flows from one document into the next, as in the paper's training, and
    each document's first label is ignored, so that no document is trained to predict another's first token.
    With group_by_length, every global batch holds sequences of one length: each length's sequences are
    permuted and cut into batches (the last one of a length topped up from the start of its permutation, so
    none is skipped), and the epoch's batches are shuffled. A dataset that mixes lengths then trains without
    padding short sequences with empty chunks up to the longest.
    """

    def __init__(self, dataset: Dataset, replicas: int, sequences_per_replica: int, seed: int,
                 max_tokens: int | None = None, group_by_length: bool = False, packing: bool = False):
        self.dataset = dataset
        self.replicas = replicas
        self.per_replica = sequences_per_replica
        self.seed = seed
        self.max_tokens = max_tokens
        lengths = sequence_lengths(dataset, max_tokens)
        self.sequences = pack_rows(lengths, max_tokens) if packing else [[i] for i in range(len(lengths))]
        self._orders: dict[int, list[int]] = {}
        self._batches: dict[int, list[list[int]]] = {}
        self._groups: list[list[int]] | None = None
        if group_by_length:
            groups: dict[int, list[int]] = {}
            for index, rows in enumerate(self.sequences):
                groups.setdefault(sum(lengths[row] for row in rows), []).append(index)
            self._groups = [groups[length] for length in sorted(groups)]
            self._batches_per_epoch = sum(-(-len(rows) // self.global_batch) for rows in self._groups)

    @property
    def global_batch(self) -> int:
        return self.replicas * self.per_replica

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(len(self.sequences),
                                                  generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()}
        return self._orders[epoch]

    def _grouped_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        batches = []
        for rows in self._groups:
            order = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
            for start in range(0, len(order), self.global_batch):
                batch = order[start:start + self.global_batch]
                while len(batch) < self.global_batch:  # a short last batch, or a length rarer than one batch
                    batch += order[:self.global_batch - len(batch)]
                batches.append(batch)
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def _indices(self, step: int) -> list[int]:
        if self._groups is not None:
            epoch, position = divmod(step, self._batches_per_epoch)
            if epoch not in self._batches:
                self._batches = {epoch: self._grouped_batches(epoch)}
            return self._batches[epoch][position]
        n = len(self.sequences)
        return [self._order(position // n)[position % n]
                for position in range(step * self.global_batch, (step + 1) * self.global_batch)]

    def batch(self, step: int, replica: int) -> StepBatch:
        ids, labels, documents = [], [], []
        for sequence in self._indices(step):
            rows = self.sequences[sequence]
            ids.append([])
            labels.append([])
            documents.append([])
            for index, row in zip(rows, self.dataset.select(rows)):
                a, b = list(row["input_ids"])[:self.max_tokens or None], list(row["labels"])[:self.max_tokens or None]
                if len(a) != len(b) or not a:
                    raise DatasetError(f"dataset row {index}: {len(a)} input_ids but {len(b)} labels")
                ids[-1] += a
                labels[-1] += b if len(rows) == 1 else [IGNORE_INDEX, *b[1:]]
                documents[-1].append(len(a))
        mine = slice(replica * self.per_replica, (replica + 1) * self.per_replica)
        return StepBatch(ids[mine], labels[mine], global_trained_tokens=sum(trained_tokens(x) for x in labels),
                         global_text_tokens=sum(len(x) for x in ids), documents=documents[mine])
