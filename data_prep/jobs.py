"""The per-record work of each `comet-prep` command: records in, dataset rows out.

These run in worker processes under --num-proc (see `parallel`), so they are plain top-level
functions of picklable arguments and take the tokenizer from `worker_tokenizer()`. A row longer
than --max-tokens comes back as None, before its text is decoded, so the caller can count it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from data_prep.agent_logs import Trajectory
from data_prep.agent_samples import questions as trajectory_questions
from data_prep.agent_samples import render, sft_sample
from data_prep.parallel import worker_tokenizer
from data_prep.passkey import DepthSpec, draw_depth, needle_sample, passkey_sample
from data_prep.qa import Question, pick_questions, qa_samples, qa_text
from data_prep.tokens import int32_array
from data_prep.user_behavior import History
from data_prep.user_behavior import questions as history_questions

Row = dict[str, Any]


def _row(ids: Sequence[int], labels: Sequence[int], max_tokens: int | None, text: str | None = None,
         **fields: Any) -> Row | None:
    """A dataset row; `text` is decoded from the ids unless the rendered text is at hand.

    Token columns are int32 arrays: as lists of Python ints they take several times the memory and
    cross processes element by element.
    """
    if max_tokens and len(ids) > max_tokens:
        return None
    return {"input_ids": int32_array(ids), "labels": int32_array(labels), **fields,
            "text": worker_tokenizer().decode(list(ids)) if text is None else text}


def retrieval_row(task: tuple[int, str, int, DepthSpec, int, frozenset[str]]) -> Row:
    """One passkey or needle sample; `task` is (index, kind, length, depth or depth range, seed, held-out keys)."""
    index, kind, length, spec, seed, held_out = task
    make = {"passkey": passkey_sample, "needle": needle_sample}[kind]
    rng = random.Random(seed)
    depth = draw_depth(spec, rng)
    sample = make(worker_tokenizer(), length, depth, rng, held_out=held_out)
    return _row(sample.input_ids, sample.labels, None, text=sample.text, source=kind, sample_id=f"{kind}-{index}",
                answer=sample.passkey, depth=depth, length=length)


def _qa_rows(context: str, picked: list[Question], source: str, key: str, max_tokens: int | None) -> list[Row | None]:
    return [_row(ids, labels, max_tokens, text=qa_text(context, q), source=f"{source}:{q.kind}",
                 sample_id=f"{key}/qa{k}", question=q.question, answer=q.answer)
            for k, (q, (ids, labels)) in enumerate(zip(picked, qa_samples(worker_tokenizer(), context, picked)))]


def trajectory_rows(record: Trajectory, kinds: tuple[str, ...], questions_per_log: int, seed: int,
                    max_tokens: int | None) -> list[Row | None]:
    """Supervised and QA rows of one agent trajectory."""
    rows: list[Row | None] = []
    if "sft" in kinds:
        ids, labels = sft_sample(worker_tokenizer(), record)
        rows.append(_row(ids, labels, max_tokens, source="agent-logs:sft", sample_id=f"{record.trajectory_id}/sft",
                         question="", answer=""))
    if "qa" in kinds:
        picked = pick_questions(trajectory_questions(record), questions_per_log, record.trajectory_id, seed)
        rows += _qa_rows(render(record), picked, "agent-logs:qa", record.trajectory_id, max_tokens)
    return rows


def user_rows(history: History, questions_per_user: int, seed: int, max_tokens: int | None) -> list[Row | None]:
    """QA rows about one user's event history."""
    picked = pick_questions(history_questions(history), questions_per_user, history.user, seed)
    return _qa_rows(history.text, picked, "user-behavior", history.user, max_tokens)
