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


MAX_NESTING = 100  # JSON nested deeper is rejected: json.dumps, pickle and repr recurse once per level
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # JSON escapes of surrogates, paired or not
_TYPE_NAMES = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
               dict: "an object", type(None): "null"}


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for rejection reasons."""
    return _TYPE_NAMES[type(value)]


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether the arrays and objects of a parsed JSON value nest deeper than `limit`: one walk with a
    stack (no recursion), stopping at the first container past the limit."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string of a parsed JSON value, keys included, holds a lone UTF-16 surrogate."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack += node.keys()
            stack += node.values()
        elif isinstance(node, list):
            stack += node
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def parse_json(text: str) -> Any:
    """json.loads for untrusted text: whatever cannot be used later raises a Rejection saying why."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise Rejection(f"JSON nested deeper than {MAX_NESTING} levels") from None
    except json.JSONDecodeError as err:
        raise Rejection(f"bad JSON: {err.msg} at column {err.colno}") from None
    except ValueError:  # an integer of more digits than Python converts
        raise Rejection("bad JSON: a number with too many digits") from None
    # brackets inside strings count too: a cheap bound before the exact measure
    if text.count("[") + text.count("{") > MAX_NESTING and _nested_deeper_than(value, MAX_NESTING):
        raise Rejection(f"JSON nested deeper than {MAX_NESTING} levels")
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise Rejection("a string holds a lone UTF-16 surrogate")  # no tokenizer takes one
    return value


def read_jsonl(path: Path) -> Iterator[tuple[int, dict | Rejection]]:
    """(line number, record or rejection) for every non-blank line; bad bytes or JSON are rejections."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                record = parse_json(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                yield number, Rejection(f"not UTF-8 ({err.reason} at byte {err.start})")
                continue
            except Rejection as err:
                yield number, err
                continue
            yield number, record if isinstance(record, dict) else Rejection("not a JSON object")


def detect_format(record: dict) -> str | None:
    if "conversations" in record:
        return "sharegpt"
    if "uniq_id" in record and "messages" in record:
        return "comet"
    if "messages" in record:
        return "openai"
    return None


_STRING, _ARRAY, _OBJECT, _ID = (str,), (list,), (dict,), (str, int, float)


def _get(mapping: dict, key: str, kinds: tuple[type, ...], where: str = "", required: bool = False) -> Any:
    """mapping[key] if it is of one of the JSON types `kinds` (or null or absent, unless required), else
    a Rejection naming the field and what it holds."""
    value = mapping.get(key)
    if type(value) in kinds or (value is None and not required):  # type(): a boolean is not a number here
        return value
    expected = " or ".join(dict.fromkeys(_TYPE_NAMES[kind] for kind in kinds))
    raise Rejection(f"{where}{key} is " + ("missing" if key not in mapping else f"{json_type(value)}, not {expected}"))


def _text(content: Any, where: str) -> str:
    """Message content: a string, null, or a list of {"type": "text", "text": ...} parts (others are skipped)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Rejection(f"{where}content is {json_type(content)}, not a string or an array of text parts")
    texts = []
    for k, part in enumerate(content):
        if not isinstance(part, dict):
            raise Rejection(f"{where}content part {k} is {json_type(part)}, not an object")
        if (_get(part, "type", _STRING, where=f"{where}content part {k}: ") or "text") == "text":
            texts.append(_get(part, "text", _STRING, where=f"{where}content part {k}: ") or "")
    return "".join(texts)


def _arguments(raw: Any, where: str) -> dict[str, Any]:
    """Tool call arguments: an object, or JSON text of one."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        raise Rejection(f"{where}arguments are {json_type(raw)}, not an object or JSON text of one")
    try:
        parsed = parse_json(raw)
    except Rejection as err:
        raise Rejection(f"{where}arguments: {err}") from None
    if not isinstance(parsed, dict):
        raise Rejection(f"{where}arguments are JSON text of {json_type(parsed)}, not of an object")
    return parsed


def _tool_call(call: Any, i: int, k: int) -> ToolCall:
    where = f"message {i}: tool call {k}"
    if not isinstance(call, dict):
        raise Rejection(f"{where} is {json_type(call)}, not an object")
    function = _get(call, "function", _OBJECT, where=f"{where}: ", required=True)
    call_id = _get(call, "id", _ID, where=f"{where}: ")
    return ToolCall(f"call_{i}_{k}" if call_id is None else str(call_id),
                    _get(function, "name", _STRING, where=f"{where}: function ", required=True),
                    _arguments(function.get("arguments"), f"{where}: "))


def _openai_steps(messages: Any) -> list[Step]:
    if not isinstance(messages, list) or not messages:
        raise Rejection("messages is missing or empty")
    steps, calls = [], {}
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise Rejection(f"message {i} has no role")
        role = _get(message, "role", _STRING, where=f"message {i}: ")
        if role not in ROLES:
            raise Rejection(f"message {i} has unknown role {role!r}")
        step = Step(role, _text(message.get("content"), f"message {i}: "))
        tool_calls = _get(message, "tool_calls", _ARRAY, where=f"message {i}: ") or []
        step.tool_calls = [_tool_call(call, i, k) for k, call in enumerate(tool_calls)]
        legacy = _get(message, "function_call", _OBJECT, where=f"message {i}: ")
        if legacy:  # a single call, in the format before tool_calls
            where = f"message {i}: function_call "
            step.tool_calls.append(ToolCall(f"call_{i}", _get(legacy, "name", _STRING, where=where) or "?",
                                            _arguments(legacy.get("arguments"), where)))
        if role == "tool":
            call_id = _get(message, "tool_call_id", _ID, where=f"message {i}: ")
            if call_id is None and len(calls) == 1:  # a lone open call is unambiguous
                call_id = next(iter(calls))
            if str(call_id) not in calls:
                raise Rejection(f"message {i}: tool result without a matching call ({call_id!r})")
            step.tool_call_id, step.tool_name = str(call_id), calls.pop(str(call_id)).name
        calls.update({c.call_id: c for c in step.tool_calls})
        steps.append(step)
    return steps


def _sharegpt_steps(record: dict) -> list[Step]:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise Rejection("conversations is missing or empty")
    system = _get(record, "system", _STRING)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    pending: list[str] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise Rejection(f"turn {i} lacks 'from' or 'value'")
        speaker = _get(turn, "from", _STRING, where=f"turn {i}: ")
        value = _get(turn, "value", _STRING, where=f"turn {i}: ", required=True)
        role = SHAREGPT_ROLES.get(speaker)
        if role is None:
            raise Rejection(f"turn {i} has unknown speaker {speaker!r}")
        if speaker == "function_call":  # {"name": ..., "arguments": {...}} as text
            try:
                call = parse_json(value)
            except Rejection as err:
                raise Rejection(f"turn {i}: function_call value: {err}") from None
            if not isinstance(call, dict):
                raise Rejection(f"turn {i}: function_call value is {json_type(call)}, not an object")
            where = f"turn {i}: function_call "
            function = {"name": _get(call, "name", _STRING, where=where, required=True),
                        "arguments": _arguments(call.get("arguments"), where)}
            pending.append(f"call_{i}")
            messages.append({"role": "assistant", "content": "", "tool_calls": [{"id": pending[-1],
                                                                                  "function": function}]})
        elif role == "tool":
            messages.append({"role": "tool", "content": value, "tool_call_id": pending.pop(0) if pending else None})
        else:
            messages.append({"role": role, "content": value})
    return _openai_steps(messages)


def _trajectory_id(record: dict, key: str, fallback: str | None) -> str:
    value = _get(record, key, _ID, required=fallback is None)
    return fallback if value is None else str(value)


def parse_record(record: dict, fmt: str, fallback_id: str) -> Trajectory:
    """The one place a record's fields are read: a Trajectory, or a Rejection naming the first bad field."""
    if fmt == "sharegpt":
        return Trajectory(_trajectory_id(record, "id", fallback_id), _sharegpt_steps(record))
    if fmt == "comet":
        trajectory_id = _trajectory_id(record, "uniq_id", None)
        messages = record.get("messages")
        if isinstance(messages, str):
            try:
                messages = parse_json(messages)
            except Rejection as err:
                raise Rejection(f"messages is a string but not JSON of them ({err})") from None
        return Trajectory(trajectory_id, _openai_steps(messages))
    if fmt == "openai":
        return Trajectory(_trajectory_id(record, "id", fallback_id), _openai_steps(record.get("messages")))
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
