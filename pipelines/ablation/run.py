"""`mumic ablate`: run an ablation's plan, one run at a time, each logged as a child of one MLflow parent
run, the results table rewritten after every run; runs already in results.csv (same config hash) are
skipped, so the same command again resumes an interrupted grid."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import storage
from ..cluster import ensure_ray
from ..evaluation import Report, report
from ..progress import Progress
from ..registry import tracking
from ..train import TrainConfig, train
from . import baselines, data, plan
from .options import AblationConfig
from .results import Results, row

say = Progress("ablate")


@dataclass
class AblationResult:
    rows: list[dict[str, Any]]  # this plan's finished runs, in plan order
    csv: str
    markdown: str
    complete: bool  # every planned run is done
    mlflow_run_id: str
    executed: int  # runs done by this call


@dataclass
class _Context:
    """What every run of one call shares: the config, the data, the results, MLflow, decoded splits."""

    cfg: AblationConfig
    out: Path
    full: data.DataSet
    earlier: data.DataSet | None
    results: Results
    mlflow: _Parent
    passes: dict = field(default_factory=dict)  # (model folder, split) → baselines.Pass
    decoded: dict = field(default_factory=dict)  # image size → decoded splits


def run_ablation(cfg: AblationConfig) -> AblationResult:
    """Plan, then run every step not yet in results.csv (at most `max_runs` of them)."""
    out = Path(cfg.output).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    cells = plan.expand(cfg)
    for cell in cells:  # every cell's options checked before any data is written or run started
        plan.train_options(cfg, cell)
    full = data.prepare(cfg, out)
    earlier = None
    if any(c.init == plan.WARM for c in cells):
        fractions = {k: cfg.base[k] for k in ("val_fraction", "test_fraction") if k in cfg.base}
        earlier = data.earlier(full, cfg.warm_start, out, **fractions)
    steps = plan.steps(cfg, cells, full.fingerprint, earlier.fingerprint if earlier else None)
    results = Results(out, steps)
    done = sum(results.get(s) is not None for s in steps)
    say(f"{len(steps)} runs planned ({len(cells)} cells, {done} already in {results.csv}); "
        f"{len(full.taxonomy)} labels, {sum(full.taxonomy.unseen_mask)} unseen")
    ensure_ray(say)
    ctx = _Context(cfg, out, full, earlier, results, _Parent.start(cfg, out, steps))
    try:
        executed = _run_steps(ctx, steps)
    except BaseException:
        ctx.mlflow.end("FAILED")
        raise
    complete = all(results.get(s) is not None for s in steps)
    results.write()
    ctx.mlflow.end("FINISHED", results, complete)
    return AblationResult(results.current, str(results.csv), str(results.markdown), complete,
                          ctx.mlflow.run_id, executed)


def _run_steps(ctx: _Context, steps: list[plan.Step]) -> int:
    executed = 0
    for k, step in enumerate(steps, 1):
        head = f"run {k} of {len(steps)} ({step.describe()})"
        if ctx.results.get(step) is not None:
            say(f"{head}: already in results.csv (config {step.config_hash}), skipped")
            continue
        if ctx.cfg.max_runs is not None and executed >= ctx.cfg.max_runs:
            say(f"stopping after {executed} new run(s) (max_runs); the same command continues from run {k}")
            break
        say(head)
        started = time.perf_counter()
        new = _train(ctx, step, started) if step.kind in ("train", "warm_source") else _baseline(ctx, step, started)
        ctx.results.add(new)
        ctx.mlflow.after(new, ctx.results)
        executed += 1
        best = ctx.results.best()
        shown = f"{best['run']} val mAP {best['val_map']:.4f}" if best else "-"
        say(f"run {k} of {len(steps)} done in {new['seconds']:.0f}s: val mAP {new['val_map']:.4f}, "
            f"test mAP {new['test_map']:.4f}; best so far: {shown}")
    return executed


def _train(ctx: _Context, step: plan.Step, started: float) -> dict[str, Any]:
    """A cell (or a warm-start source): `mumic train` on 2 workers with Ray Train, as a child run."""
    cfg, dataset = ctx.cfg, ctx.earlier if step.data == "earlier" else ctx.full
    options = dict(step.options)
    if step.source is not None:  # warm: from the source's model folder, found by its row
        source = next(s for s in ctx.results.steps if s.name == step.source)
        options["init"] = ctx.results.get(source)["model_dir"]
    run_name = f"{cfg.name}-{step.name}-{step.config_hash[:8]}"
    train_cfg = TrainConfig(
        **options, annotations=dataset.annotations, taxonomy=dataset.taxonomy_path, run_name=run_name,
        workdir=cfg.workdir, storage_path=str(ctx.out / "ray_results"), experiment=cfg.experiment,
    )
    try:
        result = train(train_cfg)
    finally:  # a failed run is a child too (and its rerun, resumed by name, the same one)
        ctx.mlflow.adopt(step, run_name)
    reports = {"val": result.val, **({"test": result.test} if result.test else {})}
    return row(step, reports, time.perf_counter() - started, best_epoch=result.best_epoch,
               epochs=result.epochs, mlflow_run_id=result.run_id, model_dir=result.model_dir)


def _baseline(ctx: _Context, step: plan.Step, started: float) -> dict[str, Any]:
    """Zero-shot or linear-probe scores of the untrained starting model on val and test, as a child run."""
    folder = ctx.out / "models" / f"start-{plan.config_hash('start', step.options)}"
    model_dir = baselines.starting_model(step.options, ctx.full.taxonomy, folder)
    size = json.loads((folder / "config.json").read_text())["preprocessing"]["image_size"]
    if size not in ctx.decoded:
        ctx.decoded[size] = baselines.decode(ctx.full, step.options, size)
    for split, ds in ctx.decoded[size].items():
        if (model_dir, split) not in ctx.passes:
            ctx.passes[model_dir, split] = baselines.score(model_dir, ds)
    passes = {s: ctx.passes[model_dir, s] for s in ("val", "test") if (model_dir, s) in ctx.passes}
    if step.kind == "zero_shot":
        scored = {s: p.scored for s, p in passes.items()}
    else:
        scored = baselines.linear_probe(ctx.passes[model_dir, "train"], passes, step.cell.seed)
    reports = {s: report(sc, ctx.full.taxonomy, s) for s, sc in scored.items()}
    if step.kind == "linear_probe":  # it has no way to score a label without training examples
        for r in reports.values():
            r.metrics = {k: v for k, v in r.metrics.items() if not k.startswith("zsl_")}
    run_id = ctx.mlflow.baseline(step, reports, model_dir)
    return row(step, reports, time.perf_counter() - started, mlflow_run_id=run_id, model_dir=model_dir)


@dataclass
class _Parent:
    """The ablation's MLflow parent run (resumed by name) and its child runs (tag mlflow.parentRunId)."""

    client: Any
    experiment_id: str
    run_id: str
    name: str

    @classmethod
    def start(cls, cfg: AblationConfig, out: Path, steps: list[plan.Step]) -> _Parent:
        uri = tracking.tracking_uri(cfg.workdir)
        client = tracking.client(uri)
        exp = tracking.ensure_experiment(client, cfg.experiment, tracking.default_artifact_location(uri, cfg.workdir))
        run_id, resumed = tracking.start_run(client, exp, cfg.name, tags={"mumic.kind": "ablation"})
        params = {"output": str(out), "n_runs": len(steps), "annotations": cfg.annotations or "generated",
                  "unseen": ",".join(cfg.unseen), "base": json.dumps(cfg.base, sort_keys=True),
                  "grid": json.dumps(cfg.grid, sort_keys=True), "baselines": ",".join(cfg.baselines)}
        tracking.log_params(client, run_id, params)
        say(f"MLflow parent run {run_id} ({'resumed' if resumed else 'new'}) in experiment "
            f"{cfg.experiment!r} at {storage.redact(uri)}")
        return cls(client, exp, run_id, cfg.name)

    def _tags(self, step: plan.Step) -> dict[str, str]:
        return {"mlflow.parentRunId": self.run_id, "mumic.ablation": self.name, "mumic.ablation.run": step.name,
                "mumic.ablation.kind": step.kind, "mumic.ablation.config_hash": step.config_hash}

    def adopt(self, step: plan.Step, run_name: str) -> None:
        """Make the training run of this name (train() made it) a child of the parent."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{tracking.RUN_NAME_TAG}` = {tracking.filter_value(run_name, 'run name')}",
            max_results=1,
        )
        for key, value in (self._tags(step) if runs else {}).items():
            self.client.set_tag(runs[0].info.run_id, key, value)

    def baseline(self, step: plan.Step, reports: dict[str, Report], model_dir: str) -> str:
        run_name = f"{self.name}-{step.name}-{step.config_hash[:8]}"
        tags = {**self._tags(step), "mumic.kind": "baseline"}
        run_id, _ = tracking.start_run(self.client, self.experiment_id, run_name, tags=tags)
        tracking.log_params(self.client, run_id, {**step.options, "baseline": step.kind, "model_dir": model_dir})
        for split, r in reports.items():
            tracking.log_metrics(self.client, run_id, {**r.metrics, "ap": r.per_class_ap}, prefix=f"{split}_")
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def after(self, new: dict[str, Any], results: Results) -> None:
        """The run's headline numbers on the parent (one step per run) and the table so far."""
        step = len(results.current)
        metrics = {f"{new['run']}/{k}": new[k] for k in ("val_map", "test_map", "test_zsl_map") if k in new}
        tracking.log_metrics(self.client, self.run_id, metrics, step=step)
        for path in (results.csv, results.markdown):
            self.client.log_artifact(self.run_id, str(path), "ablation")

    def end(self, status: str, results: Results | None = None, complete: bool = False) -> None:
        if results is not None:
            self.client.set_tag(self.run_id, "mumic.ablation.complete", str(complete).lower())
        self.client.set_terminated(self.run_id, status)
