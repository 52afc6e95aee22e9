"""eval.py compare: the five methods, the base and the retrain on "forget class 0" at the CI budget
(one seed, the CI base), each run as a program. Every method lowers the base's forget rate on a
countable number of samples, the rows carry what sets the methods apart, the table and the JSON have
one row per model and one cell per column, a second call finds every run, and usage errors are one
line before any work."""
import json
import math

import pytest
import torch
from conftest import run_here, run_script
from PIL import Image

import common as C
import eval as E

CI = E.COMPARE_BUDGETS[("digits", "ci")]


@pytest.fixture(scope="module")
def ci_compare(digits_base, digits_classifier):
    return E.compare(E.CompareArgs(budget="ci", seeds="0"))


def test_every_method_lowers_the_forget_rate_of_the_base(ci_compare):
    runs = {name: r[0] for name, r in ci_compare["per_seed"].items()}
    # samples asked for class 0 per model
    n = CI["eval"]["n_per_class"]
    base = runs["base"]
    # the CI base draws its zeros: 16 of 20 or more
    assert base["forget_rate"] * n >= 0.8 * n
    # class-conditional: at least 6 of 20 fewer
    for name in ("sfd", "srs_me", "siss", "bilevel_prune"):
        assert runs[name]["forget_rate"] * n <= base["forget_rate"] * n - 6, \
            (name, runs[name]["forget_rate"])
    # MSGM is unconditional: its share of zeros among its samples against the base's null-token
    # share
    # the base draws zeros unasked, too
    assert base["forget_rate_uncond"] * CI["eval"]["n_uncond"] >= 10
    assert (runs["msgm"]["forget_rate"] == runs["msgm"]["forget_rate_uncond"]
            <= base["forget_rate_uncond"] / 2)
    for name, m in runs.items():
        assert 0 <= m["retain_acc"] <= 1 and math.isfinite(m["fid_retain"]), name


def test_rows_carry_what_sets_the_methods_apart(ci_compare, runs_dir):
    runs = {name: r[0] for name, r in ci_compare["per_seed"].items()}
    # one step, no likelihood
    assert runs["sfd"]["nfe"] == 1 and runs["sfd"]["nll_forget_bpd"] is None
    assert all(runs[k]["nfe"] == CI["eval"]["sample_steps"] for k in runs if k != "sfd")
    # pruned
    assert runs["bilevel_prune"]["params"] < runs["base"]["params"] == runs["srs_me"]["params"]
    for name in set(runs) - {"sfd"}:
        assert all(math.isfinite(runs[name][k])
                   for k in ("nll_forget_bpd", "nll_forget_null_bpd", "nll_kept_bpd"))
    for name in set(runs) - {"base"}:
        assert runs[name]["seconds"] > 0 and runs[name]["run_cpu_s"] > 0, name
    # each row is a program's run folder with the result contract; the gold standard never saw the
    # class
    ws = runs_dir / "compare-digits-ci"
    for name in E.MODELS[2:]:
        folder = ws / f"{name}-digits-s0"
        files = {p.name for p in folder.iterdir()}
        assert {"args.json", "metrics.json", "samples.pt", "samples.png"} <= files, name
        assert json.loads((folder / "args.json").read_text())["seed"] == 0
    ck = C.load(ws / "base-digits-no0-s0" / "model.safetensors")
    assert ck["dropped"] == [0] and ck["done"]
    # MSGM fine-tunes the shared base and nothing else: no control, no model trained from scratch
    # beside it
    msgm = json.loads((ws / "msgm-digits-s0" / "metrics.json").read_text())
    assert list(msgm["models"]) == ["normal (all data)", "Obtuse-MSGM (fine-tuned)"]
    assert not list(ws.glob("msgm-digits-dsm-*")) and not list(ws.glob("msgm-digits-ft-*"))
    s = E.load_samples(ws / "base-digits-no0-s0" / "samples.pt")
    assert (s["c"] == s["null"]).sum() == CI["eval"]["n_uncond"]
    assert (s["c"] < 10).sum() == 10 * CI["eval"]["n_per_class"]
    x, y = C.training_set("digits", drop_classes=(0,))
    n_zeros = int((C.load_data("digits")[1] == 0).sum())
    assert not (y == 0).any() and len(y) == len(C.training_set("digits")[1]) - n_zeros


def test_table_json_and_grid_are_written(ci_compare, runs_dir, tmp_path):
    ws = runs_dir / "compare-digits-ci"
    rows = [line for line in (ws / "results.md").read_text().splitlines() if line.startswith("|")]
    # header, separator, one row per model
    assert len(rows) == 2 + len(E.MODELS)
    assert {r.count("|") for r in rows} == {len(E.COMPARE_COLS) + 2}  # every row has every column
    labels = [r.split("|")[1].strip().rstrip(" †") for r in rows[2:]]
    assert labels == [E.LABELS[m] for m in E.MODELS]
    saved = json.loads((ws / "results.json").read_text())
    assert list(saved["summary"]) == list(E.MODELS) and saved["settings"]["seeds"] == [0]
    for name, s in saved["summary"].items():
        assert s["forget_rate"]["n"] == 1 and s["forget_rate"]["std"] is None
        assert 0 <= s["retain_acc"]["mean"] <= 1
        # the revival attack on every conditional row; MSGM (unconditional) and bilevel: n/a
        if name in ("msgm", "bilevel_prune"):
            assert s["revived"] is None
        else:
            assert 0 <= s["revived"]["mean"] <= 1

    img = Image.open(ws / "grid.png")
    assert img.width > img.height > 0
    # a second call runs nothing again, writes the same table and pastes the report into a markdown
    # file between its markers, the figure linked from there, the text around them untouched
    logs = {p: p.stat().st_mtime_ns for p in (ws / "records").glob("*.log")}
    readme = tmp_path / "README.md"
    readme.write_text("# intro\n<!-- compare-digits:begin -->\nold table\n"
                      "<!-- compare-digits:end -->\nafter\n")
    again = E.compare(E.CompareArgs(budget="ci", seeds="0", readme=str(readme)))
    assert again["summary"] == ci_compare["summary"]
    assert logs == {p: p.stat().st_mtime_ns for p in (ws / "records").glob("*.log")}
    assert len(logs) == len(E.MODELS)
    pasted = readme.read_text()
    assert "old table" not in pasted
    assert pasted.startswith("# intro\n<!-- compare-digits:begin -->\n")
    assert pasted.endswith("<!-- compare-digits:end -->\nafter\n")
    figure = pasted.split("framed](")[1].split(")")[0]
    assert (tmp_path / figure).resolve() == (ws / "grid.png").resolve()
    between = pasted.split("<!-- compare-digits:begin -->\n")[1]
    between = between.split("<!-- compare-digits:end -->")[0]
    assert between.replace(f"({figure})", "(grid.png)") == (ws / "results.md").read_text()


def test_commands_are_what_a_user_types(tmp_path):
    full = E.COMPARE_BUDGETS[("digits", "full")]
    argv, folder = E.command("siss", E.CompareArgs(), 2, full, tmp_path)
    assert argv[0] == "siss.py" and argv[argv.index("--forget") + 1] == "0"
    assert argv[argv.index("--seed") + 1] == "2"
    # inside the workspace
    assert "--no-stop-at-zero" in argv and folder == tmp_path / "siss-digits-s2"
    argv, folder = E.command("retrain", E.CompareArgs(forget=3), 1, full, tmp_path)
    assert argv[:3] == ["common.py", "--dataset", "digits"] and "--drop-classes" in argv
    assert folder == tmp_path / "base-digits-no3-s1"
    argv, _ = E.command("msgm", E.CompareArgs(), 0, full, tmp_path)
    # the shared base
    assert argv[argv.index("--base") + 1] == str(tmp_path / "base-digits" / "model.safetensors")
    assert "--finetune" in argv and "--no-control" in argv
    # under another sampler: the same commands plus --sampler, once (SISS's budget names ddim),
    # SFD's unchanged
    for name in E.MODELS:
        ddim, _ = E.command(name, E.CompareArgs(), 0, full, tmp_path)
        ddpm, _ = E.command(name, E.CompareArgs(sampler="ddpm"), 0, full, tmp_path)
        if name == "sfd":
            assert ddpm == ddim and "--sampler" not in ddim
        else:
            assert ddpm.count("--sampler") == 1 and ddpm[ddpm.index("--sampler") + 1] == "ddpm"
            i = ddim.index("--sampler") if "--sampler" in ddim else len(ddim)
            assert [v for v in ddpm if v not in ("--sampler", "ddpm")] == ddim[:i] + ddim[i + 2:]


def test_a_second_sampler_reports_the_columns_it_changes():
    """Under --sampler ddpm the block holds the figures a sampler changes, not the NLLs or seconds
    of the same runs."""
    cell = {"mean": 0.5, "std": 0.1, "n": 3}
    summary = {n: {k: cell for k, _, _ in E.COMPARE_COLS} for n in E.MODELS}
    md = E._results_md(summary, dict(sampler="ddpm", seeds=[0, 1, 2], eval=dict(sample_steps=50),
                                     command="python eval.py compare --sampler ddpm"))
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(E.MODELS)
    assert {r.count("|") for r in rows} == {len(E.SAMPLER_COLS) + 2}
    assert "ancestral DDPM" in md and "`--sampler ddpm`" in md
    assert "NLL" not in rows[0] and "retain acc" in rows[0]


@pytest.mark.parametrize("argv, message, as_process", [
    (["--bogus", "1"], "unrecognized arguments: --bogus", True),
    (["--forget", "10"], "out of range", False),
    (["--readme", "LICENSE-none.md"], "needs one line <!-- compare-digits:begin -->", False),
    (["--sampler", "ddpm", "--readme", "LICENSE-none.md"],
     "needs one line <!-- compare-digits-ddpm:begin -->", False),
    (["--sampler", "heun"], "unknown --sampler 'heun'", False),
])
def test_usage_errors_are_one_line_before_any_work(argv, message, as_process, runs_dir, capsys):
    before = sorted(runs_dir.rglob("*"))
    if as_process:
        r = run_script("eval.py", "compare", *argv)
    else:
        r = run_here(E, argv, capsys, ("compare", "CompareArgs"))
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith("error:") and r.stderr.strip().count("\n") == 0
    assert sorted(runs_dir.rglob("*")) == before
