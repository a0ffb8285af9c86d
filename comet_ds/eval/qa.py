"""Question answering on data_prep datasets: the trained span of each row is the reference answer.

Each row's prompt is everything before its first labelled token; the model continues it greedily and
the continuation is scored against the labelled span by exact match and token F1 (SQuAD-style
normalisation: lower case, no punctuation or articles, single spaces).
"""

from __future__ import annotations

import re
import string
from collections import Counter

from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from comet_ds.config import CometInputError
from comet_ds.eval.passkey import Continuation
from comet_ds.layout import IGNORE_INDEX


def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref:
        return float(pred == ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def check_has_answers(dataset: Dataset, source: str) -> None:
    """Refuse, before a model loads, a dataset in which no row has a labelled answer after a prompt."""
    for batch in dataset.with_format("arrow").iter(batch_size=256):
        for labels in batch["labels"].to_pylist():
            if next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), 0) > 0:
                return
    raise CometInputError(f"dataset {source} has no row with a labelled answer after a prompt, so there is no "
                          "question to score; build it with comet-prep passkey, needle, agent-logs --kinds qa or "
                          "user-behavior")


def evaluate_qa(continuation: Continuation, tokenizer: PreTrainedTokenizerBase,
                dataset: Dataset, max_new_tokens: int | None = None, limit: int | None = None) -> dict:
    rows, skipped, exact_matches = [], 0, 0.0
    # counts rows read; under a limit the rows needed are unknown (skipped rows do not count toward it)
    bar = tqdm(total=len(dataset) if limit is None else None, unit="row", leave=False, dynamic_ncols=True)
    for index, row in enumerate(dataset):
        if limit is not None and len(rows) >= limit:
            break
        bar.update()
        labels = list(row["labels"])
        first = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), None)
        if first is None or first == 0:
            skipped += 1  # nothing to answer, or no prompt before the answer
            continue
        span = [t for t, x in zip(row["input_ids"][first:], labels[first:]) if x != IGNORE_INDEX]
        reference = tokenizer.decode(span, skip_special_tokens=True)
        new = continuation([list(row["input_ids"][:first])], max_new_tokens or len(span) + 4)[0]
        prediction = tokenizer.decode(new, skip_special_tokens=True)
        # score the continuation up to the reference's length in words (the model may run on)
        prediction = " ".join(prediction.split()[: max(1, len(reference.split()))])
        rows.append({"index": index, "reference": reference, "prediction": prediction,
                     "exact_match": float(normalize(prediction) == normalize(reference)),
                     "f1": token_f1(prediction, reference)})
        exact_matches += rows[-1]["exact_match"]
        bar.set_postfix(exact_match=f"{exact_matches / len(rows):.0%}")
    bar.close()
    if not rows:
        raise ValueError("no row of the dataset has a labelled answer after a prompt")
    return {"exact_match": exact_matches / len(rows),
            "f1": sum(r["f1"] for r in rows) / len(rows), "scored": len(rows), "skipped": skipped, "rows": rows}
