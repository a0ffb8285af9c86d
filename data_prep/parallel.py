"""Tokenising work spread over processes, in input order, with bounded memory.

Every worker loads the tokenizer once; the functions it runs take it from `worker_tokenizer()`.
Results come back in input order, so the same inputs give the same dataset at any --num-proc.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import TypeVar

from transformers import AutoTokenizer, PreTrainedTokenizerBase

In = TypeVar("In")
Out = TypeVar("Out")

_tokenizer: PreTrainedTokenizerBase | None = None


def load_worker_tokenizer(tokenizer_dir: str) -> None:
    global _tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process; the processes are the parallelism
    _tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)


def worker_tokenizer() -> PreTrainedTokenizerBase:
    if _tokenizer is None:
        raise RuntimeError("load_worker_tokenizer() has not run in this process")
    return _tokenizer


def ordered_map(fn: Callable[[In], Out], items: Iterable[In], num_proc: int, tokenizer_dir: str,
                chunksize: int = 16) -> Iterator[Out]:
    """fn over items in input order, on `num_proc` processes (1: in this process).

    Items are handed out a window at a time: Pool.imap alone would read the whole input ahead of
    the workers, and the input may be larger than memory.
    """
    if num_proc <= 1:
        load_worker_tokenizer(tokenizer_dir)
        yield from map(fn, items)
        return
    window = num_proc * chunksize * 4
    context = multiprocessing.get_context("spawn")  # no forked copies of tokenizer threads or open files
    with context.Pool(num_proc, initializer=load_worker_tokenizer, initargs=(tokenizer_dir,)) as pool:
        items = iter(items)
        while batch := list(islice(items, window)):
            yield from pool.imap(fn, batch, chunksize)
