"""Search over millions: a nearest-neighbour index per model over the embeddings of `current`, kept beside
the tables (`store`), built and updated from `current` (`build`), searched (`search`), and used to find
near-duplicate images (`duplicates`, `sheet`). `ann` holds the library and its parameters."""

from .build import Refreshed, refresh, refresh_after_run
from .duplicates import Found, duplicates_uri, find_duplicates
from .search import search_index, usable_manifest
from .sheet import write_sheet
from .store import IndexUnavailable, index_dir, indexed_models, read_manifest

__all__ = [
    "Found",
    "IndexUnavailable",
    "Refreshed",
    "duplicates_uri",
    "find_duplicates",
    "index_dir",
    "indexed_models",
    "read_manifest",
    "refresh",
    "refresh_after_run",
    "search_index",
    "usable_manifest",
    "write_sheet",
]
