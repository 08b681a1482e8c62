"""Typed configs: values checked against their annotations, nested configs, YAML in and out, the CLI."""

from dataclasses import dataclass

import pytest
import yaml

from upcycle.cli import main
from upcycle.config import Config, conform, from_text, option
from upcycle.errors import ConfigError


@pytest.mark.parametrize(
    "value, tp, expected",
    [
        (3, int, 3),
        (3, float, 3.0),
        (0.5, float, 0.5),
        ("a", str, "a"),
        (True, bool, True),
        (None, int | None, None),
        ([1, 2], tuple[int, ...], (1, 2)),
        ((1, 2), list[int], [1, 2]),
        ("auto", str | int, "auto"),
        (4, str | int, 4),
        ([0.9, 0.95], tuple[float, float], (0.9, 0.95)),
        ({"a": 1}, dict, {"a": 1}),
    ],
)
def test_values_that_fit_their_annotation(value, tp, expected):
    got = conform(value, tp, "key")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    "value, tp, expected",
    [
        ("3", int, "an integer"),
        (True, int, "an integer"),
        (1.5, int, "an integer"),
        ("x", float, "a number"),
        (1, str, "a string"),
        (1, bool, "true or false"),
        ("a", list[int], "a list of integers"),
        ([1, 2, 3], tuple[float, float], "a list of numbers"),
        (3, dict, "a mapping"),
        ("x", int | None, "an integer or null"),
    ],
)
def test_values_that_do_not_fit_name_the_key_and_the_type(value, tp, expected):
    with pytest.raises(ConfigError, match=f"key=.* is not allowed: expected {expected}, got {type(value).__name__}"):
        conform(value, tp, "key")


def test_an_item_of_the_wrong_type_is_named_by_its_index():
    with pytest.raises(ConfigError, match=r"key\[1\]='a' is not allowed: expected an integer, got str"):
        conform([1, "a"], list[int], "key")


def test_command_line_text_is_parsed_by_annotation():
    assert from_text("1,4,16", tuple[int, ...], "--batches") == [1, 4, 16]
    assert from_text("[1, 4]", tuple[int, ...], "--batches") == [1, 4]
    assert from_text("none", list[int] | None, "--layers") is None
    assert from_text("3", str | int, "--layer") == 3 and from_text("auto", str | int, "--layer") == "auto"
    assert from_text("1e-3", float, "--lr") == 1e-3
    assert from_text("[{name: lm}]", list[dict], "--losses") == [{"name": "lm"}]
    with pytest.raises(ConfigError, match="--batches 'one': expected a list of integers"):
        from_text("one", tuple[int, ...], "--batches")


@dataclass
class Inner(Config):
    size: int = 1


@dataclass
class Outer(Config):
    name: str = option("x", "a name", choices=("x", "y"))
    inner: Inner = option(factory=Inner)
    items: list[Inner] = option(factory=list)

    def validate(self):
        if self.inner.size > 10:
            raise ConfigError("inner too big")


def test_nested_configs_from_mappings_choices_and_validation():
    outer = Outer.from_dict({"inner": {"size": 2}, "items": [{"size": 3}]})
    assert outer.inner == Inner(2) and outer.items == [Inner(3)]
    with pytest.raises(ConfigError, match=r"items\[0\]: unknown key 'width'; known: size"):
        Outer.from_dict({"items": [{"width": 3}]})
    with pytest.raises(ConfigError, match="name='z' is not allowed: one of x, y"):
        Outer(name="z")
    with pytest.raises(ConfigError, match="inner too big"):
        Outer(inner={"size": 11})
    assert Outer.from_dict(yaml.safe_load(Outer(items=[Inner(5)]).to_yaml())) == Outer(items=[Inner(5)])


def test_print_config_is_a_recipe_that_reads_back(tmp_path, capsys):
    assert (
        main(["sparsify", "tiny-llama", str(tmp_path / "out"), "--keep", "8", "--layers", "0,1", "--print-config"]) == 0
    )
    recipe = capsys.readouterr().out
    values = yaml.safe_load(recipe)
    assert (
        values["model"] == "tiny-llama" and values["keep"] == 8 and values["layers"] == [0, 1] and values["bank"] == 64
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    assert main(["sparsify", "--config", str(path), "--print-config"]) == 0
    assert capsys.readouterr().out == recipe
    assert not (tmp_path / "out").exists()
