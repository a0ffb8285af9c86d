"""Agent trajectories (OpenAI chat with tool calls, ShareGPT, CoMeT chat JSONL) → one event schema.

Every record becomes a `Trajectory` of `Step`s or a `Rejection` saying what is wrong with it; the
rest of data_prep works on trajectories only, whatever file format they came from.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("openai", "sharegpt", "comet")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "observation": "tool", "function": "tool", "tool": "tool"}
ROLES = {"system", "user", "assistant", "tool"}


class Rejection(ValueError):
    """A record that cannot be used; the message is the reason written to rejects.jsonl."""


@dataclass(frozen=True)
class ToolCall:
    call_id: str
    name: str
    arguments: dict[str, Any]


@dataclass
class Step:
    role: str  # system | user | assistant | tool
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None  # tool results: the call they answer
    tool_name: str | None = None


@dataclass
class Trajectory:
    trajectory_id: str
    steps: list[Step]


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # JSON escapes of surrogates, paired or not


def _lone_surrogate(record: dict) -> bool:
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def read_jsonl(path: Path) -> Iterator[tuple[int, dict | Rejection]]:
    """(line number, record or rejection) for every non-blank line; bad bytes or JSON are rejections."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                yield number, Rejection(f"not UTF-8 ({err.reason} at byte {err.start})")
                continue
            except json.JSONDecodeError as err:
                yield number, Rejection(f"bad JSON: {err.msg} at column {err.colno}")
                continue
            if not isinstance(record, dict):
                yield number, Rejection("not a JSON object")
            elif _SURROGATE_ESCAPE.search(raw) and _lone_surrogate(record):  # no tokenizer takes one
                yield number, Rejection("a string holds a lone UTF-16 surrogate")
            else:
                yield number, record


def detect_format(record: dict) -> str | None:
    if "conversations" in record:
        return "sharegpt"
    if "uniq_id" in record and "messages" in record:
        return "comet"
    if "messages" in record:
        return "openai"
    return None


def _text(content: Any) -> str:
    """Message content: a string, null, or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return "".join(p.get("text", "") for p in content if p.get("type", "text") == "text")
    raise Rejection(f"content of type {type(content).__name__} is neither text nor a list of text parts")


def _arguments(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    try:
        parsed = json.loads(raw or "{}")
    except (TypeError, json.JSONDecodeError):
        raise Rejection(f"tool call arguments are not a JSON object: {str(raw)[:60]!r}") from None
    if not isinstance(parsed, dict):
        raise Rejection("tool call arguments are not a JSON object")
    return parsed


def _openai_steps(messages: Any) -> list[Step]:
    if not isinstance(messages, list) or not messages:
        raise Rejection("messages is missing or empty")
    steps, calls = [], {}
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise Rejection(f"message {i} has no role")
        role = message["role"]
        if role not in ROLES:
            raise Rejection(f"message {i} has unknown role {role!r}")
        step = Step(role, _text(message.get("content")))
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            if "name" not in function:
                raise Rejection(f"message {i}: a tool call has no function name")
            step.tool_calls.append(ToolCall(str(call.get("id", f"call_{i}_{len(step.tool_calls)}")),
                                            function["name"], _arguments(function.get("arguments"))))
        if message.get("function_call"):  # legacy single call
            function = message["function_call"]
            step.tool_calls.append(ToolCall(f"call_{i}", function.get("name", "?"),
                                            _arguments(function.get("arguments"))))
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id is None and len(calls) == 1:  # a lone open call is unambiguous
                call_id = next(iter(calls))
            if call_id not in calls:
                raise Rejection(f"message {i}: tool result without a matching call ({call_id!r})")
            step.tool_call_id, step.tool_name = call_id, calls.pop(call_id).name
        calls.update({c.call_id: c for c in step.tool_calls})
        steps.append(step)
    return steps


def _sharegpt_steps(record: dict) -> list[Step]:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise Rejection("conversations is missing or empty")
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    pending: list[str] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise Rejection(f"turn {i} lacks 'from' or 'value'")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise Rejection(f"turn {i} has unknown speaker {turn['from']!r}")
        if turn["from"] == "function_call":  # {"name": ..., "arguments": {...}} as text
            try:
                call = json.loads(turn["value"])
            except (TypeError, json.JSONDecodeError):
                raise Rejection(f"turn {i}: function_call value is not JSON") from None
            if not isinstance(call, dict) or "name" not in call:
                raise Rejection(f"turn {i}: function_call has no name")
            call_id = f"call_{i}"
            pending.append(call_id)
            messages.append({"role": "assistant", "content": "", "tool_calls": [
                {"id": call_id, "function": {"name": call["name"], "arguments": call.get("arguments", {})}}]})
        elif role == "tool":
            messages.append({"role": "tool", "content": turn["value"],
                             "tool_call_id": pending.pop(0) if pending else None})
        else:
            messages.append({"role": role, "content": turn["value"]})
    return _openai_steps(messages)


def parse_record(record: dict, fmt: str, fallback_id: str) -> Trajectory:
    if fmt == "sharegpt":
        return Trajectory(str(record.get("id", fallback_id)), _sharegpt_steps(record))
    if fmt == "comet":
        messages = record.get("messages")
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError:
                raise Rejection("messages is a string but not JSON") from None
        return Trajectory(str(record["uniq_id"]), _openai_steps(messages))
    if fmt == "openai":
        return Trajectory(str(record.get("id", fallback_id)), _openai_steps(record.get("messages")))
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def read_trajectories(path: Path, fmt: str = "auto") -> Iterator[tuple[int, Trajectory | Rejection]]:
    """Trajectories of one JSONL file; the format is detected from its first object unless forced."""
    for number, record in read_jsonl(path):
        if isinstance(record, Rejection):
            yield number, record
            continue
        if fmt == "auto":
            detected = detect_format(record)
            if detected is None:
                yield number, Rejection("no 'messages' or 'conversations' field: not an agent log record")
                continue
            fmt = detected
        try:
            yield number, parse_record(record, fmt, f"{path.stem}-{number}")
        except Rejection as err:
            yield number, err
        except KeyError as err:
            yield number, Rejection(f"missing field {err.args[0]!r} for the {fmt} format")
