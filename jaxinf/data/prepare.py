"""``jaxinf prepare``: documents (a JSONL file, or a file, directory or glob of JSONL, gzip/zstd JSONL, Parquet or
Arrow shards) to a TFDS array_record dataset directory.

The dataset has one split, ``train``, in the input's order (TFDS shuffling is
off), with the features ``id``, ``text``, ``source`` (text), ``extra`` (the
other fields of the line, as a JSON object in text) and ``line`` (the 1-based
line, or row, within its file). Its ``metadata.json`` records what was skipped and
defaulted (the counts of :class:`~jaxinf.data.documents.ReadReport`) and the
input's SHA-256, so a reader reports them too. Read it back with
:func:`jaxinf.data.sources.open_documents` (``data.documents: OUT_DIR``), or
with TFDS itself: ``tfds.builder_from_directory(OUT_DIR).as_data_source("train")``.

Nothing already there is lost: the dataset is written in a temporary
directory beside ``OUT_DIR`` and renamed to it only when complete and valid;
an ``OUT_DIR`` that exists and is not empty is refused. The records are streamed
into array_record files of at most :data:`SHARD_BYTES` (memory: one document,
whatever the corpus); TensorFlow is never imported.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxinf.atomic import LockFailed, building_dir, file_sha256
from jaxinf.data.documents import ReadReport, iter_documents, iter_jsonl_documents
from jaxinf.data.errors import DataError
from jaxinf.data.shard_files import shard_format
from jaxinf.data.sources import open_documents
from jaxinf.data.tfds_documents import PREPARED_MARK
from jaxinf.faults import fault_point

BUILDER_NAME = "jaxinf_documents"
DATASET_VERSION = "1.0.0"


def _builder_class():
    import tensorflow_datasets as tfds

    class JaxinfDocuments(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Documents of one JSONL file, in file order."""

        name = BUILDER_NAME
        VERSION = tfds.core.Version(DATASET_VERSION)
        RELEASE_NOTES = {DATASET_VERSION: "Written by jaxinf prepare."}
        # No source files beside the class (checksums, dataset card). Saying so also keeps TFDS 4.9 off a
        # code path that imports `importlib_resources`, which it declares only for Python < 3.9.
        code_path = None

        def __init__(self, *, input_path: str, source: Any = None, **kwargs):
            self._input_path = input_path
            self._source = source  # an opened corpus of shards (validated), or None for one JSONL file
            self.read_report = source.report if source is not None else ReadReport(input_path)
            self.data_error: DataError | None = None
            self._jaxinf_metadata = tfds.core.MetadataDict(writer=PREPARED_MARK, input=os.path.basename(input_path))
            super().__init__(**kwargs)

        def _info(self):
            text = tfds.features.Text()
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Documents of {os.path.basename(self._input_path)}, written by jaxinf prepare.",
                features=tfds.features.FeaturesDict(
                    {
                        "id": text,
                        "text": text,
                        "source": text,
                        "extra": text,
                        "line": tfds.features.Scalar(np.int64),
                    }
                ),
                disable_shuffling=True,
                metadata=self._jaxinf_metadata,
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            try:
                records = (
                    iter_jsonl_documents(self._input_path, self.read_report)
                    if self._source is None
                    else ((0, 0, vars(d)) for d in iter_documents(self._source))
                )
                for i, (_, _, rec) in enumerate(records):
                    yield (
                        i,
                        {
                            "id": rec["id"],
                            "text": rec["text"],
                            "source": rec["source"],
                            "extra": json.dumps(rec["extra"], ensure_ascii=False, default=str),
                            "line": rec["line"],
                        },
                    )
            except DataError as e:
                self.data_error = e  # kept so the caller re-raises it as it is, whatever TFDS wraps it in
                raise
            r = self.read_report
            if r.documents == 0:
                self.data_error = DataError(r.summary().replace(": 0 documents", ": no documents", 1))
                raise self.data_error
            self._jaxinf_metadata.update(
                empty=r.empty,
                blank_lines=r.blank_lines,
                default_ids=r.default_ids,
                default_sources=r.default_sources,
                documents=r.documents,
            )

    return JaxinfDocuments


@contextlib.contextmanager
def _quiet_tfds():
    """TFDS prints a banner to stdout and draws progress bars; the command line reports its own summary."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.utils import tqdm_utils

    before = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tfds.display_progress_bar(before)


SHARD_BYTES = 1 << 30
"""The serialized size after which :func:`_write_train_split` starts a new array_record file."""


def _write_train_split(builder) -> None:
    """Writes the builder's examples as its ``train`` split and its dataset info, streaming.

    Each example is encoded, serialized and appended to the current array_record file, a new file every
    :data:`SHARD_BYTES` bytes of records; at the end the files take TFDS's names (``NAME-train.array_record-K-of-N``)
    and ``dataset_info.json``, ``features.json`` and ``metadata.json`` are written. Memory is one example whatever
    the corpus: TFDS's own writer (``download_and_prepare``) keeps every record in memory up to 1 GB and then
    spills them through TensorFlow's file API, which jaxinf does not install, so a corpus of more than 1 GB
    failed there. Each record is serialized deterministically (its features in key order, not in the order of a
    hash table seeded per process), so the same input prepared twice gives the same files, the same content
    digest, and a run on it reuses what it computed."""
    from array_record.python import array_record_module
    from tensorflow_datasets.core import example_serializer, naming
    from tensorflow_datasets.core import splits as splits_lib

    features = builder.info.features
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    out = Path(builder.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    lengths: list[int] = []
    sizes: list[int] = []
    writer = None
    try:
        for _, example in builder._generate_examples():
            if writer is None or sizes[-1] >= SHARD_BYTES:
                if writer is not None:
                    writer.close()
                paths.append(out / f".records-{len(paths)}")
                writer = array_record_module.ArrayRecordWriter(str(paths[-1]), "group_size:1")
                lengths.append(0)
                sizes.append(0)
            record = serializer.get_tf_example(features.encode_example(example)).SerializeToString(deterministic=True)
            writer.write(record)
            lengths[-1] += 1
            sizes[-1] += len(record)
    finally:
        if writer is not None:
            writer.close()
    template = naming.ShardedFileTemplate(
        data_dir=out, dataset_name=builder.name, split="train", filetype_suffix="array_record"
    )
    for k, path in enumerate(paths):
        os.rename(path, template.sharded_filepath(shard_index=k, num_shards=len(paths)))
    split = splits_lib.SplitInfo(name="train", shard_lengths=lengths, num_bytes=sum(sizes), filename_template=template)
    builder.info.set_splits(splits_lib.SplitDict([split]))
    builder.info.write_to_directory(out)


def prepare(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    text_field: str = "text",
    id_field: str = "id",
    source_field: str = "source",
) -> ReadReport:
    """Writes the documents of ``input_path`` as a TFDS array_record dataset in ``out_dir``.

    ``input_path`` is anything ``data.documents`` accepts but a TFDS dataset: one JSONL file, or a file,
    directory or glob of JSONL, compressed JSONL, Parquet or Arrow shards (validated by one scan first,
    :class:`~jaxinf.data.shards.ShardedDocuments`, with the given field names).

    Guarantees: the dataset holds exactly the documents :func:`~jaxinf.data.sources.open_documents` reads
    from the same input, in the same order, with the same ids, sources, extra fields and lines (of their
    shard); on any error (a :class:`DataError` naming file and line, or anything else) ``out_dir``
    is left as it was. Returns the counts of what was kept, skipped and defaulted.
    """
    input_path, out = str(input_path), Path(out_dir)
    if os.path.realpath(out) == os.path.realpath(os.getcwd()):  # "." failed its final rename (EBUSY, a traceback
        raise DataError(  # after every document was converted); by another name, the dataset replaced the directory
            f"{out}: is the working directory, which the finished dataset would replace (leaving the shell in a "
            "removed directory); give a new directory's path; nothing was written"
        )
    p = Path(input_path)
    one_jsonl = (
        p.is_file()
        and (id_field, text_field, source_field) == ("id", "text", "source")
        and shard_format(p) in (None, ("jsonl", None))
    )
    if not one_jsonl and not p.exists() and not any(c in input_path for c in "*?["):
        raise DataError(f"{input_path}: no such file")
    if p.is_dir() and Path(os.path.realpath(p)) in (Path(os.path.realpath(out)), *Path(os.path.realpath(out)).parents):
        raise DataError(  # its files are listed recursively: the next read of INPUT would take the dataset's for shards
            f"{out}: is inside the input directory {input_path}; choose an OUT_DIR outside it; nothing was written"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: already exists and is not empty; nothing was written")
    if out.is_symlink() and not out.exists():  # dangling or a loop: the final rename would fail
        raise DataError(
            f"{out}: is a symbolic link to {os.readlink(out)}, which does not resolve to a directory; "
            "nothing was written"
        )
    if out.is_symlink():  # a link to an empty directory: the dataset goes there (a rename would replace the link)
        out = Path(os.path.realpath(out))

    def busy(holder: str) -> DataError:
        return DataError(
            f"{out}: being prepared by another jaxinf prepare ({holder}); wait for it to finish or stop it, or "
            "choose another OUT_DIR; nothing was written"
        )

    with contextlib.ExitStack() as stack:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            # one prepare of OUT at a time (a lock beside it); what a killed one left beside OUT is removed first
            tmp = stack.enter_context(building_dir(f".{out.name}.prepare-", out.parent, busy, out))
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
                raise  # the machine refused a write: one line, exit 3 (jaxinf.cli)
            where = e.filename if isinstance(e, LockFailed) else out  # the lock file beside OUT
            raise DataError(
                f"{where}: cannot create the dataset directory ({e.strerror}); nothing was written"
            ) from None
        return _prepare_into(tmp, out, input_path, p, one_jsonl, text_field, id_field, source_field)


def _prepare_into(
    tmp: Path, out: Path, input_path: str, p: Path, one_jsonl: bool, text_field: str, id_field: str, source_field: str
) -> ReadReport:
    """The dataset built in ``tmp`` and renamed to ``out`` (:func:`prepare`)."""
    source = None
    if not one_jsonl:
        if p.is_dir() and (p / "dataset_info.json").is_file() and not (p / "state.json").is_file():
            raise DataError(f"{input_path}: already a TFDS dataset; nothing to prepare")
        source = open_documents(input_path, text_field=text_field, id_field=id_field, source_field=source_field)
    builder = _builder_class()(
        input_path=input_path, source=source, data_dir=str(tmp / "data"), file_format="array_record"
    )
    # every reader open_documents returns has content_digest; DocumentSource (what batching needs) does not say so
    builder._jaxinf_metadata["sha256"] = file_sha256(input_path) if source is None else source.content_digest()  # type: ignore[attr-defined]
    with _quiet_tfds():
        _write_train_split(builder)
    built = Path(builder.data_dir)
    # the SHA-256 of each record file, checked when the dataset is opened: a copy cut short or a flipped byte
    # is named there, rather than read as null or other text (its records are not scanned when opened)
    meta = json.loads((built / "metadata.json").read_text())
    meta["files"] = {f.name: file_sha256(f) for f in sorted(built.glob("*.array_record*"))}
    (built / "metadata.json").write_text(json.dumps(meta))
    fault_point("prepare", 0)  # the dataset whole in its temporary directory, not yet in place
    try:
        os.rename(built, out)  # replaces an empty directory, never one another process has filled meanwhile
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
        raise DataError(f"{out}: written by another process meanwhile (no longer empty); nothing was written") from None
    return builder.read_report
