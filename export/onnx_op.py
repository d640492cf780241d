"""The ``pladis::attention`` custom op in ONNX: one ``PladisAttention`` node and its function body.

Node (domain ``pladis``, op type ``PladisAttention``) — the contract the TensorRT plugin implements:
    inputs   q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv): one float type (fp32, fp16 or bf16);
             mask: additive, broadcastable to (B, H, Lq, Lk), any float type; ``-inf`` or a large negative
             removes a key; a (1, 1, 1, 1) zero when the model passes no mask;
             lam: float32, (B,) one PLADIS strength per sample of q's batch, or (1,) for all samples. Every
             node of a denoiser reads the graph input ``pladis_scale`` (cfg_batch,), so one exported graph
             (and one engine built from it) serves every lam, per call and per sample
    output   (B, H, Lq, Dv) in q's type
    attrs    alpha, scale (float); text_len (int: 0 = cross-attention, > 0 = joint attention with
             that many text tokens), text_first (int 0/1: FLUX order [text, image] vs SD3 [image, text]);
             plugin_version = "1", plugin_namespace = "pladis" (what TensorRT's ONNX parser uses to find
             the plugin of the same name).

The model-local function of the same domain and name gives the node a body of standard ops, so ONNX
Runtime runs the file without any plugin. The body computes logits and the threshold in float32 and casts
the mixed map to v's type only for the final MatMul (docs/NUMERICS.md). Its threshold is sort-free:
Newton's method on ``f(tau) = sum [z - tau]_+^(1/(alpha-1)) - 1`` from ``tau = max z - 1`` (monotone, never
overshoots), then the closed form on the support it found. ``NEWTON_STEPS`` is the number of steps that
identified the support exactly (error at float32 rounding) for key lengths up to 1000 and score scales
0.3-30 in our measurements; TopK/CumSum are not used, so TensorRT's TopK limit does not apply.
The body is specialised per export to one alpha (1.5 or 2) and one mode (cross-attention, or joint
attention with text first or last), which every node of a model shares; scale and text_len are read from
each node's attributes, lam from its fifth input.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from pladis.defaults import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET  # noqa: F401  (written there: --help reads them)
from pladis.errors import SettingError
from pladis.numerics import MASKED as _MASKED
from pladis.numerics import NEWTON_STEPS, newton_steps

DOMAIN = "pladis"
OP_TYPE = "PladisAttention"
PLUGIN_VERSION = "1"


# --------------------------------------------------------------------------------------------------
# TorchScript exporter: pladis::attention -> one PladisAttention node
# --------------------------------------------------------------------------------------------------


def _symbolic(g, q, k, v, attn_mask, lam, alpha, scale, text_len, text_first):
    from torch.onnx import symbolic_helper as sh

    alpha, scale = sh._get_const(alpha, "f", "alpha"), sh._get_const(scale, "f", "scale")
    lam = g.op("Cast", lam, to_i=TensorProto.FLOAT)  # (B,) or (1,): a runtime input, not an attribute
    text_len, text_first = sh._get_const(text_len, "i", "text_len"), sh._get_const(text_first, "b", "text_first")
    if sh._is_none(attn_mask):
        mask = g.op("Constant", value_t=torch.zeros(1, 1, 1, 1))
    elif attn_mask.type().scalarType() == "Bool":
        zero, masked = g.op("Constant", value_t=torch.tensor(0.0)), g.op("Constant", value_t=torch.tensor(_MASKED))
        mask = g.op("Where", attn_mask, zero, masked)
    else:
        mask = attn_mask
    out = g.op(
        f"{DOMAIN}::{OP_TYPE}", q, k, v, mask, lam,
        alpha_f=alpha, scale_f=scale, text_len_i=text_len, text_first_i=int(text_first),
        plugin_version_s=PLUGIN_VERSION, plugin_namespace_s=DOMAIN,
    )  # fmt: skip
    # Keep the dtype but no traced sizes: static sizes here would let the exporter constant-fold every shape
    # computed downstream, freezing the dynamic axes (batch, image size) at their traced values.
    out.setType(q.type().with_sizes([None] * 4))
    return out


def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """``aten::rms_norm`` (FLUX's q/k norms), which the TorchScript exporter lacks below opset 23."""
    from torch.onnx import symbolic_helper as sh

    n = len(sh._get_const(normalized_shape, "is", "normalized_shape"))
    axes = list(range(-n, 0))
    eps = torch.finfo(torch.float32).eps if sh._is_none(eps) else sh._get_const(eps, "f", "eps")
    xf = g.op("Cast", x, to_i=1)  # float32 statistics, as torch computes them for half inputs
    sq = g.op("Mul", xf, xf)
    if g.opset >= 18:  # ReduceMean's axes became an input in opset 18
        mean_sq = g.op("ReduceMean", sq, g.op("Constant", value_t=torch.tensor(axes)), keepdims_i=1)
    else:
        mean_sq = g.op("ReduceMean", sq, axes_i=axes, keepdims_i=1)
    y = g.op("Div", xf, g.op("Sqrt", g.op("Add", mean_sq, g.op("Constant", value_t=torch.tensor(eps)))))
    y = g.op("CastLike", y, x)
    return y if sh._is_none(weight) else g.op("Mul", y, weight)


def _unflatten_symbolic(g, x, dim, sizes):
    """``aten::unflatten`` as one Reshape whose target keeps x's rank known.

    The exporter's own version normalises ``dim`` with graph ops (Mod), which hides the output rank from
    its shape inference; it then falls back to the traced sizes and freezes batch and sequence length
    (FLUX's stock processors unflatten q/k/v), so a model exported at one size fails at any other.
    """
    from torch.onnx import symbolic_helper as sh

    rank = x.type().dim()
    dim = sh._get_const(dim, "i", "dim") % rank
    sizes = sh._get_const(sizes, "is", "sizes")
    shape = g.op("Shape", x)
    parts = [g.op("Constant", value_t=torch.tensor(list(sizes), dtype=torch.int64))]
    if dim > 0:
        parts.insert(0, g.op("Slice", shape, g.op("Constant", value_t=torch.tensor([0])),
                             g.op("Constant", value_t=torch.tensor([dim]))))  # fmt: skip
    if dim < rank - 1:
        parts.append(g.op("Slice", shape, g.op("Constant", value_t=torch.tensor([dim + 1])),
                          g.op("Constant", value_t=torch.tensor([rank]))))  # fmt: skip
    return g.op("Reshape", x, g.op("Concat", *parts, axis_i=0))


def _upsample_nearest_exact_symbolic(g, x, output_size, scale_factors):
    """``aten::_upsample_nearest_exact2d`` (the 3-D VAEs' up-sampling), which the exporter lacks: one Resize.

    torch reads source ``floor((dst + 0.5) / scale)``; Resize with ``half_pixel`` coordinates reads
    ``round((dst + 0.5) / scale - 0.5)``, which ``round_prefer_ceil`` makes the same ``floor`` for every scale.
    """
    from torch.onnx import symbolic_helper as sh

    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    attrs = dict(mode_s="nearest", coordinate_transformation_mode_s="half_pixel", nearest_mode_s="round_prefer_ceil")
    if sh._is_none(scale_factors):  # an output size would freeze the image size: only scale factors export
        raise torch.onnx.errors.SymbolicValueError("nearest-exact up-sampling exports with scale factors only", x)
    scales = [1.0, 1.0, *sh._get_const(scale_factors, "fs", "scale_factors")]
    return g.op("Resize", x, empty, g.op("Constant", value_t=torch.tensor(scales)), **attrs)


def register_symbolics(opset: int) -> None:
    """Teach the TorchScript exporter (``torch.onnx.export(dynamo=False)``) to emit ``PladisAttention``;
    to export ``aten::rms_norm``, which it cannot below opset 23; to keep ``aten::unflatten`` dynamic; and to
    export ``aten::_upsample_nearest_exact2d``, which it lacks."""
    torch.onnx.register_custom_op_symbolic("pladis::attention", _symbolic, opset)
    torch.onnx.register_custom_op_symbolic("aten::_upsample_nearest_exact2d", _upsample_nearest_exact_symbolic, opset)
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, opset)
    torch.onnx.register_custom_op_symbolic("aten::unflatten", _unflatten_symbolic, opset)


# --------------------------------------------------------------------------------------------------
# The function body
# --------------------------------------------------------------------------------------------------


class _Body:
    """A small builder of function-body nodes with fresh value names."""

    def __init__(self, opset: int):
        self.opset, self.nodes, self._n = opset, [], 0

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self._n += 1
        out = f"_{op_type.lower()}{self._n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype=np.float32) -> str:
        return self.op("Constant", value=onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype)))

    def attr_const(self, attr: str, kind: str) -> str:
        """A Constant whose value is the calling node's attribute ``attr`` (kind: "float" or "int")."""
        self._n += 1
        out = f"_{attr}{self._n}"
        field, type_ = (
            ("value_float", onnx.AttributeProto.FLOAT) if kind == "float" else ("value_int", onnx.AttributeProto.INT)
        )
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(onnx.AttributeProto(name=field, ref_attr_name=attr, type=type_))
        self.nodes.append(node)
        return out

    def reduce(self, op_type: str, x: str) -> str:
        """Reduce over the last axis, keeping it (axes became an input in opset 18, for ReduceSum in 13)."""
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, x, self.const([-1], np.int64), keepdims=1)
        return self.op(op_type, x, axes=[-1], keepdims=1)


def _entmax(b: _Body, s: str, alpha: float, steps: int) -> tuple[str, float]:
    """alpha-entmax over the last axis of finite float32 logits s, as ``(u, c)`` with entmax = c * u.

    In units of ``z = s - max s``, tau starts at -1; the thresholds below are kept in the units of s (t
    starts at max s - 2 for alpha 1.5, max s - 1 for alpha 2), which saves the pass that would form z.
    alpha = 1.5: ``u = [s - t]_+^2``,
    c = 1/4, with t = 2 tau, by Newton on ``g(t) = ||[z - t]_+|| / 2 - 1`` (convex, decreasing, nearly
    linear: 4 steps reach float32 resolution where Newton on sum r^2 - 1 needs 8), then the closed form
    on the support, written relative to t so its sums come from the same pass. alpha = 2:
    ``u = [z - tau]_+``, c = 1, by Newton on ``sum r - 1``, whose last step is the closed form.
    """
    z, smax = s, b.reduce("ReduceMax", s)
    if alpha == 2.0:
        one = b.const(1.0)
        tau = b.op("Sub", smax, one)
        for _ in range(steps):  # tau += (sum r - 1) / |support|; exact once the support is found
            r = b.op("Relu", b.op("Sub", z, tau))
            count = b.reduce("ReduceSum", b.op("Cast", b.op("Greater", z, tau), to=TensorProto.FLOAT))
            tau = b.op("Add", tau, b.op("Div", b.op("Sub", b.reduce("ReduceSum", r), one), b.op("Max", count, one)))
        return b.op("Relu", b.op("Sub", z, tau)), 1.0
    # The Max guards only matter in a row whose keys are all masked (every r = 0): they keep it finite,
    # and the caller zeroes it.
    two, tiny = b.const(2.0), b.const(1e-30)
    t = b.op("Sub", smax, two)
    for _ in range(steps):  # t += (||r|| - 2) ||r|| / sum r
        r = b.op("Relu", b.op("Sub", z, t))
        norm = b.op("Sqrt", b.reduce("ReduceSumSquare", r))
        t = b.op(
            "Add",
            t,
            b.op("Div", b.op("Mul", b.op("Sub", norm, two), norm), b.op("Max", b.reduce("ReduceSum", r), tiny)),
        )
    # closed form on K = {z > t}: sum_K (r - u)^2 = 4  ->  k u^2 - 2 s1 u + s2 - 4 = 0, smaller root
    r = b.op("Relu", b.op("Sub", z, t))
    k = b.reduce("ReduceSum", b.op("Cast", b.op("Greater", z, t), to=TensorProto.FLOAT))  # (Sign is slow in ORT)
    s1, s2 = b.reduce("ReduceSum", r), b.reduce("ReduceSumSquare", r)
    disc = b.op("Relu", b.op("Sub", b.op("Mul", s1, s1), b.op("Mul", k, b.op("Sub", s2, b.const(4.0)))))
    t = b.op("Add", t, b.op("Div", b.op("Sub", s1, b.op("Sqrt", disc)), b.op("Max", k, b.const(1.0))))
    r = b.op("Relu", b.op("Sub", z, t))
    return b.op("Mul", r, r), 0.25


def function_proto(
    alpha: float, joint: str | None = None, opset: int = DEFAULT_OPSET, masked: bool = True, max_keys: int | None = None
) -> onnx.FunctionProto:
    """The ``pladis.PladisAttention`` function for one alpha (1.5 or 2) and one mode.

    joint: None for cross-attention, "text-first" (FLUX) or "text-last" (SD3) for joint attention.
    masked: False when no node of the model has a real mask (its mask input is the zero constant), which
    drops the mask arithmetic from the body. max_keys: the longest key (text) axis the model is exported
    for, which sets the number of Newton steps (``newton_steps``).
    """
    if alpha not in NEWTON_STEPS:
        raise SettingError("alpha", f"the ONNX function body is exact for alpha 1.5 and 2 only; got alpha={alpha}")
    b = _Body(opset)
    f32 = TensorProto.FLOAT
    q = b.op("Mul", b.op("Cast", "q", to=f32), b.attr_const("scale", "float"))  # scale q: smaller than S
    k_t = b.op("Transpose", b.op("Cast", "k", to=f32), perm=[0, 1, 3, 2])  # (B, H, D, Lk)
    s = b.op("MatMul", q, k_t)
    if masked:
        s = b.op("Max", b.op("Add", s, b.op("Cast", "mask", to=f32)), b.const(_MASKED))
    dense = b.op("Softmax", s, axis=-1)
    lam = b.op("Reshape", "lam", b.const([-1, 1, 1, 1], np.int64))  # (B,) or (1,) -> against (B, H, Lq, Lk)
    steps = newton_steps(alpha, max_keys)
    if joint is None:  # P = (1 - lam) dense + lam c u
        u, c = _entmax(b, s, alpha, steps)
        one_minus_lam = b.op("Sub", b.const(1.0), lam)
        p = b.op("Add", b.op("Mul", dense, one_minus_lam), b.op("Mul", u, b.op("Mul", lam, b.const(c))))
        out = b.op("MatMul", b.op("CastLike", p, "v"), "v")
    else:
        out = _joint_out(b, s, dense, lam, alpha, steps, text_first=joint == "text-first")
    if masked:  # a row whose keys are all masked gives zeros, as the PyTorch operator does
        row_has_keys = b.op("Greater", b.reduce("ReduceMax", s), b.const(_MASKED / 10))
        out = b.op("Mul", out, b.op("CastLike", row_has_keys, "v"))
    b.nodes.append(helper.make_node("Identity", [out], ["out"]))
    return helper.make_function(
        DOMAIN, OP_TYPE, inputs=["q", "k", "v", "mask", "lam"], outputs=["out"], nodes=b.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["alpha", "scale", "text_len", "text_first", "plugin_version", "plugin_namespace"],
    )  # fmt: skip


def _joint_out(b: _Body, s: str, dense: str, lam: str, alpha: float, steps: int, text_first: bool) -> str:
    """Joint attention as dense attention plus a correction on the image-query x text-key block only:
    ``out = P V``, then on image rows ``+= lam (m c u - P_t) V_t`` (in float32), with ``P_t`` the dense
    weights of the text keys, ``m = sum P_t`` their mass and ``c u`` the entmax of the block's logits. Text
    rows keep dense attention. No (L x L) map beyond the softmax's; Newton runs on (L - T) x T logits."""
    t = b.op("Reshape", b.attr_const("text_len", "int"), b.const([1], np.int64))
    big, zero, neg_t = b.const([2**62], np.int64), b.const([0], np.int64), b.op("Neg", t)
    # [from, to) of the text and image tokens, on the key axis of s and the row axis of the output
    text, image = ((zero, t), (t, big)) if text_first else ((neg_t, big), (zero, neg_t))
    both = b.const([-2, -1], np.int64)

    def block(x: str) -> str:  # image rows x text columns
        return b.op("Slice", x, b.op("Concat", image[0], text[0], axis=0), b.op("Concat", image[1], text[1], axis=0),
                    both)  # fmt: skip

    def rows(x: str, span: tuple[str, str]) -> str:
        return b.op("Slice", x, span[0], span[1], b.const([-2], np.int64))

    p_t = block(dense)
    u, c = _entmax(b, block(s), alpha, steps)
    mass_c = b.op("Mul", b.reduce("ReduceSum", p_t), b.const(c))
    corr = b.op("Mul", b.op("Sub", b.op("Mul", u, mass_c), p_t), lam)  # lam (m c u - P_t)
    f32 = TensorProto.FLOAT
    out = b.op("MatMul", b.op("CastLike", dense, "v"), "v")
    v_t = rows(b.op("Cast", "v", to=f32), text)
    out_image = b.op("Add", b.op("Cast", rows(out, image), to=f32), b.op("MatMul", corr, v_t))
    out_image = b.op("CastLike", out_image, "v")
    out_text = rows(out, text)
    return b.op("Concat", *((out_text, out_image) if text_first else (out_image, out_text)), axis=-2)


# --------------------------------------------------------------------------------------------------
# Attaching and stripping the function
# --------------------------------------------------------------------------------------------------


def drop_dynamic_squeeze(model: onnx.ModelProto) -> int:
    """Replace the exporter's ``If(dim == 1) then Squeeze(x) else Identity(x)`` by ``x``; returns how many.

    The TorchScript exporter writes ``squeeze(dim)`` on a dynamic dim as that ``If``; the Squeeze branch
    fails ONNX Runtime's type inference when the traced size is not 1 (PixArt's output projection). The
    export's shape ranges never make such a dim 1 (``contracts.dims`` keeps >= 2 tokens), so the
    Identity branch is the one that runs.
    """
    replaced = 0
    for i, node in enumerate(model.graph.node):
        if node.op_type != "If":
            continue
        branches = {a.name: a.g for a in node.attribute}
        then_ops = [n.op_type for n in branches["then_branch"].node]
        else_nodes = list(branches["else_branch"].node)
        if then_ops[-1:] != ["Squeeze"] or [n.op_type for n in else_nodes] != ["Identity"]:
            continue
        squeezed = branches["then_branch"].node[-1].input[0]
        if else_nodes[0].input[0] != squeezed:
            continue
        model.graph.node[i].CopyFrom(helper.make_node("Identity", [squeezed], list(node.output), name=node.name))
        replaced += 1
    return replaced


def pladis_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every PladisAttention node of the main graph."""
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def attach_function(
    model: onnx.ModelProto, opset: int = DEFAULT_OPSET, with_body: bool = True, max_keys: int | None = None
) -> onnx.ModelProto:
    """Declare the ``pladis`` domain; add the function body (``with_body``) or remove any (plugin builds)."""
    nodes = pladis_nodes(model)
    kept = [f for f in model.functions if (f.domain, f.name) != (DOMAIN, OP_TYPE)]
    del model.functions[:]
    model.functions.extend(kept)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    if nodes and with_body:
        kinds = {_node_kind(n) for n in nodes}
        if len(kinds) != 1:
            raise SettingError(
                "alpha", f"all PladisAttention nodes of one model must share alpha and mode; found {kinds}"
            )
        alpha, joint = kinds.pop()
        masked = not all(_is_zero_constant(model, n.input[3]) for n in nodes)
        model.functions.append(function_proto(alpha, joint, opset, masked=masked, max_keys=max_keys))
    return model


def _is_zero_constant(model: onnx.ModelProto, name: str) -> bool:
    """Whether value ``name`` is an all-zero constant (the "no mask" input the symbolic writes)."""
    for init in model.graph.initializer:
        if init.name == name:
            return not onnx.numpy_helper.to_array(init).any()
    for node in model.graph.node:
        if name in node.output:
            return node.op_type == "Constant" and not onnx.numpy_helper.to_array(node.attribute[0].t).any()
    return False


def _node_kind(node: onnx.NodeProto) -> tuple[float, str | None]:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    joint = None if attrs["text_len"] == 0 else ("text-first" if attrs["text_first"] else "text-last")
    return float(attrs["alpha"]), joint
