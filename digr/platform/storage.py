"""One way to read and write artifacts, on a local folder or `s3://` (pyarrow's filesystems).

Every stage writes through these functions, so a run directory can be a local path in CI
and an S3 prefix on a cluster with no change to stage code.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join path parts; keeps the `s3://` scheme intact."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def absolute(uri: str) -> str:
    """Local paths become absolute (Ray workers may run in another working directory)."""
    return uri if is_remote(uri) else os.path.abspath(uri)


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str, suffix: str = "") -> list[str]:
    """The files directly under folder `uri` whose names end in `suffix`, sorted, as URIs
    (local paths or s3://...); [] when the folder does not exist."""
    fs, path = _fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    names = sorted(f.base_name for f in fs.get_file_info(pafs.FileSelector(path))
                   if f.type == pafs.FileType.File and f.base_name.endswith(suffix))
    return [join(uri, n) for n in names]


def makedirs(uri: str) -> None:
    fs, path = _fs(uri)
    fs.create_dir(path, recursive=True)


def delete_dir(uri: str) -> None:
    fs, path = _fs(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def delete_file(uri: str) -> None:
    fs, path = _fs(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if is_remote(uri) else os.path.dirname(os.path.abspath(uri))


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically where the filesystem allows it (local: write a temp file, rename)."""
    fs, path = _fs(uri)
    fs.create_dir(_parent(path) if not is_remote(uri) else path.rsplit("/", 1)[0], recursive=True)
    if is_remote(uri):  # S3 object puts are atomic already
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_bytes(uri: str) -> bytes:
    fs, path = _fs(uri)
    with fs.open_input_file(path) as f:
        return f.read()


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def write_table(uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(uri, buf.getvalue())


def read_table(uri: str) -> pa.Table:
    fs, path = _fs(uri)
    return pq.read_table(path, filesystem=fs)
