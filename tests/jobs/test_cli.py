"""The `mumic` command line: every contract command exists, errors are one line, tag scores images."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from jobs import cli

CONTRACT_COMMANDS = ("quickstart", "train", "evaluate", "promote", "retag", "tag", "search", "runs")


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


def test_tag_prints_labels_and_scores_any_labels_zero_shot(trained_tiny, tmp_path, capsys):
    from mumic_core import synthetic

    _, folder, _ = trained_tiny
    rows = synthetic.write_dataset(tmp_path, 3, seed=5)
    paths = [str(tmp_path / r["uri"]) for r in rows]
    assert cli.main(["tag", *paths, "--model", str(folder), "--json"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["image"] for o in out] == paths
    assert set(out[0]["scores"]) == set(synthetic.LABELS)
    assert cli.main(["tag", paths[0], "--model", str(folder), "--labels", "red, a cat ,blue", "--json"]) == 0
    z = json.loads(capsys.readouterr().out)
    assert list(z["scores"]) == ["red", "a cat", "blue"]
    assert all(0 < v < 1 for v in z["scores"].values())


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


def test_job_config_supplies_options_and_flags_override(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("output: /from/config\nmodel: models:/m@champion\ntext: red\nk: 7\n")
    args = cli.parse_args(["search", "--config", str(cfg), "--k", "3"])
    assert (args.output, args.model, args.text, args.k) == ("/from/config", "models:/m@champion", "red", 3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("outptu: /typo\n")
    with pytest.raises(cli.UserError, match="unknown options"):
        cli.parse_args(["runs", "--config", str(bad)])
