"""The shape of the repository: imports point one way (method -> eval -> common), every method file fits in a
reader's head (at most 450 lines, a `main` of at most 50), `--help` shows the values that will be used (no
0-means-default sentinels), and neither code nor README speaks of how the work was organised."""
import ast
import importlib
import re
from pathlib import Path

import pytest

import common as C

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("msgm", "sfd", "srs_me", "siss", "bilevel_prune")
OURS = {"common", "eval", *METHODS}


def imported(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & OURS


def test_imports_point_down():
    assert imported(ROOT / "common.py") == set()
    assert imported(ROOT / "eval.py") == {"common"}
    for m in METHODS:
        assert imported(ROOT / f"{m}.py") <= {"common", "eval"}, m


@pytest.mark.parametrize("name", METHODS)
def test_method_file_fits_in_a_readers_head(name):
    src = (ROOT / f"{name}.py").read_text()
    assert len(src.splitlines()) <= 450
    main = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 50
    assert ast.get_docstring(ast.parse(src)).count("python ") >= 2          # usage commands in the docstring


@pytest.mark.parametrize("name", METHODS + ("common", "eval"))
def test_help_has_no_default_sentinels(name):
    module = importlib.import_module(name)
    for cls in (getattr(module, "Args"), getattr(module, "CompareArgs", None)):
        if cls is None:
            continue
        for field, doc in C._field_docs(cls).items():
            assert not re.search(r"-?\d+\s*(=|means)\s*(the )?(\w+'s )?default", doc), (name, field, doc)


def test_no_words_about_how_the_work_was_organised():
    words = re.compile(r"\b(spec|specs|issue|issues|acceptance|prototype|prototypes)\b", re.I)
    files = [ROOT / "README.md", *ROOT.glob("*.py"), *[p for p in (ROOT / "tests").glob("*.py")
                                                       if p.name != "test_shape.py"]]
    found = [(p.name, i + 1, line.strip()) for p in files for i, line in enumerate(p.read_text().splitlines())
             if words.search(line)]
    assert not found, found[:10]


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert "pip install -r requirements.txt" in readme and "python -m pytest -q tests" in readme
    assert "python eval.py compare --readme README.md" in readme
