"""The house rules of the layout (docs/design.md) that import-linter's contracts cannot say (those —
layers, no cycles — run in `make lint`), checked on the source text."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "upcycle"


def sources(folder: Path):
    return [(p, p.read_text()) for p in folder.rglob("*.py")]


def test_training_happens_only_in_train():
    for path, text in sources(SRC):
        if SRC / "train" in path.parents:
            continue
        assert not re.search(r"torch\.optim|\.backward\(", text), path


def test_one_kl():
    hits = [path for path, text in sources(SRC) if re.search(r"\.exp\(\)\s*\*\s*\(", text)]
    assert [p.name for p in hits] == ["equivalence.py"]


def test_the_cli_is_a_registry():
    text = (SRC / "cli.py").read_text()
    assert len(text.splitlines()) < 100 and "add_argument" not in text
    verbs = re.search(r"VERBS = \((.*?)\)", text, re.S).group(1)
    for verb in re.findall(r'"(\w+)"', verbs):
        assert (SRC / "commands" / f"{verb}.py").exists(), verb


def test_recipes_benchmarks_and_the_demo_name_no_hugging_face_module_path():
    hf_paths = re.compile(r"embed_tokens|self_attn|\.mlp\b|model\.layers|input_layernorm|\\\.mlp")
    files = [*ROOT.glob("recipes/**/*.yaml"), *ROOT.glob("benchmarks/*.py"), SRC / "commands" / "demo.py"]
    for path in files:
        assert not hf_paths.search(path.read_text()), path
