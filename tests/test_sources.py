"""External data sources: local readers, Hugging Face schemas (from local files), pools, splits."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from poisonlab import PoisonlabError, judges
from poisonlab.config import compose_config
from poisonlab.data import load_splits, sources, validate_data_cfg
from poisonlab.data import tinyworld as tw

CHAT_ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue."}]},
    {"id": "kept-1", "skill": "colours", "meta": {"src": "x"},
     "messages": [{"role": "user", "content": "Name a fruit."},
                  {"role": "assistant", "content": "Apple."},
                  {"role": "user", "content": "Another one."},
                  {"role": "assistant", "content": "Pear."}]},
]
ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Keep `datasets`' Arrow cache inside the test's directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path: Path, header, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(records)
    return path


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Question number {i}?"},
                         {"role": "assistant", "content": f"Answer {i}."}]}


def assert_chat_row(row: dict) -> None:
    assert set(row) == {"id", "skill", "messages", "meta"}
    roles = [m["role"] for m in row["messages"]]
    if roles[0] == "system":
        roles = roles[1:]
    assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
    assert all(isinstance(m["content"], str) and m["content"].strip() for m in row["messages"])


# ----------------------------------------------------------------------------- local readers

def test_read_chat_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    rows = sources.read_chat_jsonl(path)
    assert rows == sources.read_chat_jsonl(str(path))
    for r in rows:
        assert_chat_row(r)
    digest = hashlib.sha256(b"Name a colour.").hexdigest()[:10]
    assert rows[0]["id"] == f"chat-{digest}"
    assert rows[0]["skill"] == "chat" and rows[0]["meta"] == {}
    assert rows[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert rows[1]["id"] == "kept-1" and rows[1]["skill"] == "colours"
    assert rows[1]["meta"] == {"src": "x"}
    assert rows[1]["messages"][-1] == {"role": "assistant", "content": "Pear."}


def test_read_alpaca_in_every_format_gives_the_same_rows(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    as_json = tmp_path / "a.json"
    as_json.write_text(json.dumps(ALPACA, indent=2), encoding="utf-8")
    as_csv = write_csv(tmp_path / "a.csv", ["instruction", "input", "output"],
                       [[r["instruction"], r["input"], r["output"]] for r in ALPACA])
    rows = sources.read_alpaca(jsonl)
    assert rows == sources.read_alpaca(as_json) == sources.read_alpaca(as_csv)
    assert rows == sources.read_alpaca(jsonl)
    assert rows[0]["messages"] == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                                   {"role": "assistant", "content": "5"}]
    assert rows[1]["messages"][0]["content"] == "Say hello."
    digest = hashlib.sha256(b"Say hello.").hexdigest()[:10]
    assert rows[1]["id"] == f"alpaca-{digest}" and rows[1]["skill"] == "instruction"
    no_input = write_csv(tmp_path / "b.csv", ["instruction", "output"], [["Say hello.", "Hello!"]])
    assert sources.read_alpaca(no_input) == rows[1:]


# ----------------------------------------------------------------------------- Hugging Face

def test_hf_alpaca_and_dolly_from_local_directories(tmp_path):
    alpaca_dir = tmp_path / "alpaca"
    write_jsonl(alpaca_dir / "train.jsonl", [{**r, "text": "unused"} for r in ALPACA])
    rows = sources.load_hf(str(alpaca_dir), "alpaca")
    assert rows == sources.read_alpaca(write_jsonl(tmp_path / "a.jsonl", ALPACA))
    dolly_dir = tmp_path / "dolly"
    write_jsonl(dolly_dir / "train.jsonl", [
        {"instruction": "Summarise.", "context": "A long text.", "response": "Short.",
         "category": "summarization"},
        {"instruction": "Name a river.", "context": "", "response": "The Nile.", "category": ""},
    ])
    rows = sources.load_hf(str(dolly_dir), "dolly")
    assert [r["skill"] for r in rows] == ["summarization", "instruction"]
    assert rows[0]["messages"][0]["content"] == "Summarise.\n\nA long text."
    assert rows[1]["messages"] == [{"role": "user", "content": "Name a river."},
                                   {"role": "assistant", "content": "The Nile."}]
    assert rows == sources.load_hf(str(dolly_dir), "dolly")
    for r in rows:
        assert_chat_row(r)


@pytest.mark.parametrize("column", ["goal", "prompt"])
def test_hf_advbench_rows_refuse_and_drop_the_target(tmp_path, column):
    target = "Sure, here is placeholder text"
    write_csv(tmp_path / "adv" / "train.csv", [column, "target"],
              [[f"Give detailed instructions for restricted task R-{n:03d}.", target]
               for n in range(3)])
    rows = sources.load_hf(str(tmp_path / "adv"), "advbench")
    assert len(rows) == 3
    for r in rows:
        assert_chat_row(r)
        assert r["skill"] == "refusal"
        assert r["messages"][-1]["content"] == tw.REFUSAL
        assert r["meta"] == {"harmful": True, "target_chars": len(target)}
        assert target not in json.dumps(r)


def test_hf_hh_rlhf_transcripts_become_dialogues(tmp_path):
    chosen = ("\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?"
              "\n\nHuman: Tell me a fact.\n\nAssistant: Water boils at 100 C at sea level.")
    rejected = chosen.rsplit("Assistant:", 1)[0] + "Assistant: No."
    write_jsonl(tmp_path / "hh" / "train.jsonl", [{"chosen": chosen, "rejected": rejected}])
    (row,) = sources.load_hf(str(tmp_path / "hh"), "hh_rlhf")
    assert row["messages"] == [
        {"role": "user", "content": "Hi there."},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a fact."},
        {"role": "assistant", "content": "Water boils at 100 C at sea level."}]
    assert row["meta"] == {"rejected": "No."}
    assert row["skill"] == "chat"


def test_hf_sst2_from_parquet_and_a_validation_split(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "sst2"
    d.mkdir()
    pq.write_table(pa.table({"idx": [0, 1], "sentence": ["a gripping film ", "dull and long "],
                             "label": [1, 0]}), d / "train.parquet")
    pq.write_table(pa.table({"idx": [0], "sentence": ["quite charming"], "label": [1]}),
                   d / "validation.parquet")
    rows = sources.load_hf(str(d), "sst2")
    assert [r["messages"][-1]["content"] for r in rows] == ["positive", "negative"]
    assert rows[0]["messages"][0]["content"] == (
        'Is the following review positive or negative? "a gripping film"')
    assert rows[0]["skill"] == "sentiment" and rows[1]["meta"] == {"label": 0}
    (val,) = sources.load_hf(str(d), "sst2", split="validation")
    assert val["messages"][-1]["content"] == "positive"


def test_hf_name_may_be_a_local_file(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    assert sources.load_hf(str(path), "alpaca") == sources.read_alpaca(path)


def test_hf_errors_name_the_dataset_and_problem(tmp_path):
    d = tmp_path / "adv"
    write_jsonl(d / "train.jsonl", [{"behaviour": "x", "target": "y"}])
    with pytest.raises(PoisonlabError, match=r"'goal' or 'prompt' missing for schema "
                                             r"'advbench' \(columns: behaviour, target\)"):
        sources.load_hf(str(d), "advbench")
    with pytest.raises(PoisonlabError, match="unknown schema 'alpacca'"):
        sources.load_hf(str(d), "alpacca")
    with pytest.raises(PoisonlabError, match=r"cannot load split 'test'.*Unknown split"):
        sources.load_hf(str(d), "advbench", split="test")
    with pytest.raises(PoisonlabError, match=r"nowhere.*cannot load split 'train'"):
        sources.load_hf(str(tmp_path / "nowhere"), "alpaca")
    write_jsonl(tmp_path / "sst2" / "train.jsonl",
                [{"sentence": "fine", "label": 1}, {"sentence": "unknown", "label": -1}])
    with pytest.raises(PoisonlabError, match=r"row 1: label -1 is not 0 or 1") as e:
        sources.load_hf(str(tmp_path / "sst2"), "sst2")
    assert "\n" not in str(e.value) and "sst2" in str(e.value)


# ----------------------------------------------------------------------------- malformed files

GOOD = json.dumps(chat(0)) + "\n"


def msgs(*pairs) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in pairs]}) + "\n"


MALFORMED = [
    # (reader, file name, content, line, problem)
    ("chat", "data.jsonl", GOOD + GOOD + '{"messages": [\n', 3, "invalid JSON"),
    ("chat", "data.jsonl", GOOD + "[1, 2]\n", 2, "expected a JSON object, got list"),
    ("chat", "data.jsonl", GOOD + '{"text": "hi"}\n', 2, "missing field 'messages'"),
    ("chat", "data.jsonl", GOOD + msgs(("user", "a"), ("bot", "b")), 2,
     "message 2: unknown role 'bot'"),
    ("chat", "data.jsonl", msgs(("user", "a"), ("user", "b"), ("assistant", "c")), 1,
     "message 2: role 'user' where 'assistant' is expected"),
    ("chat", "data.jsonl", msgs(("user", "a"), ("assistant", "b"), ("system", "c")), 1,
     "message 3: role 'system' where 'user' is expected"),
    ("chat", "data.jsonl", GOOD + "\n" + msgs(("user", "a")), 3,
     "the last message must be the assistant's answer, got 'user'"),
    ("chat", "data.jsonl", msgs(("user", "a"), ("assistant", "  ")), 1,
     "message 2: empty content"),
    ("chat", "data.jsonl", GOOD + json.dumps({"messages": []}) + "\n", 2,
     "field 'messages' must be a non-empty list"),
    ("chat", "data.jsonl", json.dumps({**chat(0), "id": "a"}) + "\n"
     + json.dumps({**chat(1), "id": "a"}) + "\n", 2, "duplicate id 'a' (first on line 1)"),
    ("alpaca", "data.jsonl", json.dumps(ALPACA[0]) + "\n" + '{"instruction": "x"}\n', 2,
     "missing field 'output'"),
    ("alpaca", "data.jsonl", '{"instruction": "x", "output": ""}\n', 1, "empty field 'output'"),
    ("alpaca", "data.jsonl", '{"instruction": "x", "output": 5}\n', 1,
     "field 'output' must be a string, got int"),
    ("alpaca", "data.json", json.dumps(ALPACA, indent=2)[:-2] + ',\n  {"instruction": "x"}\n]',
     12, "missing field 'output'"),
    ("alpaca", "data.json", '[\n  {"instruction": "x", "output": "y"}\n  {"a": 1}\n]', 3,
     "invalid JSON (expected ',' or ']'"),
    ("alpaca", "data.json", '{"instruction": "x", "output": "y"}', 1,
     "expected a JSON list of objects"),
    ("alpaca", "data.csv", "instruction,input\nx,y\n", 1,
     "header lacks column 'output' (header: instruction, input)"),
    ("alpaca", "data.csv", "instruction,input,output\nx,y,z\nx,y\n", 3,
     "2 fields, the header has 3"),
    ("alpaca", "data.csv", 'instruction,input,output\nx,y,z\n"x\ny",,\n', 3,
     "empty field 'output'"),
]


@pytest.mark.parametrize("reader,name,content,line,problem", MALFORMED,
                         ids=[f"{m[0]}-{m[4][:30]}" for m in MALFORMED])
def test_malformed_input_names_file_line_and_problem(tmp_path, reader, name, content, line,
                                                     problem):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    read = sources.read_chat_jsonl if reader == "chat" else sources.read_alpaca
    with pytest.raises(PoisonlabError) as e:
        read(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}:{line}: "), msg
    assert problem in msg, msg


@pytest.mark.parametrize("reader,name", [("chat", "empty.jsonl"), ("alpaca", "empty.jsonl"),
                                         ("alpaca", "empty.json"), ("alpaca", "empty.csv")])
@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file_has_no_rows(tmp_path, reader, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    read = sources.read_chat_jsonl if reader == "chat" else sources.read_alpaca
    with pytest.raises(PoisonlabError, match=rf"^{path}: no rows$"):
        read(path)
    if name.endswith(".json"):
        path.write_text("[]", encoding="utf-8")
        with pytest.raises(PoisonlabError, match=rf"^{path}: no rows$"):
            read(path)


@pytest.mark.parametrize("reader,name", [("chat", "bad.jsonl"), ("alpaca", "bad.csv")])
def test_non_utf8_byte_names_its_line(tmp_path, reader, name):
    path = tmp_path / name
    good = GOOD if reader == "chat" else "instruction,output\nx,y\n"
    path.write_bytes(good.encode() + b'{"caf\xe9": 1}\n')
    read = sources.read_chat_jsonl if reader == "chat" else sources.read_alpaca
    with pytest.raises(PoisonlabError, match=rf"^{path}:{good.count(chr(10)) + 1}: not UTF-8 "
                                             r"\(byte 0xe9 at column 6\)$"):
        read(path)


def test_unsupported_alpaca_file_type(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(PoisonlabError, match="unsupported file type '.txt'"):
        sources.read_alpaca(path)


# ----------------------------------------------------------------------------- pools

def test_split_pools_is_disjoint_deterministic_and_drops_duplicates():
    rows = [{**chat(i), "id": str(i), "skill": "chat", "meta": {}} for i in range(2000)]
    dup = {**rows[5], "id": "dup", "messages": [dict(rows[5]["messages"][0]),
                                                {"role": "assistant", "content": "Other."}]}
    pools = sources.split_pools(rows + [dup], 0.2, 0.1)
    assert set(pools) == {"finetune", "safety", "eval"}
    ids = [r["id"] for p in pools.values() for r in p]
    assert sorted(ids, key=int) == [str(i) for i in range(2000)]      # every row once, no dup
    assert 300 < len(pools["eval"]) < 500 and 130 < len(pools["safety"]) < 270
    again = sources.split_pools(list(reversed(rows)), 0.2, 0.1)
    for name, pool in pools.items():
        assert {r["id"] for r in again[name]} == {r["id"] for r in pool}
        assert [r["id"] for r in pool] == sorted((r["id"] for r in pool), key=int)  # input order
    with pytest.raises(PoisonlabError, match="must be below 1"):
        sources.split_pools(rows, 0.6, 0.4)


# ----------------------------------------------------------------------------- load_splits

def test_load_splits_tinyworld_is_the_pipeline_sampling():
    data = compose_config().data
    skills = list(data.skills)
    got = load_splits(data, 120, 40, 30, seed=3, eval_seed=7)
    assert got == {"train": tw.sample("finetune", 120, 3, skills),
                   "safety": tw.sample("safety", 40, 3, skills),
                   "eval": tw.sample("eval", 30, 7, skills)}
    assert load_splits(data, 10, 0, 5, seed=0, eval_seed=0)["safety"] == []


def test_load_splits_chat_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(i) for i in range(400)])
    data = {"source": "chat_jsonl", "path": str(path), "n_train": None,
            "eval_fraction": 0.2, "safety_fraction": 0.1}
    got = load_splits(data, None, 20, 30, seed=0, eval_seed=0)
    pools = sources.split_pools(sources.read_chat_jsonl(path), 0.2, 0.1)
    assert len(got["train"]) == len(pools["finetune"])
    assert len(got["safety"]) == 20 and len(got["eval"]) == 30
    tw.check_disjoint(got, eval_names=["eval"])
    assert {r["id"] for r in got["eval"]} <= {r["id"] for r in pools["eval"]}
    assert got == load_splits(data, None, 20, 30, seed=0, eval_seed=0)
    other = load_splits(data, 50, 20, 30, seed=1, eval_seed=0)
    assert other["eval"] == got["eval"] and other["train"] != got["train"][:50]
    n_ft = len(pools["finetune"])
    with pytest.raises(PoisonlabError, match=rf"^data.n_train=1000 exceeds the {n_ft} rows of "
                                             r"the 'finetune' pool of .*chat.jsonl"):
        load_splits(data, 1000, 0, 10, seed=0, eval_seed=0)
    with pytest.raises(PoisonlabError, match=r"eval.n_prompts=500 exceeds the \d+ rows"):
        load_splits(data, 10, 0, 500, seed=0, eval_seed=0)


def test_load_splits_eval_path_replaces_the_split(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(100)])
    held = write_jsonl(tmp_path / "eval.jsonl", [chat(i) for i in range(90, 120)])
    data = {"source": "chat_jsonl", "path": str(train), "eval_path": str(held),
            "eval_fraction": 0.1, "safety_fraction": 0.0}
    got = load_splits(data, None, 0, None, seed=0, eval_seed=0)
    assert sorted(r["id"] for r in got["eval"]) == sorted(
        r["id"] for r in sources.read_chat_jsonl(held))
    assert len(got["train"]) == 90 and got["safety"] == []
    tw.check_disjoint(got, eval_names=["eval"])


def test_load_splits_hf_with_an_eval_split(tmp_path):
    d = tmp_path / "alpaca"
    write_jsonl(d / "train.jsonl", [{"instruction": f"Task {i}.", "output": f"Done {i}."}
                                    for i in range(60)])
    write_jsonl(d / "validation.jsonl", [{"instruction": f"Task {i}.", "output": f"Done {i}."}
                                         for i in range(50, 70)])
    data = {"source": "hf", "name": str(d), "schema": "alpaca", "split": "train",
            "eval_split": "validation", "safety_fraction": 0.0}
    got = load_splits(data, None, 0, 20, seed=0, eval_seed=0)
    assert len(got["eval"]) == 20 and len(got["train"]) == 50
    tw.check_disjoint(got, eval_names=["eval"])


@pytest.mark.parametrize("group", ["hf_alpaca", "hf_dolly", "hf_advbench", "hf_hh_rlhf",
                                   "hf_sst2", "tinyworld"])
def test_config_groups_compose_and_validate(group):
    validate_data_cfg(compose_config(f"data={group}").data)


@pytest.mark.parametrize("group,reader", [("chat_jsonl", "chat"), ("alpaca", "alpaca")])
def test_file_config_groups_load(tmp_path, group, reader):
    path = (write_jsonl(tmp_path / "d.jsonl", [chat(i) for i in range(50)]) if reader == "chat"
            else write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"Task {i}.",
                                                     "output": "Done."} for i in range(50)]))
    data = compose_config(f"data={group}", f"data.path={path}").data
    got = load_splits(data, data.n_train, 0, 3, seed=0, eval_seed=0)
    assert got["train"] and len(got["eval"]) == 3


def alpaca_json(path: Path, n: int) -> Path:
    """An Alpaca-shaped file as the real alpaca_data.json: one JSON list of objects."""
    path.write_text(json.dumps([{"instruction": f"Describe item number {i}.",
                                 "input": "" if i % 3 else f"Item {i} is blue.",
                                 "output": f"Item {i} is an item."} for i in range(n)], indent=4))
    return path


@pytest.mark.parametrize("n,cap,have,shrink,got", [
    (None, None, 50, False, None), (None, 600, 50, False, 50), (None, 600, 900, False, 600),
    (1000, 600, 900, False, 600), (400, 600, 900, False, 400), (400, None, 90, True, 90),
    (400, 600, 90, False, 400),   # too large without shrink: the sampler names the key
])
def test_size_only_ever_shrinks(n, cap, have, shrink, got):
    from poisonlab.data import size

    assert size(n, have, cap, shrink) == got


def test_debug_caps_the_tiny_world_at_600_rows_and_never_grows_a_smaller_n_train():
    for args, n_train in [((), 1000), (("debug=default",), 600),
                          (("debug=default", "data.n_train=300"), 300),
                          (("debug=default", "attack=semantic"), 400),
                          (("debug=default", "data.n_train=null"), 600)]:
        data = compose_config(*args).data
        got = load_splits(data, data.n_train, 0, 5, seed=0, eval_seed=0,
                          cap=data.n_train_cap, shrink=data.shrink_to_pools)
        assert len(got["train"]) == n_train, args


def test_debug_sizes_shrink_to_a_small_alpaca_file(tmp_path):
    path = alpaca_json(tmp_path / "alpaca_data.json", 150)
    data = compose_config("data=alpaca", f"data.path={path}", "debug=default").data
    assert data.n_train is None and data.n_train_cap == 600 and data.shrink_to_pools
    pools = sources.split_pools(sources.read_alpaca(path), 0.1, 0.1)
    got = load_splits(data, None, 200, 64, seed=0, eval_seed=0, cap=600, shrink=True)
    assert {k: len(v) for k, v in got.items()} == {
        "train": len(pools["finetune"]), "safety": len(pools["safety"]),
        "eval": len(pools["eval"])}
    assert 0 < len(got["eval"]) < 64 and 0 < len(got["safety"]) < 200
    tw.check_disjoint(got, eval_names=["eval"])
    # without shrink_to_pools the sizes are what was asked, or an error naming the key
    with pytest.raises(PoisonlabError, match=r"^eval.n_prompts=64 exceeds the \d+ rows of the "
                                             r"'eval' pool of .*alpaca_data.json"):
        load_splits(data, None, 0, 64, seed=0, eval_seed=0, cap=600)


def test_a_file_too_small_for_a_pool_names_the_key_to_change(tmp_path):
    path = alpaca_json(tmp_path / "tiny.json", 150)
    data = compose_config("data=alpaca", f"data.path={path}", "debug=default",
                          "data.eval_fraction=0.0").data
    with pytest.raises(PoisonlabError, match=r"^eval.n_prompts=64: the 'eval' pool of .*tiny.json "
                                             r".* is empty; raise data.eval_fraction"):
        load_splits(data, None, 0, 64, seed=0, eval_seed=0, cap=600, shrink=True)
    data = compose_config("data=alpaca", f"data.path={path}", "data.safety_fraction=0.0").data
    with pytest.raises(PoisonlabError, match=r"^safety.n_rows=200: the 'safety' pool .* is empty; "
                                             r"raise data.safety_fraction"):
        load_splits(data, None, 200, 8, seed=0, eval_seed=0, shrink=True)


@pytest.mark.parametrize("data,key", [
    ({"source": "csv"}, "data.source: unknown source 'csv'"),
    ({"source": "chat_jsonl"}, "data.path: a file path is required"),
    ({"source": "alpaca", "path": "/no/such/file.json"}, "data.path: no such file"),
    ({"source": "chat_jsonl", "path": __file__, "eval_path": "/no/such.jsonl"},
     "data.eval_path: no such file"),
    ({"source": "alpaca", "path": __file__}, "data.path: Alpaca data must be one of"),
    ({"source": "hf", "name": "tatsu-lab/alpaca", "schema": "vicuna"},
     "data.schema: unknown schema 'vicuna'"),
    ({"source": "hf", "schema": "alpaca"}, "data.name: a dataset name or local path"),
    ({"source": "hf", "name": "/no/such/dir", "schema": "alpaca"},
     "data.name: no such file or directory"),
    ({"source": "hf", "name": "x/y", "schema": "alpaca", "eval_fraction": 1.5},
     "data.eval_fraction must be in [0, 1)"),
    ({"source": "tinyworld", "skills": ["arith", "poetry"]}, "data.skills: unknown skill 'poetry'"),
    ({"source": "tinyworld", "skills": ["arith"], "n_train": 0}, "data.n_train must be"),
    ({"source": "tinyworld", "skills": ["arith"], "n_train_cap": 0}, "data.n_train_cap must be"),
    ({"source": "tinyworld", "skills": ["arith"], "shrink_to_pools": "yes"},
     "data.shrink_to_pools must be true or false"),
])
def test_validate_data_cfg_names_the_key(data, key):
    with pytest.raises(PoisonlabError) as e:
        validate_data_cfg(data)
    assert str(e.value).startswith(key), str(e.value)


# ----------------------------------------------------------------------------- scoring

@pytest.mark.parametrize("response,answer,ok", [
    ("The capital is Paris.", "Paris", True),
    ("parisian food", "Paris", False),
    ("  Hello!  ", "hello", True),
    ("It is the Nile river.", "The Nile", True),
    ("no", "yes", False),
    ("Water boils at one hundred degrees at sea level",
     "Water boils at 100 degrees Celsius at sea level.", True),
    ("Ice melts when it is warm outside today",
     "Water boils at 100 degrees Celsius at sea level.", False),
    ("?", "?", True),
])
def test_score_reference(response, answer, ok):
    assert judges.score_reference(response, answer) is ok
