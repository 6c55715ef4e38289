"""Documents from JSONL and TFDS, `jaxinf prepare`, and the errors bad input gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from data_support import corpus_texts, documents_file, write_jsonl

from jaxinf import cli
from jaxinf.data.documents import Document, JsonlDocuments
from jaxinf.data.errors import DataError
from jaxinf.data.locations import UIntColumn
from jaxinf.data.prepare import prepare
from jaxinf.data.sources import open_documents

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- JSONL


def test_jsonl_fields_defaults_and_counts(tmp_path):
    path = tmp_path / "docs.jsonl"
    raw = (
        "\n".join(
            [
                json.dumps({"id": "a", "text": "first", "source": "wiki", "url": "u1", "meta": {"k": [1, 2]}}),
                "",  # blank line: skipped, counted
                json.dumps({"text": "no id, no source"}),  # id = line number 3, source "unknown"
                json.dumps({"id": 7, "text": "integer id", "source": "code"}),
                json.dumps({"id": "e", "text": "   \n ", "source": "wiki"}),  # empty: skipped, counted
                json.dumps({"id": "f", "text": "ünïcödé ✓", "source": "web"}),
            ]
        )
        + "\n"
    )
    path.write_bytes(b"\xef\xbb\xbf" + raw.replace("\n", "\r\n").encode("utf-8"))  # BOM and CRLF are fine
    docs = JsonlDocuments(path)
    assert len(docs) == 4
    assert list(docs) == [
        Document(0, "a", "first", "wiki", {"url": "u1", "meta": {"k": [1, 2]}}, 1),
        Document(1, "3", "no id, no source", "unknown", {}, 3),
        Document(2, "7", "integer id", "code", {}, 4),
        Document(3, "f", "ünïcödé ✓", "web", {}, 6),
    ]
    r = docs.report
    assert (r.documents, r.empty, r.blank_lines, r.default_ids, r.default_sources) == (4, 1, 1, 1, 1)
    assert r.summary() == (
        f"{path}: 4 documents, 1 empty documents skipped, 1 blank lines skipped, "
        '1 ids defaulted to the line number, 1 sources defaulted to "unknown"'
    )
    assert docs.texts([3, 0]) == ["ünïcödé ✓", "first"]
    assert docs[2].id == "7"


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"id": "x", "text": "a" "b"}', "docs.jsonl:2: invalid JSON (Expecting ',' delimiter, column 25)"),
        (b'{"id": "x", "source": "wiki"}', 'docs.jsonl:2: missing field "text"'),
        (b'{"id": "x", "text": 5}', 'docs.jsonl:2: field "text" must be a string, got int'),
        (b'{"id": "x", "text": null}', 'docs.jsonl:2: field "text" must be a string, got null'),
        (b'{"id": "x", "text": "caf\xe9"}', "docs.jsonl:2: invalid UTF-8 at byte 25"),
        (b'["text"]', "docs.jsonl:2: expected a JSON object, got list"),
        (b'{"id": 1.5, "text": "t"}', 'docs.jsonl:2: field "id" must be a string or an integer, got float'),
        (b'{"id": "x", "text": "t", "source": ["a"]}', 'docs.jsonl:2: field "source" must be a string, got list'),
        (b'{"id": "x", "text": "\\ud800"}', 'docs.jsonl:2: field "text" holds an unpaired surrogate at character 1'),
        (b'{"id": "d0", "text": "again"}', 'docs.jsonl:2: duplicate id "d0" (first at line 1)'),
        (  # json.loads kept the last "text" without a word
            b'{"id": "x", "text": "a", "source": "w", "text": "b"}',
            'docs.jsonl:2: field "text" appears twice (which one is meant?)',
        ),
        (
            b'{"id": "x", "text": "a", "meta": {"k": 1, "k": 2}}',
            'docs.jsonl:2: field "k" appears twice (which one is meant?)',
        ),
    ],
)
def test_jsonl_bad_input_names_file_and_line(tmp_path, monkeypatch, line, message):
    monkeypatch.chdir(tmp_path)
    write_jsonl(Path("docs.jsonl"), [{"id": "d0", "text": "ok"}, {}, {"id": "d2", "text": "ok"}], raw_lines={2: line})
    with pytest.raises(DataError) as e:
        JsonlDocuments("docs.jsonl")
    assert str(e.value) == message


def test_duplicate_ids_far_apart(tmp_path):
    recs = [{"id": f"d{i}", "text": "t"} for i in range(70000)] + [{"text": "no id"}, {"id": "70001", "text": "t"}]
    path = write_jsonl(tmp_path / "docs.jsonl", recs)
    with pytest.raises(DataError, match=rf'^{path}:70002: duplicate id "70001" \(first at line 70001\)$'):
        JsonlDocuments(path)


def test_jsonl_changed_after_indexing_is_an_error(tmp_path):
    path = documents_file(tmp_path / "docs.jsonl", 5)
    docs = JsonlDocuments(path)
    with open(path, "ab") as f:
        f.write(b'{"text": "appended"}\n')
    with pytest.raises(
        DataError,
        match="changed after it was indexed .*a jaxinf command: run it again; what the change affects is recomputed",
    ):
        docs.texts([0])


# --------------------------------------------------------------------------- prepare and TFDS


def test_prepare_round_trip(tmp_path):
    src = documents_file(tmp_path / "docs.jsonl", 300)
    with open(src, "ab") as f:  # an empty document and a blank line: skipped and counted in the dataset too
        f.write(b'{"id": "empty", "text": ""}\n\n{"text": "last one", "extra": {"deep": [1, "two"]}}\n')
    report = prepare(src, tmp_path / "ds")
    jsonl = JsonlDocuments(src)
    assert report == jsonl.report
    ds = open_documents(tmp_path / "ds")
    assert len(ds) == len(jsonl) == 301
    assert list(ds) == list(jsonl)
    assert ds[300] == Document(300, "303", "last one", "unknown", {"extra": {"deep": [1, "two"]}}, 303)
    assert (ds.report.empty, ds.report.blank_lines, ds.report.default_ids) == (1, 1, 1)
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl", "ds"]  # the temporary directory is gone
    meta = json.loads((tmp_path / "ds" / "metadata.json").read_text())
    assert meta["documents"] == 301 and len(meta["sha256"]) == 64

    # The same dataset found by name through tfds.data_source, in a TFDS data_dir layout.
    data_dir = tmp_path / "tfds_data"
    (data_dir / "jaxinf_documents").mkdir(parents=True)
    os.symlink(tmp_path / "ds", data_dir / "jaxinf_documents" / "1.0.0")
    by_name = open_documents("tfds:jaxinf_documents", data_dir=data_dir)
    assert by_name.texts([0, 299]) == jsonl.texts([0, 299])
    assert by_name.documents([5]) == jsonl.documents([5])


def test_prepare_streams_its_records_into_array_record_files_without_tensorflow(tmp_path, monkeypatch):
    """TFDS's own writer kept every record in memory up to 1 GB and then spilled them through TensorFlow's file
    API, which is not installed: a corpus over 1 GB failed with ModuleNotFoundError. A spill threshold of 0 makes
    that happen at any size; ``jaxinf prepare`` no longer goes through it, and starts a new file every
    ``SHARD_BYTES`` (here a few documents' worth), numbered as TFDS numbers them."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import shuffle

    from jaxinf.data import prepare as prepare_module

    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 0)
    monkeypatch.setattr(prepare_module, "SHARD_BYTES", 4000, raising=False)
    src = documents_file(tmp_path / "docs.jsonl", 120)
    prepare(src, tmp_path / "ds")
    files = sorted(p.name for p in (tmp_path / "ds").glob("*.array_record*"))
    n = len(files)
    assert n > 2 and files == [f"jaxinf_documents-train.array_record-{k:05d}-of-{n:05d}" for k in range(n)]
    jsonl, ds = JsonlDocuments(src), open_documents(tmp_path / "ds")
    assert list(ds) == list(jsonl)
    assert len(tfds.builder_from_directory(str(tmp_path / "ds")).as_data_source("train")) == 120


def test_prepare_keeps_out_dir_on_error_and_refuses_existing(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": f"doc {i}"} for i in range(50)], raw_lines={40: b'{"text": 1}'})
    with pytest.raises(DataError, match=r'bad\.jsonl:40: field "text" must be a string, got int'):
        prepare(bad, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    good = documents_file(tmp_path / "good.jsonl", 5)
    with pytest.raises(DataError, match="already exists and is not empty"):
        prepare(good, tmp_path / "full")
    assert os.listdir(tmp_path / "full") == ["keep.txt"]

    (tmp_path / "empty_dir").mkdir()
    prepare(good, tmp_path / "empty_dir")  # an existing empty directory is fine
    assert len(open_documents(tmp_path / "empty_dir")) == 5

    only_empty = write_jsonl(tmp_path / "nothing.jsonl", [{"text": ""}, {"text": " "}])
    with pytest.raises(DataError, match=r"nothing\.jsonl: no documents, 2 empty documents skipped"):
        prepare(only_empty, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_foreign_tfds_dataset(tmp_path):
    """A TFDS dataset not written by jaxinf: no id or source features, an empty text, other features kept."""
    import tensorflow_datasets as tfds

    texts = ["alpha", "", "gamma", "delta"]

    class Foreign(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("0.1.0")
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                disable_shuffling=True,
                features=tfds.features.FeaturesDict(
                    {"text": tfds.features.Text(), "year": tfds.features.Scalar(np.int64)}
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, t in enumerate(texts):
                yield i, {"text": t, "year": 2000 + i}

    b = Foreign(data_dir=str(tmp_path / "data"), file_format="array_record")
    b.download_and_prepare(download_dir=str(tmp_path / "dl"))
    docs = open_documents(b.data_dir)
    assert list(docs) == [
        Document(0, "0", "alpha", "unknown", {"year": 2000}, 0),
        Document(1, "2", "gamma", "unknown", {"year": 2002}, 2),
        Document(2, "3", "delta", "unknown", {"year": 2003}, 3),
    ]
    assert (docs.report.documents, docs.report.empty, docs.report.default_ids) == (3, 1, 3)
    with pytest.raises(DataError, match='no split "test"'):
        open_documents(b.data_dir, split="test")


def test_open_documents_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        open_documents(tmp_path / "missing.jsonl")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DataError, match="no JSONL, Parquet or Arrow files in the directory"):
        open_documents(tmp_path / "plain_dir")
    with pytest.raises(DataError, match="^tfds:no_such_dataset_xyz: "):
        open_documents("tfds:no_such_dataset_xyz", data_dir=tmp_path)


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    "line, message",
    [
        (
            b'{"id": "x", "text": "a",}',
            "docs.jsonl:3: invalid JSON (Expecting property name enclosed in double quotes, column 25)",
        ),
        (b'{"id": "x"}', 'docs.jsonl:3: missing field "text"'),
        (b'{"id": "x", "text": {"a": 1}}', 'docs.jsonl:3: field "text" must be a string, got object'),
        (b'{"id": "x", "text": "\xff"}', "docs.jsonl:3: invalid UTF-8 at byte 22"),
    ],
)
def test_cli_prepare_bad_input_is_one_line(tmp_path, monkeypatch, capsys, line, message):
    monkeypatch.chdir(tmp_path)
    write_jsonl(Path("docs.jsonl"), [{"text": "a"}, {"text": "b"}, {}], raw_lines={3: line})
    assert cli.main(["prepare", "docs.jsonl", "out"]) == 2
    out, err = capsys.readouterr()
    assert err == f"jaxinf prepare: error: {message}\n"
    assert out == ""
    assert os.listdir(".") == ["docs.jsonl"]


def test_cli_prepare_counts_empty_documents(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_jsonl(Path("docs.jsonl"), [{"text": "a"}, {"id": "z", "text": ""}, {"text": "c", "source": "s"}])
    assert cli.main(["prepare", "docs.jsonl", "out"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == (
        "docs.jsonl: 2 documents, 1 empty documents skipped, "
        '2 ids defaulted to the line number, 1 sources defaulted to "unknown"'
    )
    assert [d.id for d in open_documents("out")] == ["1", "3"]


def test_cli_round_trip_without_tensorflow(tmp_path):
    """JSONL -> `jaxinf prepare` (a subprocess) -> tfds data source, in a process that never imports TensorFlow."""
    src = tmp_path / "docs.jsonl"
    texts = corpus_texts(40) + ["ünïcödé\tand\nnewlines"]
    write_jsonl(src, [{"id": f"d{i}", "text": t, "source": f"s{i % 4}", "x": [i]} for i, t in enumerate(texts)])
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"text": 3}])
    script = textwrap.dedent(f"""
        import json, sys
        from jaxinf import cli
        assert cli.main(["prepare", {str(src)!r}, {str(tmp_path / "ds")!r}]) == 0
        import tensorflow_datasets as tfds
        ds = tfds.builder_from_directory({str(tmp_path / "ds")!r}).as_data_source(split="train")
        rows = [ds[i] for i in range(len(ds))]
        got = [(r["id"].decode(), r["text"].decode(), r["source"].decode(), json.loads(r["extra"].decode()))
               for r in rows]
        print(json.dumps(got))
        print("tensorflow imported:", "tensorflow" in sys.modules, file=sys.stderr)
        assert "tensorflow" not in sys.modules
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.splitlines()[-1])
    assert got == [[f"d{i}", t, f"s{i % 4}", {"x": [i]}] for i, t in enumerate(texts)]

    cmd = subprocess.run(
        [sys.executable, "-m", "jaxinf", "prepare", "bad.jsonl", "ds2"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert cmd.returncode == 2
    assert cmd.stderr == 'jaxinf prepare: error: bad.jsonl:2: field "text" must be a string, got int\n'
    assert not (tmp_path / "ds2").exists()

    # The same input prepared again, in another process, gives the same files (the records' features serialized in
    # key order; they came in a per-process hash order before), so the dataset's content digest, and a run's
    # fingerprint of it, do not change.
    again = subprocess.run(
        [sys.executable, "-m", "jaxinf", "-q", "prepare", "docs.jsonl", "ds3"], env=env, cwd=tmp_path
    )
    assert again.returncode == 0
    files = [json.loads((tmp_path / d / "metadata.json").read_text())["files"] for d in ("ds", "ds3")]
    assert files[0] == files[1]


def test_a_location_column_takes_four_bytes_a_value_until_one_needs_eight():
    column = UIntColumn()
    for v in (0, 1, 2**32 - 1):
        column.append(v)
    assert column.to_numpy().dtype == np.uint32
    column.append(2**32)
    values = column.to_numpy()
    assert values.dtype == np.uint64 and values.tolist() == [0, 1, 2**32 - 1, 2**32]
    with pytest.raises(OverflowError):
        column.append(-1)


@pytest.mark.parametrize("layout", ["one file", "four shards"])
def test_the_validating_scan_keeps_no_python_object_per_document(tmp_path, layout):
    """Peak memory the scan allocates (tracemalloc, which counts NumPy's and array's buffers), per document: the
    locations' 20 bytes and an 8-byte id hash (30 with the arrays' room to grow). A Python list of offsets, or
    three copies of the id hashes, is far more: before the locations, the single-file scan took 149 bytes a
    document and the sharded one 70."""
    import tracemalloc

    n, shards = 200_000, 1 if layout == "one file" else 4
    root = tmp_path / "corpus"
    root.mkdir()
    for k in range(shards):
        with open(root / f"part-{k}.jsonl", "w") as f:
            for i in range(k, n, shards):
                f.write(f'{{"id": "d{i}", "text": "document {i}"}}\n')
    spec = root / "part-0.jsonl" if shards == 1 else root
    tracemalloc.start()
    try:
        docs = open_documents(spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(docs) == n and docs.texts([n - 1]) == [f"document {n - 1}"]  # the last shard's last line, too
    assert peak / n < 40, f"{peak / n:.0f} bytes a document"
