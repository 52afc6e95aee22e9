"""The revival attack (eval.revival): a token embedding learned by textual inversion on the frozen
model's own denoising loss (Pham et al., ICLR 2024, against concept erasure), then sampled."""
import torch
from conftest import run_here

import common as C
import eval as E


def _args(**over):
    return C.make_args(E.Args, **{"attack_steps": 200, "attack_samples": 100, "sample_steps": 10,
                                  **over})


def test_the_attack_revives_the_class_from_a_frozen_base(digits_base, digits_classifier):
    """On the CI base, a token learned from real 0s draws 0s far above chance: at least 40 of 100,
    where a random class would give 10 (measured: 91, DDIM 10). The base's weights, its
    token table included, are bitwise those before the attack."""
    model = digits_base[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = C.load_data("digits", "data", "train")
    r = E.revival(model, digits_classifier, 0, x[y == 0], _args())
    print(f"revived {r['revived_count']}/100, FID {r['revived_fid']:.1f}")
    assert r["revived_count"] >= 40 and r["revived_lo"] > 0.1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_one_step_generator_is_attacked_through_the_classifier(digits_base, digits_classifier):
    """SFD's generator has no multi-step score: the token is learned by the classifier's
    log-probability of the class on its images; the path runs and gives a share and an FID."""
    x, y = C.load_data("digits", "data", "train")
    r = E.revival(digits_base[1], digits_classifier, 0, x[y == 0],
                  _args(attack_steps=5, attack_samples=20), one_step_t=440)
    assert r["attack"].startswith("classifier") and 0 <= r["revived"] <= 1
    assert r["revived_fid"] is not None


def test_an_msgm_model_is_n_a_and_the_class_is_needed(digits_base, digits_classifier, capsys,
                                                       tmp_path):
    """MSGM's models are unconditional: one line, n/a. Without one --forget class: one line of
    error, before any work."""
    assert E.attack(_args(), digits_base[1], {"method": "msgm"}, 9, digits_classifier,
                    tmp_path) is None
    assert capsys.readouterr().out == ("revival attack: n/a (MSGM's models are unconditional: "
                                       "no class token to learn)\n")
    r = run_here(E, ["--attack"], capsys)
    assert r.returncode == 2 and r.stderr == ("error: --attack revives one class: name it with "
                                              "--forget K\n")
