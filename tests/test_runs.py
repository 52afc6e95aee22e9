"""What a run reads and writes around a method: --base from a diffusers folder, TensorBoard tracking
fed by the loop's logs, caches that know which data they were made from, the training clock across
resumes, and a runs folder that cannot be written."""
import errno
import sys
import time
import types

import numpy as np
import pytest
import torch
from conftest import run_here

import common as C
import eval as E


def _small_unet(**over):
    from diffusers import UNet2DConditionModel
    cfg = dict(C.unet_config(C.data_info("digits")), **over)
    return UNet2DConditionModel(**cfg)


def test_base_from_a_diffusers_folder_and_a_refused_mismatch(tmp_path, capsys):
    """Ours (unet/ beside model.safetensors): the same predictions as the model file. Anyone's UNet
    with the dataset's size and channels: loaded, its class tokens untrained (said so). Another
    size: one line naming it."""
    torch.manual_seed(0)
    ours = C.CondUNet("digits")
    C.save_checkpoint(tmp_path / "run" / "model.safetensors", ours, 1)
    ours.unet.save_pretrained(tmp_path / "run" / "unet")
    args = C.make_args(C.RunArgs, base=str(tmp_path / "run" / "unet"))
    model, path = C.base_model(args, "cpu")
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([10.0, 500.0, 900.0])
    c = torch.tensor([0, 4, ours.tok["null"]])
    with torch.no_grad():
        assert torch.allclose(model(x, t, c), ours(x, t, c), atol=1e-6)
        assert path == tmp_path / "run" / "unet"
    _small_unet(block_out_channels=(16, 32), norm_num_groups=4).save_pretrained(tmp_path / "theirs")
    model = C.load_checkpoint(tmp_path / "theirs", "digits")[0]
    assert "class tokens start untrained" in capsys.readouterr().out
    assert model(x, t, c).shape == x.shape
    _small_unet(sample_size=32, in_channels=3, out_channels=3).save_pretrained(tmp_path / "cifar")
    with pytest.raises(C.UsageError,
                       match="32x32 images with 3 -> 3 channels; digits needs 8x8 with 1 -> 1"):
        C.load_checkpoint(tmp_path / "cifar", "digits")


def test_a_method_refuses_a_mismatched_base_in_one_line(tmp_path, runs_dir, capsys):
    import siss
    _small_unet(sample_size=32).save_pretrained(tmp_path / "big")
    before = sorted(runs_dir.rglob("*"))
    with pytest.raises(SystemExit) as exit_:
        C.cli(siss.main, siss.Args, ["--base", str(tmp_path / "big"), "--tag", "ci-bad-base"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "digits needs 8x8" in err and err.strip().count("\n") == 0
    assert sorted(runs_dir.rglob("*")) == before


class _Writer:
    """Stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is optional): records
    add_scalar."""
    points = []

    def __init__(self, folder):
        self.folder = folder

    def add_scalar(self, tag, value, step):
        _Writer.points.append((tag, step, value))

    def flush(self):
        pass

    def close(self):
        pass


def _loop(path, track, steps, crash_at=None):
    """A toy training loop with the three kinds of logs the methods keep, resumable every 2
    steps."""
    w, loss, curve, parts = torch.nn.Linear(1, 1), [], [], {"a": [], "b": []}
    resume = C.Resume(path, {"toy": 1}, 2, track, w=w, loss=loss, curve=curve, parts=parts)
    for step in range(resume.load(), steps):
        if step == crash_at:
            raise KeyboardInterrupt
        loss.append(float(step))
        parts["a"].append(step * 10.0)
        if (step + 1) % 3 == 0:
            curve.append({"step": step + 1, "acc": step / 10})
        resume.save(step + 1)
    resume.finish()


def test_track_feeds_tensorboard_from_the_logs_once_across_a_resume(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=_Writer))
    _Writer.points = []
    with pytest.raises(KeyboardInterrupt):
        # saved at step 4, lost step 5
        _loop(tmp_path / "resume.pt", tmp_path / "tb", 7, crash_at=5)
    _loop(tmp_path / "resume.pt", tmp_path / "tb", 7)
    got = sorted(_Writer.points)
    # each point once, at its step
    assert got == sorted([("loss", s + 1, float(s)) for s in range(7)]
                         + [("parts/a", s + 1, s * 10.0) for s in range(7)]
                         + [("curve/acc", 3, 0.2), ("curve/acc", 6, 0.5)])
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)        # not installed
    with pytest.raises(C.UsageError, match="pip install tensorboard"):
        _loop(tmp_path / "other.pt", tmp_path / "tb2", 1)
    worked = []                                                              # said before any work
    with pytest.raises(SystemExit) as exit_:
        C.cli(lambda a: worked.append(1), C.RunArgs, ["--track"])
    assert exit_.value.code == 2 and not worked


def test_training_seconds_count_every_call_of_a_resumed_loop(tmp_path):
    first = C.Resume(tmp_path / "r.pt", {"k": 1}, 1)
    first.load()
    time.sleep(0.3)
    first.save(1)
    again = C.Resume(tmp_path / "r.pt", {"k": 1}, 1)
    assert again.load() == 1 and again.clock()["seconds"] >= 0.3


def test_cached_models_know_the_data_they_were_made_from(tmp_path, monkeypatch, capsys):
    """A base trained on other images (another --data-root) is refused, not silently reused; the
    judge classifier is retrained for other data, and a weak one is flagged."""
    path = tmp_path / "model.safetensors"
    C.save_checkpoint(path, C.CondUNet("digits"), 5, done=True, data="1797-other")
    with pytest.raises(C.UsageError, match="trained on other images"):
        C.pretrain("digits", out=path)
    trained = []

    def train_classifier(dataset, root, device):
        trained.append(root)
        return E.Classifier(1, 10), 0.5
    monkeypatch.setattr(E, "train_classifier", train_classifier)
    monkeypatch.setattr(C, "RUNS", tmp_path / "runs")
    full = C.load_data("digits")
    E.load_classifier("digits", "a")
    E.load_classifier("digits", "a")                                       # cached
    monkeypatch.setattr(C, "load_data", lambda *a, **k: (full[0][:500], full[1][:500]))
    # other images: trained again
    E.load_classifier("digits", "b")
    assert trained == ["a", "b"] and "only 50.0% held-out accuracy" in capsys.readouterr().out


def test_an_unwritable_runs_folder_is_a_one_line_error_before_any_work(tmp_path, monkeypatch,
                                                                       capsys):
    (tmp_path / "file").write_text("")
    # cannot be created: a file is in the way
    monkeypatch.setattr(C, "RUNS", tmp_path / "file" / "runs")
    worked = []
    with pytest.raises(SystemExit) as exit_:
        C.cli(lambda a: worked.append(1), C.RunArgs, [])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "cannot write to" in err and "UNLEARN_RUNS" in err
    assert not worked

    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/model.safetensors")
    monkeypatch.setattr(C, "RUNS", tmp_path / "runs")
    with pytest.raises(SystemExit):
        C.cli(full_disk, C.RunArgs, [])
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write runs/x/model.safetensors (No space left on device)")


def test_eval_checks_where_it_writes_before_it_evaluates(tmp_path, monkeypatch):
    """eval.json goes beside the model: an unwritable folder fails before minutes of sampling, not
    after."""
    C.save_checkpoint(tmp_path / "m" / "model.safetensors", C.CondUNet("digits"), 1)

    def refuse(dir=None, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(C.tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr(E, "evaluate_model",
                        lambda *a, **k: pytest.fail("evaluated before checking"))
    with pytest.raises(C.UsageError, match="cannot write to .*m .Permission denied"):
        E.main(C.make_args(E.Args, ckpt=str(tmp_path / "m")))


def test_sample_grid_frames_the_highlighted_rows_whatever_their_length():
    """Three samples per class: only the gaps around rows 0 and 10 turn red."""
    from PIL import Image
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        C.save_grid(torch.zeros(60, 1, 8, 8), f"{d}/g.png", nrow=3, scale=1, highlight_rows=(0, 10))
        img = torch.from_numpy(np.array(Image.open(f"{d}/g.png").convert("RGB")))
    red = ((img[..., 0] == 255) & (img[..., 1] == 0)).any(1).nonzero().flatten().tolist()
    assert red == list(range(0, 10)) + list(range(90, 100))


# The sizes behind the README's tables, as the README states them (200 samples per class and 3,000
# null-token samples for SISS, 300 a class for SRS-ME's Scene 1, 100 for SFD and bilevel, 5,000
# per model and every held-out digit for MSGM from scratch)
PAPER = {
    "siss": dict(eval_every=25, n_eval=500, n_uncond=3000, n_per_class=200, also_sampler="ddim",
                 n_monitor=100, n_nll=16),
    "srs_me": dict(n_per_class=300, compare_variants=True, check_subsets=True, n_nll=16),
    "sfd": dict(iters=300, n_per_class=100),
    "bilevel_prune": dict(steps=1100, n_per_class=100, n_nll=16),
    "msgm": dict(finetune=False, normal="scratch", steps=1400, n_samples=5000, n_nll=1000),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_protocol_paper_gives_the_readme_sizes_and_flags_still_win(name, capsys):
    """--protocol paper: every size of the README's table, over the quick defaults; a flag given
    on the command line and a dataset's own preset still win; --help names each paper value; an
    unknown protocol is one line."""
    import importlib
    Args = importlib.import_module(name).Args
    quick, paper = C.make_args(Args), C.parse_args(Args, ["--protocol", "paper"])
    for field, value in PAPER[name].items():
        assert getattr(paper, field) == value, field
        assert getattr(quick, field) != value, field     # the default is the quick one
    field, value = next(iter(PAPER[name].items()))
    flag = ["--" + field.replace("_", "-")]
    if isinstance(value, bool):
        flag = ["--no-" + field.replace("_", "-")]
        assert getattr(C.parse_args(Args, ["--protocol", "paper", *flag]), field) is False
    else:
        given = C.parse_args(Args, ["--protocol", "paper", *flag, "7"])
        assert getattr(given, field) == (type(value)(7) if not isinstance(value, str) else "7")
    if name == "msgm":    # MNIST's own number of held-out images, under either protocol
        assert C.make_args(Args, dataset="mnist", protocol="paper").n_nll == 100
    with pytest.raises(SystemExit):
        C.parse_args(Args, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    assert f"paper: {shown}]" in text or f"paper: {shown};" in text
    with pytest.raises(C.UsageError, match="unknown --protocol 'full': use quick or paper"):
        C.parse_args(Args, ["--protocol", "full"])


def test_the_clock_counts_a_nested_phase_once(monkeypatch):
    """A run's summary line: judging inside training's callback counts as judging only, and the
    phases plus 'other' add up to the total."""
    now = [100.0]
    monkeypatch.setattr(C.time, "time", lambda: now[0])
    clock = C.Clock()
    now[0] += 1                                   # other: 1 s
    with clock("training"):
        now[0] += 10
        clock.timed("judging", lambda: now.__setitem__(0, now[0] + 4))()
        now[0] += 5
    with clock("judging"):
        now[0] += 2
    assert clock.seconds() == {"training": 15.0, "judging": 6.0, "other": 1.0, "total": 22.0}
    assert clock.line() == "22s in all: training 15s, judging 6s, other 1s"


def _reads(tree, names=None) -> set:
    """Attribute names read in a syntax tree (on any object, or only on the variables `names`),
    and every string constant (getattr(args, "n_eval"), a tuple of field names looped over)."""
    import ast
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load):
            if names is None or (isinstance(n.value, ast.Name) and n.value.id in names):
                out.add(n.attr)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            out.add(n.value)
    return out


def _helper_reads(module) -> dict:
    """{function: the fields it reads off its `args` / `hp` parameter} for common.py or eval.py."""
    import ast
    import inspect
    out = {}
    for n in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(n, ast.FunctionDef):
            given = {a.arg for a in n.args.args + n.args.kwonlyargs} & {"args", "hp"}
            if given:
                out[n.name] = _reads(n, given)
    return out


def unread_options(module, fields) -> set:
    """The fields no line of the method file reads (its Args class itself does not count), nor any
    function of common.py / eval.py that the file calls (reading its args there)."""
    import ast
    import inspect
    helpers = {"C": _helper_reads(C), "E": _helper_reads(E)}
    read = set()
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.ClassDef) and node.name == "Args":
            continue
        read |= _reads(node)
        for n in ast.walk(node):
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                    and isinstance(n.func.value, ast.Name) and n.func.value.id in helpers):
                read |= helpers[n.func.value.id].get(n.func.attr, set())
    return set(fields) - read


# read for every script by the command line itself: C.cli sets torch's threads from --threads and
# C.make_args resolves each default by --protocol
EVERY_SCRIPT = {"threads", "protocol"}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_every_accepted_option_is_read_or_refused_in_one_line(name, capsys):
    """Each option a method accepts is read by its file (or by the common / eval function it hands
    its args to); the ones it inherits and cannot use are exactly its `unsupported` list, each
    refused in one line that says why. An option nothing reads is found (the walk can fail)."""
    import dataclasses
    import importlib
    module = importlib.import_module(name)
    fields = {f.name for f in dataclasses.fields(module.Args)}
    unread, refused = unread_options(module, fields | {"an_option_nobody_reads"}), \
        set(C.unsupported(module.Args))
    assert unread - EVERY_SCRIPT == refused | {"an_option_nobody_reads"}
    for field, why in C.unsupported(module.Args).items():
        flag = "--" + field.replace("_", "-")
        default = getattr(C.make_args(module.Args), field)
        argv = [flag] if isinstance(default, bool) else [flag, "7"]
        r = run_here(module, argv, capsys)
        assert r.returncode == 2 and r.stderr == f"error: {flag}: not used by {name}.py: {why}\n"
        if isinstance(default, bool):     # asking for the default is fine
            assert getattr(C.parse_args(module.Args, [f"--no-{flag[2:]}"]), field) is False


def _ddpm_cifar10_layout(size: int, channels: int):
    """A tiny UNet2DModel with google/ddpm-cifar10-32's block layout (attention at the second
    resolution, as at 16x16 there), the format of the unconditional hub DDPMs the papers start
    from."""
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                       block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                         "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


@pytest.mark.parametrize("script", ["sfd", "srs_me", "bilevel_prune", "siss", "msgm"])
def test_an_unconditional_or_unreachable_base_is_one_line(script, tmp_path, capsys, monkeypatch):
    """--base given a UNet2DModel folder (no cross-attention to read a class token through) or a
    hub id the hub cannot give (offline here): one line each, before any work, naming the model's
    class or how to pass a local copy."""
    import importlib
    module = importlib.import_module(script)
    _ddpm_cifar10_layout(8, 1).save_pretrained(tmp_path / "ddpm")
    r = run_here(module, ["--base", str(tmp_path / "ddpm")], capsys)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "is a UNet2DModel, not a UNet2DConditionModel" in r.stderr
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda name: (_ for _ in ()).throw(OSError("offline")))
    r = run_here(module, ["--base", "google/ddpm-cifar10-32"], capsys)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "hf download google/ddpm-cifar10-32 --local-dir DIR" in r.stderr
