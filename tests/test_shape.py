"""The shape of the repository: imports point one way (method -> eval -> common), every method file
fits in a reader's head (the method above one banner, a `main` of at most 50), `--help` shows the
values that will be used (no 0-means-default sentinels), and neither code nor README speaks of how
the work was organised."""
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


BANNER = re.compile(r"^# ---- (EXPERIMENT|PLUMBING|COMPARISON)\b")


def banner_line(path: Path) -> int:
    """The 1-based line of a file's one banner (below it: what a reader of the method may skip)."""
    at = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if BANNER.match(line)]
    assert len(at) == 1, f"{path.name}: one banner line, found {len(at)}"
    return at[0]


def defined_at(path: Path) -> dict:
    return {n.name: n.lineno for n in ast.parse(path.read_text()).body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("name", METHODS)
def test_the_method_comes_first_the_experiment_below_one_banner(name):
    """Above the banner (at most 300 lines): docstring, hyperparameters, losses, step and loop;
    below it Args and main. A `main` of at most 50 lines; the usage commands in the docstring."""
    from conftest import hparams
    path = ROOT / f"{name}.py"
    src, module = path.read_text(), importlib.import_module(name)
    banner, at = banner_line(path), defined_at(path)
    assert path.read_text().splitlines()[banner - 1].startswith("# ---- EXPERIMENT"), name
    assert banner <= 301, f"{name}: {banner - 1} lines above the banner"
    above = [hparams(module), *module.LOSSES, *module.STEPS]
    for obj in above:
        assert at[obj.__name__] < banner, f"{name}.{obj.__name__} should be above the banner"
    for below in ("Args", "main"):
        assert at[below] > banner, f"{name}.{below} should be below the banner"
    main = next(n for n in ast.parse(src).body
                if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 50
    # the usage commands in the docstring
    assert ast.get_docstring(ast.parse(src)).count("python ") >= 2


def test_shared_files_put_the_science_above_their_banner():
    """common.py: data, model, VP, samplers and pretraining above; the plumbing below. eval.py: the
    metrics above, the command line and the comparison harness below."""
    science = {"common": ["load_data", "CondUNet", "EMA", "VP", "sample", "denoising_step",
                          "pretrain"],
               "eval": ["Classifier", "frechet_distance", "fid", "nll_bpd", "near_copy_rate",
                        "judge"]}
    plumbing = {"common": ["parse_args", "save_checkpoint", "load_checkpoint", "Resume", "cached",
                           "run_dir"],
                "eval": ["main", "CompareArgs", "compare"]}
    for name in science:
        path = ROOT / f"{name}.py"
        banner, at = banner_line(path), defined_at(path)
        assert all(at[f] < banner for f in science[name]), (name, banner)
        assert all(at[f] > banner for f in plumbing[name]), (name, banner)


def test_no_line_over_100_characters():
    files = [*ROOT.glob("*.py"), *(ROOT / "tests").glob("*.py")]
    long = [(p.name, i + 1) for p in files for i, line in enumerate(p.read_text().splitlines())
            if len(line) > 100]
    assert not long, f"{len(long)} lines over 100 characters, e.g. {long[:10]}"


@pytest.mark.parametrize("name", METHODS + ("common", "eval"))
def test_help_has_no_default_sentinels(name):
    module = importlib.import_module(name)
    for cls in (getattr(module, "Args"), getattr(module, "CompareArgs", None)):
        if cls is None:
            continue
        for field, doc in C._field_docs(cls).items():
            sentinel = re.search(r"-?\d+\s*(=|means)\s*(the )?(\w+'s )?default", doc)
            assert not sentinel, (name, field, doc)


def test_no_words_about_how_the_work_was_organised():
    words = re.compile(r"\b(spec|specs|issue|issues|acceptance|prototype|prototypes)\b", re.I)
    files = [ROOT / "README.md", *ROOT.glob("*.py"), *[p for p in (ROOT / "tests").glob("*.py")
                                                       if p.name != "test_shape.py"]]
    found = [(p.name, i + 1, line.strip())
             for p in files for i, line in enumerate(p.read_text().splitlines())
             if words.search(line)]
    assert not found, found[:10]


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert "pip install -r requirements.txt" in readme and "python -m pytest -q tests" in readme
    assert "python eval.py compare --readme README.md" in readme
