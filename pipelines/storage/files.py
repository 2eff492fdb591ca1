"""Files and objects through one pyarrow filesystem per process and endpoint: read, write, list, delete.

Small files (configs, manifests, table parts, snapshots) go through here; image bytes go through
`objects`, which adds size limits, error reasons and retries.
"""

from __future__ import annotations

import os
import stat

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import aws
from .paths import StorageError, is_remote, normalize

_LOCAL = pafs.LocalFileSystem()


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, file:// or s3:// URI; cached per process."""
    uri = normalize(uri)
    if uri.startswith("s3://"):
        return aws.arrow_s3(), uri[len("s3://") :]
    if is_remote(uri):
        raise StorageError(f"unsupported URI scheme: {uri.split('://')[0]}://")
    return _LOCAL, uri


def read_bytes(uri: str) -> bytes:
    """All bytes of a file; FileNotFoundError when there is none."""
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(uri: str) -> str | None:
    """A small text file's content, or None when it does not exist."""
    try:
        return read_bytes(uri).decode("utf-8")
    except FileNotFoundError:
        return None


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object so that readers see all of it or nothing (S3 PUTs are atomic; local files are
    written under a hidden temporary name and renamed)."""
    fs, path = filesystem(uri)
    if fs is _LOCAL:
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _entries(uri: str, recursive: bool = False) -> tuple[str, str, list[pafs.FileInfo]]:
    """(uri without a trailing /, the path inside the filesystem, what is under it); none when absent."""
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    except FileNotFoundError:
        infos = []
    return normalize(uri).rstrip("/"), path.rstrip("/"), infos


def list_files(uri: str) -> list[tuple[str, int]]:
    """(uri, size) of the files directly under a folder / prefix, sorted; [] when it does not exist."""
    base, _, infos = _entries(uri)
    return sorted(
        (f"{base}/{info.base_name}", int(info.size or 0))
        for info in infos
        if info.type == pafs.FileType.File and not info.base_name.startswith(".")
    )


def delete_file(uri: str) -> None:
    """Remove a file or object; nothing when it is already gone."""
    _delete(uri, "delete_file")


def delete_dir(uri: str) -> None:
    """Remove a folder / prefix and all under it; nothing when it is already gone."""
    _delete(uri, "delete_dir")


def _delete(uri: str, how: str) -> None:
    fs, path = filesystem(uri)
    try:
        getattr(fs, how)(path)
    except FileNotFoundError:
        pass


TABLE_EXTENSIONS = (".parquet", ".pq", ".csv", ".csv.gz", ".tsv")
CSV_BLOCK_BYTES = 16 << 20  # pyarrow parses CSV in blocks: no line may be longer than this


def read_table(uri: str) -> pa.Table:
    """A Parquet or CSV file (by extension) as an Arrow table; CSV columns are read as strings.

    A file that is no such table (empty, binary, not UTF-8, not Parquet, a line over CSV_BLOCK_BYTES) is
    one StorageError line naming it, and the data row when it is known.
    """
    uri = normalize(uri)
    lower = uri.lower()
    if not lower.endswith(TABLE_EXTENSIONS):
        raise StorageError(f"unsupported table format (want .parquet or .csv): {uri}")
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise StorageError(f"not found: {uri}")
    if info.size == 0:
        raise StorageError(f"{uri} is empty (0 bytes): a table needs a header line and rows")
    parquet = lower.endswith((".parquet", ".pq"))
    try:
        if parquet:
            table = pq.read_table(path, filesystem=fs)
        else:
            parse = pacsv.ParseOptions(delimiter="\t" if lower.endswith(".tsv") else ",")
            read = pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES)
            with fs.open_input_stream(path, compression="detect") as f:
                header = pacsv.open_csv(f, read_options=read, parse_options=parse).schema.names
            # every column as the bytes written (then checked as UTF-8): no type guessing, so an id like
            # "007" stays "007" and a label "1e3" stays "1e3"
            as_bytes = pacsv.ConvertOptions(strings_can_be_null=False, column_types=dict.fromkeys(header, pa.binary()))
            with fs.open_input_stream(path, compression="detect") as f:
                table = pacsv.read_csv(f, read_options=read, parse_options=parse, convert_options=as_bytes)
        names = table.column_names  # decoded to str here: a header that is not UTF-8 fails now
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # pyarrow's: the file's fault
        raise StorageError(unreadable_table(uri, fs, path, e)) from None
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise StorageError(f"{uri}: column(s) {', '.join(printable(n, 40) for n in dup[:5])} appear twice")
    return table if parquet else _as_strings(table, uri)


def _as_strings(table: pa.Table, uri: str) -> pa.Table:
    columns = []
    for name, col in zip(table.column_names, table.columns, strict=True):
        try:
            columns.append(col.cast(pa.string()))
        except pa.ArrowInvalid:  # a column pyarrow read as bytes because a value is not UTF-8
            row, byte = first_non_utf8(col.combine_chunks())
            raise StorageError(
                f"{uri}: data row {row + 1}, column {printable(name, 40)}, is not UTF-8 text "
                f"(byte {byte:#04x}); save the file as UTF-8"
            ) from None
    return pa.table(columns, names=table.column_names)


def first_non_utf8(values: pa.Array) -> tuple[int, int]:
    """(index, first bad byte) of the first value that is not UTF-8 (only called once a cast failed)."""
    for i, value in enumerate(values.to_pylist()):
        try:
            if value is not None:
                value.decode("utf-8")
        except UnicodeDecodeError as e:
            return i, value[e.start]
    return 0, 0


def unreadable_table(label: str, fs, path: str, e: BaseException, block_bytes: int = CSV_BLOCK_BYTES) -> str:
    """One line for a pyarrow read / parse error of a table file (`label` names it): what is wrong with
    the file, not where pyarrow was."""
    parquet = path.lower().endswith((".parquet", ".pq"))
    kind = "Parquet" if parquet else "CSV"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "straddl" in text:
        why = f"a line longer than {block_bytes >> 20} MiB (a huge field, or an unclosed quote)"
    elif not parquet and _looks_binary(fs, path):
        why = "binary data, not CSV text"
    elif isinstance(e, UnicodeDecodeError):  # pyarrow decodes the column names to Python str
        why = "its header line is not UTF-8 text; save the file as UTF-8"
    else:
        why = printable(text, 200)
    return f"{label} is not a readable {kind} file: {why}"


def first_longer(column: pa.Array | pa.ChunkedArray, limit: int) -> tuple[int, int] | None:
    """(row, length) of the first string value longer than `limit` characters, or None."""
    lengths = pc.utf8_length(column)
    long = pc.fill_null(pc.greater(lengths, limit), False)
    if not pc.any(long).as_py():
        return None
    row = pc.index(long, True).as_py()
    return row, lengths[row].as_py()


def _looks_binary(fs, path: str) -> bool:
    try:
        with fs.open_input_stream(path, compression="detect") as f:
            return b"\x00" in f.read(4096)
    except (pa.ArrowException, OSError):
        return False


def printable(text: str, limit: int) -> str:
    """Text from a hostile file, fit for one line of a message: control characters escaped, cut short."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text)[: limit + 1])
    return out if len(out) <= limit else out[: limit - 3] + "..."


# ---- what a listing or a metadata request says of an object: (size, etag, mtime in epoch µs) --------------
#
# What `retag` compares to skip an unchanged image without downloading it. S3: size and ETag (the content's
# identity; LastModified only when a store sends no ETag, as it moves when identical bytes are uploaded
# again); local files: size and modification time (what rsync and make trust). Whole seconds for S3 times:
# a listing and a HEAD do not send them with the same precision.

ObjectMeta = tuple[int | None, str | None, int | None]
NO_META: ObjectMeta = (None, None, None)


def s3_meta(entry: dict) -> ObjectMeta:
    """From a ListObjectsV2 entry or a HeadObject response."""
    size = entry.get("Size", entry.get("ContentLength"))
    etag = (entry.get("ETag") or "").strip('"') or None
    modified = entry.get("LastModified")
    mtime = int(modified.timestamp()) * 1_000_000 if modified is not None and etag is None else None
    return (None if size is None else int(size)), etag, mtime


def local_meta(path: str) -> ObjectMeta:
    """os.stat of a file (links followed); nothing when it cannot be stat'ed or is no regular file."""
    try:
        info = os.stat(path)
    except OSError:
        return NO_META
    if not stat.S_ISREG(info.st_mode):
        return NO_META
    return info.st_size, None, info.st_mtime_ns // 1000


def object_meta(uri: str, roots: tuple[str, ...] | None = None) -> ObjectMeta:
    """One metadata request (S3 HEAD, or a local stat): no byte of the object is read. NO_META when it
    fails for any reason (the caller then reads the object, and that read says why), and for a local path
    outside `roots` (resolved folders, see `objects.confine`)."""
    uri = normalize(uri)
    if uri.startswith("s3://"):
        bucket, key = _bucket_key(uri)
        try:
            return s3_meta(aws.boto_s3().head_object(Bucket=bucket, Key=key))
        except Exception:  # any failure: the GET that follows has the retries and the reasons
            return NO_META
    if is_remote(uri):
        return NO_META
    real = os.path.realpath(uri)
    if roots is not None and not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
        return NO_META
    return local_meta(real)


# ---- listing a tree (vacuum) ----------------------------------------------------------------------------


def list_tree(uri: str) -> list[tuple[str, int, float]]:
    """(uri, size, mtime in epoch seconds) of every file under a folder / prefix, hidden ones included,
    sorted; [] when it does not exist."""
    base, root, infos = _entries(uri, recursive=True)
    out = [
        (f"{base}{info.path[len(root):]}", int(info.size or 0), info.mtime.timestamp() if info.mtime else 0.0)
        for info in infos
        if info.type == pafs.FileType.File and info.path.startswith(root)
    ]
    return sorted(out)


def list_dirs(uri: str) -> list[str]:
    """The folders (S3: common prefixes) directly under a folder / prefix, sorted."""
    base, _, infos = _entries(uri)
    return sorted(f"{base}/{i.base_name}" for i in infos if i.type == pafs.FileType.Directory)


def remove_empty_dir(uri: str) -> None:
    """A local folder left empty, and the empty folders in it (S3 has no folders: nothing to do)."""
    fs, path = filesystem(uri)
    if fs is _LOCAL:
        for folder, _, _ in [*os.walk(path, topdown=False)] or [(path, [], [])]:
            try:
                os.rmdir(folder)
            except OSError:  # not empty (someone wrote into it meanwhile) or already gone
                pass


# ---- conditional writes: one small object changed by one writer at a time (the run lease) ----------------
#
# S3: conditional PUT / DELETE (If-None-Match: *, If-Match: <ETag>), through the boto client of `aws`.
# Local disk: a hard link of a fully written temporary file creates a file only if absent (O_CREAT|O_EXCL
# where the filesystem has no hard links); a replace or delete compares the file's identity (inode,
# mtime, size) and swaps it under an exclusive flock on its folder. The token of a version is its ETag
# (S3) or that identity (local). Temporary files are written beside the folder, not in it, so that a
# concurrent removal of the folder (a run's staging after its commit) never finds a stranger in it.


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def _lost_race(exc: BaseException) -> bool:
    """An S3 precondition that did not hold: the object changed, exists, or is gone (or a concurrent
    conditional write is in flight: 409)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = str((response.get("Error") or {}).get("Code") or "")
    status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
        return True
    return code in ("NoSuchKey", "NotFound", "404") or (status == 404 and code != "NoSuchBucket")


def _local_token(st: os.stat_result) -> str:
    return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"


def _write_hidden(folder: str, name: str, data: bytes) -> str:
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _s3_if(operation: str, uri: str, **request) -> dict | None:
    """A conditional S3 request; its response, or None when its condition did not hold (lost a race)."""
    bucket, key = _bucket_key(uri)
    try:
        return getattr(aws.boto_s3(retrying=True), operation)(Bucket=bucket, Key=key, **request)
    except Exception as e:
        if _lost_race(e):
            return None
        raise


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create a file with this content unless one exists; True when this call created it. Of concurrent
    callers exactly one gets True, and a reader sees the whole content or no file."""
    uri = normalize(uri)
    if uri.startswith("s3://"):
        return _s3_if("put_object", uri, Body=data, IfNoneMatch="*") is not None
    _, path = filesystem(uri)
    folder, name = os.path.split(path)
    tmp = _write_hidden(_beside(folder), name, data)
    try:
        for _ in range(3):
            os.makedirs(folder, exist_ok=True)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            except FileNotFoundError:
                continue  # the folder was removed meanwhile: make it again
            except OSError:  # a filesystem without hard links
                return _create_excl(path, data)
        raise FileNotFoundError(path)
    finally:
        os.unlink(tmp)


def _beside(folder: str) -> str:
    return os.path.dirname(folder.rstrip("/")) or folder


def _create_excl(path: str, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def read_versioned(uri: str) -> tuple[bytes, str] | None:
    """(content, token of this version), or None when there is no such file."""
    uri = normalize(uri)
    if uri.startswith("s3://"):
        bucket, key = _bucket_key(uri)
        try:
            response = aws.boto_s3(retrying=True).get_object(Bucket=bucket, Key=key)
        except Exception as e:
            if _lost_race(e):
                return None
            raise
        with response["Body"] as body:
            return body.read(), str(response["ETag"])
    _, path = filesystem(uri)
    try:
        with open(path, "rb") as f:
            return f.read(), _local_token(os.fstat(f.fileno()))
    except FileNotFoundError:
        return None


class _FolderLock:
    """An exclusive flock on a local folder: the compare and the swap of a conditional write as one step."""

    def __init__(self, folder: str):
        self.folder = folder

    def __enter__(self) -> _FolderLock:
        import fcntl  # POSIX only; imported where a local conditional write needs it

        self.fd = os.open(self.folder, os.O_RDONLY)  # FileNotFoundError when the folder is gone
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # releases the lock


def replace_if_unchanged(uri: str, data: bytes, token: str) -> str | None:
    """Replace the file's content if it is still the version `token`; the new token, or None when the
    file changed or is gone."""
    uri = normalize(uri)
    if uri.startswith("s3://"):
        response = _s3_if("put_object", uri, Body=data, IfMatch=token)
        return None if response is None else str(response["ETag"])
    _, path = filesystem(uri)
    folder, name = os.path.split(path)
    try:
        with _FolderLock(folder):
            try:
                if _local_token(os.stat(path)) != token:
                    return None
            except FileNotFoundError:
                return None
            tmp = _write_hidden(_beside(folder), name, data)
            new = _local_token(os.stat(tmp))
            try:
                os.replace(tmp, path)
            except OSError:
                os.unlink(tmp)
                raise
            return new
    except FileNotFoundError:  # the folder itself is gone
        return None


def delete_if_unchanged(uri: str, token: str) -> bool:
    """Delete the file if it is still the version `token`; True when this call deleted it."""
    uri = normalize(uri)
    if uri.startswith("s3://"):
        return _s3_if("delete_object", uri, IfMatch=token) is not None
    _, path = filesystem(uri)
    try:
        with _FolderLock(os.path.dirname(path)):
            if _local_token(os.stat(path)) != token:
                return False
            os.unlink(path)
            return True
    except FileNotFoundError:
        return False
