"""params.yaml validation: each bad value stops with one line naming the key."""

from __future__ import annotations

import itertools
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dvc.utils.serialize import modify_yaml

from skin_lesion.errors import PipelineError
from skin_lesion.params import load_params
from tests.conftest import REPO, small_params


def _write(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


def test_committed_params_are_valid() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.base.melanoma_class in params.base.classes
    assert len(params.base.classes) == 9


def _lists(section: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The key path of every list in a params mapping."""
    for key, value in section.items():
        if isinstance(value, dict):
            yield from _lists(value, (*prefix, key))
        elif isinstance(value, list):
            yield (*prefix, key)


def _key_then_comment(text: str) -> set[tuple[str, str]]:
    """Each line that ends a key with no value on it, paired with a whole-line comment right below."""
    lines = [line.strip() for line in text.splitlines()]
    return {
        (line, after)
        for line, after in itertools.pairwise(lines)
        if re.fullmatch(r"[^#\s][^#]*:\s*(#.*)?", line) and after.startswith("#")
    }


def test_a_list_set_with_dvc_exp_run_leaves_every_comment_where_it_was(tmp_path: Path) -> None:
    committed = (REPO / "params.yaml").read_text(encoding="utf-8")
    for path in _lists(yaml.safe_load(committed)):
        rewritten = shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
        with modify_yaml(rewritten) as params:  # what `dvc exp run -S key=value` does to the file
            section = params
            for key in path[:-1]:
                section = section[key]
            section[path[-1]] = ["a", "b"]
        moved = _key_then_comment(Path(rewritten).read_text(encoding="utf-8")) - _key_then_comment(committed)
        assert not moved, f"-S {'.'.join(path)}=[a,b] puts a comment between the key and its values: {moved}"


def test_unknown_key_is_named(tmp_path: Path) -> None:
    params = small_params(train={"epoch": 3})
    with pytest.raises(PipelineError, match=r"params.yaml: train.epoch: Extra inputs"):
        load_params(_write(tmp_path, params))


def test_wrong_type_is_named(tmp_path: Path) -> None:
    params = small_params(train={"epochs": "many"})
    with pytest.raises(PipelineError, match=r"train.epochs: Input should be a valid integer"):
        load_params(_write(tmp_path, params))


def test_out_of_range_value_is_named(tmp_path: Path) -> None:
    params = small_params(split={"val_fraction": 0.9})
    with pytest.raises(PipelineError, match=r"split.val_fraction: Input should be less than 0.5"):
        load_params(_write(tmp_path, params))


def test_unknown_source_is_named(tmp_path: Path) -> None:
    params = small_params(download={"source": "ftp"})
    expected = r"download.source: Input should be 'isic', 'local' or 'synthetic'"
    with pytest.raises(PipelineError, match=expected):
        load_params(_write(tmp_path, params))


def test_melanoma_class_must_be_a_class(tmp_path: Path) -> None:
    params = small_params(base={"melanoma_class": "melanomas"})
    with pytest.raises(PipelineError, match=r"base.melanoma_class 'melanomas' is not in base.classes"):
        load_params(_write(tmp_path, params))


def test_diagnosis_classes_must_be_classes(tmp_path: Path) -> None:
    params = small_params(split={"diagnosis_classes": {"mel": ["melanomas"]}})
    expected = r"split.diagnosis_classes\['mel'\] has 'melanomas', which is not in base.classes"
    with pytest.raises(PipelineError, match=expected):
        load_params(_write(tmp_path, params))


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"nope.yaml: file not found"):
        load_params(tmp_path / "nope.yaml")


def test_invalid_yaml_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("base: [unclosed\n", encoding="utf-8")
    with pytest.raises(PipelineError, match=r"params.yaml: not valid YAML") as raised:
        load_params(path)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("section", "values", "expected"),
    [
        ("train", {"epochs": True}, r"train.epochs: Input should be a valid integer"),
        ("train", {"epochs": 2.5}, r"train.epochs: Input should be a valid integer"),
        ("train", {"learning_rate": float("inf")}, r"train.learning_rate: Input should be a finite number"),
        ("train", {"dropout": float("nan")}, r"train.dropout: Input should be a finite number"),
        (
            "evaluate",
            {"target_sensitivity": True},
            r"evaluate.target_sensitivity: Input should be a valid number",
        ),
        (
            "rebalance",
            {"samples_per_class": False},
            r"rebalance.samples_per_class: Input should be a valid integer",
        ),
    ],
)
def test_values_that_pass_a_lax_schema_but_make_no_sense_are_refused(
    tmp_path: Path, section: str, values: dict, expected: str
) -> None:
    with pytest.raises(PipelineError, match=expected):
        load_params(_write(tmp_path, small_params(**{section: values})))


def test_non_finite_numbers_written_in_yaml_are_refused(tmp_path: Path) -> None:
    text = (
        (REPO / "params.yaml")
        .read_text(encoding="utf-8")
        .replace("learning_rate: 0.001", "learning_rate: .inf")
    )
    (tmp_path / "params.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(PipelineError, match=r"train.learning_rate: Input should be a finite number"):
        load_params(tmp_path / "params.yaml")
