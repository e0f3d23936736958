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


def test_the_pareto_plot_draws_the_computed_front():
    from pipeline.report.format import pyplot
    from pipeline.report.plots import pareto_figure, pareto_front, pareto_points

    variants = [("dense", 1.0, 46.0, 27.0), ("pruned", 0.55, 47.5, 26.0), ("dense_int8", 0.7, 46.5, None),
                ("pruned_int8", 0.4, 45.0, None), ("dense_stochastic", 1.8, 46.4, 28.0)]
    report = {"run": "t", "devices": {"host": {"kind": "host"}},
              "variants": [{"artifact": a, "natural_onnx": nat, "whitebox_worst_case": rob,
                            "onnx_worst_attack": 25.0 if rob is None else None} for a, _, nat, rob in variants]}
    rows = [{"device": "host", "emulated": False, "artifact": a, "p50_ms": lat} for a, lat, _, _ in variants]
    fig = pareto_figure(report, rows, pyplot())
    for kind in ("natural", "robust"):
        pts = [(lat, acc) for _, k, lat, acc in pareto_points(report, rows) if k == kind]
        front = sorted(pts[i] for i in pareto_front(pts))
        (line,) = [ln for ln in fig.axes[0].lines if ln.get_gid() == f"pareto-{kind}"]
        assert line.get_linestyle() == "--" and line.get_marker() == "o"   # a one-point front is still drawn
        assert sorted(zip(line.get_xdata(), line.get_ydata())) == front
    # natural: the fast int8 (0.4 ms, 45 %), pruned (0.55, 47.5) -- dense, dense_int8 and the slow ones dominated
    natural = [ln for ln in fig.axes[0].lines if ln.get_gid() == "pareto-natural"][0]
    assert list(natural.get_xdata()) == [0.4, 0.55]
