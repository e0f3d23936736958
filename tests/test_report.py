"""Report quality guards: a model at chance, or any failed attack/ONNX check, is a red line, not a number."""
from pipeline.report.build import sanity_checks

EMPTY = {"models": {}}


def model(variant="pruned", n=500, **acc):
    return {"variant": variant, "accuracy_images": n, "accuracy": acc}


def failed(models, ev=EMPTY, transfer=EMPTY):
    return {(c["model"], c["check"]) for c in sanity_checks(models, ev, transfer) if not c["ok"]}


def test_healthy_model_passes_every_check():
    checks = sanity_checks([model(natural=47.0)], EMPTY, EMPTY)
    assert [c["check"] for c in checks] == ["above_chance"] and checks[0]["ok"]


def test_collapsed_model_at_chance_fails():
    # 8.98 % (the old smoke run's pruned model) and just under 10 % + 3 SE on 500 images (14.02 %)
    assert failed([model(natural=8.98)]) == {("pruned", "above_chance")}
    assert failed([model(natural=14.0)]) == {("pruned", "above_chance")}
    assert failed([model(natural=14.1)]) == set()


def test_eval_and_transfer_checks_are_carried_over():
    ev = {"models": {"pruned": {"stochastic": {"sanity": [{"check": "eot_not_above_single_sample", "ok": False,
                                                            "detail": ""}]},
                                "noise_off": {"sanity": [{"check": "eps0_equals_natural", "ok": True, "detail": ""}]}}}}
    transfer = {"models": {"dense": {"sanity": [{"check": "onnx_pgd_matches_torch_noise_off", "ok": False,
                                                 "detail": ""}]}}}
    assert failed([model(natural=40.0)], ev, transfer) == {("pruned/stochastic", "eot_not_above_single_sample"),
                                                           ("dense.onnx", "onnx_pgd_matches_torch_noise_off")}
