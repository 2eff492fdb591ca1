"""`mumic drift` on real tables: runs committed through the retag's own writers (staged parts, the one
`tags` commit, the `runs` row, the `current` merge) with planted scores, and one end-to-end check on real
retag runs of generated images. A planted rate change is flagged; an unchanged re-run flags nothing."""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from jobs import cli
from mumic_core import checkpoint, synthetic
from pipelines.drift import DriftError, run_drift
from pipelines.registry import resolve_model
from pipelines.retag.commit import commit_run, ensure_run_row
from pipelines.retag.current import RunFacts, update_current
from pipelines.retag.staging import PartWriter, RunStaging
from pipelines.tables import FLOATS_TYPE, LABELS_TYPE, UTC_TS

NAMES = list(synthetic.LABELS)  # red, green, blue, yellow, striped object, ...
CUTS = {"red": 0.7}  # the saved model's own thresholds: 0.8 for every other label
DOC = Path(__file__).resolve().parents[2] / "docs" / "output-tables.md"


@pytest.fixture(autouse=True)
def no_default_registry(tmp_path, monkeypatch):
    """No registry unless a test makes one: the default store would be an mlflow.db in a fresh folder."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MUMIC_WORKDIR", str(tmp_path))


@pytest.fixture(scope="module")
def model(tiny_model_untrained, tmp_path_factory):
    """A saved model whose thresholds are not the fallback's 0.5, and the (name, version) its rows carry."""
    m = copy.deepcopy(tiny_model_untrained)
    m.set_thresholds([CUTS.get(n, 0.8) for n in m.taxonomy.names])
    folder = tmp_path_factory.mktemp("drift-model") / "tiny-drift"
    checkpoint.save(m, folder)
    ref = resolve_model(str(folder))
    return str(folder), (ref.name, ref.version)


def scores(rng, n: int, skew: dict[str, float] | None = None) -> np.ndarray:
    """[n, labels] uniform scores; `skew` raises a label's: u ** power (power < 1 pushes scores up)."""
    s = rng.random((n, len(NAMES)), dtype=np.float32)
    for name, power in (skew or {}).items():
        s[:, NAMES.index(name)] **= power
    return s


def embeddings(rng, n: int, offset: float = 0.0) -> np.ndarray:
    e = rng.normal(size=(n, 16)).astype(np.float32)
    e[:, 0] += offset
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def commit(output, run_id, model, ids, s=None, e=None, skipped=(), names=NAMES, date="2026-03-01"):
    """Commit a run the way `mumic retag` does: tagged rows `ids` (scores s [n, C], embeddings e [n, D])
    and `skipped` ids (unchanged bytes, already tagged by this model): staged parts, one `tags` commit,
    the `runs` row, the `current` merge."""
    staging = RunStaging(str(output), run_id)
    constants = {"model_name": model[0], "model_version": model[1], "taxonomy_sha256": "t", "run_id": run_id}
    writer = PartWriter(staging, date, constants, rows_per_part=10_000)
    now, n = dt.datetime.now(dt.UTC), len(ids)
    if n:
        writer.add(pa.table({
            "image_id": ids, "uri": [f"/c/{i}.jpg" for i in ids], "content_sha256": [f"sha-{i}" for i in ids],
            "status": ["ok"] * n, "error": pa.nulls(n, pa.string()),
            "labels": pa.array([[{"label": names[int(np.argmax(r))], "score": float(r.max())}] for r in s], LABELS_TYPE),
            "scores": pa.array(s.tolist(), FLOATS_TYPE), "embedding": pa.array(e.tolist(), FLOATS_TYPE),
            "processed_at": pa.array([now] * n, UTC_TS),
        }))
    if skipped:
        k = len(skipped)
        writer.add(pa.table({"image_id": list(skipped), "uri": [f"/c/{i}.jpg" for i in skipped],
                             "content_sha256": [f"sha-{i}" for i in skipped], "status": ["skipped"] * k}))
    writer.flush()
    row = {"run_id": run_id, "run_date": date, "started_at": now.isoformat(),
           "finished_at": dt.datetime.now(dt.UTC).isoformat(), "model_name": model[0], "model_version": model[1],
           "taxonomy": json.dumps(names), "catalog": "catalog.parquet", "rows_ok": n, "rows_error": 0,
           "rows_skipped": len(skipped)}
    version = commit_run(staging.tags_uri, run_id, date, writer.parts, row)
    ensure_run_row(str(output / "runs"), row)
    update_current(str(output), RunFacts(run_id, date, version, model[0], model[1], now), writer.parts)
    staging.cleanup()


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


@pytest.fixture(scope="module")
def history(model, tmp_path_factory):
    """run-a: 800 images; run-b: 400 new images, many more of them red; run-c: the catalog again, nothing
    changed (every image skipped); run-d: 800 other images of run-a's kind, tagged afresh."""
    _, mv = model
    out = tmp_path_factory.mktemp("drift") / "out"
    rng = np.random.default_rng(7)
    a_scores = scores(rng, 800)
    commit(out, "run-a", mv, ids("a", 800), a_scores, embeddings(rng, 800))
    b_scores = scores(rng, 400, skew={"red": 0.25})
    commit(out, "run-b", mv, ids("b", 400), b_scores, embeddings(rng, 400, offset=1.5), skipped=ids("a", 800))
    commit(out, "run-c", mv, [], skipped=ids("a", 800) + ids("b", 400))
    commit(out, "run-d", mv, ids("d", 800), scores(rng, 800), embeddings(rng, 800))
    return out, a_scores, b_scores


def by_label(drift) -> dict[str, dict]:
    return {r["label"]: r for r in drift.labels}


def test_drift_flags_the_planted_red_rate_change_and_no_other_label(history, model):
    out, a_scores, b_scores = history
    folder, _ = model
    drift = run_drift(str(out), "run-a", "run-b", models=[folder], progress=False)
    rows = by_label(drift)
    assert [n for n, r in rows.items() if r["flagged"]] == ["red"]
    red = rows["red"]
    # the model's own threshold for red (0.7), over the catalog as each run left it (current: a, then a + b)
    want_from = int((a_scores[:, 0] >= 0.7).sum())
    want_to = want_from + int((b_scores[:, 0] >= 0.7).sum())
    assert (red["images_from"], red["above_from"], red["images_to"], red["above_to"]) == (800, want_from, 1200, want_to)
    assert red["rate_to"] - red["rate_from"] == pytest.approx(red["change"]) and red["change"] > 0.1
    assert red["threshold_source"] == "model" and red["q_value"] < 1e-6
    assert rows["green"]["above_from"] == int((a_scores[:, 1] >= 0.8).sum())
    assert drift.summary["centroid_shift"] > 0.05 and not drift.warnings
    assert (drift.summary["rows_from"], drift.summary["rows_to"]) == (800, 1200)


def test_drift_over_the_rows_each_run_tagged(history, model):
    out, a_scores, b_scores = history
    drift = run_drift(str(out), "run-a", "run-b", scope="tags", models=[model[0]], progress=False)
    red = by_label(drift)["red"]
    assert (red["images_to"], red["above_to"]) == (400, int((b_scores[:, 0] >= 0.7).sum()))
    assert [r["label"] for r in drift.labels if r["flagged"]] == ["red"]


def test_an_unchanged_rerun_flags_no_label(history, model):
    out, _, _ = history
    drift = run_drift(str(out), "run-b", "run-c", models=[model[0]], progress=False)
    assert not any(r["flagged"] for r in drift.labels)
    assert all(r["change"] == 0 and r["p_value"] == 1 for r in drift.labels)
    assert drift.summary["centroid_shift"] == pytest.approx(0, abs=1e-9)
    # in scope tags the re-run has no rows of its own: reported, with nulls, and nothing flagged
    tags = run_drift(str(out), "run-b", "run-c", scope="tags", models=[model[0]], progress=False)
    assert not any(r["flagged"] for r in tags.labels) and all(r["rate_to"] is None for r in tags.labels)
    assert any("run-c has no rows in scope tags" in w for w in tags.warnings)


def test_a_fresh_sample_of_the_same_kind_flags_no_label(history, model):
    out, _, _ = history
    drift = run_drift(str(out), "run-a", "run-d", scope="tags", models=[model[0]], progress=False)
    assert not any(r["flagged"] for r in drift.labels), [(r["label"], r["q_value"]) for r in drift.labels]
    assert min(r["q_value"] for r in drift.labels) > 0.01


def test_the_defaults_compare_the_latest_run_with_the_one_before(history, model):
    out, _, _ = history
    drift = run_drift(str(out), models=[model[0]], progress=False)
    assert (drift.summary["from_run_id"], drift.summary["to_run_id"]) == ("run-c", "run-d")


def test_the_drift_table_holds_one_row_per_label_and_a_rerun_replaces_its_comparison(history, model):
    out, _, _ = history
    for _ in range(2):
        run_drift(str(out), "run-a", "run-b", models=[model[0]], progress=False)
    run_drift(str(out), "run-a", "run-b", scope="tags", models=[model[0]], progress=False)
    table = DeltaTable(str(out / "drift")).to_pyarrow_dataset().to_table().to_pylist()
    mine = [r for r in table if (r["from_run_id"], r["to_run_id"]) == ("run-a", "run-b")]
    assert sorted((r["scope"], r["label"]) for r in mine) == sorted((s, n) for s in ("current", "tags") for n in NAMES)
    red = next(r for r in mine if r["scope"] == "current" and r["label"] == "red")
    assert red["flagged"] and red["models_to"] == f"{model[1][0]}/{model[1][1]}" and red["computed_at"] is not None


def test_the_report_shows_the_bars_and_marks_flagged_labels(history, model):
    out, _, _ = history
    drift = run_drift(str(out), "run-a", "run-b", models=[model[0]], progress=False)
    assert drift.report == str(out / "reports" / "drift-run-a-run-b.html")
    page = Path(drift.report).read_text()
    png = re.search(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert png and len(png.group(1)) > 1000
    assert "<tr class='flagged'><td>red</td>" in page and page.count("class='flagged'") == 1


def test_without_the_models_thresholds_the_fallback_is_used_and_said(history):
    out, a_scores, _ = history
    drift = run_drift(str(out), "run-a", "run-b", fallback_threshold=0.5, progress=False)
    red = by_label(drift)["red"]
    assert red["threshold_source"] == "fallback" and red["above_from"] == int((a_scores[:, 0] >= 0.5).sum())
    assert len(drift.warnings) == 1 and "no thresholds for" in drift.warnings[0] and "--model" in drift.warnings[0]


def test_thresholds_come_from_the_registry_version_that_made_the_rows(model, tmp_path, monkeypatch):
    from pipelines import registry
    from pipelines.registry import tracking

    folder, _ = model
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    c = tracking.client(uri)
    exp = tracking.ensure_experiment(c, "drift-tests", tracking.default_artifact_location(uri))
    run_id, _ = tracking.start_run(c, exp, "drift")
    version = registry.log_model_version(folder, "drift-tiny", run_id, tracking_uri=uri, alias=None)
    out, rng = tmp_path / "out", np.random.default_rng(3)
    s = scores(rng, 50)
    commit(out, "r1", ("drift-tiny", version), ids("x", 50), s, embeddings(rng, 50))
    commit(out, "r2", ("drift-tiny", version), ids("y", 50), scores(rng, 50), embeddings(rng, 50))
    drift = run_drift(str(out), progress=False)
    red = by_label(drift)["red"]
    assert red["threshold_source"] == "model" and red["above_from"] == int((s[:, 0] >= 0.7).sum())
    assert not drift.warnings


def test_a_label_in_one_taxonomy_only_has_nulls_and_a_model_change_has_no_centroid_shift(tmp_path):
    out, rng = tmp_path / "out", np.random.default_rng(5)
    commit(out, "old", ("m", "1"), ids("o", 100), rng.random((100, 2)), embeddings(rng, 100), names=["red", "blue"])
    commit(out, "new", ("m", "2"), ids("n", 100), rng.random((100, 2)), embeddings(rng, 100), names=["red", "teal"])
    drift = run_drift(str(out), progress=False)
    rows = by_label(drift)
    # current keeps the old run's rows of images the new run did not list: red is in both runs' taxonomies
    assert rows["red"]["images_to"] == 200 and rows["red"]["p_value"] is not None
    assert rows["blue"]["rate_from"] is not None and rows["blue"]["images_to"] == 100
    assert rows["teal"]["images_from"] is None and rows["teal"]["rate_from"] is None
    assert rows["teal"]["change"] is None and rows["teal"]["p_value"] is None and not rows["teal"]["flagged"]
    assert drift.summary["centroid_shift"] is None and "model changed" in drift.summary["centroid_note"]
    assert drift.summary["models_to"] == "m/1, m/2" or drift.summary["models_to"] == "m/2, m/1"


def test_bad_comparisons_are_one_line_errors(history, tmp_path):
    out, _, _ = history
    with pytest.raises(DriftError, match="no committed run 'nope'"):
        run_drift(str(out), from_run="nope", progress=False)
    with pytest.raises(DriftError, match="both name run run-b"):
        run_drift(str(out), "run-b", "run-b", progress=False)
    with pytest.raises(DriftError, match="no committed runs"):
        run_drift(str(tmp_path / "empty"), progress=False)
    one, rng = tmp_path / "one", np.random.default_rng(1)
    commit(one, "only", ("m", "1"), ids("o", 5), rng.random((5, len(NAMES))), embeddings(rng, 5))
    with pytest.raises(DriftError, match="only committed run"):
        run_drift(str(one), progress=False)


def test_vacuumed_current_history_is_a_one_line_error_and_scope_tags_still_compares(tmp_path):
    out, rng = tmp_path / "out", np.random.default_rng(2)
    for run_id in ("r1", "r2"):
        commit(out, run_id, ("m", "1"), ids(run_id, 20), rng.random((20, len(NAMES))), embeddings(rng, 20))
    current = DeltaTable(str(out / "current"))
    kept = set(current.file_uris())
    current.load_as_version(current.version() - 1)
    for gone in set(current.file_uris()) - kept:  # what `mumic vacuum` removes past its grace period
        Path(gone).unlink()
    with pytest.raises(DriftError, match="no longer readable.*--scope tags"):
        run_drift(str(out), progress=False)
    assert run_drift(str(out), scope="tags", progress=False).summary["rows_from"] == 20


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mumic: error")]
    assert len(err) == 1
    return err[0]


@pytest.mark.parametrize(
    "argv, code, says",
    [
        (["--from", "nope"], 1, "--from-run: no committed run 'nope'"),
        (["--to-run", "run-b", "--from-run", "run-b"], 1, "both name run run-b"),
        (["--alpha", "2"], 2, "--alpha: Input should be less than 1"),
        (["--scope", "all"], 2, "--scope: Input should be 'current' or 'tags'"),
    ],
)
def test_the_cli_gives_one_line_errors(history, capsys, argv, code, says):
    out, _, _ = history
    assert cli.main(["drift", "--output", str(out), *argv]) == code
    assert says in one_error_line(capsys)


def test_the_cli_with_one_run_only_is_a_one_line_error(tmp_path, capsys):
    one, rng = tmp_path / "one", np.random.default_rng(1)
    commit(one, "only", ("m", "1"), ids("o", 5), rng.random((5, len(NAMES))), embeddings(rng, 5))
    assert cli.main(["drift", "--output", str(one)]) == 1
    assert "only committed run" in one_error_line(capsys)


def test_the_cli_prints_the_movers_and_where_the_table_and_report_are(history, model, capsys, tmp_path):
    out, _, _ = history
    config = tmp_path / "drift.yaml"
    config.write_text(f"output: {out}\nscope: current\nmodel: [{model[0]}]\n")
    assert cli.main(["drift", "--config", str(config), "--from", "run-a", "--to", "run-b", "--show", "3"]) == 0
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("label"))
    assert lines[header + 1].startswith("red") and "DRIFT" in lines[header + 1]
    assert sum(1 for line in lines[header + 1:] if line and not line.startswith(("...", "table:", "report:"))) == 3
    assert f"table: {out / 'drift'}" in lines and "mumic drift: reading run run-a" in printed.err
    assert cli.main(["drift", "--output", str(out), "--from", "run-a", "--to", "run-b", "--model", model[0], "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["flagged"] == 1 and {r["label"] for r in parsed["labels"]} == set(NAMES)


def test_the_drift_query_of_the_docs_runs(history, model):
    out, _, _ = history
    run_drift(str(out), "run-a", "run-b", models=[model[0]], progress=False)
    blocks = re.findall(r"^```python drift\n(.*?)^```", DOC.read_text(), re.M | re.S)
    assert blocks, "docs/output-tables.md has no ```python drift block"
    namespace: dict = {}
    for i, code in enumerate(blocks):
        code = re.sub(r'^output = "[^"]*"', f"output = {str(out)!r}", code, flags=re.M)
        exec(compile(code, f"docs/output-tables.md (drift block {i + 1})", "exec"), namespace)
    movers = namespace["movers"]
    assert movers.iloc[0]["label"] == "red" and bool(movers.iloc[0]["flagged"])


@pytest.mark.slow
def test_real_retag_runs_drift_when_red_scoring_images_arrive_and_not_on_a_rerun(ray_cluster, tiny_model_untrained, tmp_path):
    """Generated images through `mumic retag`: run 1 tags the 60 images the model finds least red; run 2
    lists them again (skipped) plus the 40 it finds most red; run 3 lists the same catalog (all skipped).
    The images are chosen by the model's own red score (its red threshold set between the two groups),
    so the planted change does not depend on how well a time-boxed training run went."""
    import pyarrow.parquet as pq

    from mumic_core.scoring import Scorer
    from pipelines.retag import run_retag

    pool = synthetic.write_dataset(tmp_path, 200, seed=21)
    model = copy.deepcopy(tiny_model_untrained)
    scorer = Scorer(model)
    red_scores = scorer.predict(np.stack([scorer.pixels((tmp_path / r["uri"]).read_bytes()) for r in pool])).scores[:, 0]
    order = np.argsort(red_scores)
    model.set_thresholds([float(np.median(red_scores)) if n == "red" else 0.5 for n in model.taxonomy.names])
    folder = str(checkpoint.save(model, tmp_path / "model"))
    plain, red = [pool[i] for i in order[:60]], [pool[i] for i in order[-40:]]

    def catalog(name, rows):
        pq.write_table(pa.table({"image_id": [r["image_id"] for r in rows], "uri": [r["uri"] for r in rows]}), tmp_path / name)
        return str(tmp_path / name)

    out = str(tmp_path / "out")
    first, second = catalog("one.parquet", plain), catalog("two.parquet", plain + red)
    for run_id, cat in (("night-1", first), ("night-2", second), ("night-3", second)):
        run_retag(cat, folder, out, run_id=run_id, progress=False)

    moved = run_drift(out, "night-1", "night-2", models=[folder], progress=False)
    rows = by_label(moved)
    assert (rows["red"]["rate_from"], rows["red"]["rate_to"]) == (0.0, 0.4)
    assert rows["red"]["flagged"] and rows["red"]["threshold_source"] == "model" and not moved.warnings
    assert max(moved.labels, key=lambda r: abs(r["change"]))["label"] == "red"
    assert (moved.summary["rows_from"], moved.summary["rows_to"]) == (60, 100)
    assert moved.summary["centroid_shift"] > 0

    rerun = run_drift(out, models=[folder], progress=False)  # the defaults: night-2 -> night-3
    assert (rerun.summary["from_run_id"], rerun.summary["to_run_id"]) == ("night-2", "night-3")
    assert not any(r["flagged"] for r in rerun.labels) and all(r["change"] == 0 for r in rerun.labels)
    assert rerun.summary["centroid_shift"] == pytest.approx(0, abs=1e-6)


def test_drift_has_help_and_is_listed(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["drift", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: mumic drift" in text and "--from-run" in text and "--scope {current,tags}" in text
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "drift" in capsys.readouterr().out
