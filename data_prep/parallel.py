"""Tokenising work spread over processes, in input order, with bounded memory.

Every worker loads the tokenizer once; the functions it runs take it from `worker_tokenizer()`.
Results come back in input order, so the same inputs give the same dataset at any --num-proc.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import TypeVar

from data_prep.tokens import TextEncoder

In = TypeVar("In")
Out = TypeVar("Out")

_tokenizer: TextEncoder | None = None


def load_worker_tokenizer(tokenizer_dir: str) -> None:
    global _tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per encoding call; threads and processes are ours
    _tokenizer = TextEncoder(tokenizer_dir)


def worker_tokenizer() -> TextEncoder:
    if _tokenizer is None:
        raise RuntimeError("load_worker_tokenizer() has not run in this process")
    return _tokenizer


def ordered_map(fn: Callable[[In], Out], items: Iterable[In], num_proc: int, tokenizer_dir: str,
                chunksize: int = 16) -> Iterator[Out]:
    """fn over items in input order, on `num_proc` processes.

    With one process, fn runs on two threads of this one: the tokenizer releases the GIL while it
    encodes, so one thread tokenises while the other (and the caller, reading input) runs Python.
    Either way only a window of items is in flight: Pool.imap alone would read the whole input
    ahead of the workers, and the input may be larger than memory.
    """
    if num_proc <= 1:
        load_worker_tokenizer(tokenizer_dir)
        with ThreadPoolExecutor(2) as threads:
            pending: deque[Future[Out]] = deque()
            for item in items:
                pending.append(threads.submit(fn, item))
                if len(pending) >= 4 * chunksize:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        return
    context = multiprocessing.get_context("spawn")  # no forked copies of tokenizer threads or open files
    with context.Pool(num_proc, initializer=load_worker_tokenizer, initargs=(tokenizer_dir,)) as pool:
        items = iter(items)
        while window := list(islice(items, num_proc * chunksize * 4)):
            yield from pool.imap(fn, window, chunksize)
