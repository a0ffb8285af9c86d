"""The tokenizer as comet-prep and comet-ds use it on raw text: text → token ids, one text or a batch.

Raw text (logs, prompts, documents) is data, never control: a special token's string written in it —
a CoMeT beacon such as `<beacon>` or `<|memory|>`, or the base's `</s>` — is encoded as the characters
it is made of, never as the token's id. Otherwise a log that mentions `<beacon_3>` puts an inserted
token into the inputs and the labels, and training on it diverges. Special ids come only from the
tokenizer's own framing (bos/eos templates), and only when a caller asks for them.

A fast tokenizer's own `tokenizer.json` is loaded with the `tokenizers` library alone. Going through
transformers would import torch, a slow start-up in every comet-prep process and worker for
nothing the ids need. Anything else (a sentencepiece model without tokenizer.json, a config whose
settings transformers applies on top of the file) loads through AutoTokenizer.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# the label of a token that is not a training target (the value cross-entropy's ignore_index skips)
IGNORE_INDEX = -100


def int32_array(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token ids as an int32 array (an int32 array comes back as it is). struct packs a list of Python
    ints faster than numpy converts one, and that conversion is a good part of comet-prep's Python
    work."""
    if isinstance(ids, np.ndarray):
        return ids.astype(np.int32, copy=False)
    return np.frombuffer(struct.pack(f"{len(ids)}i", *ids), dtype=np.int32)


class Encoder(Protocol):
    """What sample builders need of a tokenizer: a TextEncoder."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class TextEncoder:
    """Encodes raw text as text, from a local tokenizer directory or a loaded transformers tokenizer.

    `encode_batch` releases the GIL while it runs (on the `tokenizers` path), so a thread can tokenise
    while another renders the next samples.
    """

    def __init__(self, tokenizer: str | Path | PreTrainedTokenizerBase):
        self._fast = self._slow = None
        if not isinstance(tokenizer, (str, Path)):
            self._slow = tokenizer
            return
        directory = Path(tokenizer)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory} is not a directory")
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        # settings with which transformers alters the file's pipeline or the decoded text at load time
        adjusted = config.get("clean_up_tokenization_spaces") or any(
            config.get(key) is not None for key in ("add_prefix_space", "legacy"))
        if (directory / "tokenizer.json").is_file() and not adjusted:
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_file(str(directory / "tokenizer.json"))
            self._fast.encode_special_tokens = True  # special tokens' strings in the text stay text
        else:
            from transformers import AutoTokenizer

            self._slow = AutoTokenizer.from_pretrained(str(directory))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text` read as text; add_special_tokens adds the tokenizer's own framing (e.g. bos)."""
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=add_special_tokens).ids
        return self._slow(text, add_special_tokens=add_special_tokens, split_special_tokens=True).input_ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text read as text, without framing tokens."""
        if self._fast is not None:
            # the _fast variant skips character offsets, which we never read
            return [e.ids for e in self._fast.encode_batch_fast(list(texts), add_special_tokens=False)]
        return self._slow(list(texts), add_special_tokens=False, split_special_tokens=True).input_ids

    def decode(self, ids: list[int]) -> str:
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=False)
        return self._slow.decode(ids)


def open_tokenizer(tokenizer_dir: str | Path) -> TextEncoder:
    """A --tokenizer directory's encoder, or one line saying it is not one (tokenizers raises a bare
    Exception on a damaged file); checked before any work, since a worker failing to load it would not say."""
    from data_prep.errors import CometInputError

    try:
        return TextEncoder(tokenizer_dir)
    except Exception as err:
        raise CometInputError(f"--tokenizer {tokenizer_dir}: not a tokenizer directory "
                              f"({str(err).splitlines()[0]})") from None
