"""User-behaviour event logs (CSV, TSV, JSONL; Taobao UserBehavior layout by default) → per-user histories.

Reading streams: events are parsed line by line and spilled into bucket files by user, so memory is
bounded by one bucket, not by the input; each bucket is then grouped by user and ordered by time.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from data_prep.agent_logs import Rejection
from data_prep.qa import Question

TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
VERBS = {"pv": "viewed", "buy": "bought", "cart": "added to cart", "fav": "favorited"}


@dataclass(frozen=True, order=True, slots=True)  # slots: millions of these sit in a spill bucket
class Event:
    timestamp: int
    item_id: str
    category_id: str
    behavior: str


def _timestamp(value: str) -> int:
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        try:
            return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())
        except ValueError:
            raise Rejection(f"bad timestamp {text[:30]!r}") from None
    if not math.isfinite(number) or number < 0:
        raise Rejection(f"bad timestamp {text[:30]!r}")
    return int(number / 1000) if number > 1e11 else int(number)  # milliseconds → seconds


def format_time(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _rows(path: Path, columns: tuple[str, ...], mapping: dict[str, str]) -> Iterator[tuple[int, dict | Rejection]]:
    """(line, field dict or rejection); CSV/TSV with or without a header, or JSONL objects."""
    with open(path, "rb") as handle:
        first = handle.readline()
        handle.seek(0)
        if first.lstrip().startswith(b"{"):
            for number, raw in enumerate(handle, 1):
                if raw.strip():
                    try:
                        record = json.loads(raw.decode("utf-8"))
                        yield number, record if isinstance(record, dict) else Rejection("not a JSON object")
                    except UnicodeDecodeError:
                        yield number, Rejection("not UTF-8")
                    except json.JSONDecodeError as err:
                        yield number, Rejection(f"bad JSON: {err.msg}")
            return
        delimiter = "\t" if b"\t" in first else ","
        header = [c.strip() for c in first.decode("utf-8", "replace").strip().split(delimiter)]
        wanted = {mapping.get(c, c) for c in columns}
        names, start = (header, 2) if wanted <= set(header) else (list(columns), 1)
        for number, raw in enumerate(handle, 1):
            if number < start or not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, Rejection("not UTF-8")
                continue
            if '"' in text:  # quoted fields: the csv module's rules
                values = next(csv.reader(io.StringIO(text), delimiter=delimiter))
            else:  # the common case, several times faster
                values = text.rstrip("\r\n").split(delimiter)
            if len(values) != len(names):
                yield number, Rejection(f"{len(values)} fields, expected {len(names)}")
                continue
            yield number, dict(zip(names, values))


def read_events(path: Path, mapping: dict[str, str]) -> Iterator[tuple[int, tuple[str, Event] | Rejection]]:
    """(line, (user, event)) for each row; `mapping` maps our column names to the file's."""
    for number, row in _rows(path, TAOBAO_COLUMNS, mapping):
        if isinstance(row, Rejection):
            yield number, row
            continue
        try:
            values = {}
            for column in TAOBAO_COLUMNS:
                value = row.get(mapping.get(column, column))
                if value is None or str(value).strip() == "":
                    raise Rejection(f"missing {mapping.get(column, column)!r}")
                values[column] = str(value).strip()
            event = Event(_timestamp(values["timestamp"]), values["item_id"], values["category_id"],
                          values["behavior_type"])
            yield number, (values["user_id"], event)
        except Rejection as err:
            yield number, err


class UserBuckets:
    """Spills (user, event) pairs into bucket files so that grouping needs one bucket in memory."""

    def __init__(self, buckets: int, directory: Path):
        self.paths = [directory / f"bucket-{i:04d}.jsonl" for i in range(buckets)]
        self.handles = [open(p, "w", buffering=1 << 16) for p in self.paths]  # noqa: SIM115

    def add(self, user: str, event: Event) -> None:
        bucket = zlib.crc32(user.encode()) % len(self.handles)
        self.handles[bucket].write(json.dumps([user, event.timestamp, event.item_id, event.category_id,
                                               event.behavior]) + "\n")

    def users(self) -> Iterator[tuple[str, list[Event]]]:
        """Every user with their events in time order; users sorted within each bucket."""
        for handle in self.handles:
            handle.close()
        for path in self.paths:
            grouped: dict[str, list[Event]] = {}
            with open(path) as handle:
                for line in handle:
                    user, *fields = json.loads(line)
                    grouped.setdefault(user, []).append(Event(*fields))
            path.unlink()
            for user in sorted(grouped):
                yield user, sorted(grouped[user])


def spill_directory(base: Path | None = None) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="comet-prep-", dir=base)


def render_history(user: str, events: list[Event]) -> str:
    lines = [f"Activity log of user {user} ({len(events)} events):"]
    lines += [f"{format_time(e.timestamp)} {VERBS.get(e.behavior, e.behavior)} item {e.item_id} "
              f"(category {e.category_id})" for e in events]
    return "\n".join(lines) + "\n"


def questions(events: list[Event]) -> list[Question]:
    """Questions this history answers, with answers computed from the events."""
    out = []
    bought = [e for e in events if e.behavior == "buy"]
    if bought:
        out.append(Question("last_bought", "Which item did the user buy last?", bought[-1].item_id))
    counts = Counter((e.behavior, e.category_id) for e in events)
    for (behavior, category), n in sorted(counts.items()):
        verb = VERBS.get(behavior, behavior)
        out.append(Question("behavior_count", f"How many times did the user perform '{verb}' on items of category "
                            f"{category}?", str(n)))
    categories = Counter(e.category_id for e in events).most_common()
    if len(categories) == 1 or categories[0][1] > categories[1][1]:
        out.append(Question("top_category", "Which category did the user interact with most often?",
                            categories[0][0]))
    for item in sorted({e.item_id for e in events if e.behavior == "cart"}):
        first_cart = min(e.timestamp for e in events if e.item_id == item and e.behavior == "cart")
        later_buy = any(e.item_id == item and e.behavior == "buy" and e.timestamp >= first_cart for e in events)
        out.append(Question("bought_after_cart", f"Did the user buy item {item} after adding it to the cart?",
                            "yes" if later_buy else "no"))
    out.append(Question("first_activity", "When was the user's first activity?", format_time(events[0].timestamp)))
    out.append(Question("last_activity", "When was the user's last activity?", format_time(events[-1].timestamp)))
    return out
