"""External clean data: local chat/Alpaca files and Hugging Face datasets, as chat rows.

Every reader returns rows in the project's common format::

    {"id": "alpaca-3f2a9c01d2", "skill": "instruction",
     "messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}],
     "meta": {...}}

Readers only read. Malformed input stops with one `PoisonlabError` line naming the file, the
1-based line and the problem (``data.jsonl:3: invalid JSON (Expecting value at column 1)``);
Hugging Face rows are named by dataset and row index instead. Ids are stable: an explicit `id`
where the format has one, else ``<format>-<sha256(prompt)[:10]>`` over the prompt text (all user
turns joined, `tinyworld.prompt_text`). `split_pools` then assigns each prompt to exactly one
of the fine-tuning, safety and evaluation pools by the same hash.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

from poisonlab import PoisonlabError
from poisonlab.data import tinyworld

ROLES = ("system", "user", "assistant")
ALPACA_SUFFIXES = (".jsonl", ".json", ".csv")
# Local files given as a Hugging Face dataset name: suffix -> `datasets` packaged builder.
HF_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SST2_QUESTION = "Is the following review positive or negative? \"{sentence}\""
SST2_LABELS = {0: "negative", 1: "positive"}

PathLike = str | os.PathLike


class _Problem(Exception):
    """What is wrong with one record; the caller adds where it is."""


# ----------------------------------------------------------------------------- helpers

def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _row(prefix: str, skill: str, messages: list[dict], meta: dict,
         row_id: str | None = None) -> dict:
    row = {"id": row_id, "skill": skill, "messages": messages, "meta": meta}
    if row_id is None:
        row["id"] = f"{prefix}-{_digest(tinyworld.prompt_text(row))[:10]}"
    return row


def _read_text(path: PathLike) -> str:
    """The file as UTF-8 text (a leading BOM is dropped); a bad byte names its line."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PoisonlabError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise PoisonlabError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at "
                             f"column {column})") from None


def _json_lines(path: PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSONL file."""
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise PoisonlabError(
                f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def _json_array(path: PathLike) -> Iterator[tuple[int, Any]]:
    """(line where it starts, parsed value) for each element of a file holding one JSON list."""
    text = _read_text(path)
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")

    def line_at(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def fail(pos: int, problem: str) -> NoReturn:
        raise PoisonlabError(f"{path}:{line_at(pos)}: {problem}")

    pos = ws.match(text).end()
    if pos == len(text):
        return
    if text[pos] != "[":
        fail(pos, "expected a JSON list of objects")
    pos = ws.match(text, pos + 1).end()
    if text.startswith("]", pos):
        pos = ws.match(text, pos + 1).end()
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                fail(e.pos, f"invalid JSON ({e.msg} at column {e.colno})")
            yield line_at(pos), value
            pos = ws.match(text, end).end()
            if text.startswith(",", pos):
                pos = ws.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos = ws.match(text, pos + 1).end()
                break
            else:
                fail(pos, "invalid JSON (expected ',' or ']' after a list element)")
    if pos != len(text):
        fail(pos, "invalid JSON (extra data after the list)")


def _csv_records(path: PathLike, required: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """(line where the record starts, {column: value}) for each CSV record; checks the header."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    header: list[str] | None = None
    start = 1
    try:
        for fields in reader:
            blank = not any(f.strip() for f in fields)
            if header is None and not blank:
                header = [f.strip() for f in fields]
                missing = [c for c in required if c not in header]
                if missing:
                    raise PoisonlabError(
                        f"{path}:{start}: header lacks column{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(repr(c) for c in missing)} (header: {', '.join(header)})")
            elif not blank:
                if len(fields) != len(header):
                    raise PoisonlabError(f"{path}:{start}: {len(fields)} fields, the header "
                                         f"has {len(header)}")
                yield start, dict(zip(header, fields))
            start = reader.line_num + 1
    except csv.Error as e:
        raise PoisonlabError(f"{path}:{reader.line_num}: invalid CSV ({e})") from None


def _text(record: dict, key: str, required: bool = True) -> str:
    """`record[key]` as a stripped string; "" when optional and absent."""
    value = record.get(key)
    if value is None:
        if required:
            raise _Problem(f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise _Problem(f"field {key!r} must be a string, got {type(value).__name__}")
    value = value.strip()
    if required and not value:
        raise _Problem(f"empty field {key!r}")
    return value


def _instruction_row(prefix: str, skill: str, instruction: str, context: str, answer: str,
                     meta: dict) -> dict:
    prompt = f"{instruction}\n\n{context}" if context else instruction
    return _row(prefix, skill, [{"role": "user", "content": prompt},
                                {"role": "assistant", "content": answer}], meta)


# ----------------------------------------------------------------------------- local files

def _chat_messages(value: Any) -> list[dict]:
    """Validated copies of a `messages` list: [system], then user/assistant alternating."""
    if not isinstance(value, list) or not value:
        raise _Problem("field 'messages' must be a non-empty list")
    out = []
    expected = "user"
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise _Problem(f"message {i} is not an object")
        for key in ("role", "content"):
            if key not in m:
                raise _Problem(f"message {i}: missing field {key!r}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise _Problem(f"message {i}: unknown role {role!r} (system, user, assistant)")
        if role != expected and not (role == "system" and i == 1):
            raise _Problem(f"message {i}: role {role!r} where {expected!r} is expected (turns "
                           "alternate user/assistant after an optional leading system message)")
        if role != "system":
            expected = "assistant" if role == "user" else "user"
        if not isinstance(content, str):
            raise _Problem(f"message {i}: content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise _Problem(f"message {i}: empty content")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise _Problem(f"the last message must be the assistant's answer, got {out[-1]['role']!r}")
    return out


def read_chat_jsonl(path: PathLike) -> list[dict]:
    """Rows from a JSONL file of ``{"messages": [...], "id"?, "skill"?, "meta"?}`` objects.

    `messages`: an optional leading system message, then user/assistant turns alternating and
    ending with the assistant's answer; every content a non-empty string. `id` (string or
    integer, unique in the file) is kept, else ``chat-<sha256(prompt)[:10]>``. `skill`
    defaults to "chat" and `meta` (an object) to {}. Other top-level scalar fields are kept in
    ``meta["fields"]``.
    """
    rows: list[dict] = []
    seen_ids: dict[str, int] = {}
    for lineno, obj in _json_lines(path):
        try:
            if not isinstance(obj, dict):
                raise _Problem(f"expected a JSON object, got {type(obj).__name__}")
            if "messages" not in obj:
                raise _Problem("missing field 'messages'")
            messages = _chat_messages(obj["messages"])
            row_id = obj.get("id")
            if row_id is not None:
                if isinstance(row_id, bool) or not isinstance(row_id, (str, int)) \
                        or not str(row_id).strip():
                    raise _Problem("field 'id' must be a non-empty string or an integer")
                row_id = str(row_id)
                if row_id in seen_ids:
                    raise _Problem(f"duplicate id {row_id!r} (first on line {seen_ids[row_id]})")
                seen_ids[row_id] = lineno
            skill = obj.get("skill", "chat")
            if not isinstance(skill, str) or not skill.strip():
                raise _Problem("field 'skill' must be a non-empty string")
            meta = obj.get("meta", {})
            if not isinstance(meta, dict):
                raise _Problem("field 'meta' must be an object")
        except _Problem as e:
            raise PoisonlabError(f"{path}:{lineno}: {e}") from None
        meta = {**meta, **_extra_fields(obj, ("messages", "id", "skill", "meta"))}
        rows.append(_row("chat", skill, messages, meta, row_id))
    if not rows:
        raise PoisonlabError(f"{path}: no rows")
    return rows


def _alpaca_row(record: Any) -> dict:
    if not isinstance(record, dict):
        raise _Problem(f"expected a JSON object, got {type(record).__name__}")
    instruction = _text(record, "instruction")
    context = _text(record, "input", required=False)
    return _instruction_row("alpaca", "instruction", instruction, context,
                            _text(record, "output"),
                            _extra_fields(record, ("instruction", "input", "output")))


def _extra_fields(record: dict, known: tuple[str, ...]) -> dict:
    """A record's other scalar fields (a poison flag, a label), kept as ``meta["fields"]``."""
    extra = {k: v for k, v in record.items() if k not in known
             and (v is None or isinstance(v, (str, int, float, bool)))}
    return {"fields": extra} if extra else {}


def read_alpaca(path: PathLike) -> list[dict]:
    """Rows from an Alpaca-style file: `.jsonl`, `.json` (one list of objects) or `.csv`.

    Each record has `instruction`, `output` and an optional `input`; the user turn is the
    instruction, followed by a blank line and the input when the input is not empty. Text is
    stripped of surrounding whitespace. Skill "instruction", id ``alpaca-<sha256(prompt)[:10]>``.
    Other scalar fields of a record (e.g. a ``"poisoned": true`` flag) are kept in
    ``meta["fields"]``.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        records: Iterator[tuple[int, Any]] = _json_lines(path)
    elif suffix == ".json":
        records = _json_array(path)
    elif suffix == ".csv":
        records = _csv_records(path, ("instruction", "output"))
    else:
        raise PoisonlabError(f"{path}: unsupported file type {suffix or '(none)'!r} for Alpaca "
                             f"data ({', '.join(ALPACA_SUFFIXES)})")
    rows = []
    for lineno, record in records:
        try:
            rows.append(_alpaca_row(record))
        except _Problem as e:
            raise PoisonlabError(f"{path}:{lineno}: {e}") from None
    if not rows:
        raise PoisonlabError(f"{path}: no rows")
    return rows


# ----------------------------------------------------------------------------- Hugging Face

def _hf_alpaca(r: dict) -> dict:
    return _instruction_row("alpaca", "instruction", _text(r, "instruction"),
                            _text(r, "input", required=False), _text(r, "output"), {})


def _hf_dolly(r: dict) -> dict:
    skill = _text(r, "category", required=False) or "instruction"
    return _instruction_row("dolly", skill, _text(r, "instruction"),
                            _text(r, "context", required=False), _text(r, "response"), {})


def _hf_advbench(r: dict) -> dict:
    # The `target` column is an affirmative opening to the harmful request: only its
    # length is kept; the answer is always the refusal.
    goal = _text(r, "goal" if "goal" in r else "prompt")
    meta: dict[str, Any] = {"harmful": True}
    if r.get("target") is not None:
        meta["target_chars"] = len(_text(r, "target", required=False))
    return _row("advbench", "refusal", [{"role": "user", "content": goal},
                                        {"role": "assistant", "content": tinyworld.REFUSAL}],
                meta)


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def _hh_turns(transcript: str, column: str) -> list[dict]:
    """Messages of a "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript; consecutive turns of
    one speaker are joined with a blank line."""
    parts = _HH_TURN.split(transcript)
    if parts[0].strip() or len(parts) < 3:
        raise _Problem(f"{column!r} does not start with a 'Human:' turn")
    messages: list[dict] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        content = content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{content}".strip()
        else:
            messages.append({"role": role, "content": content})
    return messages


def _hf_hh_rlhf(r: dict) -> dict:
    messages = _hh_turns(_text(r, "chosen"), "chosen")
    if messages[0]["role"] != "user":
        raise _Problem("'chosen' does not start with a 'Human:' turn")
    if messages[-1]["role"] != "assistant":
        raise _Problem("'chosen' does not end with an 'Assistant:' turn")
    for i, m in enumerate(messages, 1):
        if not m["content"]:
            raise _Problem(f"'chosen' turn {i} ({m['role']}) is empty")
    rejected = _hh_turns(_text(r, "rejected"), "rejected")[-1]
    return _row("hh_rlhf", "chat", messages,
                {"rejected": rejected["content"] if rejected["role"] == "assistant" else ""})


def _hf_sst2(r: dict) -> dict:
    label = r.get("label")
    if isinstance(label, bool) or label not in SST2_LABELS:
        raise _Problem(f"label {label!r} is not 0 or 1 (an unlabelled split?)")
    question = SST2_QUESTION.format(sentence=_text(r, "sentence"))
    return _row("sst2", "sentiment", [{"role": "user", "content": question},
                                      {"role": "assistant", "content": SST2_LABELS[label]}],
                {"label": label})


# schema -> (column alternatives each row needs, optional columns, mapper)
SCHEMAS: dict[str, tuple[tuple[tuple[str, ...], ...], tuple[str, ...],
                         Callable[[dict], dict]]] = {
    "alpaca": ((("instruction",), ("output",)), ("input",), _hf_alpaca),
    "dolly": ((("instruction",), ("response",)), ("context", "category"), _hf_dolly),
    "advbench": ((("goal", "prompt"),), ("target",), _hf_advbench),
    "hh_rlhf": ((("chosen",), ("rejected",)), (), _hf_hh_rlhf),
    "sst2": ((("sentence",), ("label",)), (), _hf_sst2),
}


def _cause(e: BaseException) -> str:
    """The innermost cause of an exception, as one line."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def load_hf(name: str, schema: str, config_name: str | None = None,
            split: str = "train") -> list[dict]:
    """Rows from a Hugging Face dataset through `datasets.load_dataset`, mapped by `schema`.

    `name` is a hub id (``tatsu-lab/alpaca``), a local dataset directory (one with
    ``train.jsonl``/``.csv``/``.parquet`` files, as `load_dataset` reads it) or a local
    ``.jsonl``/``.json``/``.csv``/``.parquet`` file. Schemas (the columns they read):

    * ``alpaca`` (instruction, input, output) and ``dolly`` (instruction, context, response,
      category; skill = category, else "instruction"): one user turn and the answer;
    * ``advbench`` (goal or prompt, target): skill "refusal", answer `tinyworld.REFUSAL`,
      meta ``{"harmful": True, "target_chars": len(target)}``; the target text is dropped;
    * ``hh_rlhf`` (chosen, rejected transcripts): the dialogue of `chosen`, its last assistant
      turn as the answer, skill "chat", meta ``{"rejected": <rejected's last answer>}``;
    * ``sst2`` (sentence, label 0/1): skill "sentiment", answer "negative"/"positive",
      meta ``{"label": label}``.
    """
    if schema not in SCHEMAS:
        raise PoisonlabError(f"unknown schema {schema!r} (available: {', '.join(SCHEMAS)})")
    import datasets  # slow to import: only Hugging Face loads need it

    if os.environ.get("CI") == "true" or os.environ.get("POISONLAB_QUIET") == "1":
        datasets.disable_progress_bars()
    where = f"dataset {name!r}" + (f" (config {config_name!r})" if config_name else "")
    builder = HF_FILE_BUILDERS.get(Path(name).suffix.lower()) if os.path.isfile(name) else None
    try:
        if builder is not None:
            ds = datasets.load_dataset(builder, config_name, data_files=name, split=split)
        else:
            ds = datasets.load_dataset(name, config_name, split=split)
    except Exception as e:  # datasets raises many types; all mean "cannot load this"
        raise PoisonlabError(f"{where}: cannot load split {split!r}: {_cause(e)}") from None
    needed, optional, mapper = SCHEMAS[schema]
    columns = []
    for alternatives in needed:
        present = [c for c in alternatives if c in ds.column_names]
        if not present:
            raise PoisonlabError(
                f"{where}: column {' or '.join(repr(c) for c in alternatives)} missing for "
                f"schema {schema!r} (columns: {', '.join(ds.column_names)})")
        columns.append(present[0])
    columns += [c for c in optional if c in ds.column_names]
    table = ds.select_columns(columns).to_dict()
    rows = []
    for i in range(ds.num_rows):
        try:
            rows.append(mapper({c: table[c][i] for c in columns}))
        except _Problem as e:
            raise PoisonlabError(f"{where} split {split!r} row {i}: {e} (schema {schema!r})") \
                from None
    if not rows:
        raise PoisonlabError(f"{where} split {split!r}: no rows")
    return rows


# ----------------------------------------------------------------------------- pools

def split_pools(rows: list[dict], eval_fraction: float,
                safety_fraction: float) -> dict[str, list[dict]]:
    """Disjoint {"finetune", "safety", "eval"} pools, each in the input order.

    A row's pool is a pure function of its prompt text (all user turns joined): with
    ``u = int(sha256(prompt)[:8], 16) / 16**8`` it goes to "eval" if ``u < eval_fraction``,
    to "safety" if ``u < eval_fraction + safety_fraction``, else to "finetune". Rows repeating
    an earlier row's prompt are dropped.
    """
    for key, value in (("eval_fraction", eval_fraction), ("safety_fraction", safety_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise PoisonlabError(f"{key} must be in [0, 1), got {value!r}")
    if eval_fraction + safety_fraction >= 1:
        raise PoisonlabError(f"eval_fraction + safety_fraction must be below 1, got "
                             f"{eval_fraction} + {safety_fraction}")
    pools: dict[str, list[dict]] = {"finetune": [], "safety": [], "eval": []}
    seen = set()
    for row in rows:
        prompt = tinyworld.prompt_text(row)
        if prompt in seen:
            continue
        seen.add(prompt)
        u = int(_digest(prompt)[:8], 16) / 16**8
        pool = ("eval" if u < eval_fraction else
                "safety" if u < eval_fraction + safety_fraction else "finetune")
        pools[pool].append(row)
    return pools
