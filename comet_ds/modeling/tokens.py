"""Adding CoMeT's tokens to a tokenizer and giving them trainable embedding rows."""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from comet_ds.config import CometConfig, CometInputError, CometTokens

PLACEHOLDER_TOKEN = "<|memory|>"
TEMP_BEACON_TOKEN = "<beacon>"


def global_beacon_token(slot: int) -> str:
    return f"<beacon_{slot}>"


def inserted_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[int, str]:
    """CoMeT's tokens in `tokenizer`, id → name: none in a base tokenizer, all of them in a CoMeT one."""
    name = re.compile(f"{re.escape(PLACEHOLDER_TOKEN)}|{re.escape(TEMP_BEACON_TOKEN)}|<beacon_[0-9]+>")
    return {i: token for token, i in tokenizer.get_added_vocab().items() if name.fullmatch(token)}


def extend_tokenizer(tokenizer: PreTrainedTokenizerBase, config: CometConfig) -> CometTokens:
    """Add the placeholder, the temporary beacon and G global beacons as special tokens.

    Idempotent: a tokenizer that already has them (a saved CoMeT tokenizer) keeps its ids.
    The pad id falls back to eos, then unk, when the tokenizer has no pad token.
    """
    names = [PLACEHOLDER_TOKEN, TEMP_BEACON_TOKEN, *(global_beacon_token(i) for i in range(config.global_slots))]
    tokenizer.add_special_tokens({"additional_special_tokens": names}, replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(names)
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
                   if i is not None), None)
    if pad_id is None:
        raise CometInputError("the tokenizer has no pad, eos or unk token to pad chunks with; add a pad token")
    return CometTokens(placeholder_id=ids[0], temp_beacon_id=ids[1], global_beacon_ids=tuple(ids[2:]),
                       pad_id=pad_id, names=tuple(names))


def replace_inserted_rows(base_embeddings: torch.Tensor, input_ids: torch.Tensor, new_rows: torch.Tensor,
                          row_of_id: torch.Tensor) -> torch.Tensor:
    """Swap the base embedding of every inserted token for its trainable row."""
    rows = row_of_id[input_ids]
    return torch.where((rows >= 0).unsqueeze(-1), new_rows[rows.clamp(min=0)], base_embeddings)


class CometEmbedding(nn.Module):
    """The base token embedding plus separate rows for the inserted tokens.

    The new rows are their own parameter, so they train while the base embedding stays frozen.
    """

    def __init__(self, base: nn.Embedding, new_token_ids: tuple[int, ...]):
        super().__init__()
        if max(new_token_ids) >= base.num_embeddings:
            raise ValueError(f"token id {max(new_token_ids)} is outside the embedding "
                             f"({base.num_embeddings} rows); resize the embedding first")
        self.base = base
        ids = torch.tensor(new_token_ids, dtype=torch.long)
        self.new_rows = nn.Parameter(base.weight.detach()[ids].clone())
        row_of_id = torch.full((base.num_embeddings,), -1, dtype=torch.long)
        row_of_id[ids] = torch.arange(len(new_token_ids))
        self.register_buffer("row_of_id", row_of_id, persistent=False)
        self.register_buffer("new_token_ids", ids, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.insert_new_rows(self.base(input_ids), input_ids)

    def insert_new_rows(self, base_embeddings: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return replace_inserted_rows(base_embeddings, input_ids, self.new_rows, self.row_of_id)

    @torch.no_grad()
    def write_into_base(self) -> None:
        """Copy the trained rows into the base matrix (for a standalone export)."""
        self.base.weight[self.new_token_ids] = self.new_rows.to(self.base.weight.dtype)
