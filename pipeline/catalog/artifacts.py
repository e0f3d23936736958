"""What the run produces and how the stages name it: the models, the ONNX artifacts (one per deployable noise
variant, and int8), each artifact's torch twin, and where each lives in the manifest.

- models: ``dense`` (the train stage's checkpoint), ``masked`` (the prune stage's, zero channels still in place),
  ``pruned`` (physically smaller: the surgery stage's, through the finetune stage, which trains it further when
  finetune.epochs > 0); ``dense`` and ``pruned`` are deployed (exported);
- noise variants of an exported model: ``deterministic`` (noise removed), ``stochastic`` (EnResNet's noise as
  trained: std over the batch tensor), ``per_sample`` (std per image);
- quantized variants, each of the deterministic graph (the quantize stage's, quantize.method): ``int8``
  (onnxruntime's post-training QDQ int8: always written), ``qat_int8`` (the int8 graph after quantization-aware
  adversarial training), ``br`` (Binary-Relax: weights on a 4-bit / ternary / binary grid), ``admm_q`` (ADMM
  joint prune + quantize: weights on the grid);
- eval modes: how the eval stage runs a torch model's noise -- its *twin* of each variant is the mode that computes
  the same function. The quantized variants have none among the eval modes: their twin is the torch interpretation
  of the quantized graph itself (export/qdq_twin.py), attacked by the ``qeval`` stage.
"""
from __future__ import annotations

SOURCES = {"dense": "train", "masked": "prune", "pruned": "finetune"}   # model -> the stage that writes it
DEPLOYED = ("dense", "pruned")                                         # the models exported to ONNX

NOISE_OF_VARIANT = {"deterministic": "off", "stochastic": "batch", "per_sample": "per_sample"}   # models.noise_mode
SUFFIX = {"deterministic": "", "stochastic": "_stochastic", "per_sample": "_per_sample", "int8": "_int8",
          "qat_int8": "_qat_int8", "br": "_br", "admm_q": "_admm_q"}
NOISE_OF_MODE = {"stochastic": "batch", "noise_off": "off", "per_sample": "per_sample"}   # eval mode -> noise
WORST = "worst_case"   # the examples a cascade keeps: per image the one that broke it
QUANTIZED = ("int8", "qat_int8", "br", "admm_q")   # written by the quantize stage; the others by export
TWIN = {"deterministic": "noise_off", "stochastic": "stochastic", "per_sample": "per_sample",
        **{v: None for v in QUANTIZED}}
AGREEMENT_VARIANTS = ("deterministic", *QUANTIZED)   # the variants whose predictions every device must reproduce


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


# onnxruntime's mobile format (the mobile stage): ``<name>.ort`` for every deterministic and quantized artifact, and
# one required_operators.config for all of them. In bench rows and the report a .ort file is the artifact
# ``<name>.ort`` (model and variant of its .onnx, ``format`` "ort"); the .onnx artifacts keep their bare names.
MOBILE_VARIANTS = ("deterministic", *QUANTIZED)
REQUIRED_OPERATORS = "required_operators"   # the mobile stage's output key of the combined config


def ort_label(name: str) -> str:
    """``pruned_int8`` -> ``pruned_int8.ort``: the .ort file's name, and its artifact name in bench rows."""
    return f"{name}.ort"


def ort_key(name: str) -> str:
    return f"{name}_ort"


def ort_artifacts(inputs: dict) -> dict[str, tuple[str, str, str]]:
    """``<name>.ort`` -> (model, variant, ``<name>``) for every .ort file among a stage's ``inputs["mobile"]``."""
    mobile = inputs.get("mobile", {})
    return {ort_label(artifact_name(m, v)): (m, v, artifact_name(m, v)) for m in DEPLOYED for v in MOBILE_VARIANTS
            if ort_key(artifact_name(m, v)) in mobile}
