"""The int8 recipe: SmoothQuant + per-tensor dynamic int8, and per-token int8 for the FFN output.

Measured on MiniLM-L6 in one run (cosine to the ORT fp32 graph, worst input; "probe" is
``calibrate.probe_texts``, each input alone in its call; "corpus" the benchmark's 2,000 sentences
in length-sorted batches of 32; speed: the corpus through ORT in-process, median ratio to ORT
fp32 over 10 interleaved repetitions, 2 threads):

| recipe | probe min | corpus min | corpus mean | speed |
|---|---|---|---|---|
| ORT dynamic int8, per-tensor weights | 0.822 | 0.882 | 0.959 | 2.26x |
| dynamic, per-channel weights | 0.973 | 0.981 | 0.992 | 2.15x |
| per-channel + SmoothQuant α = 0.8 on every linear | 0.982 | 0.9965 | 0.998 | 1.87x |
| **+ per-token asymmetric activations for the FFN output (this recipe)** | **0.994** | **0.998** | **0.999** | **1.84x** |

Also measured, simulated in torch on the same inputs: keeping the FFN output layers of layers
0-2 in fp32 instead reached probe min 0.992; α = 0.5 / 0.7 / 0.9 instead of 0.8, corpus min
0.967 / 0.995 / 0.996; per-token symmetric instead of asymmetric, probe min 0.974. In ORT:
MatMulNBits 8-bit (block 32, int8 compute) corpus min 0.9993 but only 1.1-1.4x fp32 speed;
ORT's fused (Q)Attention graph no faster than the unfused one.

Why: ORT's dynamic quantization gives each activation tensor *one* uint8 range per call. Two
things break that on a BERT encoder. (1) A few input channels carry outliers (one channel of the
FFN input reaches ~28 where the median channel stays under 2): SmoothQuant (Xiao et al., 2023)
divides input channel j by ``s_j = max|X_j|^α / max|W_j|^(1-α)`` and multiplies the weight's
input column j by it, an identical function whose outliers now sit in the per-channel-quantized
weights. The maxima come from a calibration corpus; the division is one elementwise ``Mul``
before the layer, or free for the attention output projection (folded into the value
projection). (2) The FFN output projection's input (after GELU, 4× wider) has *tokens* of very
different ranges - [CLS] and [SEP] against words - and its error dominates short inputs ("ok"
fell to 0.98 with everything else smoothed). Those layers quantize each token's row with its own
scale and zero point (``_per_token_matmul``), built from plain ONNX ops around
``MatMulInteger``: ORT's CPU kernel takes only a scalar zero point for A, so the zero-point term
is subtracted after the product via the weight's column sums.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polyray.backends.base import pad_batch

SMOOTH_ALPHA = 0.8  # measured on MiniLM: 0.5 / 0.7 / 0.8 / 0.9 gave corpus min cosine 0.967 / 0.995 / 0.9965 / 0.9955
_CALIBRATION_BATCH = 16
_EPS = 1e-8


class SmoothedLinear(torch.nn.Module):
    """``linear(x ⊙ inv_scale)`` with the weight's input columns divided by ``inv_scale``: the same
    function, smoother input."""

    def __init__(self, linear: torch.nn.Linear, inv_scale: torch.Tensor) -> None:
        super().__init__()
        self.inv_scale: torch.Tensor
        self.register_buffer("inv_scale", inv_scale)
        self.linear = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.linear.weight.data = (linear.weight.detach() / inv_scale[None, :]).contiguous()
        if linear.bias is not None:
            self.linear.bias.data = linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.inv_scale)  # type: ignore[no-any-return]


def smoothing_scale(input_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel ``s = max|X|^α / max|W|^(1-α)``, W the (out, in) weights reading X."""
    weight_absmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0).clamp(min=1e-5)
    return input_absmax.clamp(min=1e-5) ** alpha / weight_absmax ** (1.0 - alpha)


def per_token_width(model: Any) -> int:
    """Input width of the linears quantized per token: the FFN output projection (``intermediate_size``)."""
    return int(getattr(model.config, "intermediate_size", 0))


def _targets(model: Any, skip: Callable[[torch.nn.Linear], bool]) -> dict[str, tuple[torch.nn.Module, str]]:
    """The encoder's ``nn.Linear`` layers to smooth, as (parent, attribute)."""
    encoder = getattr(model, "encoder", model)
    out: dict[str, tuple[torch.nn.Module, str]] = {}
    for parent_name, parent in encoder.named_modules():
        for name, child in parent.named_children():
            if type(child) is torch.nn.Linear and not skip(child):
                out[f"{parent_name}.{name}"] = (parent, name)
    return out


def _fold_into_value(model: Any, key: str, scale: torch.Tensor) -> bool:
    """Smooth a BERT attention output projection for free: its input is softmax · V, so dividing V's
    output channels by ``s`` divides the projection's input channels by ``s`` exactly (no ``Mul``)."""
    encoder = getattr(model, "encoder", None)
    for i, layer in enumerate(getattr(encoder, "layer", ())):
        attention = getattr(layer, "attention", None)
        value = getattr(getattr(attention, "self", None), "value", None)
        if isinstance(value, SmoothedLinear):  # input-smoothed already: scaling its outputs commutes with that
            value = value.linear
        output = getattr(getattr(attention, "output", None), "dense", None)
        if key == f"layer.{i}.attention.output.dense" and isinstance(output, torch.nn.Linear):
            if not isinstance(value, torch.nn.Linear) or value.out_features != output.in_features:
                return False
            value.weight.data = (value.weight.detach() / scale[:, None]).contiguous()
            if value.bias is not None:
                value.bias.data = value.bias.detach() / scale
            output.weight.data = (output.weight.detach() * scale[None, :]).contiguous()
            return True
    return False


def calibrate_and_smooth(model: Any, calibration_ids: Sequence[Sequence[int]], alpha: float = SMOOTH_ALPHA) -> int:
    """Measure each linear input's per-channel |max| on the calibration inputs and smooth it.

    Each linear gets its own scale, even where several read one tensor (a layer's query, key and
    value): one scale shared by the three, from the largest of their weights, measured min cosine
    0.9919 against 0.9939 on the probe set, for a speed-up within noise. A BERT attention output
    projection is smoothed by folding the scale into the value projection (no ``Mul``). The
    per-token layers are left alone: their own scales already follow each token. Batches are cut
    from the length-sorted inputs, so padding stays as small as in serving. Returns the number of
    smoothed layers.
    """
    width = per_token_width(model)
    targets = _targets(model, skip=lambda linear: linear.in_features == width)
    absmax: dict[str, torch.Tensor] = {}
    hooks = []
    for key, (parent, attr) in targets.items():

        def record(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _out: Any, key: str = key) -> None:
            x = inputs[0].detach()
            channel_max = x.reshape(-1, x.shape[-1]).abs().amax(dim=0)
            absmax[key] = torch.maximum(absmax[key], channel_max) if key in absmax else channel_max

        hooks.append(getattr(parent, attr).register_forward_hook(record))
    ordered = sorted(calibration_ids, key=len)
    try:
        with torch.inference_mode():
            for start in range(0, len(ordered), _CALIBRATION_BATCH):
                ids, mask = pad_batch(ordered[start : start + _CALIBRATION_BATCH])
                model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    finally:
        for hook in hooks:
            hook.remove()
    for key, (parent, attr) in targets.items():
        linear = getattr(parent, attr)
        scale = smoothing_scale(absmax[key], [linear.weight.detach()], alpha)
        if not _fold_into_value(model, key, scale):
            setattr(parent, attr, SmoothedLinear(linear, (1.0 / scale).contiguous()))
    return len(targets)


def quantize_int8(src: Path, dst: Path, per_token_k: int, weight_bits: int = 8) -> tuple[int, int]:
    """Quantize every MatMul with a constant weight; returns (per-tensor count, per-token count).

    ``weight_bits`` 7 keeps the per-tensor layers' weights within ±63 for CPUs whose int8 kernels
    sum pairs of products in int16 (x86 without VNNI: ``backends.cpu``); 8 uses the full ±127.
    The per-token layers keep 8 bits either way: measured on an AVX2-only CPU, probe min cosine
    0.9909 with them at 8 bits, 0.9854 at 7 (the short inputs lose most), 0.9839 with no
    headroom anywhere. Unsigned 8-bit weights for the per-tensor layers (ORT's u8u8 kernel, which
    widens to int16 and cannot saturate) reached 0.9936 but ran at 0.77x the 7-bit build's speed.

    MatMuls whose weight has ``per_token_k`` input rows get per-token activations
    (``_per_token_matmul``); the others ORT's dynamic quantizer (per-tensor uint8 activations,
    per-channel int8 weights), which ORT fuses into ``DynamicQuantizeMatMul`` at load. The
    attention products (activation × activation) stay fp32.
    """
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic  # type: ignore[import-untyped]

    graph = onnx.load(str(src), load_external_data=False).graph
    weights = {init.name: tuple(init.dims) for init in graph.initializer}
    per_token = [
        node.name
        for node in graph.node
        if node.op_type == "MatMul"
        and len(weights.get(node.input[1], ())) == 2
        and weights[node.input[1]][0] == per_token_k
    ]
    staged = dst.with_name("per-tensor-" + dst.name)
    quant_log = logging.getLogger()
    level = quant_log.level
    # The quantizer logs a pre-processing hint on the root logger at WARNING for every build.
    # Start-up is single-threaded here, so muting the root logger for the call hides nothing else.
    quant_log.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            src,
            staged,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            reduce_range=weight_bits < 8,  # 7-bit weights: no int16 saturation on AVX2 kernels
            weight_type=QuantType.QInt8,
            nodes_to_exclude=per_token,
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        quant_log.setLevel(level)
    model = onnx.load(str(staged))
    staged.unlink()
    inits = {init.name: init for init in model.graph.initializer}
    nodes: list[Any] = []
    consts: list[Any] = []
    quantized_inputs: dict[str, tuple[str, str, str, str]] = {}
    num_per_token = 0
    for node in model.graph.node:
        if node.name in per_token:
            weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            _per_token_matmul(node, weight, f"polyray_pt{num_per_token}", nodes, consts, quantized_inputs)
            num_per_token += 1
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(consts)
    used = {name for node in model.graph.node for name in node.input}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    num_per_tensor = sum(1 for node in model.graph.node if node.op_type == "MatMulInteger") - num_per_token
    return num_per_tensor, num_per_token


def _per_token_matmul(
    node: Any,
    weight: np.ndarray,
    prefix: str,
    nodes: list[Any],
    consts: list[Any],
    quantized_inputs: dict[str, tuple[str, str, str, str]],
) -> None:
    """Replace ``Y = X @ W`` by per-token asymmetric uint8 X and per-channel symmetric int8 W.

    For each row r of X (one token): ``scale_r = (max(0, max X_r) - min(0, min X_r)) / 255``,
    ``zp_r = round(-min / scale_r)``, ``Xq = clip(round(X / scale_r) + zp_r, 0, 255)``. Then
    ``Y ≈ scale_r · w_scale ⊙ (Xq @ Wq) - (scale_r · zp_r) ⊗ (w_scale ⊙ colsum(Wq))``: the
    zero-point term is the outer product, because ``MatMulInteger`` on CPU accepts only a scalar
    zero point for X. Rows of one input are quantized once, however many MatMuls read them.
    """
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value: np.ndarray) -> str:
        consts.append(numpy_helper.from_array(value, name))
        return name

    def op(kind: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(kind, inputs, [out], name=out, **attrs))
        return out

    x, y = node.input[0], node.output[0]
    k, n = weight.shape
    if x not in quantized_inputs:
        q = f"{prefix}_x"
        x2 = op("Reshape", [x, const(f"{q}_2d", np.array([-1, k], dtype=np.int64))], f"{q}_rows")
        zero = const(f"{q}_zero", np.array(0.0, dtype=np.float32))
        lo = op("Min", [op("ReduceMin", [x2], f"{q}_rmin", axes=[1], keepdims=1), zero], f"{q}_lo")
        hi = op("Max", [op("ReduceMax", [x2], f"{q}_rmax", axes=[1], keepdims=1), zero], f"{q}_hi")
        span = op(
            "Mul", [op("Sub", [hi, lo], f"{q}_span"), const(f"{q}_inv255", np.array(1 / 255, np.float32))], f"{q}_s0"
        )
        scale = op("Max", [span, const(f"{q}_eps", np.array(_EPS, dtype=np.float32))], f"{q}_scale")
        zp = op("Round", [op("Div", [op("Neg", [lo], f"{q}_nlo"), scale], f"{q}_zp0")], f"{q}_zp")
        # One QuantizeLinear with per-row (axis 0) scale and zero point does round, shift, clip and
        # cast in a single pass over the rows; separate ops made five passes (measured ≈ 8 % of the build).
        flat = const(f"{q}_flat", np.array([-1], dtype=np.int64))
        row_scale = op("Reshape", [scale, flat], f"{q}_row_scale")
        row_zp = op("Reshape", [op("Cast", [zp], f"{q}_zp_u8", to=TensorProto.UINT8), flat], f"{q}_row_zp")
        xq = op("QuantizeLinear", [x2, row_scale, row_zp], f"{q}_u8", axis=0)
        scale_zp = op("Mul", [scale, zp], f"{q}_scale_zp")
        lead = op(
            "Slice",
            [
                op("Shape", [x], f"{q}_shape"),
                const(f"{q}_from", np.array([0], dtype=np.int64)),
                const(f"{q}_to", np.array([-1], dtype=np.int64)),
            ],
            f"{q}_lead",
        )
        quantized_inputs[x] = (xq, scale, scale_zp, lead)
    xq, scale, scale_zp, lead = quantized_inputs[x]
    w_scale = (np.maximum(np.abs(weight).max(axis=0), _EPS) / 127.0).astype(np.float32)
    wq = np.clip(np.round(weight / w_scale), -127, 127).astype(np.int8)
    col_sums = (wq.astype(np.int64).sum(axis=0) * w_scale).astype(np.float32)
    p = prefix
    product = op("MatMulInteger", [xq, const(f"{p}_wq", wq)], f"{p}_i32")
    as_float = op("Cast", [product], f"{p}_f32", to=TensorProto.FLOAT)
    scaled = op("Mul", [op("Mul", [as_float, scale], f"{p}_row"), const(f"{p}_wscale", w_scale)], f"{p}_col")
    correction = op("Mul", [scale_zp, const(f"{p}_colsum", col_sums)], f"{p}_zpterm")
    flat = op("Sub", [scaled, correction], f"{p}_flat")
    shape = op("Concat", [lead, const(f"{p}_n", np.array([n], dtype=np.int64))], f"{p}_shape", axis=0)
    nodes.append(helper.make_node("Reshape", [flat, shape], [y], name=f"{p}_out"))
