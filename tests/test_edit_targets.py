"""Edit targets and held-out rewordings: grammar, files, errors (no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prunescope.edit.rewordings import REWORDINGS, heldout_templates
from prunescope.edit.targets import (
    FieldKey, Target, load_targets, parse_target, parse_targets, rows_text, target_fields,
)
from prunescope.errors import PrunescopeError
from prunescope.probe.run import DIGITS
from prunescope.probe.template import load_template, parse_template

PEOPLE_COLUMNS = [
    {"name": "Name", "type": "text", "max_tokens": 8},
    {"name": "Gender", "type": "choice", "choices": ["Male", "Female", "Non-binary"]},
    {"name": "Age", "type": "digits", "min_length": 1, "max_length": 3},
]
GENDERS = ("Male", "Female", "Non-binary")


@pytest.fixture(scope="module")
def people():
    return load_template("people")


def probs(target: Target) -> dict[str, float]:
    return dict(zip(target.values, target.probs))


def error(spec: str, template) -> str:
    with pytest.raises(PrunescopeError) as info:
        parse_target(spec, template)
    return str(info.value)


# ---- keys and the grammar ------------------------------------------------------------------


def test_field_key_labels_match_probe_labels():
    assert FieldKey("Gender", None).label == "Gender"
    assert FieldKey("Age", 1).label == "Age digit 1"
    assert FieldKey("Age", 2).spelling == "Age.digit2"


def test_target_fields_of_people(people):
    assert list(target_fields(people)) == ["Gender", "Age.digit1", "Age.digit2", "Age.digit3"]


def test_uniform_over_all_values(people):
    t = parse_target("Gender=uniform", people)
    assert t.key == FieldKey("Gender", None) and t.values == GENDERS and t.rows is None
    assert np.allclose(t.as_array(), [1 / 3] * 3)
    d = parse_target("Age.digit2=uniform", people)
    assert d.values == DIGITS and np.allclose(d.as_array(), 0.1)
    assert t.describe() == "Gender: uniform"


def test_uniform_digit_range(people):
    t = parse_target("Age.digit1=uniform:2-6", people)
    assert t.key == FieldKey("Age", 1)
    assert probs(t) == pytest.approx({d: (0.2 if "2" <= d <= "6" else 0.0) for d in DIGITS})
    assert t.describe() == "Age digit 1: uniform over 2-6"
    mixed = parse_target("Age.digit1=uniform:0-1,7", people)
    assert [v for v, p in probs(mixed).items() if p > 0] == ["0", "1", "7"]


def test_uniform_value_list(people):
    t = parse_target("Gender=uniform:Male,Female", people)
    assert probs(t) == pytest.approx({"Male": 0.5, "Female": 0.5, "Non-binary": 0.0})
    assert t.describe() == "Gender: uniform over Male, Female"
    assert parse_target("Age.digit3=uniform:5", people).describe() == "Age digit 3: all mass on 5"


def test_explicit_probabilities(people):
    t = parse_target("Gender=Male:0.7, Female:0.3", people)
    assert probs(t) == pytest.approx({"Male": 0.7, "Female": 0.3, "Non-binary": 0.0})
    assert t.describe() == "Gender: Male 0.7, Female 0.3"
    d = parse_target("Age.digit1=2:0.25,3:0.25,4:0.5", people)
    assert d.as_array().sum() == pytest.approx(1) and probs(d)["4"] == 0.5


def test_explicit_sum_within_tolerance_is_renormalised(people):
    t = parse_target("Gender=Male:0.5000004,Female:0.5", people)
    assert sum(t.probs) == pytest.approx(1, abs=1e-12)


def test_case_insensitive_field_and_value(people):
    t = parse_target("gender=male:1", people)
    assert t.key == FieldKey("Gender", None) and probs(t)["Male"] == 1
    assert parse_target("AGE.DIGIT1=uniform", people).key == FieldKey("Age", 1)


@pytest.mark.parametrize("rows, want", [("1", (1,)), ("1-3", (1, 2, 3)), ("1,4", (1, 4)), ("4,1-2", (1, 2, 4))])
def test_rows(people, rows, want):
    t = parse_target(f"Age.digit1@{rows}=uniform:2-6", people)
    assert t.rows == want and t.applies_to(want[0]) and not t.applies_to(99)


def test_rows_in_description(people):
    assert parse_target("Gender@1=uniform", people).describe() == "Gender (row 1): uniform"
    assert rows_text((1, 2, 3, 5)) == "1-3, 5"


# ---- errors --------------------------------------------------------------------------------


def test_error_unknown_column_lists_valid_fields(people):
    msg = error("Height=uniform", people)
    assert "'Height'" in msg and "Gender, Age.digit1, Age.digit2, Age.digit3" in msg


def test_error_text_column(people):
    msg = error("Name=uniform", people)
    assert "Name is a text column" in msg and "Gender, Age.digit1, Age.digit2, Age.digit3" in msg


def test_error_bare_digits_column(people):
    msg = error("Age=uniform", people)
    assert "Age.digit1" in msg and "Age.digit3" in msg


def test_error_digit_position_out_of_range(people):
    assert "'Age.digit4'" in error("Age.digit4=uniform", people)


def test_error_unknown_value_names_valid_values(people):
    msg = error("Gender=uniform:Male,Robot", people)
    assert "'Robot'" in msg and "Male, Female, Non-binary" in msg
    assert "'x'" in error("Age.digit1=x:1", people)


def test_error_sum_not_one(people):
    msg = error("Gender=Male:0.5,Female:0.4", people)
    assert "sum to 0.9" in msg


@pytest.mark.parametrize("spec, part", [
    ("Gender=Male:-0.5,Female:1.5", "-0.5"),
    ("Gender=Male:nan,Female:1", "nan"),
    ("Gender=Male:inf", "inf"),
    ("Gender=Male:half", "half"),
])
def test_error_bad_probability(people, spec, part):
    msg = error(spec, people)
    assert part in msg and "finite number >= 0" in msg


@pytest.mark.parametrize("spec", ["Gender=uniform:", "Gender=Male:0,Female:0", "Gender=uniform: , "])
def test_error_mass_on_nothing(people, spec):
    assert "mass on nothing" in error(spec, people)


def test_error_range_on_choice_or_backwards(people):
    assert "'6-2'" in error("Age.digit1=uniform:6-2", people)
    assert "'Male-Female'" in error("Gender=uniform:Male-Female", people)


def test_error_duplicate_value(people):
    assert "twice" in error("Gender=Male:0.5,Male:0.5", people)
    assert "twice" in error("Age.digit1=uniform:2-4,3", people)


@pytest.mark.parametrize("rows", ["0", "3-1", "a", "", "1,,2"])
def test_error_bad_rows(people, rows):
    assert f"rows {rows.strip()!r}" in error(f"Gender@{rows}=uniform", people)


def test_error_no_equals_and_unreadable_dist(people):
    assert "expected FIELD=DIST" in error("Gender", people)
    assert "cannot read 'lopsided'" in error("Gender=lopsided", people)


def test_error_names_the_spec(people):
    assert error("Gender=Male:0.5", people).startswith("target 'Gender=Male:0.5': Gender: probabilities sum")


def test_template_without_targetable_columns():
    only_text = parse_template({"prompt": "Names:\n{table}", "columns": [{"name": "Name", "type": "text"}]}, "names")
    assert "no choice or digits column" in error("Name=uniform", only_text)


# ---- files and lists -----------------------------------------------------------------------


def test_load_json(people, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"Age.digit1@1": "uniform:2-6", "Gender": {"Male": 0.5, "Female": 0.5}}))
    age, gender = load_targets(path, people)
    assert age.rows == (1,) and probs(age)["2"] == pytest.approx(0.2)
    assert probs(gender) == pytest.approx({"Male": 0.5, "Female": 0.5, "Non-binary": 0})


def test_load_yaml_keeps_digits_and_values_as_written(people, tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("Age.digit1@1-3:\n  0: 0.5\n  9: 0.5\nGender@2: uniform:Male,Female\n")
    age, gender = load_targets(path, people)
    assert age.rows == (1, 2, 3) and probs(age)["0"] == 0.5 and probs(age)["9"] == 0.5
    assert gender.rows == (2,) and probs(gender)["Male"] == 0.5


def test_parse_targets_mixes_specs_and_files(people, tmp_path):
    path = tmp_path / "t.yml"
    path.write_text("Gender: uniform\n")
    targets = parse_targets(["Age.digit1@1=uniform:2-6", str(path), "Age.digit1@2=uniform"], people)
    assert [t.key.spelling for t in targets] == ["Age.digit1", "Gender", "Age.digit1"]


@pytest.mark.parametrize("text, part", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "expected a non-empty mapping"),
    ("{}", "expected a non-empty mapping"),
])
def test_bad_json_file(people, tmp_path, text, part):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(PrunescopeError, match=part) as info:
        load_targets(path, people)
    assert str(path) in str(info.value)


def test_bad_yaml_and_missing_file(people, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("Gender: [unclosed\n")
    with pytest.raises(PrunescopeError, match="is not valid YAML"):
        load_targets(path, people)
    with pytest.raises(PrunescopeError, match="cannot read it"):
        load_targets(tmp_path / "missing.yaml", people)
    with pytest.raises(PrunescopeError, match="cannot read it"):
        parse_targets([str(tmp_path / "missing.json")], people)


@pytest.mark.parametrize("entry, part", [
    ({"Gender": {"Male": 0.5, "Robot": 0.5}}, "'Robot'"),
    ({"Gender": {"Male": 0.5, "Female": 0.6}}, "sum to 1.1"),
    ({"Gender": {"Male": True}}, "True"),
    ({"Gender": 5}, "got int"),
    ({"Name": "uniform"}, "text column"),
])
def test_file_entry_errors_name_file_and_key(people, tmp_path, entry, part):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(entry))
    with pytest.raises(PrunescopeError) as info:
        load_targets(path, people)
    msg = str(info.value)
    assert str(path) in msg and repr(next(iter(entry))) in msg and part in msg


def test_parse_targets_needs_one(people):
    with pytest.raises(PrunescopeError, match="no target given"):
        parse_targets([], people)


def test_parse_targets_rejects_bare_words(people):
    with pytest.raises(PrunescopeError, match="or a path to a .json"):
        parse_targets(["Gender"], people)


@pytest.mark.parametrize("specs, part", [
    (["Gender=uniform", "gender=Male:1"], "on every row"),
    (["Age.digit1@1-3=uniform", "Age.digit1@3,4=uniform:2-6"], "on row 3"),
    (["Age.digit1=uniform", "Age.digit1@2=uniform"], "on every row"),
])
def test_parse_targets_rejects_overlaps(people, specs, part):
    with pytest.raises(PrunescopeError) as info:
        parse_targets(specs, people)
    assert "Age.digit1" in str(info.value) or "Gender" in str(info.value)
    assert part in str(info.value) and "twice" in str(info.value)


def test_overlap_inside_one_file(people, tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("Gender: uniform\nGender@1: Male:1\n")
    with pytest.raises(PrunescopeError, match="targeted twice") as info:
        load_targets(path, people)
    assert str(path) in str(info.value)


def test_disjoint_rows_are_fine(people):
    targets = parse_targets(["Age.digit1@1=uniform:2-6", "Age.digit1@2-3=uniform"], people)
    assert [t.rows for t in targets] == [(1,), (2, 3)]


def test_target_checks_alignment():
    with pytest.raises(PrunescopeError, match="probabilities"):
        Target(FieldKey("Gender", None), ("Male", "Female"), (1.0,))
    with pytest.raises(PrunescopeError, match="sum to 1"):
        Target(FieldKey("Gender", None), ("Male", "Female"), (0.5, 0.6))


# ---- rewordings ----------------------------------------------------------------------------


def test_people_rewordings_are_valid_and_distinct(people):
    prompts = REWORDINGS["people"]
    assert len(prompts) >= 4 and len(set(prompts) | {people.prompt}) == len(prompts) + 1
    for i, prompt in enumerate(prompts):
        t = parse_template({"prompt": prompt, "columns": PEOPLE_COLUMNS}, f"r{i}")
        assert t.columns == people.columns
        assert "{rows}" in prompt and prompt.count("{table}") == 1 and prompt.endswith("{table}")
        assert "{rows}" not in t.instruction(5) and "5" in t.instruction(5)
    first_words = {p.split()[0] for p in prompts} | {people.prompt.split()[0]}
    assert len(first_words) == len(prompts) + 1


def test_heldout_for_builtin(people):
    held = heldout_templates(people)
    assert [t.name for t in held] == [f"people/reworded-{i}" for i in range(1, len(REWORDINGS["people"]) + 1)]
    assert all(t.columns == people.columns for t in held)


def write_template(path, prompt, columns):
    path.write_text(json.dumps({"name": "mine", "prompt": prompt, "columns": columns}))
    return path


def test_heldout_for_user_template(tmp_path):
    user = parse_template({"name": "mine", "prompt": "Table of {rows}:\n{table}", "columns": PEOPLE_COLUMNS})
    assert heldout_templates(user) == []
    a = write_template(tmp_path / "a.json", "Write {rows} rows:\n{table}", PEOPLE_COLUMNS)
    b = tmp_path / "b.yaml"
    b.write_text("prompt: |-\n  Another {rows} rows\n  {table}\n" + "columns:\n" + "".join(
        f"  - {json.dumps(c)}\n" for c in PEOPLE_COLUMNS))
    held = heldout_templates(user, [a, b])
    assert [t.name for t in held] == [str(a), str(b)]
    assert all(t.columns == user.columns for t in held)


@pytest.mark.parametrize("change, part", [
    ({"name": "Years"}, "Age (digits, 1-3)"),
    ({"max_length": 2}, "Age (digits, 1-2)"),
])
def test_heldout_rejects_other_columns(tmp_path, change, part):
    user = parse_template({"name": "mine", "prompt": "Table of {rows}:\n{table}", "columns": PEOPLE_COLUMNS})
    cols = PEOPLE_COLUMNS[:2] + [{**PEOPLE_COLUMNS[2], **change}]
    path = write_template(tmp_path / "bad.json", "Other {rows}:\n{table}", cols)
    with pytest.raises(PrunescopeError) as info:
        heldout_templates(user, [path])
    assert str(path) in str(info.value) and "column 3" in str(info.value) and part in str(info.value)


def test_heldout_rejects_missing_column_and_file(tmp_path):
    user = parse_template({"name": "mine", "prompt": "Table of {rows}:\n{table}", "columns": PEOPLE_COLUMNS})
    path = write_template(tmp_path / "short.json", "Other {rows}:\n{table}", PEOPLE_COLUMNS[:2])
    with pytest.raises(PrunescopeError, match="got no column"):
        heldout_templates(user, [path])
    with pytest.raises(PrunescopeError, match="does not exist"):
        heldout_templates(user, [tmp_path / "nope.yaml"])


def test_builtin_name_with_other_columns_gets_no_builtin_rewordings():
    fake = parse_template({"name": "people", "prompt": "Genders:\n{table}", "columns": PEOPLE_COLUMNS[1:2]})
    assert heldout_templates(fake) == []
