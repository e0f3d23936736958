"""``pipeline device check aarch64-emu``: a tiny ONNX model on the host and on the emulated device; their logits
must agree."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ...catalog.devices import device_name
from .. import DeviceError, run_on_device, write_job
from . import guest

def tiny_model(path: Path, seed: int = 0) -> Path:
    """A small CIFAR-shaped ONNX model (Conv-BN-ReLU x2, residual Add, GAP, Gemm): 3x32x32 -> 10 logits."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def init(name, arr):
        return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)

    c = 8
    inits = [init("w1", rng.normal(0, (2 / 27) ** 0.5, (c, 3, 3, 3))), init("b1", rng.normal(0, 0.1, c)),
             init("w2", rng.normal(0, (2 / (9 * c)) ** 0.5, (c, c, 3, 3))),
             init("g", rng.uniform(0.5, 1.5, c)), init("be", rng.normal(0, 0.1, c)),
             init("mu", rng.normal(0, 0.1, c)), init("var", rng.uniform(0.5, 1.5, c)),
             init("fw", rng.normal(0, (1 / c) ** 0.5, (10, c))), init("fb", rng.normal(0, 0.01, 10))]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c2", "g", "be", "mu", "var"], ["n2"]),
             helper.make_node("Add", ["n2", "r1"], ["a"]), helper.make_node("Relu", ["a"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["gp"]),
             helper.make_node("Flatten", ["gp"], ["fl"], axis=1),
             helper.make_node("Gemm", ["fl", "fw", "fb"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "tiny_cifar",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="pipeline-check")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


def compare_logits(host, emu) -> dict:
    import numpy as np
    a, b = np.asarray(host, dtype=np.float64), np.asarray(emu, dtype=np.float64)
    if a.shape != b.shape:
        return {"shape_host": list(a.shape), "shape_emu": list(b.shape), "ok": False}
    d = np.abs(a - b)
    scale = float(np.abs(a).max()) or 1.0
    return {"images": int(a.shape[0]), "max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "rel": float(d.max() / scale), "top1_agree": int((a.argmax(1) == b.argmax(1)).sum())}


def check(root: Path | None = None, qemu_cpu: str = "neoverse-n1", *, log=print, images: int = 16,
          rel_tol: float = 1e-4) -> dict:
    """Run a tiny model on the host and on ``aarch64-emu:<qemu_cpu>``; the agreement of their logits."""
    import numpy as np

    from ...config import DeviceConfig

    guest.check_cpu(qemu_cpu)
    emu = DeviceConfig(target="aarch64-emu", qemu_cpu=qemu_cpu, root=str(root) if root else "")
    with tempfile.TemporaryDirectory(prefix="pipeline-devcheck-") as tmpdir:
        tmp = Path(tmpdir)
        model = tiny_model(tmp / "tiny.onnx")
        x = np.random.default_rng(0).random((images, 3, 32, 32), dtype=np.float32)
        kw = dict(settings=[{"batch": 1, "threads": 1}], levels=["all"], warmup=1, runs=3, seed=0, predict_batch=8)
        write_job(tmp / "host", {"tiny": model}, x, **kw)
        write_job(tmp / "emu", {"tiny": model}, x, **kw)
        host = run_on_device(DeviceConfig(target="host"), tmp / "host", timeout_s=300)
        t = time.perf_counter()
        arm = run_on_device(emu, tmp / "emu", timeout_s=900)
        emu_s = time.perf_counter() - t
    agree = compare_logits(host["models"]["tiny"]["logits"], arm["models"]["tiny"]["logits"])
    if "shape_host" in agree:
        raise DeviceError(f"device {device_name(emu)}: logits of shape {agree['shape_emu']}, the host's "
                          f"{agree['shape_host']}")
    agree["ok"] = bool(agree.get("rel", 1.0) <= rel_tol and agree.get("top1_agree") == agree.get("images"))
    return {"device": device_name(emu), "root": str(guest.root_of(emu)), "host_runtime": host["runtime"],
            "emu_runtime": arm["runtime"], "emu_seconds": round(emu_s, 1), "rel_tol": rel_tol, **agree}
