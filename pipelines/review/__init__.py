"""The review queue for annotators (`mumic review`): `select` (which images, pure numpy), `queue` (read
`current`, write the annotations-format CSV), `sheet` (the HTML contact sheet) and `run` (all of it).

Reads the tables; writes no table.
"""

from ..lazy import exports

# exported lazily: `mumic review --help` loads no table reader, torch or PIL
_EXPORTS = {
    "select": ("Pick", "margins", "review_queue", "shortlist"),
    "queue": ("Candidates", "queue_table", "read_candidates", "write_csv"),
    "sheet": ("contact_sheet",),
    "run": ("ReviewError", "default_csv", "format_summary", "label_columns", "run_review", "sheet_uri"),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)

__getattr__ = exports(__name__, _EXPORTS)
