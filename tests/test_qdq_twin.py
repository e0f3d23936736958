"""The torch twin of a quantized ONNX graph (export/qdq_twin.py) and grid-weight graphs (export/grid.py): the twin
computes what onnxruntime computes (within one quantization step of the logits), its gradients pass straight through
the rounding, QAT's trained weights written back give a graph that onnxruntime runs as the twin did, and grid codes
stored as int8 or int4 give back the float graph."""
import numpy as np
import onnx
import pytest
import torch

from export import export_onnx, ort_predict, ort_session
from export.grid import write_grid_graph
from export.qdq_twin import QDQTwin, UnsupportedOp, round_ste, weight_scale
from export.quantize import quantize_int8
from models import create_model
from pipeline.algorithms.quantizers import codes
from pipeline.stages.quantize import output_step


def _float_graph(tmp_path, seed=0):
    torch.manual_seed(seed)
    model = create_model("test_resnet", ensemble=1, noise_coef=0.0).eval()
    for m in model.modules():   # BN statistics away from the identity, so folding matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "float.onnx"
    export_onnx(model, path, opset=18, dynamo=True, simplify=True, parity_inputs=torch.rand(4, 3, 32, 32))
    return model, path


@pytest.fixture(scope="module")
def int8_graph(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qdq")
    _, src = _float_graph(tmp)
    dst = tmp / "int8.onnx"
    calib = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1)).numpy()
    quantize_int8(src, dst, calib)
    return src, dst


def _inputs(n=64, seed=2):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_twin_matches_onnxruntime_within_one_step(int8_graph):
    _, path = int8_graph
    proto = onnx.load(str(path))
    twin = QDQTwin(proto).eval()
    x = _inputs()
    with torch.no_grad():
        t = twin(x).numpy()
    o = ort_predict(ort_session(path), x)
    step = output_step(proto)
    assert step is not None and step > 0
    assert np.abs(t - o).max() <= step * 1.001
    assert (t.argmax(1) == o.argmax(1)).mean() >= 0.95


def test_trainable_twin_starts_as_the_graph(int8_graph):
    """Re-quantizing the dequantized weights the way onnxruntime does gives back its codes: the trainable twin is the
    same function before any step."""
    _, path = int8_graph
    proto = onnx.load(str(path))
    fixed, trainable = QDQTwin(proto).eval(), QDQTwin(proto, trainable=True).eval()
    assert len(trainable.weights) > 0 and len(list(trainable.parameters())) > 0
    x = _inputs(16)
    with torch.no_grad():
        assert torch.equal(fixed(x), trainable(x))


def test_qat_write_back_runs_in_onnxruntime_as_the_twin(int8_graph, tmp_path):
    _, path = int8_graph
    proto = onnx.load(str(path))
    twin = QDQTwin(proto, trainable=True)
    opt = torch.optim.SGD(twin.parameters(), lr=0.05)
    x, y = _inputs(32, seed=3), torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(4))
    before = {k: v.detach().clone() for k, v in twin.weights.items()}
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(twin(x), y).backward()
        opt.step()
    assert any(not torch.equal(before[k], v) for k, v in twin.weights.items())   # training moved the weights
    twin.write_back(proto)
    onnx.checker.check_model(proto, full_check=True)
    out = tmp_path / "qat.onnx"
    onnx.save(proto, str(out))
    xt = _inputs(64, seed=5)
    with torch.no_grad():
        t = twin.eval()(xt).numpy()
        reread = QDQTwin(onnx.load(str(out)))(xt).numpy()
    o = ort_predict(ort_session(out), xt)
    step = output_step(proto)
    assert np.abs(t - o).max() <= step * 1.001
    assert np.abs(reread - t).max() <= step * 1.001
    # the written codes are int8 on onnxruntime's per-channel grid
    from onnx import numpy_helper
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for name in twin.param_of.values():
        if name[0] == "weight":
            assert inits[name[1]].dtype == np.int8 and np.abs(inits[name[1]]).max() <= 127


def test_gradients_pass_straight_through_the_rounding():
    x = torch.tensor([0.2, 0.5, 1.5, 2.7], requires_grad=True)
    round_ste(x).sum().backward()
    assert torch.equal(round_ste(x.detach()), torch.tensor([0.0, 0.0, 2.0, 3.0]))   # half to even, as onnxruntime
    assert torch.equal(x.grad, torch.ones(4))


def test_whitebox_gradient_is_nonzero_and_clamped_outside_the_range(int8_graph):
    _, path = int8_graph
    twin = QDQTwin(onnx.load(str(path))).eval()
    x = _inputs(8).requires_grad_(True)
    twin(x).logsumexp(1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_weight_scale_is_onnxruntimes():
    w = torch.tensor([[1.0, -2.54], [0.0, 0.0]])
    assert torch.allclose(weight_scale(w), torch.tensor([2.54 / 127, 1.0]))


def test_unsupported_op_is_named():
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Softplus", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    twin = QDQTwin(helper.make_model(graph))
    with pytest.raises(UnsupportedOp, match="Softplus"):
        twin(torch.zeros(1, 2))


@pytest.mark.parametrize("bits,int4", [(4, True), (2, True), (1, False), (8, False)])
def test_grid_graph_stores_codes_and_computes_the_float_graph(tmp_path, bits, int4):
    model, _ = _float_graph(tmp_path)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        pairs = [codes(w, bits) for w in convs]
        for w, (q, s) in zip(convs, pairs):
            w.copy_(q.float() * (s.reshape(-1, 1, 1, 1) if s.dim() else s))
    src = tmp_path / "grid_float.onnx"
    export_onnx(model, src, opset=18, dynamo=True, simplify=True, parity_inputs=torch.rand(4, 3, 32, 32))
    dst = tmp_path / "grid.onnx"
    rep = write_grid_graph(src, dst, [q.numpy() for q, _ in pairs], int4=int4)
    assert rep["quantized_convs"] == len(convs) and rep["weight_format"] == ("int4" if int4 else "int8")
    x = _inputs(16)
    a, b = ort_predict(ort_session(src), x), ort_predict(ort_session(dst), x)
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())
    with torch.no_grad():
        t = QDQTwin(onnx.load(str(dst)))(x).numpy()
    assert np.abs(t - b).max() <= 1e-4 * max(1.0, np.abs(b).max())
    if int4:   # two codes per byte: half the int8 file's code bytes
        as_int8 = write_grid_graph(src, tmp_path / "grid8.onnx", [q.numpy() for q, _ in pairs], int4=False)
        assert as_int8["bytes"] - rep["bytes"] >= 0.45 * rep["codes"]


def test_grid_graph_refuses_weights_off_the_grid(tmp_path):
    model, src = _float_graph(tmp_path)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    fake = [codes(w.detach(), 4)[0].numpy() for w in convs]   # codes of weights the graph does not hold
    with pytest.raises(ValueError, match="found no conv"):
        write_grid_graph(src, tmp_path / "x.onnx", fake, int4=True)
    assert not (tmp_path / "x.onnx").exists()
