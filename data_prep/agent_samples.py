"""Training samples from agent trajectories: supervised assistant turns, and long-context QA whose
answers are computed from the trajectory itself."""

from __future__ import annotations

import json
from collections import Counter

from data_prep.agent_logs import Step, ToolCall, Trajectory
from data_prep.qa import Question, QuestionPools, pools_by_kind
from data_prep.tokens import IGNORE_INDEX, TextEncoder


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def is_failure(result: str) -> bool:
    """A tool result that reports an error: {"error": <non-empty>} or text opening with an error word."""
    try:
        parsed = json.loads(result)
        if isinstance(parsed, dict) and parsed.get("error"):
            return True
    except (ValueError, RecursionError):  # not JSON, or nested past the recursion limit: read as text
        pass
    return result.strip().lower().startswith(("error", "traceback", "exception", "failed"))


def _call_text(call: ToolCall) -> str:
    return f"{call.name}({json.dumps(call.arguments, sort_keys=True, ensure_ascii=False)})"


def render_step(number: int, step: Step) -> str:
    lines = []
    if step.role == "tool":
        lines.append(f"[step {number}] {step.tool_name} returned: {step.content}")
    elif step.content or not step.tool_calls:
        lines.append(f"[step {number}] {step.role}: {step.content}")
    lines += [f"[step {number}] assistant calls {_call_text(call)}" for call in step.tool_calls]
    return "\n".join(lines)


def render(trajectory: Trajectory) -> str:
    """The whole trajectory as a readable log, one event per line, numbered by step."""
    return "\n".join(render_step(i, step) for i, step in enumerate(trajectory.steps, 1)) + "\n"


def questions(trajectory: Trajectory) -> QuestionPools:
    """Every question this trajectory can answer, with its answer computed from the steps."""
    calls = [call for step in trajectory.steps for call in step.tool_calls]
    results = {step.tool_call_id: step.content for step in trajectory.steps if step.role == "tool"}
    out = [Question("tool_at_step", f"Which tool did the agent use in its {ordinal(k)} tool call?", call.name)
           for k, call in enumerate(calls, 1)]
    seen: Counter[str] = Counter()
    for call in calls:
        seen[call.name] += 1
        n = seen[call.name]
        for argument, value in sorted(call.arguments.items()):
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            out.append(Question("tool_argument", f"In the {ordinal(n)} call of {call.name}, what was "
                                f"{argument}?", text))
        result = results.get(call.call_id, "")
        if result.strip():
            out.append(Question("tool_result", f"What did the {ordinal(n)} call of {call.name} return? "
                                "Give its first line.", result.strip().splitlines()[0]))
    for name, count in sorted(seen.items()):
        out.append(Question("call_count", f"How many times did the agent call {name}?", str(count)))
    if calls:
        failed = sum(is_failure(content) for content in results.values())
        out.append(Question("failed_calls", "How many tool calls failed?", str(failed)))
    final = next((s.content for s in reversed(trajectory.steps) if s.role == "assistant" and s.content.strip()
                  and not s.tool_calls), None)
    if final:
        out.append(Question("final_answer", "What was the agent's final answer?", final.strip()))
    return pools_by_kind(out)


def sft_sample(tokenizer: TextEncoder, trajectory: Trajectory) -> tuple[list[int], list[int]]:
    """The trajectory as a transcript in which the assistant's words and tool calls are trained."""
    pieces: list[tuple[str, bool]] = []  # (text, trained), tokenised separately so labels align exactly
    for number, step in enumerate(trajectory.steps, 1):
        if step.role != "assistant":
            pieces.append((render_step(number, step) + "\n", False))
            continue
        parts = ([(":", step.content)] if step.content or not step.tool_calls else []) + \
                [("", f"calls {_call_text(call)}") for call in step.tool_calls]
        for separator, text in parts:  # the same lines as render_step, the assistant's words trained
            pieces += [(f"[step {number}] assistant{separator}", False), (f" {text}\n", True)]
    ids: list[int] = []
    labels: list[int] = []
    for (_, trained), piece in zip(pieces, tokenizer.encode_batch([text for text, _ in pieces])):
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels
