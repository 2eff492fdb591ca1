"""The `mumic` command line: every contract command exists, errors are one line, tag scores images."""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import cli

CONTRACT_COMMANDS = (
    "quickstart", "train", "evaluate", "promote", "retag", "tag", "search", "runs", "vacuum",
    "ablate", "index", "duplicates", "drift", "review",
)


def mumic(*args, **kw):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=120, **kw)


def test_help_lists_every_contract_command():
    r = mumic("--help")
    assert r.returncode == 0
    for name in CONTRACT_COMMANDS:
        assert name in r.stdout


@pytest.mark.parametrize("name", CONTRACT_COMMANDS)
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert "usage: mumic " + name in capsys.readouterr().out


def test_missing_command_and_unknown_option_exit_2():
    assert mumic().returncode == 2
    r = mumic("runs", "--no-such-flag")
    assert r.returncode == 2
    assert "unrecognized arguments" in r.stderr


def test_unreadable_model_is_one_line_error_and_nonzero_exit(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    r = mumic("tag", str(img), "--model", str(tmp_path / "no-model"))
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mumic: error:")
    assert "no saved model" in lines[0]


def assert_labels_follow_the_rule(record: dict, names, scores, thresholds, top_k: int):
    """`labels` = every label at/above its threshold plus the top-k, best first, with the model's scores."""
    order = np.argsort(-scores, kind="stable")
    want = [names[c] for rank, c in enumerate(order) if rank < top_k or scores[c] >= thresholds[c]]
    assert [c["label"] for c in record["labels"]] == want
    by_name = dict(zip(names, scores, strict=True))
    assert [c["score"] for c in record["labels"]] == pytest.approx([by_name[n] for n in want], abs=1e-4)


def test_tag_prints_labels_and_scores_any_labels_zero_shot(trained_tiny, tmp_path, capsys):
    from mumic_core import synthetic
    from mumic_core.scoring import Scorer

    _, folder, _ = trained_tiny
    rows = synthetic.write_dataset(tmp_path, 3, seed=5)
    paths = [str(tmp_path / r["uri"]) for r in rows]
    assert cli.main(["tag", *paths, "--model", str(folder), "--top-k", "1", "--json"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["image"] for o in out] == paths
    assert set(out[0]["scores"]) == set(synthetic.LABELS)

    # the model's own scores of the same files, and its thresholds
    scorer = Scorer.load(folder)
    pixels = np.stack([scorer.pixels(Path(p).read_bytes()) for p in paths])
    model = scorer.predict(pixels)
    for record, scores in zip(out, model.scores, strict=True):
        assert record["scores"] == pytest.approx(dict(zip(model.names, scores.tolist(), strict=True)), abs=1e-4)
        assert_labels_follow_the_rule(record, model.names, scores, scorer.thresholds, top_k=1)

    labels = ["red", "a cat", "blue"]
    assert cli.main(["tag", paths[0], "--model", str(folder), "--labels", "red, a cat ,blue", "--top-k", "1",
                     "--json"]) == 0
    z = json.loads(capsys.readouterr().out)
    assert list(z["scores"]) == labels
    assert all(0 < v < 1 for v in z["scores"].values())
    zero_shot = scorer.predict(pixels[:1], labels=labels).scores[0]
    assert list(z["scores"].values()) == pytest.approx(zero_shot.tolist(), abs=1e-4)
    assert_labels_follow_the_rule(z, labels, zero_shot, np.full(len(labels), 0.5), top_k=1)


def test_tag_reports_a_bad_image_and_still_tags_the_rest(trained_tiny, tmp_path, capsys):
    _, folder, _ = trained_tiny
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), "red").save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    code = cli.main(["tag", str(bad), str(good), str(tmp_path / "missing.jpg"), "--model", str(folder)])
    captured = capsys.readouterr()
    assert code == 1
    assert f"{bad}: error: not_an_image" in captured.err
    assert "missing.jpg: error: not_found" in captured.err
    assert captured.out.startswith(f"{good}:")


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_job_config_supplies_options_and_flags_override(tmp_path):
    cfg = write(tmp_path / "job.yaml", "output: /from/config\nmodel: models:/m@champion\ntext: red\nk: 7\n")
    inv = cli.parse(["search", "--config", cfg, "--k", "3"])
    assert inv.command == "search"
    (args,) = inv.options
    assert (args.output, args.model, args.text, args.k) == ("/from/config", "models:/m@champion", "red", 3)
    bad = write(tmp_path / "bad.yaml", "outptu: /typo\n")
    with pytest.raises(cli.UserError, match="unknown options"):
        cli.parse(["runs", "--config", bad])


RETAG_WHAT = "catalog: /c.parquet\nmodel: models:/m@champion\noutput: /out\n"
RETAG_FLAGS = ["--catalog", "/c.parquet", "--model", "models:/m@champion", "--output", "/out"]


@pytest.mark.parametrize("key,value", [("max_pixels", "-1"), ("fetch_threads", "-3")])
def test_a_bad_value_is_the_same_one_line_error_from_a_flag_or_the_config(key, value, tmp_path, capsys):
    flag = "--" + key.replace("_", "-")
    problem = f"Input should be greater than or equal to 1 (got {value})"
    assert cli.main(["retag", *RETAG_FLAGS, flag, value]) == 2
    assert capsys.readouterr().err == f"mumic: error: {flag}: {problem}\n"
    cfg = write(tmp_path / "job.yaml", f"{RETAG_WHAT}{key}: {value}\n")
    assert cli.main(["retag", "--config", cfg]) == 2
    assert capsys.readouterr().err == f"mumic: error: config file {cfg}: {key}: {problem}\n"


def test_a_bad_value_exits_2_with_one_line_from_the_shell(tmp_path):
    cfg = write(tmp_path / "job.yaml", RETAG_WHAT + "max_pixels: -1\n")
    problem = "Input should be greater than or equal to 1 (got -1)"
    for argv, line in (
        (["--config", cfg], f"mumic: error: config file {cfg}: max_pixels: {problem}"),
        ([*RETAG_FLAGS, "--max-pixels", "-1"], f"mumic: error: --max-pixels: {problem}"),
    ):
        r = mumic("retag", *argv)
        assert r.returncode == 2
        assert r.stderr.splitlines() == [line]


def test_a_wrong_type_in_the_config_is_refused_in_one_line(tmp_path, capsys):
    cfg = write(tmp_path / "job.yaml", RETAG_WHAT + 'top_k: "abc"\n')
    assert cli.main(["retag", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"mumic: error: config file {cfg}: top_k: Input should be a valid integer, unable to parse string as an "
        "integer (got abc)\n"
    )


def test_an_unknown_config_key_is_refused(tmp_path, capsys):
    cfg = write(tmp_path / "job.yaml", RETAG_WHAT + "max_pixel: 5\ntop-k: 3\n")
    assert cli.main(["retag", "--config", cfg]) == 2
    assert capsys.readouterr().err == f"mumic: error: config file {cfg}: unknown options ['max_pixel']\n"


def test_required_options_may_come_from_the_config_alone(tmp_path, capsys):
    inv = cli.parse(["retag", "--config", write(tmp_path / "job.yaml", RETAG_WHAT + "full: true\n")])
    args, options = inv.options
    assert (args.catalog, args.model, args.output) == ("/c.parquet", "models:/m@champion", "/out")
    assert options.full is True and options.top_k == 10  # the RetagOptions default
    inv = cli.parse(["tag", "--config", write(tmp_path / "tag.yaml", "images: [a.png, b.png]\nmodel: m\n")])
    assert inv.options[0].images == ["a.png", "b.png"]
    assert cli.main(["retag", "--model", "m", "--output", "/out"]) == 2
    assert capsys.readouterr().err == "mumic: error: --catalog is required (or catalog: in --config)\n"


def test_flags_arrive_typed_and_yaml_text_options_read_as_written(tmp_path):
    cfg = write(tmp_path / "job.yaml", RETAG_WHAT + "run_date: 2026-11-20\nrun_id: 20261120\n")
    args, options = cli.parse(["retag", "--config", cfg, "--top-k", "3", "--no-progress", "--full"]).options
    assert (options.top_k, options.progress, options.full) == (3, False, True)
    assert (options.run_date, options.run_id) == ("2026-11-20", "20261120")
    train, _ = cli.parse(["train", "--annotations", "a", "--taxonomy", "t"]).options
    assert (train.annotations, train.epochs, train.use_gpu) == ("a", 10, False)


def test_every_registered_command_is_in_the_contract_and_the_readme():
    registered = {mod.NAME for mod in cli.COMMANDS}
    assert registered == set(CONTRACT_COMMANDS)
    root = Path(cli.__file__).resolve().parents[1]
    for doc in ("docs/contract.md", "README.md"):
        rows = re.findall(r"^\| `mumic (\w+)", (root / doc).read_text(), re.M)
        assert set(rows) == registered and len(rows) == len(set(rows)), doc


def test_an_alias_flag_sets_the_same_option_as_its_long_flag():
    # without abbreviations: --from is a flag of its own, not a prefix of --from-run
    short = cli.parse(["drift", "--output", "o", "--from", "a", "--to", "b"], allow_abbrev=False).values
    long = cli.parse(["drift", "--output", "o", "--from-run", "a", "--to-run", "b"], allow_abbrev=False).values
    assert short == long and (short["from_run"], short["to_run"]) == ("a", "b")
    assert cli.command_fields("drift")["from_run"].aliases == ("--from",)


def test_an_alias_must_be_a_long_flag_of_an_option():
    from pydantic import Field
    from pydantic.dataclasses import dataclass

    from jobs.options import add_options, fields

    @dataclass(frozen=True)
    class Positional:
        images: list[str] = Field(
            default_factory=list, json_schema_extra={"cli": {"positional": "IMAGE", "aliases": ["--image"]}}
        )

    @dataclass(frozen=True)
    class Short:
        level: int = Field(1, json_schema_extra={"cli": {"aliases": ["-l"]}})

    for schema, name in ((Positional, "images"), (Short, "level")):
        with pytest.raises(TypeError, match=name):
            add_options(argparse.ArgumentParser(), fields([schema]), {})


def test_the_cli_uses_no_argparse_internals_and_commands_do_not_import_it():
    for path in sorted(Path(cli.__file__).parent.glob("*.py")):
        text = path.read_text()
        assert "._actions" not in text and "argparse._" not in text, path.name
        assert "importlib" not in text, path.name
        if path.name.startswith("cmd_"):
            assert "jobs.cli" not in text, f"{path.name} should import jobs.errors, not jobs.cli"
