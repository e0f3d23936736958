"""The evaluation attacks: name -> implementation, the config keys it takes its hyper-parameters from, and where
the report shows it. Adding an attack: a function ``(model, x, y, *, generator, **params) -> x_adv`` in its own
module, and one ``ATTACKS.register(...)`` naming it (docs/architecture.md).

Meta of an entry:
- ``params(e)``: its hyper-parameters from the ``[eval]`` section ``e`` (``eps`` always, in [0, 1] pixel units);
- ``family``: ``"paper"`` (the paper's A2-A4 columns, with its reference script's constants; ``column`` is the
  header) or ``"strong"`` (the strong-attack table; checked not to beat IFGSM);
- ``stochastic_only``: only meaningful against a model with test-time noise (EOT);
- ``eot``: against a model with test-time noise, the gradient is averaged over ``eval.eot_samples`` passes (the
  attack takes ``eot_samples``; AutoAttack's "rand" flavour);
- ``cost(params)``: gradient evaluations per image, roughly: the cascade runs the cheapest first."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..core.registry import Registry

ATTACKS = Registry("attack")


def _strong(e) -> dict:
    return {"eps": e.eps_255 / 255, "step": e.step_255 / 255}


def _steps(p) -> int:
    return p.get("steps", 1) * p.get("restarts", 1) * p.get("eot_samples", 1)


ATTACKS.register("fgsm", "pipeline.algorithms.attacks:fgsm", family="paper", column="A2 FGSM",
                 params=lambda e: dict(eps=e.paper_eps_01), cost=_steps)
ATTACKS.register("ifgsm", "pipeline.algorithms.attacks:ifgsm", family="paper", column="A3 IFGSM",
                 params=lambda e: dict(eps=e.paper_eps_01, step=e.paper_step_01, steps=e.ifgsm_steps), cost=_steps)
ATTACKS.register("cw_paper", "pipeline.algorithms.attacks:cw_paper", family="paper",
                 column="A4 C&W (paper variant, weak)", cost=_steps,
                 params=lambda e: dict(eps=e.paper_eps_01, c=e.cw_c, kappa=e.cw_kappa, lr=e.cw_lr, steps=e.cw_steps))
ATTACKS.register("pgd", "pipeline.algorithms.attacks:pgd_restarts", family="strong", cost=_steps,
                 params=lambda e: dict(**_strong(e), steps=e.pgd_steps, restarts=e.pgd_restarts))
ATTACKS.register("eot_pgd", "pipeline.algorithms.attacks:pgd", family="strong", stochastic_only=True, cost=_steps,
                 params=lambda e: dict(**_strong(e), steps=e.pgd_steps, eot_samples=e.eot_samples))
ATTACKS.register("apgd_ce", "pipeline.algorithms.attacks:apgd", family="strong", eot=True, cost=_steps,
                 params=lambda e: dict(eps=e.eps_255 / 255, steps=e.apgd_steps, loss="ce"))
ATTACKS.register("apgd_dlr", "pipeline.algorithms.attacks:apgd", family="strong", eot=True, cost=_steps,
                 params=lambda e: dict(eps=e.eps_255 / 255, steps=e.apgd_steps, loss="dlr"))


def names(family: str | None = None) -> tuple[str, ...]:
    """Registered attack names (of one ``family``), in registration order."""
    return tuple(e.name for e in ATTACKS.entries() if family is None or e.meta.get("family") == family)


@dataclass(frozen=True)
class AttackSpec:
    name: str
    key: str                       # the name with its parameters, as report.json records it
    run: Callable                  # (model, x, y, generator) -> x_adv
    eps: float
    stochastic_only: bool = False  # EOT is meaningless for a deterministic model
    params: dict = field(default_factory=dict)


def _key(name: str, params: dict) -> str:
    def fmt(v):
        return f"{v:g}" if isinstance(v, float) else str(v)
    return f"{name}[" + ",".join(f"{k}={fmt(v)}" for k, v in params.items()) + "]"


def attack_specs(e, stochastic: bool = False) -> dict[str, AttackSpec]:
    """The attacks named in ``e.attacks`` (the ``[eval]`` section), each bound to its hyper-parameters for a model
    with (``stochastic``) or without test-time noise; in the order given, or cheapest first for a cascade."""
    out = {}
    for name in e.attacks:
        entry = ATTACKS[name]
        params = entry.meta["params"](e)
        if stochastic and entry.meta.get("eot"):
            params["eot_samples"] = e.eot_samples
        fn = entry.load()
        shown = {k: v for k, v in params.items() if k != "loss"}   # the loss is in the attack's name

        def run(m, x, y, g, _fn=fn, _p=params):
            return _fn(m, x, y, generator=g, **_p)
        out[name] = AttackSpec(name, _key(name, shown), run, params["eps"],
                               bool(entry.meta.get("stochastic_only")), shown)
    if e.mode == "cascade":
        cost = {n: ATTACKS[n].meta.get("cost", _steps)(s.params) for n, s in out.items()}
        out = dict(sorted(out.items(), key=lambda kv: cost[kv[0]]))   # stable: ties keep the configured order
    return out
