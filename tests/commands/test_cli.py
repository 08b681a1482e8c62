import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from upcycle import hub
from upcycle.cli import VERBS, main


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_tiny_moe(capsys):
    code, out, err = run(["inspect", "tiny-qwen2_moe"], capsys)
    assert code == 0
    assert "qwen2_moe" in out and "4 x 64, top-2, shared 128" in out


def test_eval_on_a_local_folder_from_a_yaml_config(tmp_path, text_folder, tmp_cache, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text(f"model: tiny-llama\ndata: {text_folder}\nseq-len: 64\nmax_blocks: 2\n")
    code, out, err = run(["eval", "--config", str(config), "--json"], capsys)
    assert code == 0, err
    assert '"tokens": 126' in out  # 2 blocks x 63 predicted tokens


def test_command_line_wins_over_the_config_file(tmp_path, text_folder, tmp_cache, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text(f"model: tiny-llama\ndata: {text_folder}\nseq_len: 64\nmax_blocks: 2\n")
    code, out, _ = run(["eval", "--config", str(config), "--max-blocks", "1", "--json"], capsys)
    assert code == 0 and '"tokens": 63' in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["inspect", "no/such-thing/here"], "no model"),
        (["inspect", "tiny-gpt9"], "unknown built-in"),
        (["eval"], "missing MODEL"),
        (["eval", "tiny-llama", "--data", "/definitely/not/here"], "no text source"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(argv, fragment, capsys, tmp_cache):
    code, out, err = run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("upcycle: error:") and fragment in err


def test_unknown_key_in_the_config_file(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("model: tiny-llama\nsequence_length: 64\n")
    code, _, err = run(["eval", "--config", str(config)], capsys)
    assert code == 2 and "sequence_length" in err and "seq_len" in err


def test_convert_writes_a_folder_that_reloads_identically(tmp_path, capsys):
    out = tmp_path / "converted"
    code, stdout, err = run(["convert", "tiny-mixtral", str(out)], capsys)
    assert code == 0, err
    assert "max |Δlogit| 0" in stdout
    original, _ = hub.load("tiny-mixtral")
    reloaded, _ = hub.load(out)
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        assert torch.equal(original(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    code, _, err = run(["convert", "tiny-mixtral", str(out)], capsys)
    assert code == 2 and "--overwrite" in err


def test_console_script_has_no_traceback_on_error():
    result = subprocess.run(
        [sys.executable, "-m", "upcycle.cli", "inspect", "./missing-model"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0


@pytest.mark.parametrize(
    "recipe",
    sorted(Path(__file__).resolve().parents[2].glob("recipes/*/*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_every_recipe_is_a_valid_config_of_its_verb(recipe, capsys):
    assert main([recipe.parent.name, "--config", str(recipe), "--print-config"]) == 0, capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    for key, value in yaml.safe_load(recipe.read_text()).items():
        if not isinstance(value, (list, dict)):
            assert printed[key.replace("-", "_")] == value, key


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help_with_its_options(verb, capsys):
    with pytest.raises(SystemExit) as exit:
        main([verb, "--help"])
    assert exit.value.code == 0
    assert "--config" in capsys.readouterr().out
