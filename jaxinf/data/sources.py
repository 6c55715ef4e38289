"""``data.documents`` to a document source: the one place that picks a reader by what the setting names.

Above every reader (:mod:`jaxinf.data.documents`, :mod:`jaxinf.data.tfds_documents`,
:mod:`jaxinf.data.shards`), so none of them imports another to dispatch.
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxinf.data.documents import DEFAULT_FIELDS, DocumentSource, JsonlDocuments
from jaxinf.data.errors import DataError
from jaxinf.data.shard_files import is_glob, shard_format
from jaxinf.data.shards import ShardedDocuments
from jaxinf.data.tfds_documents import open_tfds_directory, open_tfds_name


def open_documents(
    spec: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    text_field: str = "text",
    id_field: str = "id",
    source_field: str = "source",
    dedupe: str = "none",
) -> DocumentSource:
    """The document source ``data.documents`` names.

    - a directory holding ``dataset_info.json`` but no ``state.json`` (what ``jaxinf prepare`` writes): a TFDS
      dataset directory;
    - ``tfds:NAME`` (``NAME[/CONFIG][:VERSION]``): a TFDS dataset found by name in ``data_dir``;
    - one plain JSONL file with the default field names: :class:`JsonlDocuments`;
    - any other file, directory or glob of JSONL, gzip/zstd JSONL, Parquet or Arrow shards (a ``datasets``
      ``save_to_disk`` directory too): :class:`jaxinf.data.shards.ShardedDocuments`.

    ``text_field``, ``id_field`` and ``source_field`` (``data.text_field`` ...) name the columns. ``dedupe``
    (``data.dedupe``): ``exact`` skips documents whose text equals an earlier one's (counted in the report);
    not for TFDS datasets.
    """
    spec = str(spec)
    fields = (id_field, text_field, source_field)
    p = Path(spec)
    tfds_dir = p.is_dir() and (p / "dataset_info.json").is_file() and not (p / "state.json").is_file()
    if dedupe != "none" and (spec.startswith("tfds:") or tfds_dir):
        raise DataError(
            f"{spec}: data.dedupe={dedupe} is not supported for TFDS datasets (de-duplicate the JSONL, "
            "Parquet or Arrow shards instead)"
        )
    if spec.startswith("tfds:"):
        return open_tfds_name(spec[len("tfds:") :], data_dir, split, fields)
    if tfds_dir:
        return open_tfds_directory(p, split, fields)
    if p.is_file() and fields == DEFAULT_FIELDS and dedupe == "none" and shard_format(p) in (None, ("jsonl", None)):
        return JsonlDocuments(p)
    if p.exists() or is_glob(spec):
        return ShardedDocuments(
            spec, text_field=text_field, id_field=id_field, source_field=source_field, dedupe=dedupe
        )
    raise DataError(
        f"{spec}: no such file or directory (documents are a JSONL, Parquet or Arrow file, a directory "
        "or glob of them, a TFDS dataset directory or tfds:NAME)"
    )
