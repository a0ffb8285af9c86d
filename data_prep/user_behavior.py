"""User-behaviour event logs (CSV, TSV, JSONL; Taobao UserBehavior layout by default) → per-user histories.

Events travel as Arrow record batches: well-formed CSV/TSV blocks are parsed by Arrow's CSV reader,
and only blocks that need the per-line rules (quotes, carriage returns, control characters, damage
of any kind) go through Python, which turns each bad line into a rejection. Batches are
spilled into bucket files by user, so memory is bounded by one bucket, not by the input; each bucket
is then sorted by user and time and rendered with Arrow's compute kernels.
"""

from __future__ import annotations

import csv
import functools
import io
import re
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import csv as pa_csv

from data_prep.agent_logs import Rejection, json_type, read_jsonl
from data_prep.memory import release_free_memory
from data_prep.qa import LazyPool, Question, QuestionPools

TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
VERBS = {"pv": "viewed", "buy": "bought", "cart": "added to cart", "fav": "favorited"}
EVENT_SCHEMA = pa.schema([("user", pa.string()), ("timestamp", pa.int64()), ("item", pa.string()),
                          ("category", pa.string()), ("behavior", pa.string())])
_SORT_KEYS = [(name, "ascending") for name in EVENT_SCHEMA.names]  # a user's events in time order
_END_OF_TIME = 253_402_300_800  # 10000-01-01: from here on a time cannot be written as a date
_LARGEST_SECONDS = 100_000_000_000  # larger numbers are milliseconds (this is year 5138 in seconds)
_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")  # a fraction or an exponent
_PACKED_USERS = 1 << 25  # below this many users in a bucket, (user rank, time) packs into one int64
_BLOCK_BYTES = 1 << 22
_BATCH_EVENTS = 1 << 16
# Bytes whose rules Arrow's reader does not share with the per-line path: quoting, '\r' (a line end
# to Arrow, not to us) and control characters (some of which str.strip takes for whitespace).
_NEEDS_PER_LINE_RULES = re.compile(rb'["\r\x00-\x08\x0b-\x1f]')
_JSON_FIELD_TYPES = {str, int, float, type(None)}  # values a CSV field could hold (None: absent); not bool


class History(NamedTuple):
    """One user's events in time order, as columns, and the log rendered from them."""

    user: str
    text: str
    timestamps: list[int]
    items: list[str]
    categories: list[str]
    behaviors: list[str]


def _timestamp(text: str) -> int:
    """Seconds since the epoch, from seconds or milliseconds (told apart by size: 10 digits are seconds,
    13 milliseconds) or an ISO 8601 time (UTC unless it names a zone). Digits must be ASCII: int() and
    float() would also read full-width and other scripts' digits."""
    try:
        if not text.isascii():
            raise ValueError
        if text.isdecimal() or _DECIMAL.fullmatch(text):  # the common case: a number
            number = int(text) if text.isdecimal() else float(text)
            seconds = int(number // 1000 if number > _LARGEST_SECONDS else number)
        else:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            seconds = int((parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp())
    except (ValueError, OverflowError):  # OverflowError: an exponent past float's range
        raise Rejection(f"bad timestamp {text[:30]!r}") from None
    if not 0 <= seconds < _END_OF_TIME:
        raise Rejection(f"timestamp {text[:30]!r} is outside the years 1970 to 9999")
    return seconds


_DAYS: dict[int, str] = {}


def format_time(timestamp: int) -> str:
    """UTC 'YYYY-MM-DD HH:MM:SS'; the date part is cached per day (a history spans few days)."""
    day, second = divmod(timestamp, 86_400)
    date = _DAYS.get(day)
    if date is None:
        date = _DAYS[day] = datetime.fromtimestamp(day * 86_400, tz=timezone.utc).strftime("%Y-%m-%d")
    hour, second = divmod(second, 3600)
    return f"{date} {hour:02d}:{second // 60:02d}:{second % 60:02d}"


class _EventBuffer:
    """Events that passed the per-line rules, gathered into record batches."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, str, str, str]] = []

    def add(self, values: list[str | None], wanted: list[str]) -> Rejection | None:
        """Keep the event, or say why not; `wanted` names the file's columns the values came from."""
        if None in values or "" in values:  # absent or blank
            return Rejection(f"missing {wanted[next(i for i, v in enumerate(values) if not v)]!r}")
        user, item, category, behavior, stamp = values
        try:
            self.rows.append((user, _timestamp(stamp), item, category, behavior))
        except Rejection as err:
            return err
        return None

    def take(self, at_least: int = 1) -> pa.RecordBatch | None:
        if len(self.rows) < max(at_least, 1):
            return None
        batch = pa.RecordBatch.from_arrays([pa.array(column, type=field.type) for column, field in
                                            zip(zip(*self.rows), EVENT_SCHEMA)], schema=EVENT_SCHEMA)
        self.rows = []
        return batch


Item = pa.RecordBatch | tuple[int, Rejection]


def _per_line(lines: Iterable[tuple[int, bytes]], delimiter: str, width: int, order: list[int | None],
              wanted: list[str]) -> Iterator[Item]:
    """The per-line rules: every bad line becomes a rejection with its line number."""
    buffer = _EventBuffer()
    for number, raw in lines:
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield number, Rejection("not UTF-8")
            continue
        if '"' in text:  # quoted fields: the csv module's rules
            try:
                values = next(csv.reader([text.rstrip("\r\n")], delimiter=delimiter))
            except csv.Error as err:  # a field over csv.field_size_limit(), a line break outside quotes
                yield number, Rejection(f"bad CSV line: {str(err).split(' - ')[0]}")  # not its advice on open()
                continue
        else:
            values = text.rstrip("\r\n").split(delimiter)
        if len(values) != width:
            yield number, Rejection(f"{len(values)} fields, expected {width}")
            continue
        rejection = buffer.add([None if i is None else values[i].strip() for i in order], wanted)
        if rejection is not None:
            yield number, rejection
        if (batch := buffer.take(_BATCH_EVENTS)) is not None:
            yield batch
    if (batch := buffer.take()) is not None:
        yield batch


def _block_as_batch(block: bytes, delimiter: str, columns: list[str], wanted: list[str]) -> pa.RecordBatch | None:
    """The whole block through Arrow's CSV reader, or None where any line needs the per-line rules
    (then that path decides, and rejects what is bad)."""
    if _NEEDS_PER_LINE_RULES.search(block):
        return None
    if not block.isascii():
        try:  # a line with bytes that are not UTF-8 is rejected whole, whichever column holds them
            block.decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        table = pa_csv.read_csv(
            pa.py_buffer(block),
            read_options=pa_csv.ReadOptions(column_names=columns),
            parse_options=pa_csv.ParseOptions(delimiter=delimiter, quote_char=False, ignore_empty_lines=True),
            convert_options=pa_csv.ConvertOptions(column_types={c: pa.string() for c in columns},
                                                  include_columns=wanted, strings_can_be_null=False))
    except pa.ArrowInvalid:  # a line with the wrong number of fields, for one
        return None
    # the same characters as str.strip() once control characters are ruled out (checked for every code point)
    user, item, category, behavior, stamp = (pc.utf8_trim_whitespace(table[name]) for name in wanted)
    if any(pc.min(pc.binary_length(c)).as_py() == 0 for c in (user, item, category, behavior, stamp)):
        return None  # a blank value
    if not pc.all(pc.ascii_is_decimal(stamp)).as_py():
        return None  # dates, fractions or non-ASCII digits: the per-line parser reads or rejects them
    try:
        seconds = pc.cast(stamp, pa.int64())
    except pa.ArrowInvalid:  # too many digits for int64: rejected per line
        return None
    seconds = pc.if_else(pc.greater(seconds, _LARGEST_SECONDS), pc.divide(seconds, 1000), seconds)
    if pc.max(seconds).as_py() >= _END_OF_TIME:
        return None
    return pa.RecordBatch.from_arrays([c.combine_chunks() for c in (user, seconds, item, category, behavior)],
                                      schema=EVENT_SCHEMA)


def _blocks(handle: io.BufferedReader, first_line: int) -> Iterator[tuple[int, bytes]]:
    """(number of the block's first line, whole lines) in blocks of about _BLOCK_BYTES."""
    rest = b""
    while data := handle.read(_BLOCK_BYTES):
        end = data.rfind(b"\n") + 1
        if not end:
            rest += data
            continue
        block, rest = rest + data[:end], data[end:]
        yield first_line, block
        first_line += block.count(b"\n")
    if rest:
        yield first_line, rest


def _first_line(first: bytes) -> tuple[str, list[str]]:
    """(delimiter, fields) of a CSV/TSV file's first line, which may be a header."""
    delimiter = "\t" if b"\t" in first else ","
    return delimiter, [c.strip() for c in first.decode("utf-8", "replace").strip().split(delimiter)]


def _read_delimited(path: Path, wanted: list[str]) -> Iterator[Item]:
    with open(path, "rb") as handle:
        delimiter, header = _first_line(handle.readline())
        has_header = set(wanted) <= set(header)
        names = header if has_header else list(TAOBAO_COLUMNS)
        order = [names.index(name) if name in names else None for name in wanted]
        # Arrow needs distinct column names; the per-line path goes by position
        columns = [f"{i}:{name}" for i, name in enumerate(names)]
        if not has_header:
            handle.seek(0)
        for first_line, block in _blocks(handle, 2 if has_header else 1):
            batch = None if None in order else _block_as_batch(block, delimiter, columns,
                                                               [columns[i] for i in order])
            if batch is not None:
                yield batch
            else:
                lines = enumerate(block.split(b"\n"), first_line)
                yield from _per_line(lines, delimiter, len(names), order, wanted)


def _read_json_lines(path: Path, wanted: list[str]) -> Iterator[Item]:
    buffer = _EventBuffer()
    for number, record in read_jsonl(path):
        if isinstance(record, Rejection):
            yield number, record
            continue
        values = [record.get(name) for name in wanted]
        if not _JSON_FIELD_TYPES.issuperset(map(type, values)):
            name, value = next((n, v) for n, v in zip(wanted, values) if type(v) not in _JSON_FIELD_TYPES)
            yield number, Rejection(f"{name} is {json_type(value)}, not a string or a number")
            continue
        values = [None if value is None else str(value).strip() for value in values]
        if (rejection := buffer.add(values, wanted)) is not None:
            yield number, rejection
        if (batch := buffer.take(_BATCH_EVENTS)) is not None:
            yield batch
    if (batch := buffer.take()) is not None:
        yield batch


def _is_json_lines(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.readline().lstrip().startswith(b"{")


def read_events(path: Path, mapping: dict[str, str]) -> Iterator[Item]:
    """Record batches of good events (EVENT_SCHEMA) and (line, rejection) pairs, in file order.

    CSV/TSV with or without a header, or JSONL objects; `mapping` maps our column names to the file's.
    """
    wanted = [mapping.get(c, c) for c in TAOBAO_COLUMNS]
    return _read_json_lines(path, wanted) if _is_json_lines(path) else _read_delimited(path, wanted)


def check_columns(path: Path, mapping: dict[str, str]) -> None:
    """Raise ValueError, in one line, where a column `mapping` names is not in the file: in the header of a
    CSV/TSV file (one whose first line holds any of the wanted columns), else in its first JSON object.
    Without the check every event would be rejected for it, one by one."""
    if not mapping:
        return
    wanted = [mapping.get(c, c) for c in TAOBAO_COLUMNS]
    if _is_json_lines(path):
        present = next((list(record) for _, record in read_jsonl(path) if isinstance(record, dict)), None)
        if present is None:  # no object to compare with: each line's rejection says why
            return
        missing = [name for name in mapping.values() if name not in present]
        where = "its first object has"
    else:
        with open(path, "rb") as handle:
            _, present = _first_line(handle.readline())
        names = present if set(wanted) & set(present) else TAOBAO_COLUMNS  # a header, or the default layout
        missing = [name for name in wanted if name not in names]
        where = "its first line has"
    if missing:
        shown = ", ".join(present[:20]) + (", ..." if len(present) > 20 else "")
        raise ValueError(f"--columns: {path} has no column{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(map(repr, missing))} ({where}: {shown[:300]})")


class UserBuckets:
    """Spills event batches into Arrow stream files by user so that grouping needs one bucket in memory."""

    def __init__(self, buckets: int, directory: Path):
        self.paths = [directory / f"bucket-{i:04d}.arrow" for i in range(buckets)]
        self.writers = [pa.ipc.new_stream(str(p), EVENT_SCHEMA) for p in self.paths]

    def _bucket_of_each_event(self, users: pa.Array) -> np.ndarray:
        encoded = users.dictionary_encode()  # a user has many events: hash each user once
        per_user = np.fromiter((zlib.crc32(u.encode()) % len(self.paths) for u in encoded.dictionary.to_pylist()),
                               dtype=np.int64, count=len(encoded.dictionary))
        return per_user[encoded.indices.to_numpy(zero_copy_only=False)]

    def add(self, batch: pa.RecordBatch) -> None:
        if len(self.paths) == 1:
            self.writers[0].write_batch(batch)
            return
        buckets = self._bucket_of_each_event(batch.column(0))
        batch = batch.take(pa.array(np.argsort(buckets, kind="stable")))
        start = 0
        for bucket, count in enumerate(np.bincount(buckets, minlength=len(self.paths))):
            if count:
                self.writers[bucket].write_batch(batch.slice(start, count))
                start += count

    def histories(self, keep: int | None = None) -> Iterator[History]:
        """Every user's history (the last `keep` events when given); users sorted within each bucket."""
        for writer in self.writers:
            writer.close()
        for path in self.paths:
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_stream(source).read_all()
            path.unlink()
            if table.num_rows:
                yield from _bucket_histories(table.combine_chunks(), keep)
            del table
            release_free_memory()  # else the tokenising threads' arenas keep each bucket's pages: RSS grows by bucket


def _ranks(strings: pa.Array) -> np.ndarray:
    """Each value's rank among the distinct values in code-point order (UTF-8 byte order is the same);
    sorting the distinct values is cheap: a user has many events, an event type many more."""
    encoded = strings.dictionary_encode()
    rank_of_value = np.empty(len(encoded.dictionary), dtype=np.int64)
    rank_of_value[pc.sort_indices(encoded.dictionary).to_numpy()] = np.arange(len(encoded.dictionary))
    return rank_of_value[encoded.indices.to_numpy(zero_copy_only=False)]


def _time_order(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(row order by user, time, item, category, behaviour; each user's rank, in that order).

    The (user rank, time) pair sorts almost everything, as one integer key; only rows that tie on it
    go through Arrow's multi-column sort, which on all rows is several times slower.
    """
    users = _ranks(table.column("user").chunk(0))
    stamps = table.column("timestamp").chunk(0).to_numpy()
    packs = users.max() < _PACKED_USERS  # into one int64 with the time, which is below 2**38 (_END_OF_TIME)
    order = np.argsort((users << 38) | stamps, kind="stable") if packs else np.lexsort((stamps, users))
    users, stamps = users[order], stamps[order]
    ties = np.flatnonzero((users[1:] == users[:-1]) & (stamps[1:] == stamps[:-1]))
    if len(ties):
        # runs of ties sit at ascending positions in ascending (user, time) order, so sorting the tied
        # rows by every key and putting them back at the same positions orders each run
        tied = np.union1d(ties, ties + 1)
        rows = table.take(pa.array(order[tied])).append_column("rank", pa.array(users[tied]))
        run_order = pc.sort_indices(rows, [("rank", "ascending"), *_SORT_KEYS[1:]]).to_numpy()
        order[tied] = order[tied][run_order]
    return order, users


def _render_lines(timestamps: np.ndarray, behaviors: pa.Array, items: pa.Array,
                  categories: pa.Array) -> pa.LargeStringArray:
    """'YYYY-MM-DD HH:MM:SS <verb> item <item> (category <category>)\n' for every event; dates, clock
    times and verbs are looked up, not formatted per event."""
    days, seconds = np.divmod(timestamps, 86_400)
    distinct_days, day_index = np.unique(days, return_inverse=True)
    dates = pa.array([format_time(int(day) * 86_400)[:10] for day in distinct_days], pa.large_string())
    verbs = behaviors.dictionary_encode()
    verb_text = pa.array([VERBS.get(b, b) for b in verbs.dictionary.to_pylist()], pa.large_string())
    parts = [dates.take(pa.array(day_index)), " ", _clock_times().take(pa.array(seconds)), " ",
             verb_text.take(verbs.indices), " item ", items, " (category ", categories, ")\n"]
    as_large = [pa.scalar(p, pa.large_string()) if isinstance(p, str) else pc.cast(p, pa.large_string())
                for p in [*parts, ""]]  # 64-bit offsets: a bucket's log may pass 2 GB
    return pc.binary_join_element_wise(*as_large)


@functools.cache
def _clock_times() -> pa.LargeStringArray:
    """'HH:MM:SS' for every second of a day."""
    return pa.array([f"{h:02d}:{m:02d}:{s:02d}" for h in range(24) for m in range(60) for s in range(60)],
                    pa.large_string())


def _bucket_histories(table: pa.Table, keep: int | None) -> Iterator[History]:
    order, users = _time_order(table)
    bounds = np.concatenate([[0], np.flatnonzero(users[1:] != users[:-1]) + 1, [len(users)]])
    if keep and np.diff(bounds).max() > keep:  # the last `keep` rows of each user
        lengths = np.diff(bounds)
        kept = np.arange(len(order)) >= np.repeat(bounds[1:] - np.minimum(lengths, keep), lengths)
        order = order[kept]
        bounds = np.concatenate([[0], np.cumsum(np.minimum(lengths, keep))])
    table = table.take(pa.array(order))
    stamps = table.column("timestamp").chunk(0).to_numpy()
    user, item, category, behavior = (table.column(name).chunk(0) for name in ("user", "item", "category", "behavior"))
    lines = _render_lines(stamps, behavior, item, category)
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int64)[lines.offset:]
    text = memoryview(lines.buffers()[2])
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        # Python objects per user, not per bucket: a bucket's worth of strings is hundreds of MB
        name, count = user[start].as_py(), end - start
        body = bytes(text[offsets[start]:offsets[end]]).decode("utf-8")
        yield History(name, f"Activity log of user {name} ({count} events):\n{body}", stamps[start:end].tolist(),
                      *(column.slice(start, count).to_pylist() for column in (item, category, behavior)))


def spill_directory(base: Path | None = None) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="comet-prep-", dir=base)


def _count_question(fact: tuple[tuple[str, str], int]) -> Question:
    (behavior, category), n = fact
    return Question("behavior_count", f"How many times did the user perform '{VERBS.get(behavior, behavior)}' on "
                    f"items of category {category}?", str(n))


def _cart_question(fact: tuple[str, bool]) -> Question:
    item, bought_later = fact
    return Question("bought_after_cart", f"Did the user buy item {item} after adding it to the cart?",
                    "yes" if bought_later else "no")


def questions(history: History) -> QuestionPools:
    """Questions this history answers, with answers computed from the events."""
    stamps, items, categories, behaviors = history.timestamps, history.items, history.categories, history.behaviors
    pools: QuestionPools = {}
    if "buy" in behaviors:
        last = len(behaviors) - 1 - behaviors[::-1].index("buy")
        pools["last_bought"] = [Question("last_bought", "Which item did the user buy last?", items[last])]
    pools["behavior_count"] = LazyPool(Counter(zip(behaviors, categories)).items(), _count_question)
    top = Counter(categories).most_common(2)
    if len(top) == 1 or top[0][1] > top[1][1]:
        pools["top_category"] = [Question("top_category", "Which category did the user interact with most often?",
                                          top[0][0])]
    first_cart: dict[str, int] = {}
    last_buy: dict[str, int] = {}
    for stamp, item, behavior in zip(stamps, items, behaviors):
        if behavior == "cart":
            first_cart.setdefault(item, stamp)  # events are in time order
        elif behavior == "buy":
            last_buy[item] = stamp
    if first_cart:
        pools["bought_after_cart"] = LazyPool([(item, last_buy.get(item, -1) >= first)
                                               for item, first in first_cart.items()], _cart_question)
    pools["first_activity"] = [Question("first_activity", "When was the user's first activity?",
                                        format_time(stamps[0]))]
    pools["last_activity"] = [Question("last_activity", "When was the user's last activity?",
                                       format_time(stamps[-1]))]
    return pools
