"""The ablation's plan and table without Ray: grid expansion, loss presets, config hashes (what resume
keys on), one-line errors, and the Markdown table's mean ± std over seeds."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from jobs.cli import main
from pipelines.ablation import plan
from pipelines.ablation.options import AblationConfig, AblationError
from pipelines.ablation.results import COLUMNS, Results, markdown

BASE = {"backbone": "mumic-tiny", "epochs": 1}


def _cfg(**kw) -> AblationConfig:
    return AblationConfig(**{"output": "/tmp/unused", "generate": {}, "base": BASE, **kw})


def test_a_list_of_grids_runs_their_union_each_cell_once_in_order():
    cfg = _cfg(grid=[{"loss": ["plain_bce", "focal"], "seed": [0, 1]}, {"loss": "focal", "seed": 0, "init": ["base", "warm"]}])
    names = [c.name for c in plan.expand(cfg)]
    assert names == [
        "mumic-plain_bce-both-s0", "mumic-plain_bce-both-s1", "mumic-focal-both-s0", "mumic-focal-both-s1",
        "mumic-focal-both-s0-warm",
    ]


def test_loss_presets_are_training_options_and_a_config_may_add_its_own():
    cfg = _cfg(loss_presets={"focal_g3": {"loss_weighting": "focal", "focal_gamma": 3.0}})
    options = {name: plan.train_options(cfg, plan.Cell("mumic", name, "image", 2)) for name in (*plan.LOSS_PRESETS, "focal_g3")}
    assert options["plain_bce"]["learn_tau"] is False and options["plain_bce"]["init_tau"] == 1.0
    assert options["tempered_learned"]["learn_tau"] is True and options["tempered_learned"]["init_tau"] is None
    assert options["tempered_fixed"] == {**options["tempered_fixed"], "learn_tau": False, "init_tau": 0.01}
    assert options["focal"]["loss_weighting"] == "focal" and options["asl"]["loss_weighting"] == "asymmetric"
    assert options["focal_g3"]["focal_gamma"] == 3.0
    assert all(o["train_mode"] == "image" and o["seed"] == 2 and o["epochs"] == 1 for o in options.values())


def test_the_plan_puts_baselines_per_seed_first_and_a_warm_cell_after_its_source():
    cfg = _cfg(grid={"loss": ["focal"], "seed": [0, 1], "init": ["base", "warm"]})
    steps = plan.steps(cfg, plan.expand(cfg), "data-fp", "earlier-fp")
    kinds = [(s.kind, s.name) for s in steps]
    assert kinds[:4] == [("zero_shot", "zero_shot-s0"), ("linear_probe", "linear_probe-s0"),
                         ("zero_shot", "zero_shot-s1"), ("linear_probe", "linear_probe-s1")]
    source = kinds.index(("warm_source", "mumic-focal-both-s0-earlier"))
    warm = next(s for s in steps if s.name == "mumic-focal-both-s0-warm")
    assert warm.source == "mumic-focal-both-s0-earlier" and kinds.index(("train", warm.name)) > source
    assert len({s.config_hash for s in steps}) == len(steps)


def test_config_hashes_change_with_what_a_run_computes_not_with_where_it_is_kept():
    cfg = _cfg(grid={"loss": ["asl"]})
    (cell,) = plan.expand(cfg)
    h = plan.steps(cfg, [cell], "fp", None)[-1].config_hash
    assert plan.steps(_cfg(grid={"loss": ["asl"]}, name="other", workdir="/elsewhere"), [cell], "fp", None)[-1].config_hash == h
    assert plan.steps(_cfg(grid={"loss": ["asl"]}, base={**BASE, "epochs": 2}), [cell], "fp", None)[-1].config_hash != h
    assert plan.steps(cfg, [cell], "other data", None)[-1].config_hash != h


@pytest.mark.parametrize(
    ("grid", "base", "message"),
    [
        ({"loss": ["nope"]}, BASE, "grid: unknown loss 'nope'; known: plain_bce, tempered_learned"),
        ({"head": ["no_such_head"]}, BASE, "grid: head 'no_such_head': unknown head"),
        ({"lr": [1]}, BASE, "grid: unknown axes ['lr']"),
        ({"loss": "focal"}, {**BASE, "epochs": 0}, "epochs: Input should be greater than or equal to 1"),
        ({"loss": "focal"}, {**BASE, "taxonomy": "x.yaml"}, "base: ['taxonomy'] are set by the ablation itself"),
        ({"loss": "focal"}, {**BASE, "bogus": 1}, "unknown training options: bogus"),
    ],
)
def test_a_bad_grid_or_base_is_one_line(grid, base, message):
    cfg = _cfg(grid=grid, base=base)
    with pytest.raises(AblationError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        for cell in plan.expand(cfg):
            plan.train_options(cfg, cell)
    assert "\n" not in str(e.value)


def test_mumic_ablate_refuses_a_bad_config_in_one_line_before_any_data_is_written(tmp_path, capsys):
    config = tmp_path / "ablate.yaml"
    config.write_text(f"output: {tmp_path / 'out'}\ngenerate: {{n_images: 10}}\ngrid: {{head: [nope]}}\n")
    assert main(["ablate", "--config", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mumic: error: grid: head 'nope': unknown head 'nope'; known: " + err[0].split("known: ")[1]]
    assert not (tmp_path / "out" / "data").exists()
    assert main(["ablate", "--output", str(tmp_path), "--generate", "{n_images: 5}", "--annotations", "a.csv"]) == 2
    assert "give either annotations (with taxonomy) or generate" in capsys.readouterr().err


def _row(kind, loss, seed, val_map, zsl=math.nan, seconds=10.0):
    return {c: None for c in COLUMNS} | {
        "run": f"{kind}-{loss}-{seed}", "kind": kind, "head": "mumic", "loss": loss, "train_mode": "both",
        "seed": seed, "init": "base", "config_hash": f"h-{kind}-{loss}-{seed}", "val_map": val_map,
        "test_map": val_map - 0.1, "test_f1_at_3": 0.5, "test_zsl_map": zsl, "test_zsl_f1_at_3": zsl,
        "test_gzsl_map": val_map - 0.1, "seconds": seconds,
    }


def test_the_markdown_table_groups_seeds_as_mean_and_sample_std():
    rows = [_row("train", "focal", s, v, zsl=0.3) for s, v in ((0, 0.6), (1, 0.7), (2, 0.8))]
    rows.append(_row("linear_probe", "untrained", 0, 0.5))
    text = markdown(rows)
    lines = text.splitlines()
    assert lines[0] == ("| run | head | loss | train_mode | init | seeds | val mAP | test mAP | test F1@3 | ZSL mAP "
                        "| ZSL F1@3 | GZSL mAP | s per run |")
    assert "| trained | mumic | focal | both | base | 0,1,2 | 0.7000 ± 0.1000 | 0.6000 ± 0.1000 |" in text
    assert "| linear probe, frozen start | mumic | - | - | base | 0 | 0.5000 | 0.4000 | 0.5000 | – | – |" in text
    assert "ZSL" not in markdown([_row("train", "focal", 0, 0.6)])  # no unseen labels: no ZSL columns


def test_results_are_rewritten_whole_and_read_back_by_config_hash(tmp_path):
    cfg = _cfg(grid={"loss": ["focal", "asl"]})
    steps = plan.steps(cfg, plan.expand(cfg), "fp", None)
    results = Results(tmp_path, steps)
    first = {**_row("train", "focal", 0, 0.6), "config_hash": steps[2].config_hash, "run": steps[2].name}
    results.add(first)
    again = Results(tmp_path, steps)
    assert again.get(steps[2])["val_map"] == pytest.approx(0.6) and again.get(steps[3]) is None
    assert again.get(steps[2])["best_epoch"] is None  # empty cells come back as None, metrics as NaN
    frame = pd.read_csv(tmp_path / "results.csv")
    assert list(frame.columns) == list(COLUMNS) and len(frame) == 1
    assert (tmp_path / "results.md").read_text().count("| trained |") == 1
