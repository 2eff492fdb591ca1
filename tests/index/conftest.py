"""Fixtures of the index tests (helpers are in `index_helpers`)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_ref(tiny_model_dir) -> tuple[str, tuple[str, str]]:
    """The tiny model folder and the (name, version) the tables record for it."""
    from pipelines.registry import resolve_model

    mref = resolve_model(str(tiny_model_dir))
    return str(tiny_model_dir), (mref.name, mref.version)
