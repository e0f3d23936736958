"""The torch twin of a quantized ONNX graph: the graph interpreted node by node in torch, so that a white-box attack
(and quantization-aware training) sees exactly the function onnxruntime runs.

- ``QuantizeLinear`` rounds half to even and clamps, as onnxruntime does; its gradient is straight through the
  rounding and zero where the clamp is active (BPDA: Athalye et al. 2018) -- the only non-differentiable step of
  a QDQ graph.
- ``DequantizeLinear`` of a weight initializer (int8, int4, per tensor or per axis) is a constant, or -- with
  ``trainable=True`` -- a float parameter fake-quantized the way onnxruntime quantizes weights (per output channel,
  symmetric, scale = max|w| / 127) and biases (int32, scale = input scale x weight scale), so training moves the
  float weights and ``write_back`` puts their int8 codes into the graph. Activation scales stay as calibrated.
- Only the ops the pipeline's graphs use are implemented; anything else raises ``UnsupportedOp`` naming it.

Differences with onnxruntime are float rounding and its integer kernels' requantization: the logits agree within
one quantization step of the last quantized tensor (tests/test_qdq_twin.py)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INT8_MAX = 127


class UnsupportedOp(ValueError):
    def __init__(self, op: str, node: str):
        super().__init__(f"op {op} (node {node!r}) is not implemented by the torch twin (export/qdq_twin.py)")
        self.op = op


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _broadcast_axis(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    if t.dim() == 0:
        return t
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return t.reshape(shape)


_INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int32": (-2 ** 31, 2 ** 31 - 1), "int4": (-8, 7),
               "uint4": (0, 15), "int16": (-32768, 32767), "uint16": (0, 65535)}


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """onnxruntime's symmetric per-output-channel int8 scale: max|w_c| / 127, computed in float64."""
    absmax = w.detach().double().abs().reshape(w.shape[0], -1).amax(1)
    scale = absmax / INT8_MAX
    return torch.where(scale > 0, scale, torch.ones_like(scale)).float()


class _Constants:
    """The graph's initializers by ONNX name, held as buffers of ``owner`` (ONNX names may contain dots)."""

    def __init__(self, owner: nn.Module):
        self._owner, self._keys = owner, {}

    def __setitem__(self, name, value):
        self._keys[name] = f"onnx_const_{len(self._keys)}"
        self._owner.register_buffer(self._keys[name], value, persistent=False)

    def __getitem__(self, name):
        return getattr(self._owner, self._keys[name])

    def __contains__(self, name):
        return name in self._keys


class QDQTwin(nn.Module):
    """``model = QDQTwin(onnx.load(path))``; ``model(images)`` -> logits, differentiable in the images."""

    def __init__(self, proto, *, trainable: bool = False):
        super().__init__()
        from onnx import numpy_helper

        graph = proto.graph
        self.input_name = graph.input[0].name
        self.output_name = graph.output[0].name
        self.nodes = [(n.op_type, list(n.input), list(n.output), _attrs(n), n.name) for n in graph.node]
        self.const = _Constants(self)   # buffers, so that .to(device) moves them
        self.dtype: dict[str, str] = {}
        arrays = [(init.name, numpy_helper.to_array(init)) for init in graph.initializer]
        arrays += [(outs[0], numpy_helper.to_array(attrs["value"])) for op, ins, outs, attrs, _ in self.nodes
                   if op == "Constant"]
        for name, arr in arrays:
            self.dtype[name] = str(arr.dtype)
            self.const[name] = torch.from_numpy(np.array(arr, dtype=np.float32 if arr.dtype.kind == "f"
                                                         else np.int64))
        self.trainable = trainable
        # weight / bias initializers behind a DequantizeLinear that feeds a Conv or Gemm
        self.weights = nn.ParameterDict()   # weight init name -> float parameter (trainable only)
        self.biases = nn.ParameterDict()
        self.param_of: dict[str, tuple[str, str]] = {}   # DQ output -> ("weight"|"bias", init name)
        self.bias_input_scale: dict[str, str] = {}      # bias init -> the scale initializer of its conv's input
        self.weight_of_bias: dict[str, str] = {}        # bias init -> its conv's weight init
        producer = {o: (op, ins) for op, ins, outs, _, _ in self.nodes for o in outs}
        for op, ins, outs, attrs, name in self.nodes:
            if op not in ("Conv", "Gemm"):
                continue
            for slot, kind in ((1, "weight"), (2, "bias")):
                if len(ins) <= slot or ins[slot] not in producer or producer[ins[slot]][0] != "DequantizeLinear":
                    continue
                q = producer[ins[slot]][1][0]
                if q not in self.const:
                    continue
                if kind == "bias":   # int32 at input scale x weight scale: both must be known
                    if ins[1] not in self.param_of or producer.get(ins[0], ("",))[0] != "DequantizeLinear":
                        continue
                    self.bias_input_scale[q] = producer[ins[0]][1][1]
                    self.weight_of_bias[q] = self.param_of[ins[1]][1]
                self.param_of[ins[slot]] = (kind, q)
        if trainable:
            for dq_out, (kind, q) in self.param_of.items():
                dq = next(ins for op, ins, outs, _, _ in self.nodes if outs[0] == dq_out)
                value = self._dequantize(self.const[q], self.const[dq[1]], self._zp(dq), self._axis_of(dq_out),
                                         ).detach().clone()
                (self.weights if kind == "weight" else self.biases)[self._key(q)] = nn.Parameter(value)

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def _zp(self, ins):
        return self.const[ins[2]] if len(ins) > 2 and ins[2] else torch.zeros(())

    def _axis_of(self, dq_out: str) -> int:
        return next(attrs.get("axis", 1) for op, ins, outs, attrs, _ in self.nodes if outs[0] == dq_out)

    @staticmethod
    def _dequantize(q, scale, zp, axis):
        nd = q.dim()
        return (q.float() - _broadcast_axis(zp.float().to(q.device), axis, nd)) * _broadcast_axis(scale, axis, nd)

    # -- the float weights a trainable twin holds, quantized as onnxruntime would quantize them
    def quantized_weight(self, q_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(fake-quantized weight, int8 codes, per-channel scale) of a trainable weight."""
        w = self.weights[self._key(q_name)]
        scale = weight_scale(w)
        s = scale.reshape([-1] + [1] * (w.dim() - 1))
        codes = torch.clamp(round_ste(w / s), -INT8_MAX, INT8_MAX)
        return codes * s, codes.detach().round().to(torch.int8), scale

    def quantized_bias(self, q_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = self.biases[self._key(q_name)]
        w_name = self.weight_of_bias[q_name]
        in_scale = self.const[self.bias_input_scale[q_name]]
        scale = (in_scale * weight_scale(self.weights[self._key(w_name)])).float()
        codes = round_ste(b / scale)
        return codes * scale, codes.detach().round().to(torch.int32), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {self.input_name: x}

        def get(name):
            if name in env:
                return env[name]
            return self.const[name]

        for op, ins, outs, a, name in self.nodes:
            if op == "Constant":
                continue
            if op == "DequantizeLinear" and outs[0] in self.param_of and self.trainable:
                kind, q = self.param_of[outs[0]]
                env[outs[0]] = self.quantized_weight(q)[0] if kind == "weight" else self.quantized_bias(q)[0]
                continue
            env[outs[0]] = self._run(op, [get(i) if i else None for i in ins], a, name, ins)
        return env[self.output_name]

    def _run(self, op, v, a, name, ins):
        if op == "QuantizeLinear":
            x, scale = v[0], v[1]
            zp = v[2] if len(v) > 2 and v[2] is not None else torch.zeros((), device=x.device)
            lo, hi = _INT_RANGES[self.dtype.get(ins[2], "uint8") if len(ins) > 2 and ins[2] else "uint8"]
            axis = a.get("axis", 1)
            nd = x.dim()
            q = round_ste(x / _broadcast_axis(scale, axis, nd)) + _broadcast_axis(zp.float(), axis, nd)
            return torch.clamp(q, lo, hi)   # codes, kept as floats
        if op == "DequantizeLinear":
            return self._dequantize(v[0], v[1], v[2] if len(v) > 2 and v[2] is not None else torch.zeros(()),
                                    a.get("axis", 1))
        if op == "Conv":
            if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise UnsupportedOp("Conv(auto_pad)", name)
            pads = list(a.get("pads", [0, 0, 0, 0]))
            x = v[0]
            if pads[:2] != pads[2:]:
                x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
                pads = [0, 0, 0, 0]
            return F.conv2d(x, v[1], v[2] if len(v) > 2 else None, stride=tuple(a.get("strides", [1, 1])),
                            padding=tuple(pads[:2]), dilation=tuple(a.get("dilations", [1, 1])),
                            groups=a.get("group", 1))
        if op == "Gemm":
            x, w = v[0], v[1]
            if a.get("transA", 0):
                x = x.t()
            if a.get("transB", 0):
                w = w.t()
            y = a.get("alpha", 1.0) * (x @ w)
            if len(v) > 2 and v[2] is not None:
                y = y + a.get("beta", 1.0) * v[2]
            return y
        if op == "MatMul":
            return v[0] @ v[1]
        if op == "BatchNormalization":
            return F.batch_norm(v[0], v[3], v[4], v[1], v[2], training=False, eps=a.get("epsilon", 1e-5))
        if op == "Relu":
            return F.relu(v[0])
        if op == "Clip":
            lo = v[1] if len(v) > 1 and v[1] is not None else a.get("min")
            hi = v[2] if len(v) > 2 and v[2] is not None else a.get("max")
            return torch.clamp(v[0], None if lo is None else float(lo), None if hi is None else float(hi))
        if op in ("Add", "Sub", "Mul", "Div"):
            return {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}[op](v[0], v[1])
        if op == "ReduceMean":
            axes = v[1].tolist() if len(v) > 1 and v[1] is not None else a.get("axes")
            keep = bool(a.get("keepdims", 1))
            return v[0].mean(dim=tuple(axes), keepdim=keep) if axes is not None else v[0].mean()
        if op == "GlobalAveragePool":
            return v[0].mean(dim=tuple(range(2, v[0].dim())), keepdim=True)
        if op == "Flatten":
            axis = a.get("axis", 1)
            return v[0].reshape(int(np.prod(v[0].shape[:axis])), -1)
        if op == "Reshape":
            shape = [int(s) for s in v[1].tolist()]
            shape = [v[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
            return v[0].reshape(shape)
        if op in ("Identity", "Dropout"):
            return v[0]
        if op == "Concat":
            return torch.cat(v, dim=a["axis"])
        if op == "Sigmoid":
            return torch.sigmoid(v[0])
        if op == "HardSigmoid":
            return torch.clamp(a.get("alpha", 0.2) * v[0] + a.get("beta", 0.5), 0, 1)
        if op == "HardSwish":
            return F.hardswish(v[0])
        if op in ("MaxPool", "AveragePool"):
            pads = list(a.get("pads", [0, 0, 0, 0]))
            if pads[:2] != pads[2:]:
                raise UnsupportedOp(f"{op}(asymmetric pads)", name)
            k, s = tuple(a["kernel_shape"]), tuple(a.get("strides", [1, 1]))
            if op == "MaxPool":
                return F.max_pool2d(v[0], k, s, tuple(pads[:2]), ceil_mode=bool(a.get("ceil_mode", 0)))
            return F.avg_pool2d(v[0], k, s, tuple(pads[:2]), ceil_mode=bool(a.get("ceil_mode", 0)),
                                count_include_pad=bool(a.get("count_include_pad", 0)))
        raise UnsupportedOp(op, name)

    @torch.no_grad()
    def write_back(self, proto):
        """The trained weights' int8 codes and scales (and biases' int32 codes) written into ``proto`` (in place)."""
        from onnx import numpy_helper

        if not self.trainable:
            raise ValueError("write_back needs a trainable twin")
        new = {}
        for dq_out, (kind, q) in self.param_of.items():
            scale_name = next(ins[1] for op, ins, outs, _, _ in self.nodes if outs[0] == dq_out)
            if kind == "weight":
                _, codes, scale = self.quantized_weight(q)
            else:
                _, codes, scale = self.quantized_bias(q)
            new[q] = codes.numpy()
            new[scale_name] = scale.numpy().astype(np.float32)
        for init in proto.graph.initializer:
            if init.name in new:
                old = numpy_helper.to_array(init)
                arr = new[init.name].reshape(old.shape).astype(old.dtype)
                init.CopyFrom(numpy_helper.from_array(arr, init.name))
        return proto


def load_twin(path, *, trainable: bool = False) -> QDQTwin:
    import onnx

    return QDQTwin(onnx.load(str(path)), trainable=trainable).eval()
