"""The search index: built beside the tables from `current`, updated in place when rows change, published
so that readers see all of a generation or none of it, and used by `mumic search` only while it reflects
`current` as it is (else an exact scan, with a note)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from index_helpers import DIM, clustered, vector_rows, write_current

from pipelines import index, tables
from pipelines.index import ann, store

MODEL = ("mumic", "7")


def _ids(hits):
    return [h["image_id"] for h in hits]


def assert_same_top_k(hits, exact, tol=3e-3):
    """The index's hits are the exact scan's, up to the order of images whose scores differ by less than
    float16 rounding (the index stores vectors as float16)."""
    assert len(hits) == len(exact)
    assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in exact], abs=tol)
    kth = exact[-1]["score"]
    differ = set(_ids(hits)) ^ set(_ids(exact))
    assert all(abs(h["score"] - kth) < tol for h in [*hits, *exact] if h["image_id"] in differ), differ


def test_index_is_built_beside_the_tables_and_records_the_current_version(tmp_path):
    vectors = clustered(300)
    rows = vector_rows(vectors)
    rows[0]["model"] = ("other", "1")  # embedded by another model: not in this model's index
    version = write_current(tmp_path, rows, MODEL)

    done = index.refresh(str(tmp_path), MODEL)

    assert done.rebuilt and done.added == 299
    folder = tmp_path / "_index" / "mumic" / "7"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["current_version"] == version and manifest["rows"] == 299 and manifest["dim"] == DIM
    assert manifest["rows_other_model"] == 1 and manifest["dtype"] == "f16"
    assert (folder / manifest["index_file"]).stat().st_size > 299 * DIM * 2  # f16 vectors + the graph
    mapping = store.read_mapping(str(tmp_path), manifest)
    assert sorted(mapping.column("image_id").to_pylist()) == [r["image_id"] for r in rows[1:]]
    assert index.indexed_models(str(tmp_path)) == [MODEL]
    assert index.refresh(str(tmp_path), MODEL).up_to_date  # nothing new in `current`: nothing written


def test_an_index_of_at_most_exact_up_to_vectors_is_searched_exactly_whatever_its_graph():
    # a graph built too sparse to find neighbours: its own answers are poor, the scan's are the exact ones
    vectors, queries = clustered(2000, seed=4), clustered(16, seed=5)
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    graph = ann.new_index(vectors.shape[1], ann.AnnParams(connectivity=2, expansion_add=4, expansion_search=10))
    ann.add(graph, np.arange(len(vectors)), vectors)
    assert len(vectors) <= ann.EXACT_UP_TO

    def recall(exact):
        keys, _ = ann.knn(graph, queries, 10, exact=exact)
        return np.mean([len(set(keys[i].tolist()) & set(truth[i].tolist())) / 10 for i in range(len(queries))])

    assert recall(exact=False) < 0.5  # the graph alone
    assert recall(exact=None) == 1.0  # the default at this size: every vector scanned


def test_search_through_the_index_returns_the_exact_scans_top_k(tmp_path):
    vectors = clustered(500, seed=1)
    write_current(tmp_path, vector_rows(vectors), MODEL)
    index.refresh(str(tmp_path), MODEL)
    queries = clustered(8, seed=2)
    for q in queries:
        searched, hits = index.search_index(str(tmp_path), q, 10, MODEL)
        exact_searched, exact = tables.search_embeddings(str(tmp_path), q, k=10, model=MODEL)
        assert_same_top_k(hits, exact)
        assert hits[0]["image_id"] == exact[0]["image_id"]
        assert hits[0]["uri"] == exact[0]["uri"] and hits[0]["labels"] == exact[0]["labels"] == ["red"]
        assert searched["rows"] == exact_searched["rows"] == 500


def test_an_update_after_changed_rows_removes_and_adds_only_those_rows(tmp_path):
    vectors = clustered(200, seed=3)
    rows = vector_rows(vectors)
    write_current(tmp_path, rows, MODEL)
    first = index.refresh(str(tmp_path), MODEL)
    gone, moved, renamed = rows[5], rows[6], rows[7]

    new_vector = clustered(1, seed=99)[0]
    moved = {**moved, "embedding": new_vector, "content_sha256": "f" * 64, "tags_version": 1}  # re-tagged bytes
    added = {"image_id": "z-new", "uri": "/data/z-new.jpg", "content_sha256": "e" * 64, "embedding": vectors[6]}
    renamed = {**renamed, "uri": "/data/moved-folder/v-00007.jpg"}  # listed elsewhere, same bytes
    changed = [r for r in rows if r["image_id"] not in {gone["image_id"], moved["image_id"], renamed["image_id"]}]
    version = write_current(tmp_path, [*changed, moved, added, renamed], MODEL)

    done = index.refresh(str(tmp_path), MODEL)

    assert not done.rebuilt and (done.added, done.removed) == (2, 2)  # moved (re-added) + new; moved + gone
    manifest = done.manifest
    assert manifest["current_version"] == version and manifest["rows"] == 200
    assert manifest["built_at"] == first.manifest["built_at"] and manifest["removed_since_build"] == 2
    mapping = {r["image_id"]: r for r in store.read_mapping(str(tmp_path), manifest).to_pylist()}
    assert gone["image_id"] not in mapping and "z-new" in mapping
    assert mapping[renamed["image_id"]]["uri"] == renamed["uri"]
    old = {r["image_id"]: r["key"] for r in store.read_mapping(str(tmp_path), first.manifest).to_pylist()}
    assert mapping[moved["image_id"]]["key"] != old[moved["image_id"]]
    assert mapping[rows[0]["image_id"]]["key"] == old[rows[0]["image_id"]]  # untouched rows keep their key

    _, hits = index.search_index(str(tmp_path), new_vector, 3, MODEL)
    assert hits[0]["image_id"] == moved["image_id"] and hits[0]["score"] == pytest.approx(1.0, abs=2e-3)
    _, hits = index.search_index(str(tmp_path), gone["embedding"], 20, MODEL)
    assert gone["image_id"] not in _ids(hits)
    _, exact = tables.search_embeddings(str(tmp_path), vectors[6], k=5, model=MODEL)
    _, hits = index.search_index(str(tmp_path), vectors[6], 5, MODEL)
    assert _ids(hits) == _ids(exact) and hits[0]["image_id"] == "z-new"  # the new row, at the old vector


def test_a_run_of_another_model_gives_a_new_manifest_without_rewriting_the_index(tmp_path):
    rows = vector_rows(clustered(50, seed=4))
    write_current(tmp_path, rows, MODEL)
    first = index.refresh(str(tmp_path), MODEL).manifest
    other = {"image_id": "o-1", "uri": "/data/o-1.jpg", "content_sha256": "d" * 64, "embedding": clustered(1)[0]}
    version = write_current(tmp_path, [*rows, {**other, "model": ("other", "2")}], MODEL)

    done = index.refresh(str(tmp_path), MODEL)

    assert (done.added, done.removed) == (0, 0)
    assert done.manifest["current_version"] == version and done.manifest["rows_other_model"] == 1
    assert (done.manifest["index_file"], done.manifest["keys_file"]) == (first["index_file"], first["keys_file"])


def test_too_many_changes_rebuild_the_index(tmp_path):
    rows = vector_rows(clustered(100, seed=5))
    write_current(tmp_path, rows, MODEL)
    index.refresh(str(tmp_path), MODEL)
    write_current(tmp_path, rows[:50], MODEL)  # half of the images left `current`
    done = index.refresh(str(tmp_path), MODEL)
    assert done.rebuilt and done.manifest["rows"] == 50 and done.manifest["removed_since_build"] == 0


def test_publishing_is_atomic_a_failed_manifest_write_leaves_the_old_generation_in_use(tmp_path, monkeypatch):
    vectors = clustered(120, seed=6)
    rows = vector_rows(vectors)
    write_current(tmp_path, rows, MODEL)
    old = index.refresh(str(tmp_path), MODEL).manifest
    write_current(tmp_path, rows[:110], MODEL)
    folder = tmp_path / "_index" / "mumic" / "7"
    real_write = store.storage.write_bytes

    def crash_on_manifest(uri, data):
        if uri.endswith("/manifest.json"):
            raise OSError("disk full")  # the crash lands between the new files and the manifest
        real_write(uri, data)

    monkeypatch.setattr(store.storage, "write_bytes", crash_on_manifest)
    with pytest.raises(OSError):
        index.refresh(str(tmp_path), MODEL)
    monkeypatch.setattr(store.storage, "write_bytes", real_write)

    assert index.read_manifest(str(tmp_path), MODEL) == old  # readers still see the whole old generation
    assert len(list(folder.glob("index-*.usearch"))) == 2  # the new generation's files, referenced by nothing
    with pytest.raises(index.IndexUnavailable, match="stale"):  # old, so not trusted for the new version
        index.search_index(str(tmp_path), vectors[0], 5, MODEL)

    monkeypatch.setattr(store, "KEEP_SECONDS", 0)
    write_current(tmp_path, rows[:100], MODEL)
    index.refresh(str(tmp_path), MODEL)  # publishes, and removes generations older than the previous one
    new = index.read_manifest(str(tmp_path), MODEL)
    assert new["rows"] == 100
    names = {p.name for p in folder.iterdir()}
    assert {new["index_file"], new["keys_file"], "manifest.json"} <= names
    assert len([n for n in names if n.startswith("index-")]) <= 2  # the current and the previous one
    _, hits = index.search_index(str(tmp_path), vectors[0], 1, MODEL)
    assert hits[0]["image_id"] == "v-00000"


def test_an_index_with_unreadable_files_is_not_used_and_is_rebuilt(tmp_path):
    rows = vector_rows(clustered(40, seed=7))
    write_current(tmp_path, rows, MODEL)
    manifest = index.refresh(str(tmp_path), MODEL).manifest
    (tmp_path / "_index" / "mumic" / "7" / manifest["keys_file"]).unlink()
    with pytest.raises(index.IndexUnavailable, match="cannot be read"):
        index.search_index(str(tmp_path), clustered(1)[0], 5, MODEL)
    write_current(tmp_path, rows[:39], MODEL)
    assert index.refresh(str(tmp_path), MODEL).rebuilt


def test_the_index_works_on_s3_outputs(s3_bucket):
    output = f"s3://{s3_bucket}/out"
    vectors = clustered(80, seed=8)
    write_current(output, vector_rows(vectors), MODEL)
    done = index.refresh(output, MODEL)
    assert done.rebuilt and index.indexed_models(output) == [MODEL]
    write_current(output, vector_rows(vectors[:79]), MODEL)
    assert index.refresh(output, MODEL).removed == 1
    _, hits = index.search_index(output, vectors[3], 3, MODEL)
    _, exact = tables.search_embeddings(output, vectors[3], k=3, model=MODEL)
    assert _ids(hits) == _ids(exact) and hits[0]["image_id"] == "v-00003"


def test_mumic_search_uses_a_fresh_index_falls_back_when_stale_and_scans_with_exact(tmp_path, tiny_ref, capsys):
    from jobs import cli

    folder, model = tiny_ref
    rows = vector_rows(clustered(300, seed=9))
    write_current(tmp_path, rows, model)
    args = ["search", "--output", str(tmp_path), "--model", folder, "--text", "red", "--k", "5", "--json"]

    def search(*extra):
        assert cli.main([*args, *extra]) == 0
        out = capsys.readouterr()
        return [json.loads(line)["image_id"] for line in out.out.splitlines()], out.err

    missing, err = search()
    assert "no search index" in err and "scanning every embedding" in err
    index.refresh(str(tmp_path), model)
    fresh, err = search()
    assert "scanning" not in err
    exact, err = search("--exact")
    assert "scanning" not in err and fresh == exact == missing and len(exact) == 5
    write_current(tmp_path, rows[:250], model)  # `current` moves on; the index is not updated
    stale, err = search()
    assert "stale" in err and err.count("\n") == 1
    assert stale == search("--exact")[0]


def test_index_command_builds_and_reports_one_line_errors(tmp_path, tiny_ref, capsys):
    from index_helpers import mumic

    from jobs import cli

    folder, model = tiny_ref
    for extra, say in (([], "no committed run"), (["--model", folder], "no current table")):
        assert cli.main(["index", "--output", str(tmp_path), *extra]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mumic: error:") and say in err, err
    write_current(tmp_path, vector_rows(clustered(30)), model)
    config = tmp_path / "job.yaml"
    config.write_text(f"output: {tmp_path}\nmodel: {folder}\nfull: true\n")
    r = mumic("index", "--config", str(config), "--json")  # its own process, checked by exit code
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["rebuilt"] and report["manifest"]["rows"] == 30
    assert "mumic index: " not in r.stdout  # progress goes to stderr


def test_index_help_says_where_it_lives(capsys):
    from jobs import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["index", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: mumic index" in out and "_index/" in out and "--full" in out


def test_search_help_offers_exact(capsys):
    from jobs import cli

    with pytest.raises(SystemExit):
        cli.main(["search", "--help"])
    assert "--exact" in capsys.readouterr().out


def test_knn_pads_missing_neighbours_and_vectors_round_trip():
    vectors = clustered(5, dim=8)
    idx = ann.new_index(8)
    ann.add(idx, np.arange(5, dtype=np.uint64), vectors)
    keys, sims = ann.knn(idx, vectors[:2], 10)
    assert keys.shape == (2, 5) and keys[0, 0] == 0 and sims[0, 0] == pytest.approx(1.0, abs=1e-3)
    assert np.allclose(ann.vectors(idx, np.array([3], np.uint64)), vectors[3], atol=2e-3)


def test_when_every_image_of_the_model_leaves_current_its_index_is_empty(tmp_path):
    rows = vector_rows(clustered(20, seed=10))
    write_current(tmp_path, rows, MODEL)
    index.refresh(str(tmp_path), MODEL)
    write_current(tmp_path, [{**r, "model": ("mumic", "8")} for r in rows], MODEL)  # re-tagged by version 8
    done = index.refresh(str(tmp_path), MODEL)
    assert done.manifest["rows"] == 0 and done.manifest["rows_other_model"] == 20
    searched, hits = index.search_index(str(tmp_path), rows[0]["embedding"], 5, MODEL)
    assert searched["rows"] == 0 and hits == []
    assert index.find_duplicates(str(tmp_path), MODEL, 0.9).table.num_rows == 0
