"""What the run produces and how the stages name it: the models, the ONNX artifacts (one per deployable noise
variant, and int8), each artifact's torch twin, and where each lives in the manifest.

- models: ``dense`` (the train stage's checkpoint), ``masked`` (the prune stage's, zero channels still in place),
  ``pruned`` (physically smaller: the surgery stage's, through the finetune stage, which trains it further when
  finetune.epochs > 0); ``dense`` and ``pruned`` are deployed (exported);
- noise variants of an exported model: ``deterministic`` (noise removed), ``stochastic`` (EnResNet's noise as
  trained: std over the batch tensor), ``per_sample`` (std per image); ``int8`` is the quantized deterministic graph;
- eval modes: how the eval stage runs a torch model's noise -- its *twin* of each variant is the mode that computes
  the same function (int8 has none).
"""
from __future__ import annotations

SOURCES = {"dense": "train", "masked": "prune", "pruned": "finetune"}   # model -> the stage that writes it
DEPLOYED = ("dense", "pruned")                                         # the models exported to ONNX

NOISE_OF_VARIANT = {"deterministic": "off", "stochastic": "batch", "per_sample": "per_sample"}   # models.noise_mode
SUFFIX = {"deterministic": "", "stochastic": "_stochastic", "per_sample": "_per_sample", "int8": "_int8"}
NOISE_OF_MODE = {"stochastic": "batch", "noise_off": "off", "per_sample": "per_sample"}   # eval mode -> noise
WORST = "worst_case"   # the examples a cascade keeps: per image the one that broke it
TWIN = {"deterministic": "noise_off", "stochastic": "stochastic", "per_sample": "per_sample", "int8": None}
AGREEMENT_VARIANTS = ("deterministic", "int8")   # the variants whose predictions every device must reproduce
QUANTIZED = ("int8",)                            # written by the quantize stage; the others by export


def artifact_name(model: str, variant: str) -> str:
    """``dense``, ``pruned_stochastic``, ``dense_int8`` ...: the file stem, and ``<name>_onnx`` its output key."""
    return model + SUFFIX[variant]


def output_key(name: str) -> str:
    return f"{name}_onnx"


def artifacts(inputs: dict) -> dict[str, tuple[str, str]]:
    """``<name>`` -> (model, variant) for every ONNX file among a stage's ``inputs`` (export, quantize)."""
    out = {}
    for model in DEPLOYED:
        for variant in TWIN:
            name = artifact_name(model, variant)
            if any(output_key(name) in inputs.get(stage, {}) for stage in ("export", "quantize")):
                out[name] = (model, variant)
    return out


def stage_of(variant: str) -> str:
    """The stage that writes an artifact of ``variant``."""
    return "quantize" if variant in QUANTIZED else "export"


def artifact_path(inputs: dict, name: str):
    return inputs["export"].get(output_key(name)) or inputs["quantize"][output_key(name)]
