"""sfd.py: the one-step generator against the x0-prediction, the SiD loss against its expanded form, which
network each step may change, which label each network sees, and a short end-to-end run that forgets."""
import copy
import json

import pytest
import torch
import torch.nn as nn
from conftest import run_script

import common as C
import sfd

# ---------------------------------------------------------------------------------------------- generator


def test_init_coefficients_match_diffusers_schedule():
    from diffusers import DDPMScheduler
    ab = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02).alphas_cumprod[440].item()
    b, sigma = sfd.init_coefs(C.VP(), 440)
    assert b == pytest.approx((1 - ab) ** 0.5, rel=1e-5) and sigma == pytest.approx(((1 - ab) / ab) ** 0.5, rel=1e-5)
    assert b == pytest.approx(0.9286, abs=1e-4) and sigma == pytest.approx(2.5023, abs=1e-3)   # spec's table


def test_generator_is_the_x0_prediction_at_t_init(digits_base):
    _, model = digits_base
    vp = C.VP()
    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(6, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 3, 4, 9])
    b, _ = sfd.init_coefs(vp, 440)
    t = torch.full((6,), 440)
    with torch.no_grad():
        x = sfd.generate(model, z, c, 440, vp)
        x_t = b * z
        expected = vp.eps_to_x0(x_t, t, model(x_t, t.float(), c))
        # the official code's route: x_t / a - sigma * eps, with a = sqrt(abar), sigma = sqrt(1 / abar - 1)
        ab = vp.alpha_bar[440].item()
        official = x_t / ab ** 0.5 - (1 / ab - 1) ** 0.5 * model(x_t, t.float(), c)
    assert torch.allclose(x, expected, atol=1e-5) and torch.allclose(x, official, atol=1e-5)
    assert x.std() > 0.3                                 # a real image-scale output, not a constant


# ---------------------------------------------------------------------------------------------- SiD loss


@pytest.mark.parametrize("alpha", [1.2, 1.0, 0.5])
def test_sid_loss_matches_expanded_form(alpha):
    g = torch.Generator().manual_seed(1)
    f_phi, f_psi, x = (torch.randn(5, 1, 8, 8, generator=g) for _ in range(3))
    d = (f_phi - f_psi).flatten(1)
    omega = (f_phi - x).abs().flatten(1).mean(1)
    expanded = ((1 - alpha) * d.square().sum(1) + (d * (f_psi - x).flatten(1)).sum(1)) / omega
    assert sfd.sid_loss(f_phi, f_psi, x, alpha).item() == pytest.approx(expanded.mean().item(), rel=1e-5)
    # With f_phi, f_psi held fixed the gradient in x is -(f_phi - f_psi) / (omega B): omega carries no gradient
    # and x enters through (f_phi - x), not detached.
    x = x.clone().requires_grad_(True)
    sfd.sid_loss(f_phi, f_psi, x, alpha).backward()
    assert torch.allclose(x.grad, -(f_phi - f_psi) / omega.view(-1, 1, 1, 1) / 5, atol=1e-6)


def test_sid_loss_normaliser_is_floored():
    x = torch.zeros(2, 1, 2, 2)
    f_phi, f_psi = x.clone(), torch.full_like(x, 1e-3)     # f_phi = x: omega would be 0
    assert sfd.sid_loss(f_phi, f_psi, x, 1.2).item() == pytest.approx(-1.2 * 4 * 1e-6 / 1e-5, rel=1e-4)


# ---------------------------------------------------------------------------------------------- the two steps


class Recorder(nn.Module):
    """Wraps a network and remembers the labels it was called with."""

    def __init__(self, net):
        super().__init__()
        self.net, self.info, self.labels = net, net.info, []

    def forward(self, x, t, c):
        self.labels.append(c.clone())
        return self.net(x, t, c)


def _nets(model):
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    return teacher, copy.deepcopy(model), copy.deepcopy(model)


def _snapshot(net):
    return [p.detach().clone() for p in net.parameters()]


def _changed(net, snap):
    return any(not torch.equal(p, q) for p, q in zip(net.parameters(), snap))


def test_each_step_changes_only_its_own_network(digits_base):
    _, model = digits_base
    torch.manual_seed(0)
    teacher, fake, gen = _nets(model)
    args = sfd.Args(batch_size=4)
    opt_f = torch.optim.Adam(fake.parameters(), lr=1e-4, betas=(0.0, 0.999))
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-4, betas=(0.0, 0.999))
    c, cf, co = torch.tensor([2, 3, 4, 5]), torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    snaps = {n: _snapshot(m) for n, m in (("teacher", teacher), ("fake", fake), ("gen", gen))}
    sfd.fake_score_step(gen, fake, opt_f, c, cf, args, C.VP())
    assert _changed(fake, snaps["fake"]) and not _changed(gen, snaps["gen"]) and not _changed(teacher, snaps["teacher"])
    snaps = {n: _snapshot(m) for n, m in (("teacher", teacher), ("fake", fake), ("gen", gen))}
    sfd.generator_step(gen, teacher, fake, opt_g, c, cf, co, args, C.VP())
    assert _changed(gen, snaps["gen"]) and not _changed(fake, snaps["fake"]) and not _changed(teacher, snaps["teacher"])
    assert all(p.grad is None for p in teacher.parameters())


def test_forget_term_routes_override_label_to_teacher_and_forget_label_to_fake(digits_base):
    """Teacher sees [c, c_o], fake score sees [c, c_f], the generator draws [c, c_f]. With fake = teacher the
    distillation term vanishes (its gradient is rounding noise), so the generator's gradient is the forget term."""
    _, model = digits_base
    torch.manual_seed(0)
    teacher, fake, gen = (Recorder(m) for m in _nets(model))
    c, cf, co = torch.tensor([2, 3, 4, 5]), torch.full((4,), 7), torch.full((4,), 8)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.0)      # keep the weights: we compare gradients
    grad_max = lambda: max(p.grad.abs().max().item() for p in gen.parameters() if p.grad is not None)
    logs = sfd.generator_step(gen, teacher, fake, opt_g, c, cf, co, sfd.Args(forget_coef=0.0), C.VP())
    assert logs["g_remain"] == 0.0 and "g_forget" not in logs
    remain_only = grad_max()
    for rec in (teacher, fake, gen):
        rec.labels.clear()
    logs = sfd.generator_step(gen, teacher, fake, opt_g, c, cf, co, sfd.Args(forget_coef=0.01), C.VP())
    assert logs["g_remain"] == 0.0 and logs["g_forget"] != 0.0
    assert remain_only < 1e-4 * grad_max()
    same = lambda got, want: len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert same(teacher.labels, [c, co]) and same(fake.labels, [c, cf]) and same(gen.labels, [c, cf])


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("argv, message", [
    (["--forget", "12"], "out of range"),
    (["--override", "0"], "equals --forget"),
    (["--iters", "0"], "needs --init"),
    (["--init", "BASE"], "not an sfd.py run"),
])
def test_bad_input_is_one_line_error(argv, message, digits_base, runs_dir):
    argv = [str(digits_base[0]) if a == "BASE" else a for a in argv]
    before = sorted(runs_dir.rglob("*"))
    r = run_script("sfd.py", *argv)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith("error:") and r.stderr.strip().count("\n") == 0
    assert sorted(runs_dir.rglob("*")) == before


def test_short_run_lowers_forget_rate(digits_base, digits_classifier, runs_dir):
    # Calibrated on the CI base: forget rate 0.95 -> 0.67 (30 iterations) -> 0.00 (50, 60), retain 0.98.
    r = run_script("sfd.py", "--iters", "60", "--batch-size", "16", "--lr-g", "5e-4", "--lr-fake", "5e-4",
                   "--ema", "0.5", "--n-per-class", "20", "--eval-steps", "10", "--log-every", "20", "--tag", "ci")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    out = runs_dir / "sfd-digits-ci"
    assert all((out / f).exists() for f in ("args.json", "model.pt", "samples.png", "metrics.json"))
    assert m["nfe"] == 1 and m["base_nfe"] == 10 and m["images_per_s"] > m["base_images_per_s"]
    assert m["base_forget_rate"] >= 0.8                      # the CI base draws its zeros
    assert m["forget_rate"] <= m["base_forget_rate"] - 0.5   # ... the generator mostly does not
    assert m["retain_acc"] >= 0.7                            # and the kept classes survive
    ck = torch.load(out / "model.pt", weights_only=False)
    assert ck["method"] == "sfd" and ck["t_init"] == 440 and ck["forget"] == 0 and "fake" in ck
