"""Report quality guards: a model at chance or an attack scoring above natural is a red line, not a number."""
from pipeline.report import sanity_checks


def model(variant="pruned", n=500, **acc):
    return {"variant": variant, "accuracy_images": n, "accuracy": acc, "attack_sanity": {}}


def failed(models):
    return {(c["model"], c["check"]) for c in sanity_checks(models) if not c["ok"]}


def test_healthy_model_passes_every_check():
    m = model(natural=47.0, pgd20=30.0, natural_noise_off=47.5, pgd20_noise_off=28.0)
    checks = sanity_checks([m])
    assert checks and all(c["ok"] for c in checks)
    assert {c["check"] for c in checks} == {"above_chance", "pgd20_not_above_natural",
                                            "pgd20_noise_off_not_above_natural"}


def test_collapsed_model_at_chance_fails():
    # 8.98 % (the old smoke run's pruned model) and just under 10 % + 3 SE on 500 images (14.02 %)
    assert failed([model(natural=8.98, pgd20=5.0)]) == {("pruned", "above_chance")}
    assert failed([model(natural=14.0, pgd20=5.0)]) == {("pruned", "above_chance")}
    assert failed([model(natural=14.1, pgd20=5.0)]) == set()


def test_attack_above_natural_fails_with_noise_slack_only_for_the_noisy_model():
    assert failed([model(natural=40.0, pgd20=40.8)]) == set()                 # within 1 point: test-time noise
    assert failed([model(natural=40.0, pgd20=41.5)]) == {("pruned", "pgd20_not_above_natural")}
    assert failed([model(natural=40.0, pgd20=30.0, natural_noise_off=40.0, pgd20_noise_off=40.5)]) == {
        ("pruned", "pgd20_noise_off_not_above_natural")}


def test_evaluation_attack_checks_are_carried_over():
    m = model(natural=40.0, pgd20=30.0)
    m["attack_sanity"] = {"eot_not_weaker": False}
    assert failed([m]) == {("pruned", "eot_not_weaker")}
