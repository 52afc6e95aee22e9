"""bilevel_prune.py: the slicing against a masked network, the MAC counter against torch's
FlopCounterMode, the budgets, which parameters each level moves, the copied steps against the
originals, the warm-up, and a short bilevel run against a distilled-only one."""
import contextlib
import json
import math

import pytest
import torch
from conftest import hparams, isolated, run_here, run_script

import bilevel_prune as B
import common as C
import eval as E


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return C.CondUNet("digits").eval().requires_grad_(False)


def _inputs(info, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, info.channels, info.size, info.size, generator=g),
            torch.tensor([3.0, 100.0, 400.0, 650.0, 900.0, 999.0][:n]),
            torch.randint(0, 11, (n,), generator=g))


def test_keep_everything_is_the_identity(net):
    plan = B.prune_plan(net, 1.0)
    units = B.prunable_units(net.unet)
    assert all(len(plan[k]) == n for k, (_, n) in units.items())
    student = B.apply_plan(net, plan)
    x, t, c = _inputs(net.info)
    assert torch.equal(student(x, t, c), net(x, t, c))


def test_slicing_equals_masking_the_same_units(net):
    """Zero every dropped unit's only outgoing weights (conv2 input columns, out-projection columns
    of a head, the feed-forward output columns): that masked network must compute exactly what the
    sliced one does."""
    plan = B.prune_plan(net, 0.55)
    units = B.prunable_units(net.unet)
    masked = C.CondUNet("digits")
    masked.load_state_dict(net.state_dict())
    masked.eval().requires_grad_(False)
    for name, keep in plan.items():
        kind, n = units[name]
        m = masked.unet.get_submodule(name)
        drop = B.unit_slices(kind, m, n, [u for u in range(n) if u not in keep])
        if kind == "resnet":
            consumer = m.conv2
        elif kind == "attn":
            consumer = m.to_out[0]
        else:
            consumer = m.net[2]
        consumer.weight[:, drop] = 0
    student = B.apply_plan(net, plan)
    x, t, c = _inputs(net.info)
    out = student(x, t, c)
    assert torch.allclose(out, masked(x, t, c), atol=1e-5)
    assert (out - net(x, t, c)).abs().max() > 1e-2          # the pruning did change the function
    # the attention modules really lost heads (head_dim unchanged)
    a = student.unet.mid_block.attentions[0].transformer_blocks[0].attn2
    assert a.heads == len(plan["mid_block.attentions.0.transformer_blocks.0.attn2"]) < 8
    assert a.to_q.out_features == 8 * a.heads


def test_mac_counter_matches_torch_flop_counter(net):
    """FlopCounterMode counts conv / linear FLOPs (2 per MAC) but not CPU scaled-dot-product
    attention, whose two matmuls we add by their formula: 2 x Lq x Lk x inner (Lk = 2 context
    tokens for cross-attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    for keep in (1.0, 0.55):
        s = B.apply_plan(net, B.prune_plan(net, keep))
        fc = FlopCounterMode(display=False)
        with fc, torch.no_grad():
            s(torch.zeros(1, 1, 8, 8), 500.0, torch.zeros(1, dtype=torch.long))
        attn = sum(2 * 16 * (16 if n.endswith("attn1") else 2)
                   * s.unet.get_submodule(n).to_q.out_features
                   for n, (kind, _) in B.prunable_units(s.unet).items() if kind == "attn")
        assert B.count_macs(s)[0] == fc.get_total_flops() // 2 + attn


@pytest.mark.parametrize("measure, keep", [("macs", 0.55), ("macs", 0.8), ("params", 0.7)])
def test_budget_is_met_within_five_percent(net, measure, keep):
    s = B.apply_plan(net, B.prune_plan(net, keep, measure))
    if measure == "macs":
        ratio = B.count_macs(s)[0] / B.count_macs(net)[0]
    else:
        ratio = C.n_params(s) / C.n_params(net)
    assert keep - 0.05 <= ratio <= keep + 1e-9


def test_block_outputs_keep_the_teachers_shapes(net):
    s = B.apply_plan(net, B.prune_plan(net, 0.55))
    x, t, c = _inputs(net.info)
    (eps_t, ft), (eps_s, fs) = B.with_blocks(net, x, t, c), B.with_blocks(s, x, t, c)
    # the hooks change nothing
    assert torch.equal(eps_t, net(x, t, c)) and torch.equal(eps_s, s(x, t, c))
    assert len(ft) == len(fs) == 5 and [f.shape for f in ft] == [f.shape for f in fs]
    assert C.n_params(s) < 0.6 * C.n_params(net)
    # and are removed
    assert not net.unet.mid_block._forward_hooks and not s.unet.mid_block._forward_hooks


def test_losses_are_copy_paste_ready_and_exact(net):
    """Each loss re-created from its source in a namespace holding only torch and math gives the
    same value; the lower loss has its analytic value on constant tensors; the upper loss is the
    MSE to 2 T(null) - T(c*)."""
    ns = isolated(B.LOSSES)
    g = torch.Generator().manual_seed(1)
    eps_s, eps_t, noise = (torch.randn(3, 1, 8, 8, generator=g) for _ in range(3))
    fs, ft = ([torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 8, 2, 2, generator=g)]
              for _ in range(2))
    for w in ((1.0, 2.0, 0.1), (0.3, 0.0, 5.0)):
        args = (eps_s, eps_t, noise, fs, ft, *w)
        assert torch.equal(ns["lower_loss"](*args), B.lower_loss(*args))
    one, zero = torch.ones(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    # (1 - 0)^2 + 2 (1 - 3)^2 + 0.1 mean((2 - 0)^2, (1 - 1)^2) = 1 + 8 + 0.2
    value = B.lower_loss(one, 3 * one, zero, [2 * one, one], [zero, one]).item()
    assert value == pytest.approx(9.2)
    x, t, _ = _inputs(net.info, 4)
    c, null = torch.tensor([0, 3, 0, 7]), net.tok["null"]
    s = B.apply_plan(net, B.prune_plan(net, 0.8))
    for name, args in (("negative_guidance_target", (net, x, t, c, null, 0.5)),
                       ("upper_loss", (s, net, x, t, c, null, 1.0))):
        assert torch.equal(ns[name](*args), getattr(B, name)(*args)), name
    eps, feats = ns["with_blocks"](s, x, t, c)
    ref_eps, ref_feats = B.with_blocks(s, x, t, c)
    assert torch.equal(eps, ref_eps) and all(map(torch.equal, feats, ref_feats))
    ref = ((s(x, t, c) - (2 * net(x, t, torch.full_like(c, null)) - net(x, t, c))) ** 2).mean()
    assert B.upper_loss(s, net, x, t, c, null, 1.0).item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("level", ["lower", "upper"])
def test_copied_steps_move_the_weights_as_the_originals(net, level):
    """lower_step and upper_step compiled from their source in a namespace holding only torch,
    math, bilevel_prune.LOSSES and BilevelHparams (as a user copies them) move a pruned student's
    weights exactly as the originals do, from the same weights, batch and a fresh AdamW each; the
    teacher stays as it is, and the student moved."""
    hp_class = hparams(B)
    assert hp_class is B.BilevelHparams
    ns = isolated([*B.LOSSES, *B.STEPS], extra={hp_class.__name__: hp_class})
    hp = hp_class(eta=0.7, w_diff=0.5, w_feat=0.3)
    plan = B.prune_plan(net, 0.8)
    torch.manual_seed(2)
    x_t, t, noise = B.noised(C.load_data("digits")[0][:6], C.VP())
    if level == "lower":
        batch = (x_t, t, noise, torch.tensor([1, 2, 3, 4, 5, net.tok["null"]]))
    else:
        batch = (x_t, t, torch.zeros(6, dtype=torch.long))
    teacher = {k: v.clone() for k, v in net.state_dict().items()}
    start, moved, losses = None, [], []
    for step in (getattr(B, f"{level}_step"), ns[f"{level}_step"]):
        student = B.apply_plan(net, plan).train().requires_grad_(True)
        start = [p.detach().clone() for p in student.parameters()]
        opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
        losses.append(step(student, net, opt, C.grad_scaler("cpu"), contextlib.nullcontext(),
                           batch, hp))
        moved.append([p.detach().clone() for p in student.parameters()])
    assert ns[f"{level}_step"].__globals__ is not B.__dict__
    assert math.isfinite(losses[0]) and losses[0] == losses[1]
    assert all(torch.equal(a, b) for a, b in zip(*moved))
    assert any(not torch.equal(a, p) for a, p in zip(start, moved[0]))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in teacher.items())


def test_levels_move_only_what_they_should(net):
    """Upper step: only the student moves (the teacher is the frozen target). ESD stage: only attn2
    weights."""
    teacher = net
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s = B.apply_plan(teacher, B.prune_plan(teacher, 0.55)).train().requires_grad_(True)
    s0 = {k: v.clone() for k, v in s.state_dict().items()}
    opt = torch.optim.AdamW(s.parameters(), lr=1e-3)
    x0 = C.load_data("digits")[0][:16]
    x_t, t, _ = B.noised(x0, C.VP())
    c = torch.zeros(16, dtype=torch.long)
    loss = B.upper_loss(s, teacher, x_t, t, c, teacher.tok["null"], eta=1.0)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in teacher.parameters())
    assert sum(not torch.equal(v, s.state_dict()[k]) for k, v in s0.items()) > 0.9 * len(s0)
    s1 = {k: v.clone() for k, v in s.state_dict().items()}
    B.esd(B.Args(esd_batch=2), s, "cpu", steps=2)
    changed = {k for k, v in s1.items() if not torch.equal(v, s.state_dict()[k])}
    assert changed and all(".attn2." in k for k in changed)


def test_negative_guidance_target_is_twice_null_minus_concept(net):
    x, t, _ = _inputs(net.info, 4)
    c = torch.zeros(4, dtype=torch.long)
    null = torch.full_like(c, net.tok["null"])
    target = B.negative_guidance_target(net, x, t, c, null[0].item(), eta=1.0)
    assert torch.allclose(target, 2 * net(x, t, null) - net(x, t, c), atol=1e-5)


def _digits_data(forget=0) -> tuple:
    """train()'s data: (x_keep, y_keep, x_concept, y_concept) of the digits training split."""
    x, y = C.load_data("digits")
    concept = y == forget
    return x[~concept], y[~concept], x[concept], y[concept]


def test_interrupted_run_resumes_to_the_same_weights(net, tmp_path, monkeypatch):
    """A crash in step 5 of 6 (checkpoints every 2 steps), then a rerun with the same arguments:
    the weights (EMA included) and the log of an uninterrupted run. Upper steps come at 2 and 4,
    not 6: the run ends on a lower step; the monitor logs |upper update| / |lower update| of
    each, and that the ratio is what the weights did."""
    data = _digits_data()
    args = C.make_args(B.Args, keep=0.8, steps=6, batch_size=8, upper_every=2, warmup=2,
                       save_every=2, ema=0.5)

    def run(out):
        C.seed_everything(0)
        s = B.apply_plan(net, B.prune_plan(net, 0.8)).train().requires_grad_(True)
        return s, B.fine_tune(args, out, net, s, data, "cpu")
    ref, log = run(tmp_path / "a")
    assert len(log["l_ft"]) == 6 and len(log["l_cu"]) == len(log["update_ratio"]) == 2
    assert all(r > 0 for r in log["update_ratio"])
    assert (tmp_path / "a" / "model.safetensors").exists()
    noised, calls = B.noised, []

    def crash(*a):   # noised runs once per lower and once per upper step: call 7 is step 5's lower
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return noised(*a)
    monkeypatch.setattr(B, "noised", crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    assert (tmp_path / "b" / "resume.pt").exists()
    assert not (tmp_path / "b" / "model.safetensors").exists()
    monkeypatch.setattr(B, "noised", noised)
    s, log_b = run(tmp_path / "b")

    def without_clock(log):
        return {k: v for k, v in log.items() if k != "clock"}
    assert without_clock(log_b) == without_clock(log)
    assert not (tmp_path / "b" / "resume.pt").exists()
    assert all(map(torch.equal, ref.state_dict().values(), s.state_dict().values()))
    weight = "unet.conv_out.weight"
    assert not torch.equal(ref.state_dict()[weight], net.state_dict()[weight])


def test_update_monitor_measures_the_two_updates():
    """update_monitor's ratio is |w_end - w_upper| / |w_upper - w_lower| of the weights it sees at
    the three points of an iteration with an upper step; an iteration without one adds nothing."""
    model = torch.nn.Linear(2, 1, bias=False)
    on_step = B.update_monitor(C.make_args(B.Args, steps=1000), model)
    log = {"l_ft": [0.0], "l_cu": []}
    with torch.no_grad():
        for level, w in (("lower", [0.0, 0.0]), ("upper", [3.0, 4.0]), ("end", [3.0, 5.0]),
                         ("lower", [1.0, 1.0]), ("end", [9.0, 9.0])):
            model.weight.copy_(torch.tensor([w]))
            on_step(1, level, log)
    assert log["update_ratio"] == [pytest.approx(1 / 5)]


def test_warmup_zero_means_no_warm_up(net, tmp_path, monkeypatch):
    """The warm-up of either optimiser is linear over --warmup of its own steps (counted from 1),
    then constant; --warmup 0 is no warm-up: both levels take their full lr from their first step
    (and nothing divides by 0)."""
    assert [B.constant_with_warmup(2.0, n, 4) for n in (1, 2, 4, 9)] == [0.5, 1.0, 2.0, 2.0]
    assert [B.constant_with_warmup(2.0, n, 0) for n in (1, 2, 9)] == [2.0, 2.0, 2.0]
    seen = []

    def spy(real):
        def step(student, teacher, opt, *rest):
            seen.append(opt.param_groups[0]["lr"])
            return real(student, teacher, opt, *rest)
        return step
    monkeypatch.setattr(B, "lower_step", spy(B.lower_step))
    monkeypatch.setattr(B, "upper_step", spy(B.upper_step))
    for warmup, lrs in ((0, [1e-3, 2e-3, 1e-3, 2e-3, 1e-3]), (2, [5e-4, 1e-3, 1e-3, 2e-3, 1e-3])):
        args = C.make_args(B.Args, steps=3, batch_size=4, upper_every=1, warmup=warmup, lr=1e-3,
                           lr_up_mult=2.0, save_every=0)
        s = B.apply_plan(net, B.prune_plan(net, 0.8)).train().requires_grad_(True)
        seen.clear()
        log = B.train(args, net, s, _digits_data(), "cpu", tmp_path / str(warmup),
                      B.update_monitor(args, s))
        assert seen == pytest.approx(lrs, rel=1e-12)   # lower, upper, lower, upper, lower
        assert all(math.isfinite(v) for v in log["l_ft"] + log["l_cu"] + log["update_ratio"])


def test_short_bilevel_run_suppresses_the_class_distillation_alone_does_not(
        digits_base, digits_classifier, runs_dir):
    """Same budget and seed; the distilled-only run is the CP reference of the bilevel one."""
    # A CI-sized budget: an upper step every 2nd iteration, at the lower lr, so that 40 upper
    # steps in 80 suppress the class without costing the retain accuracy checked below.
    kw = dict(keep=0.8, steps=80, batch_size=32, upper_every=2, lr_up_mult=1.0, n_per_class=10,
              sample_steps=10, warmup=10, n_nll=2, nll_tol=1e-3)
    ref = B.main(C.make_args(B.Args, schedule="distill-only", tag="ref-s0", **kw))
    res = B.main(C.make_args(B.Args, schedule="bilevel", tag="bilevel-s0", **kw))
    assert ref["forget_rate"] >= 0.5 and res["forget_rate"] <= min(0.3, ref["forget_rate"] - 0.3)
    assert res["cp_score"] >= 0.7 and res["retain_acc"] >= ref["retain_acc"] - 0.15
    assert res["macs_ratio"] <= 0.8 and res["params_student"] < res["params_teacher"]
    out = C.run_dir("bilevel_prune", "digits", "bilevel-s0")
    files = {"args.json", "model.safetensors", "samples.pt", "samples.png", "metrics.json"}
    assert files <= {p.name for p in out.iterdir()}
    m = json.loads((out / "metrics.json").read_text())
    assert m["cp_reference"].endswith("ref-s0/metrics.json")
    keys = ("forget_rate", "retain_acc", "fid_retain", "nfe", "params", "nll_forget_bpd",
            "nll_kept_bpd", "nll_forget_null_bpd")
    assert all(m[k] is not None and m["base_" + k] is not None for k in keys) and m["seconds"] > 0
    assert m["params"] == res["params_student"] and m["nfe"] == 10
    assert m["base_params"] == C.n_params(digits_base[1])
    s = E.load_samples(out / "samples.pt")   # the student's own samples: what the comparison judges
    assert s["nfe"] == 10 and s["c"].tolist() == C.class_tokens(10, 10).tolist()
    judged = E.judge(s, digits_classifier, *C.load_data("digits"), [0])
    assert judged["forget_rate"] == res["forget_rate"]
    loaded = B.load_student(out / "model.safetensors")
    x, t, c = _inputs(loaded.info)
    s = B.apply_plan(digits_base[1], loaded.plan)
    s.load_state_dict(C.load(out / "model.safetensors")["model"])
    assert torch.equal(loaded(x, t, c), s(x, t, c)) and C.n_params(loaded) == res["params_student"]


@pytest.mark.parametrize("argv, message, as_process", [
    (["--keep", "0.1"], "out of reach", False),
    (["--schedule", "three-stage"], "unknown --schedule", False),
    (["--forget", "11"], "out of range", True),
])
def test_bad_input_is_one_line_error(argv, message, as_process, digits_base, capsys):
    r = run_script("bilevel_prune.py", *argv) if as_process else run_here(B, argv, capsys)
    assert r.returncode == 2 and message in r.stderr and r.stderr.strip().count("\n") == 0
