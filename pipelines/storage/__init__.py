"""Storage: where bytes live (local paths, file:// and s3:// URIs) and how they are read and written.

One layer for every room: `paths` (normalise, join, resolve), `aws` (the AWS settings, read once, and the
clients built from them), `files` (small files through pyarrow), `objects` (image reads: size limit,
typed reasons, one retry layer) and `redact` (no credential in any message).
"""

from .aws import delta_storage_options
from .files import (
    delete_dir,
    delete_file,
    exists,
    filesystem,
    list_files,
    read_bytes,
    read_table,
    read_text,
    write_bytes,
)
from .objects import (
    DEFAULT_MAX_BYTES,
    ReadFailed,
    RetryPolicy,
    confine,
    read_many,
    read_object,
    read_with_retries,
)
from .paths import StorageError, is_remote, join, normalize, parent, resolve
from .redact import redact

__all__ = [
    "DEFAULT_MAX_BYTES",
    "ReadFailed",
    "RetryPolicy",
    "StorageError",
    "confine",
    "delete_dir",
    "delete_file",
    "delta_storage_options",
    "exists",
    "filesystem",
    "is_remote",
    "join",
    "list_files",
    "normalize",
    "parent",
    "read_bytes",
    "read_many",
    "read_object",
    "read_table",
    "read_text",
    "read_with_retries",
    "redact",
    "resolve",
    "write_bytes",
]
