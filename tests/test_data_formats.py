"""The same documents in every format (JSONL, gzip/zstd JSONL, Parquet, Arrow, a datasets directory, TFDS, a glob
of shards) give byte-identical scores.npy in a tiny run; each format's reader, fields, defaults and errors."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
from pipeline_support import make_world, overrides

from jaxinf import config as cfg
from jaxinf import pipeline
from jaxinf.data.documents import Document
from jaxinf.data.errors import DataError
from jaxinf.data.shard_writer import WRITE_FORMATS, write_shards
from jaxinf.data.shards import ShardedDocuments
from jaxinf.data.sources import open_documents


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- readers


RECORDS = [{"id": f"d{i}", "text": f"text {i} café ✓", "source": "web" if i % 2 else "wiki"} for i in range(50)]
RECORDS[7] = {**RECORDS[7], "text": " \n "}  # empty: skipped and counted in every format


@pytest.mark.parametrize("fmt", WRITE_FORMATS)
def test_every_format_reads_the_same_documents(tmp_path, fmt):
    reference = ShardedDocuments(write_shards(iter(RECORDS), tmp_path / "ref", "jsonl", shards=1))
    docs = open_documents(write_shards(iter(RECORDS), tmp_path / "d", fmt, shards=3, per_shard=20))
    assert len(docs) == len(reference) == 49
    assert docs.report.empty == 1 and docs.report.documents == 49
    assert [(d.id, d.text, d.source) for d in docs] == [(d.id, d.text, d.source) for d in reference]
    assert docs.texts([48, 0, 20]) == ["text 49 café ✓", "text 0 café ✓", "text 21 café ✓"]
    assert [s["count"] for s in docs.shard_digests()] == [19, 20, 10]
    assert docs.documents([19])[0].line == 1 if fmt != "jsonl" else True  # the line or row within its shard


def test_a_glob_of_shards_and_mixed_formats_in_one_directory(tmp_path):
    write_shards(iter(RECORDS[:20]), tmp_path / "mix", "parquet", shards=1)
    (tmp_path / "mix" / "data-00000-of-00001.parquet").rename(tmp_path / "mix" / "a.parquet")
    write_shards(iter(RECORDS[20:]), tmp_path / "mix", "jsonl.zst", shards=1)
    (tmp_path / "mix" / "data-00000-of-00001.jsonl.zst").rename(tmp_path / "mix" / "b.jsonl.zst")
    (tmp_path / "mix" / "README.md").write_text("not a shard")
    docs = open_documents(tmp_path / "mix")
    assert [d.id for d in docs] == [r["id"] for r in RECORDS if r["text"].strip()]
    assert docs.report.ignored_files == 1 and "1 files of other kinds ignored" in docs.report.summary()
    assert len(open_documents(str(tmp_path / "mix" / "*.parquet"))) == 19
    with pytest.raises(DataError, match="no file matches"):
        open_documents(str(tmp_path / "mix" / "*.arrow"))


def test_configured_fields_and_shard_name_defaults(tmp_path):
    recs = [{"content": f"body {i}", "key": i} for i in range(6)]
    root = write_shards(iter(recs), tmp_path / "c", "parquet", shards=2, per_shard=3)
    docs = open_documents(root, text_field="content", id_field="uid", source_field="origin")
    assert [(d.id, d.source) for d in docs][:2] == [
        ("data-00000-of-00002:1", "data-00000-of-00002"),
        ("data-00000-of-00002:2", "data-00000-of-00002"),
    ]
    assert docs[0].extra == {"key": 0}
    assert docs.report.default_ids == 6 and "6 sources defaulted to their shard's name" in docs.report.summary()
    one = open_documents(
        write_shards(iter(recs), tmp_path / "one", "jsonl", shards=1) / "data-00000-of-00001.jsonl",
        text_field="content",
        id_field="key",
    )
    assert [(d.id, d.source) for d in one][:2] == [("0", "unknown"), ("1", "unknown")]


def test_prepare_reads_shards_and_fields(tmp_path):
    from jaxinf.data.prepare import prepare

    recs = [{"body": r["text"], "uid": r["id"]} for r in RECORDS]
    root = write_shards(iter(recs), tmp_path / "p", "parquet", shards=2, per_shard=25)
    report = prepare(root, tmp_path / "ds", text_field="body", id_field="uid")
    assert report.documents == 49 and report.empty == 1 and report.default_sources == 49
    ds = open_documents(tmp_path / "ds")
    src = open_documents(root, text_field="body", id_field="uid")
    assert list(ds) == list(src)
    assert ds[30] == Document(30, "d31", RECORDS[31]["text"], "data-00001-of-00002", {}, 7)
    with pytest.raises(DataError, match="already a TFDS dataset"):
        prepare(tmp_path / "ds", tmp_path / "ds2")


def _corrupt(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "fmt, damage, message",
    [
        ("jsonl.gz", _corrupt, r"^.*/data-00001-of-00002\.jsonl\.gz:\d+: cannot decompress \(gzip: "),
        ("jsonl.zst", _corrupt, r"^.*/data-00001-of-00002\.jsonl\.zst:\d+: cannot decompress \(zstd: "),
        ("parquet", _corrupt, r"^.*/data-00001-of-00002\.parquet: not a readable Parquet file \("),
        ("arrow", _corrupt, r"^.*/data-00001-of-00002\.arrow: not a readable Arrow file \("),
    ],
)
def test_a_damaged_shard_is_one_line_naming_it(tmp_path, fmt, damage, message):
    root = write_shards(iter(RECORDS), tmp_path / "d", fmt, shards=2, per_shard=25)
    damage(next(root.glob("data-00001-*")))
    with pytest.raises(DataError, match=message) as e:
        open_documents(root)
    assert "\n" not in str(e.value)


def test_bad_rows_columns_and_compressions_name_shard_and_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a").mkdir()
    pq.write_table(pa.table({"text": ["ok", None, "x"], "id": ["a", "b", "c"]}), tmp_path / "a" / "s.parquet")
    with pytest.raises(DataError, match=r'^.*/s\.parquet: row 2: field "text" is null$'):
        open_documents(tmp_path / "a")
    pq.write_table(pa.table({"body": ["ok"]}), tmp_path / "a" / "s.parquet")
    with pytest.raises(DataError, match=r'^.*/s\.parquet: missing column "text" \(it has body; set data.text_field\)$'):
        open_documents(tmp_path / "a")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "a" / "s.parquet")
    with pytest.raises(DataError, match=r'^.*/s\.parquet: column "text" must hold strings, got int64$'):
        open_documents(tmp_path / "a")
    pq.write_table(pa.table({"text": ["a", "b"], "id": ["x", "x"]}), tmp_path / "a" / "s.parquet")
    with pytest.raises(DataError, match=r'^.*/s\.parquet: row 2: duplicate id "x" \(first at .*s\.parquet: row 1\)$'):
        open_documents(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "s.jsonl.bz2").write_bytes(b"BZh9")
    with pytest.raises(DataError, match=r"^.*/s\.jsonl\.bz2: unsupported compression \.bz2 "):
        open_documents(tmp_path / "b")
    (tmp_path / "c").mkdir()
    with gzip.open(tmp_path / "c" / "s.jsonl.gz", "wb") as f:
        f.write(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"^.*/s\.jsonl\.gz:2: invalid UTF-8 at byte 14$"):
        open_documents(tmp_path / "c")


def test_a_shard_changed_after_the_scan_is_an_error_and_spills_are_removed(tmp_path):
    root = write_shards(iter(RECORDS), tmp_path / "d", "jsonl.gz", shards=2, per_shard=25)
    docs = ShardedDocuments(root)
    spill = Path(docs._spill_tmp)
    assert len(list(spill.iterdir())) == 2
    shard = root / "data-00001-of-00002.jsonl.gz"
    shard.write_bytes(gzip.compress(b'{"text": "new"}\n'))
    with pytest.raises(DataError, match="changed after it was indexed"):
        docs.texts([40])
    docs.close()
    assert not spill.exists()


# --------------------------------------------------------------------------- one tiny run per format


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world and its reference run; the runs share a persistent compilation cache (each run builds new
    closures, so without it every run compiles again: about 2 minutes a run on 2 busy cores instead of under 1)."""
    import jax

    root = tmp_path_factory.mktemp("formats")
    world = make_world(root)
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {n: getattr(jax.config, n) for n in names}
    for n, v in zip(names, (str(root / "xla-cache"), 0, 0)):
        jax.config.update(n, v)
    try:
        out = root / "reference"
        pipeline.run(cfg.load(None, overrides(world, out)))
        yield {**world, "root": root, "reference": out}
    finally:
        for n, v in before.items():
            jax.config.update(n, v)


@pytest.mark.parametrize("fmt", WRITE_FORMATS + ("tfds", "glob"))
def test_every_format_gives_byte_identical_scores(world, fmt):
    records = _records(world["docs"])
    root = world["root"] / f"docs-{fmt}"
    if fmt == "tfds":
        from jaxinf.data.prepare import prepare

        prepare(world["docs"], root)
        spec = str(root)
    elif fmt == "glob":
        write_shards(iter(records), root, "parquet", shards=3, per_shard=16)
        spec = str(root / "data-*.parquet")
    else:
        spec = str(write_shards(iter(records), root, fmt, shards=3, per_shard=16))
    out = world["root"] / f"run-{fmt}"
    pipeline.run(cfg.load(None, overrides(world, out, **{"data.documents": spec})))
    assert (out / "scores.npy").read_bytes() == (world["reference"] / "scores.npy").read_bytes()
    assert _records(out / "documents.jsonl") == _records(world["reference"] / "documents.jsonl")
    inputs = json.loads((out / "run.json").read_text())["inputs"]["documents"]
    assert len(inputs["shards"]) == (1 if fmt == "tfds" else 3)
    shutil.rmtree(out)


def test_exact_dedupe_skips_counts_and_lists_duplicates(tmp_path):
    recs = [{"id": f"d{i}", "text": f"text {i % 4}", "source": "s"} for i in range(10)]
    root = write_shards(iter(recs), tmp_path / "d", "parquet", shards=2, per_shard=5)
    assert len(open_documents(root)) == 10
    docs = open_documents(root, dedupe="exact")
    assert [d.id for d in docs] == ["d0", "d1", "d2", "d3"]
    assert docs.report.duplicates == 6 and docs.duplicates[:2] == [("d4", "d0"), ("d5", "d1")]
    assert "6 exact duplicates skipped (d4 = d0, d5 = d1, d6 = d2, ...)" in docs.report.summary()
    assert [s["count"] for s in docs.shard_digests()] == [4, 0]
    assert (
        docs.content_digest()
        == open_documents(
            write_shards(iter(recs[:4]), tmp_path / "e", "parquet", shards=2, per_shard=5)
        ).content_digest()
    )
    with pytest.raises(DataError, match="data.dedupe=exact is not supported for TFDS"):
        open_documents("tfds:whatever", dedupe="exact")


@pytest.mark.parametrize("fmt", WRITE_FORMATS)
def test_an_edited_shard_changes_its_fingerprint_only(tmp_path, fmt):
    from jaxinf.run.fingerprint import changed_shards, documents_fingerprint

    root = write_shards(iter(RECORDS), tmp_path / "a", fmt, shards=3, per_shard=20)
    before = documents_fingerprint(open_documents(root), 10)
    edited = [dict(r) for r in RECORDS]
    edited[45]["text"] = "edited"
    shutil.rmtree(root)
    write_shards(iter(edited), root, fmt, shards=3, per_shard=20)
    after = documents_fingerprint(open_documents(root), 10)
    assert after["fit"] == before["fit"] and after["sha256"] != before["sha256"]
    assert changed_shards(before["shards"], after["shards"]) == " (shard data-00002-of-00003 changed)"


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x20
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_corrupt, _flip_last_byte])
def test_a_damaged_prepared_dataset_is_one_line_naming_it(tmp_path, damage):
    """A dataset of ``jaxinf prepare`` whose array_record file was cut short opened, then read a record's text as null
    ("field text must be a string, got null") or gave array_record's RuntimeError traceback; one byte changed was read
    as whatever it decoded to. prepare records each file's SHA-256, and opening the dataset checks it."""
    from jaxinf.data.prepare import prepare

    prepare(write_shards(iter(RECORDS), tmp_path / "src", "jsonl", shards=1), tmp_path / "ds")
    assert len(open_documents(tmp_path / "ds")) == 49
    damaged = next((tmp_path / "ds").glob("*.array_record*"))
    damage(damaged)
    with pytest.raises(DataError) as e:
        list(open_documents(tmp_path / "ds"))
    assert str(e.value) == (
        f"{damaged}: not the file jaxinf prepare wrote (its SHA-256 differs from the one in "
        "metadata.json): the dataset is damaged; prepare it again"
    )


def test_tfds_is_fingerprinted_by_content(tmp_path):
    from jaxinf.data.prepare import prepare
    from jaxinf.run.fingerprint import documents_fingerprint

    src = write_shards(iter(RECORDS), tmp_path / "src", "jsonl", shards=1)
    prepare(src, tmp_path / "ds")
    fp = documents_fingerprint(open_documents(tmp_path / "ds"), 5)
    assert fp["count"] == 49 and sum(s["count"] for s in fp["shards"]) == 49
    assert fp["sha256"] == open_documents(tmp_path / "ds").content_digest() != fp["fit"]["sha256"]
