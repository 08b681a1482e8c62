"""Bad input ends in one line and exit 2 from the CLI, the same error from the Python API, and no new folder."""

import re

import pytest

from upcycle import hub
from upcycle.cli import main
from upcycle.commands import repair, sparsify
from upcycle.errors import ConfigError, NotACausalLM
from upcycle.modules import BankSparsity, UpcycleSparseForCausalLM
from upcycle.train import TrainConfig

PROGRESS_LINE = re.compile(r"^[\w ()→-]+: layer \d+/\d+ in [\d.]+ s, peak [\d,]+ MB resident$")


def one_line_error(argv, capsys) -> str:
    """The error's one line, last on stderr; before it only a streamed pass's progress lines (what a log
    shows off a terminal), never a traceback."""
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    *before, last = err.splitlines()
    assert err.endswith("\n") and last.startswith("upcycle: error: "), err
    assert all(PROGRESS_LINE.match(line) for line in before), err
    return last + "\n"


@pytest.fixture
def folders(tmp_path):
    hub.save(hub.tiny("llama"), hub.byte_tokenizer(), tmp_path / "dense")
    sparse = UpcycleSparseForCausalLM.from_dense(hub.tiny("llama"), BankSparsity(32, 8, 16), [1])
    hub.save(sparse, hub.byte_tokenizer(), tmp_path / "sparse")
    return tmp_path


def test_an_out_that_is_a_file_or_cannot_be_created(folders, capsys):
    a_file = folders / "a-file"
    a_file.write_text("not a folder")
    for verb in ("convert", "sparsify"):
        assert "is a file" in one_line_error([verb, str(folders / "dense"), str(a_file)], capsys)
        assert "cannot be created" in one_line_error([verb, str(folders / "dense"), str(a_file / "sub")], capsys)
    assert a_file.read_text() == "not a folder"


def test_truncated_or_corrupt_weights(folders, capsys):
    weights = folders / "dense" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert "weights cannot be read" in one_line_error(["eval", str(folders / "dense")], capsys)
    weights.write_bytes(b"\x00" * 64)
    assert "weights cannot be read" in one_line_error(["inspect", str(folders / "dense")], capsys)
    with pytest.raises(NotACausalLM, match="weights cannot be read"):
        hub.load(folders / "dense")


def test_non_positive_threads(capsys):
    assert "threads=0" in one_line_error(["--threads", "0", "inspect", "tiny-llama"], capsys)
    assert "threads=-2" in one_line_error(["--threads", "-2", "inspect", "tiny-llama"], capsys)


def test_a_config_value_of_the_wrong_type_names_the_key_and_the_type(tmp_path, capsys):
    recipe = tmp_path / "run.yaml"
    recipe.write_text("model: tiny-llama\nseq_len: long\n")
    err = one_line_error(["train", "--config", str(recipe)], capsys)
    assert "seq_len='long'" in err and "expected an integer" in err
    recipe.write_text("model: tiny-llama\nstages: [{name: main, tokens: many}]\n")
    err = one_line_error(["train", "--config", str(recipe)], capsys)
    assert "tokens='many'" in err and "expected an integer" in err
    recipe.write_text("keep: [16]\n")
    err = one_line_error(["sparsify", "tiny-llama", str(tmp_path / "x"), "--config", str(recipe)], capsys)
    assert "keep=[16]" in err and "expected an integer" in err
    assert "--keep 'many': expected an integer" in one_line_error(["sparsify", "a", "b", "--keep", "many"], capsys)


def test_a_failed_command_leaves_no_new_folder(folders, text_folder, tmp_cache, capsys):
    out = folders / "new" / "deeper"
    one_line_error(["sparsify", str(folders / "dense"), str(out), "--calibration", "/no/such/text"], capsys)
    assert not out.exists() and not out.parent.exists()
    run = folders / "run"
    one_line_error(
        ["train", "--model", "tiny-llama", "--data", str(text_folder), "--out", str(run), "--resume"], capsys
    )
    assert not run.exists()


# the same bad values, from the command line and from Python: the same error
SAME = [
    ("sparsify", ["--keep", "80"], dict(keep=80), "keep=80"),
    ("sparsify", ["--gate", "soft"], dict(gate="soft"), "gate='soft'"),
    ("sparsify", ["--warmup-steps", "-1"], dict(warmup_steps=-1), "warmup_steps=-1"),
    ("repair", ["--lengths", "32"], dict(lengths=(32,)), "lengths=(32,)"),
    ("repair", ["--objective", "global"], dict(objective="global"), "objective='global'"),
    ("repair", ["--steps", "0"], dict(steps=0), "steps=0"),
    ("train", ["--lr", "-1"], dict(lr=-1.0), "lr=-1.0"),
    ("train", ["--schedule", "step"], dict(schedule="step"), "schedule='step'"),
    ("train", ["--global-batch", "3"], dict(global_batch=3), "global_batch=3"),
]


@pytest.mark.parametrize("verb, argv, values, message", SAME, ids=[f"{v}-{a[0]}" for v, a, _, _ in SAME])
def test_the_python_api_rejects_what_the_cli_rejects(verb, argv, values, message, tmp_path, capsys):
    sources = {
        "sparsify": ["tiny-llama", str(tmp_path / "x")],
        "repair": ["tiny-llama", "--reference", "tiny-llama"],
        "train": ["--model", "tiny-llama"],
    }[verb]
    cli_error = one_line_error([verb, *sources, *argv], capsys).removeprefix("upcycle: error: ").strip()
    config = {
        "sparsify": sparsify.SparsifyConfig,
        "repair": repair.RepairConfig,
        "train": lambda **v: TrainConfig(model="tiny-llama", **v),
    }[verb]
    with pytest.raises(ConfigError) as python_error:
        config(**values)
    assert message in cli_error and str(python_error.value) == cli_error
    assert not (tmp_path / "x").exists()
