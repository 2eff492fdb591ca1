"""Every query the docs show, run as a reader runs it: each ```python block of DOCS and the query that
`mumic quickstart` prints, as its own process, RUNS times, against a real output (two retag runs, the
second incremental with a missing image), each run exiting 0 with the right answer. `mumic runs` and
`mumic search` too. Exit codes matter: with pyarrow 25 + deltalake 1.6 some reads print the answer, then
abort at interpreter exit (134); see docs/output-tables.md, *Reads that exit cleanly*.

How a block is run (docs/output-tables.md, *How these snippets are tested*):
- ```python GROUP blocks of one file chain: block k runs after blocks 1..k-1 of its group, as a reader
  pasting them in order does; a plain ```python block runs alone. `output = "..."` lines point at the
  test output.
- Every `{output}/NAME` table a block reads must be one TABLES makes, else the block is skipped and says
  which; a `# needs: MODULE` line skips it where MODULE is not installed (Spark).
- The harness prints, as JSON, the data held by the names the block assigns at top level; CHECKS holds
  what at least one of them must be, by name.
"""

from __future__ import annotations

import ast
import collections
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("docs/output-tables.md", "README.md", "docs/contract.md", "docs/operations.md")
# processes per snippet: an abort at exit is a race. 2 in the suite (the reads that raced are forbidden by
# test_snippets_use_reads_that_exit_cleanly; these runs catch a new one); MUMIC_DOC_RUNS=30 to hunt for one
RUNS = int(os.environ.get("MUMIC_DOC_RUNS", "2"))
IMAGE = "img-11-000003"  # the docs' example image id: tagged by run A, skipped as unchanged by run B
FENCE = re.compile(r"^```python(?:[ \t]+([\w-]+))?[ \t]*\n(.*?)^```", re.M | re.S)
OUTPUT_LINE = re.compile(r'^output = "[^"\n]*"', re.M)
TABLE_READ = re.compile(r"\{output\}/(\w+)")
NEEDS = re.compile(r"^# needs: *(.+)$", re.M)
MARK = "@@answers "
# Reads that can abort at exit (an Arrow I/O thread frees a Python-owned buffer after the interpreter
# began to exit): deltalake's datasets without a `filesystem=` of Arrow's own, and what is built on them.
RISKY_READS = re.compile(
    r"\.to_pyarrow_table\(|\.to_pyarrow_dataset\((?![^)\n]*filesystem\s*=)|DeltaTable\([^\n]*\)\.to_pandas\("
)

# The tables of the test output. `retag` makes tags, current and runs (the `output` fixture); a command
# that writes another table the docs query adds a maker here: maker(output_dir, facts) runs that command
# into output_dir after the two retag runs and may add to `facts` (the fixture's dict) what its CHECKS
# need. Add its snippets' checks to CHECKS.
TABLES: dict[str, Callable[[Path, dict], None] | None] = {"tags": None, "current": None, "runs": None}


def _mumic(*argv: str) -> None:
    """A command as a user runs it (in this process: `mumic drift` and `duplicates` start no Ray)."""
    from jobs import cli

    assert cli.main(list(argv)) == 0, argv


def make_drift(output: Path, facts: dict) -> None:
    """`mumic drift` with its defaults: the latest run (run-b) against the one before (run-a), scope
    `current`, the thresholds of the model that made the rows."""
    _mumic("drift", "--output", str(output), "--model", str(facts["model"]), "--workdir", str(output.parent))


def make_duplicates(output: Path, facts: dict) -> None:
    """`mumic duplicates` with its defaults (the latest run's model, threshold 0.95); the table as this
    process reads it, for the checks of the snippet's aggregation."""
    import polars as pl

    _mumic("duplicates", "--output", str(output), "--sheet", str(output.parent / "duplicates.html"))
    facts["duplicates"] = pl.read_delta(str(output / "duplicates")).to_dicts()


TABLES["drift"] = make_drift
TABLES["duplicates"] = make_duplicates


@dataclass(frozen=True)
class Snippet:
    id: str
    code: str  # this block alone
    chain: str  # the blocks of its group up to this one
    needs_tables: frozenset[str]
    needs_modules: tuple[str, ...]
    stdout_check: Callable | None = None  # for a snippet that only prints

    @property
    def skip_reason(self) -> str | None:
        missing = sorted(self.needs_tables - set(TABLES))
        if missing:
            return f"the test output has no {', '.join(missing)} table (add a maker to TABLES)"
        absent = [m for m in self.needs_modules if importlib.util.find_spec(m) is None]
        return f"{', '.join(absent)} not installed" if absent else None


def doc_snippets() -> list[Snippet]:
    out = []
    for doc in DOCS:
        path = ROOT / doc
        if not path.exists():
            continue
        chains: dict[str, list[str]] = collections.defaultdict(list)
        for n, (group, code) in enumerate(FENCE.findall(path.read_text()), 1):
            chain = chains[group] if group else []
            chain.append(code)
            joined = "\n\n".join(chain)
            needs = tuple(m.strip() for line in NEEDS.findall(code) for m in line.split(","))
            name = f"{path.stem}:{group or 'block'}-{len(chain) if group else n}"
            out.append(Snippet(name, code, joined, frozenset(TABLE_READ.findall(joined)), needs))
    return out


def quickstart_snippet(output: Path | str = "OUTPUT") -> Snippet:
    """The query `mumic quickstart` prints (the lines of its `python - <<'EOF'` ... `EOF` here-document)."""
    # lazily, where it is needed: the quickstart room imports MLflow
    from pipelines.quickstart.run import _next_steps

    lines = _next_steps(
        Path("/tmp/qs"), Path(output), "models:/mumic-tiny@champion", "sqlite:///qs/mlflow.db"
    )
    start = lines.index("python - <<'EOF'") + 1
    code = "\n".join(lines[start : lines.index("EOF", start)])

    def check(stdout: str, t: Truth) -> None:
        printed = [line for line in stdout.splitlines() if line.strip() and not line.startswith(MARK)]
        assert printed[-1] == repr([(t.latest["run_id"], t.latest_rows)])

    return Snippet(
        "quickstart:printout", code, code, frozenset(TABLE_READ.findall(code)) | {"tags", "runs"}, (), check
    )


SNIPPETS = doc_snippets()


def assigned_names(code: str) -> list[str]:
    """The names a block binds by top-level assignment (`a = ...`, `a, b = ...`, `a: int = ...`)."""

    def bound(target: ast.expr) -> list[str]:
        if isinstance(target, ast.Name):
            return [target.id]
        if isinstance(target, ast.Tuple | ast.List):
            return [n for t in target.elts for n in bound(t)]
        return bound(target.value) if isinstance(target, ast.Starred) else []

    names: list[str] = []
    for node in ast.parse(code).body:
        if isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            targets = node.targets if isinstance(node, ast.Assign) else []
        names += [n for t in targets for n in bound(t) if n not in names]
    return names


# Runs in the snippet's process after its code: the data its names hold, as JSON on the last stdout line.
EPILOGUE = """
import json as _json


def _data(_v):
    if hasattr(_v, "to_dicts"):  # polars DataFrame
        return _v.to_dicts()
    if hasattr(_v, "to_dict") and hasattr(_v, "columns"):  # pandas DataFrame
        return _v.to_dict("records")
    if hasattr(_v, "to_pylist") and hasattr(_v, "schema"):  # Arrow table
        return _v.to_pylist()
    if _v is None or isinstance(_v, (str, int, float, bool, list, tuple, dict)):
        return _v
    raise TypeError  # a module, a function, a lazy frame or dataset: not an answer


def _plain(_o):
    for _how in ("total_seconds", "tolist", "isoformat"):
        if hasattr(_o, _how):
            return getattr(_o, _how)()
    return str(_o)


_answers = {}
for _name in NAMES:
    try:
        _answers[_name] = _data(globals()[_name])
    except (KeyError, TypeError):
        pass
print(MARK + _json.dumps(_answers, default=_plain, sort_keys=True))
"""


def program(snippet: Snippet, output: Path) -> str:
    code = OUTPUT_LINE.sub(lambda _: f"output = {str(output)!r}", snippet.chain)
    epilogue = EPILOGUE.replace("NAMES", repr(assigned_names(snippet.code))).replace("MARK", repr(MARK))
    return f"{code}\n\n{epilogue}"


def write_catalog(folder: Path, name: str, rows: list[dict]) -> str:
    pq.write_table(
        pa.table({"image_id": [r["image_id"] for r in rows], "uri": [r["uri"] for r in rows]}), folder / name
    )
    return str(folder / name)


@dataclass
class Truth:
    """What the tables hold, read in the test's process (not by the snippets' queries)."""

    output: Path
    model: Path
    runs: list[dict]  # oldest first
    tags: list[dict]
    current: list[dict]
    facts: dict = field(default_factory=dict)  # what TABLES makers add

    @property
    def latest(self) -> dict:
        return self.runs[-1]

    @property
    def latest_tags(self) -> list[dict]:
        return [
            r
            for r in self.tags
            if (r["run_id"], r["run_date"]) == (self.latest["run_id"], self.latest["run_date"])
        ]

    @property
    def latest_rows(self) -> int:
        return len(self.latest_tags)

    @property
    def taxonomy(self) -> list[str]:
        return json.loads(self.latest["taxonomy"])


@pytest.fixture(scope="module")
def truth(ray_cluster, tiny_model_untrained, tmp_path_factory) -> Truth:
    """Run A tags 16 images; run B (later) sees 6 of them again (skipped), 5 new ones and a missing file."""
    import polars as pl

    from mumic_core import checkpoint, synthetic
    from pipelines.retag import run_retag

    root = tmp_path_factory.mktemp("docs-queries")
    model = root / "model"
    checkpoint.save(tiny_model_untrained, model)
    first = synthetic.write_dataset(root, 16, seed=11)
    new = synthetic.write_dataset(root, 5, seed=12)
    missing = {"image_id": "missing-1", "uri": "images/missing-1.jpg"}
    out = root / "out"
    a = run_retag(
        write_catalog(root, "a.parquet", first), str(model), str(out), run_id="run-a", progress=False
    )
    b = run_retag(
        write_catalog(root, "b.parquet", first[:6] + new + [missing]),
        str(model),
        str(out),
        run_id="run-b",
        progress=False,
    )
    assert (a["rows_ok"], a["rows_error"], a["rows_skipped"]) == (16, 0, 0)
    assert (b["rows_ok"], b["rows_error"], b["rows_skipped"]) == (5, 1, 6)
    assert IMAGE in {r["image_id"] for r in first[:6]}
    facts: dict = {"run_a_images": {r["image_id"] for r in first}, "model": model}
    for make in TABLES.values():
        if make is not None:
            make(out, facts)
    runs = pl.read_delta(str(out / "runs")).sort("finished_at", "run_id").to_dicts()
    tags, current = (pl.read_delta(str(out / t)).to_dicts() for t in ("tags", "current"))
    return Truth(out, model, runs, tags, current, facts)


def cli_jobs(t: Truth) -> dict[str, list[str]]:
    mumic = shutil.which("mumic", path=str(Path(sys.executable).parent))
    cmd = [mumic] if mumic else [sys.executable, "-m", "jobs.cli"]
    out, model = str(t.output), str(t.model)
    return {
        "mumic runs": [*cmd, "runs", "--output", out, "--json"],
        "mumic search": [
            *cmd,
            "search",
            "--output",
            out,
            "--model",
            model,
            "--text",
            "red",
            "--k",
            "5",
            "--json",
        ],
    }


def run_process(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=cwd)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def outcomes(truth: Truth, tmp_path_factory) -> dict[str, list[tuple[int, str, str]]]:
    """RUNS processes of every runnable snippet and command, 2 at a time (2 cores); results by id."""
    folder = tmp_path_factory.mktemp("snippets")
    jobs: dict[str, list[str]] = dict(cli_jobs(truth))
    for s in [*SNIPPETS, quickstart_snippet(truth.output)]:
        if s.skip_reason is None:
            script = folder / (re.sub(r"[^\w-]", "_", s.id) + ".py")
            script.write_text(program(s, truth.output))
            jobs[s.id] = [sys.executable, str(script)]
    with ThreadPoolExecutor(2) as pool:
        futures = {
            k: [pool.submit(run_process, argv, folder) for _ in range(RUNS)] for k, argv in jobs.items()
        }
        return {k: [f.result() for f in fs] for k, fs in futures.items()}


def clean_runs(outcomes: dict, key: str) -> list[str]:
    """The stdout of each of RUNS runs of `key`, after asserting that every one exited 0."""
    runs = outcomes[key]
    codes = collections.Counter(rc for rc, _, _ in runs)
    failed = next((err for rc, _, err in runs if rc != 0), "")
    assert codes == {0: RUNS}, f"{key}: exit codes {dict(codes)}; stderr of a failed run:\n{failed[-2000:]}"
    return [out for _, out, _ in runs]


def answers_of(key: str, stdouts: list[str]) -> dict:
    """The answers of the runs, which must all be the same (rows in any order)."""
    parsed = []
    for out in stdouts:
        line = next((x for x in reversed(out.splitlines()) if x.startswith(MARK)), None)
        assert line is not None, f"{key} printed no answers:\n{out[-2000:]}"
        parsed.append(json.loads(line[len(MARK) :]))
    canonical = [json.dumps({k: _unordered(v) for k, v in p.items()}, sort_keys=True) for p in parsed]
    assert len(set(canonical)) == 1, f"{key}: the runs gave different answers"
    return parsed[0]


def _unordered(value):
    return sorted(json.dumps(v, sort_keys=True) for v in value) if isinstance(value, list) else value


@pytest.mark.slow
@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_doc_snippet_exits_cleanly_with_the_right_answer_every_time(snippet: Snippet, request):
    if snippet.skip_reason:
        pytest.skip(snippet.skip_reason)
    outcomes, truth = request.getfixturevalue("outcomes"), request.getfixturevalue("truth")
    answers = answers_of(snippet.id, clean_runs(outcomes, snippet.id))
    checked = [name for name in answers if name in CHECKS]
    assert checked, f"{snippet.id}: no check for any of {sorted(answers)}: add one to CHECKS"
    for name in checked:
        CHECKS[name](answers[name], truth)


@pytest.mark.slow
def test_the_query_the_quickstart_prints_exits_cleanly_with_the_right_answer(outcomes, truth):
    snippet = quickstart_snippet(truth.output)
    for stdout in clean_runs(outcomes, snippet.id):
        snippet.stdout_check(stdout, truth)


@pytest.mark.slow
def test_mumic_runs_exits_cleanly_listing_the_committed_runs(outcomes, truth):
    for stdout in clean_runs(outcomes, "mumic runs"):
        listed = [json.loads(line) for line in stdout.splitlines()]
        assert [(r["run_id"], r["rows_ok"], r["rows_error"], r["rows_skipped"]) for r in listed] == [
            (r["run_id"], r["rows_ok"], r["rows_error"], r["rows_skipped"]) for r in truth.runs
        ]


@pytest.mark.slow
def test_mumic_search_exits_cleanly_with_the_same_hits_every_time(outcomes, truth):
    embedded = {r["image_id"] for r in truth.current if r["embedding"] is not None}
    results = [
        [json.loads(line) for line in out.splitlines()] for out in clean_runs(outcomes, "mumic search")
    ]
    assert all(hits == results[0] for hits in results)
    hits = results[0]
    assert len(hits) == 5 and {h["image_id"] for h in hits} <= embedded
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_the_commands_read_the_tables_through_arrows_own_filesystem(truth):
    """What keeps `mumic runs` / `search` from aborting at exit: no filesystem written in Python under their
    scans (the exit-code runs above only catch the race when it is lost)."""
    import pyarrow.fs as pafs

    from pipelines.tables import arrow_dataset, open_table

    for name in ("runs", "tags", "current"):
        dataset = arrow_dataset(open_table(str(truth.output / name)))
        assert isinstance(dataset.filesystem, pafs.SubTreeFileSystem)
        assert not isinstance(dataset.filesystem.base_fs, pafs.PyFileSystem)
        assert dataset.to_table().num_rows == len(getattr(truth, name))


def test_snippets_use_reads_that_exit_cleanly():
    """The exit-code runs catch an abort only when the race is lost; this catches the risky reads always."""
    risky = [s.id for s in [*SNIPPETS, quickstart_snippet()] if RISKY_READS.search(s.code)]
    assert not risky, (
        f"{risky} read Delta through deltalake's own filesystem: see output-tables.md, *Reads that exit cleanly*"
    )


def test_the_project_reads_delta_tables_only_through_arrow_dataset():
    """Every command's reads exit cleanly: none of the risky reads in pipelines/ or jobs/
    (`tables.arrow_dataset` is the one read, through Arrow's own filesystem)."""
    risky = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in ("pipelines", "jobs")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if RISKY_READS.search(line)
    ]
    assert not risky, f"read through pipelines.tables.arrow_dataset instead: {risky}"


def test_the_harness_finds_the_snippets_and_what_they_need():
    ids = [s.id for s in SNIPPETS]
    assert {"output-tables:duckdb-1", "output-tables:polars-1", "output-tables:sql-1"} <= set(ids)
    assert len(ids) == len(set(ids))
    polars_2 = next(s for s in SNIPPETS if s.id == "output-tables:polars-2")
    by_id = {s.id: s for s in SNIPPETS}
    for made in ("output-tables:drift-1", "output-tables:duplicates-1"):  # tables TABLES makes
        assert by_id[made].skip_reason is None, (made, by_id[made].skip_reason)
    assert {"runs", "tags", "current"} <= polars_2.needs_tables  # its own table and its group's
    code = "a, (b, *c) = 1, (2, 3)\nd: int = 4\nx.y = 5\nfor i in []: pass\na = 6"
    assert assigned_names(code) == ["a", "b", "c", "d"]


# ---- what each answer must be, by the name the snippet gives it ------------------------------------------


def _rows(value) -> list[dict]:
    return [value] if isinstance(value, dict) else list(value)


def _check_latest(value, t: Truth) -> None:
    (row,) = _rows(value)
    assert row["run_id"] == t.latest["run_id"] == "run-b" and row["run_date"] == t.latest["run_date"]


def _check_current(value, t: Truth) -> None:
    rows = _rows(value)
    labelled = {r["image_id"] for r in t.current if r["labels"] is not None}
    assert sorted(r["image_id"] for r in rows) == sorted(labelled) and len(labelled) == 21
    # images run B skipped as unchanged keep run A's labels
    assert {r["run_id"] for r in rows} == {"run-a", "run-b"}


def _check_with_label(value, t: Truth) -> None:
    rows = _rows(value)
    want = sorted(
        (
            (next(x["score"] for x in r["labels"] if x["label"] == "red"), r["image_id"])
            for r in t.latest_tags
            if any(x["label"] == "red" and x["score"] >= 0.5 for x in r["labels"] or [])
        ),
        reverse=True,
    )
    assert [r["image_id"] for r in rows] == [i for _, i in want] and want
    assert all(math.isclose(r["score"], s, rel_tol=1e-6) for r, (s, _) in zip(rows, want, strict=True))


def _check_errors(value, t: Truth) -> None:
    reasons = collections.Counter(r["error"].split(":")[0] for r in t.latest_tags if r["status"] == "error")
    assert (
        _rows(value)
        == [{"reason": k, "images": n} for k, n in reasons.most_common()]
        == [{"reason": "not_found", "images": 1}]
    )


def _check_history(value, t: Truth) -> None:
    rows = _rows(value)
    keys = ("run_id", "rows_ok", "rows_error", "rows_skipped")
    assert [tuple(r[k] for k in keys) for r in rows] == [tuple(r[k] for k in keys) for r in t.runs]
    assert all(r["took"] > 0 for r in rows if "took" in r)


def _check_wide(value, t: Truth) -> None:
    rows = _rows(value)
    ok = {r["image_id"]: r["scores"] for r in t.latest_tags if r["status"] == "ok"}
    assert sorted(r["image_id"] for r in rows) == sorted(ok) and len(ok) == t.latest["rows_ok"]
    for r in rows:
        assert set(r) == {"image_id", *t.taxonomy}  # (the answers' keys come sorted)
        assert all(math.isclose(r[n], ok[r["image_id"]][i], rel_tol=1e-6) for i, n in enumerate(t.taxonomy))


def _check_image_labels(value, t: Truth) -> None:
    (row,) = _rows(value)
    now = next(r for r in t.current if r["image_id"] == IMAGE)
    assert row["image_id"] == IMAGE and row["run_id"] == now["run_id"] == "run-a"
    assert [x["label"] for x in row["labels"]] == [x["label"] for x in now["labels"]]
    assert all(
        math.isclose(a["score"], b["score"], rel_tol=1e-6)
        for a, b in zip(row["labels"], now["labels"], strict=True)
    )


def _check_label_counts(value, t: Truth) -> None:
    want = collections.Counter(x["label"] for r in t.latest_tags for x in r["labels"] or [])
    assert {r["label"]: r["images"] for r in _rows(value)} == dict(want) and want


def _check_labels_before(value, t: Truth) -> None:
    rows = _rows(value)
    assert {r["image_id"] for r in rows} == t.facts["run_a_images"] and len(rows) == 16
    assert {r["run_id"] for r in rows} == {"run-a"}


def _check_run_id(value, t: Truth) -> None:
    assert value == t.latest["run_id"] == "run-b"


def _check_latest_rows(value, t: Truth) -> None:
    assert value == t.latest_rows == t.latest["rows_ok"] + t.latest["rows_error"] == 6


def _check_names(value, t: Truth) -> None:
    assert value == t.taxonomy


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _check_movers(value, t: Truth) -> None:
    """The latest comparison (run-a → run-b, scope current): rates recomputed from the rows each run left
    in `current` and the model's own thresholds, the flag rule, the order, the centroid shift."""
    from mumic_core import checkpoint
    from mumic_core.taxonomy import Taxonomy

    config = checkpoint.read_config(str(t.model))
    names = Taxonomy.from_dict(config["taxonomy"]).names
    threshold = dict(zip(names, config["thresholds"], strict=True))
    before = [r for r in t.tags if r["run_id"] == "run-a" and r["status"] == "ok"]  # the first run: all of it
    after = [r for r in t.current if r["scores"] is not None]  # current as run-b left it
    assert (len(before), len(after)) == (16, 21)

    def rate(rows: list[dict], label: str) -> float:
        i = names.index(label)
        return sum(r["scores"][i] >= threshold[label] for r in rows) / len(rows)

    rows = _rows(value)
    assert sorted(r["label"] for r in rows) == sorted(names) == sorted(t.taxonomy)
    for r in rows:
        assert math.isclose(r["rate_from"], rate(before, r["label"])), r
        assert math.isclose(r["rate_to"], rate(after, r["label"])), r
        assert math.isclose(r["change"], r["rate_to"] - r["rate_from"], abs_tol=1e-12)
        assert r["flagged"] == (r["q_value"] < 0.01 and abs(r["change"]) >= 0.02) and 0 <= r["q_value"] <= 1
    assert rows == sorted(rows, key=lambda r: (not r["flagged"], -abs(r["change"]), r["label"]))
    centroids = [np.mean([r["embedding"] for r in side], 0) for side in (before, after)]
    shift = 1 - _cosine(*centroids)
    assert all(math.isclose(r["centroid_shift"], shift, abs_tol=1e-5) for r in rows), (rows[0], shift)


def _check_groups(value, t: Truth) -> None:
    """The groups as aggregated from the `duplicates` table (read by the test), and what the table says
    checked against `current`'s embeddings and hashes."""
    table = t.facts["duplicates"]
    now = {r["image_id"]: r for r in t.current}
    members = collections.defaultdict(list)
    for r in table:
        members[r["group_id"]].append(r["image_id"])
    rows = _rows(value)
    assert [r["group_id"] for r in rows] == list(range(1, len(members) + 1)) and rows  # the tiny model's
    # untrained embeddings are nearly parallel, so at 0.95 the images fall into a few large groups
    assert [r["images"] for r in rows] == sorted((r["images"] for r in rows), reverse=True)
    threshold = table[0]["threshold"]
    for r in rows:
        ids = members[r["group_id"]]
        first = min(ids)
        assert r["images"] == len(ids) and r["first_image"] == first
        sims = {i: _cosine(now[i]["embedding"], now[first]["embedding"]) for i in ids}
        assert math.isclose(r["least_similar"], min(sims.values()), abs_tol=1e-4)
        hashes = collections.Counter(now[i]["content_sha256"] for i in ids)
        assert r["same_bytes"] == sum(hashes[now[i]["content_sha256"]] > 1 for i in ids)
        for i in ids:  # every member has a partner in its group: similar enough, or the same bytes
            partners = [j for j in ids if j != i]
            assert any(
                _cosine(now[i]["embedding"], now[j]["embedding"]) >= threshold - 1e-4
                or now[i]["content_sha256"] == now[j]["content_sha256"]
                for j in partners
            ), i


CHECKS: dict[str, Callable[[object, Truth], None]] = {
    "run_id": _check_run_id,
    "latest": _check_latest,
    "latest_rows": _check_latest_rows,
    "current": _check_current,
    "with_label": _check_with_label,
    "errors": _check_errors,
    "history": _check_history,
    "wide": _check_wide,
    "names": _check_names,
    "image_labels": _check_image_labels,
    "label_counts": _check_label_counts,
    "labels_before": _check_labels_before,
    "movers": _check_movers,
    "groups": _check_groups,
}
