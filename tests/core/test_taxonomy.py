import json

import numpy as np
import pytest

from mumic_core.taxonomy import Label, Taxonomy, TaxonomyError


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_taxonomy_loads_yaml_with_templates_prompts_and_unseen_flags(tmp_path):
    p = write(
        tmp_path,
        "tax.yaml",
        """
templates: ["a photo of a {}.", "a picture of a {}."]
labels:
  - pool
  - {name: sea view, prompts: ["a hotel room with a view of the sea"]}
  - {name: sauna, unseen: true}
""",
    )
    tax = Taxonomy.load(p)
    assert tax.names == ["pool", "sea view", "sauna"]
    assert tax.unseen_mask == [False, False, True]
    assert tax.seen_names == ["pool", "sea view"]
    assert tax.prompts_for("pool") == ["a photo of a pool.", "a picture of a pool."]
    assert tax.prompts_for("sea view") == ["a hotel room with a view of the sea"]


def test_taxonomy_loads_json_and_plain_list_equivalently(tmp_path):
    a = Taxonomy.load(write(tmp_path, "t.json", json.dumps({"labels": ["a", "b"]})))
    b = Taxonomy.load(write(tmp_path, "t.yaml", "- a\n- b\n"))
    assert a == b
    assert a.sha256 == b.sha256


def test_taxonomy_sha256_is_stable_and_changes_with_content():
    t1 = Taxonomy.from_names(["x", "y"])
    t2 = Taxonomy.from_dict({"labels": ["x", "y"], "templates": ["a photo of a {}."]})
    t3 = Taxonomy.from_names(["y", "x"])
    assert t1.sha256 == t2.sha256
    assert len(t1.sha256) == 64
    assert t1.sha256 != t3.sha256  # order is part of the score vector's meaning


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"labels": ["a", "a"]}, "duplicate label name 'a'"),
        ({"labels": ["a", "  "]}, "empty name"),
        ({"labels": []}, "no labels"),
        ({"labels": ["a"], "templates": ["no placeholder"]}, "must be a string containing"),
        ({"labels": [{"name": "a", "unseen": "yes"}]}, "'unseen' must be true or false"),
        ({"labels": [{"name": "a", "colour": 1}]}, "unknown keys"),
        ({"labels": [{"prompts": ["x"]}]}, "has no name"),
        ({"labels": "a,b"}, "must be a list"),
        ({"labelz": ["a"]}, "unknown taxonomy keys"),
        ({"labels": [{"name": "a", "prompts": [""]}]}, "empty prompt"),
    ],
)
def test_taxonomy_defects_raise_one_line_errors(data, needle):
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.from_dict(data)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_taxonomy_invalid_yaml_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(TaxonomyError, match="not valid YAML"):
        Taxonomy.load(write(tmp_path, "bad.yaml", "labels: [a, b\n"))
    with pytest.raises(TaxonomyError, match="not found"):
        Taxonomy.load(tmp_path / "missing.yaml")


def test_taxonomy_encode_labels_multi_hot_and_unknown_label_named():
    tax = Taxonomy.from_names(["a", "b", "c"])
    y = tax.encode_labels([["a", "c"], [], ["b"]])
    assert y.tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0]]
    assert y.dtype == np.uint8
    with pytest.raises(TaxonomyError, match="'zebra'"):
        tax.encode_labels([["zebra"]])


def test_with_labels_keeps_templates_and_known_prompts():
    tax = Taxonomy((Label("a", ("custom a",)), Label("b")), ("x {} y",))
    z = tax.with_labels(["a", "new"])
    assert z.prompts_for("a") == ["custom a"]
    assert z.prompts_for("new") == ["x new y"]
