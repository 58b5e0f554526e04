"""The operator registry: everything qparity declares about each operator of the integer program, in one entry.

Capture, the graph (which operators make a new grid), prepare_qat (which targets refuse an operator, checked
before any training), the exporters, golden vectors, to_torch and docs/ops.md all read these entries, and
tests/test_registry.py checks every (operator, target) and (operator, file format) pair against the code that
implements it, so an operator added in one place and forgotten in another fails a test, not a user.

`python -m qparity.ops.registry` prints docs/ops.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

from ..errors import UnsupportedOpError
from ..numerics import TARGETS as TARGET_NAMES

FILE_FORMATS = ("onnx", "tflite", "tosa", "pte")


@dataclass(frozen=True)
class Operator:
    name: str
    forms: str                          # the PyTorch modules and functions capture maps to it
    new_grid: bool                      # whether its output gets quantization parameters of its own
    integer: str                        # how the integer program computes it
    surrogate: str                      # what QAT differentiates (straight-through)
    restrictions: str = ""
    refused_by: Mapping[str, str] = field(default_factory=dict)  # target -> why it is refused at prepare_qat
    formats: Tuple[str, ...] = FILE_FORMATS  # file formats whose emitter writes it
    golden: bool = True                 # golden() writes its integer parameters
    torch_form: Optional[str] = None    # the torch.ao quantized form to_torch uses (None: not convertible)
    fuses_clamp: bool = False           # a clamp right after it (its only user) becomes its output range
    aimet: bool = True                  # the AIMET export (Qualcomm QNN/SNPE) writes it as a float ONNX operator
    captured: bool = True               # prepare_qat captures it from a PyTorch model (False: only from_torch of
    #                                     a convert_pt2e graph writes it)

    def targets(self) -> Tuple[str, ...]:
        """The targets that run this operator."""
        return tuple(t for t in TARGET_NAMES if t not in self.refused_by)



_SLEEF = ("PyTorch's fbgemm/x86 kernel computes its vector loop with Sleef's vectorized exp/tanh, which qparity "
          "does not emulate bit for bit yet (the qnnpack engine's table is emulated)")
_ORT_NO_KERNEL = ("ONNX Runtime has no quantized (QLinear) CPU kernel for it: its quantization tool runs it in float "
                  "between DequantizeLinear and QuantizeLinear")

_SLEEF_EVERY_ENGINE = ("PyTorch's quantized kernel (QuantizedOpKernels.cpp qgelu_kernel / qelu_kernel, the same on "
                       "every engine) computes its vector loop with Vectorized<float> erf/tanh/exp, Sleef on AVX2 and "
                       "AVX-512, which qparity does not emulate bit for bit")
_TFLITE_REFERENCE_NO_ELU = ("LiteRT's reference kernel set (BUILTIN_REF, the kernels this target follows) has no ELU "
                            "kernel, so the exported model could not be verified there; target 'xnnpack' runs it")
_TFLITE_NO_KERNEL = ("LiteRT has no int8 kernel for it (TFLite's converter rewrites it into other operators); "
                     "write it as relu6(x + 3) / 6 once those operators are supported")

_TOSA_NO_RESIZE = "not lowered for target 'tosa' yet (no emitter for TOSA's bilinear RESIZE)"
_TORCH_FLOAT_FALLBACK = ("PyTorch's quantized kernel for it (ATen quantized/cpu qmatmul.cpp, qsoftmax.cpp) dequantizes, runs "
                         "the float operator (vectorized BLAS / Sleef exp) and quantizes again outside its ruy and "
                         "QNNPACK special cases, which qparity does not emulate bit for bit")
_XNNPACK_MATMUL = ("LiteRT's XNNPACK delegate takes an int8 BATCH_MATMUL only where input 2's zero point is 0 "
                   "(xnnpack_delegate.cc VisitBatchMatMulNode) and LiteRT's optimized (ruy) kernel runs the rest; "
                   "neither is emulated yet, while target 'tflite' runs the reference kernel")
_TFLM_NO_GELU = ("TFLite Micro registers no GELU kernel (its interpreter fails to allocate the model); target 'tflite' "
                 "runs it on LiteRT's reference kernels")
_TFLM_ELU = ("TFLite Micro's int8 ELU table has not been matched bit for bit with its interpreter yet; target "
             "'xnnpack' runs ELU")


def _pte_float(config: str, kernel: str) -> str:
    """Why executorch-xnnpack refuses an operator ExecuTorch's XNNPACK partitioner takes only in float32."""
    return (f"ExecuTorch 1.5.1's XNNPACK partitioner takes it only in float32 (backends/xnnpack/partition/config/"
            f"{config}: FP32, no static quantization), so the delegate converts the codes to float32, runs {kernel} "
            "and converts back (XNNPACK has no rewrite to a qs8 operator), which qparity does not emulate bit for bit")


_TORCH_NO_SUB = ("PyTorch has no quantized sub (no quantized::sub operator; torch.sub raises on quantized tensors), so "
                 "the engine has no kernel to run it")

_TORCH_MEAN = ("PyTorch's quantized mean (ReduceOps.cpp mean_quantized_cpu) averages the dequantized values in float "
               "and quantizes onto the input's own grid; qparity does not emulate its float summation order. A "
               "LayerNorm there is quantized::layer_norm (QuantizedOpKernels.cpp quantized_normalize_kernel: exact "
               "integer sums, then float32 mean, variance, sqrt and float gamma/beta in Vectorized lanes, quantized "
               "once), one kernel qparity does not emulate; qparity's LayerNorm is LiteRT's program of int8 operators")
_XNNPACK_MEAN = ("LiteRT's default interpreter hands int8 MEAN to XNNPACK's mean operator (xnn_define_static_mean), "
                 "whose rounding qparity does not emulate; target 'tflite' runs it")

_PT2E_ONLY = ("it exists only in a model read from a convert_pt2e graph (`qparity.from_torch`, target "
              "'pt2e-reference'), for a value the PT2E quantizer left in float32")

OPERATORS: Dict[str, Operator] = {op.name: op for op in (
    Operator("input", "model inputs", True, "quantize (the target's QUANTIZE rule)",
             "identity inside the grid, 0 outside (torch.ao's fake-quant mask)",
             "float tensors; any batch size, other dimensions as captured", torch_form="quantize_per_tensor"),
    Operator("conv2d", "`nn.Conv2d`, `F.conv2d` on the model's own parameters; `nn.BatchNorm2d` (or `nn.SyncBatchNorm`) right "
             "after it is folded in; `nn.Conv1d`, `F.conv1d` as a height-1 conv2d between an unsqueeze and a squeeze "
             "(ops/conv1d.py), with `nn.BatchNorm1d` right after it folded in; `nn.BatchNorm2d` anywhere else as a "
             "depthwise 1x1 conv with the BatchNorm folded in", True,
             "exact int32 accumulator + bias, the target's requantizer (PyTorch engines: float bias as the "
             "engine adds it)", "float conv on straight-through weight codes, BatchNorm as torch.ao's QAT",
             "`padding_mode=\"zeros\"`; any stride, padding (incl. `\"same\"`), dilation, groups (x86: more "
             "than 100 groups run fbgemm's kernels, as PyTorch's x86 engine does); a folded BatchNorm must directly follow the conv, be its only "
             "user, `affine=True`, `track_running_stats=True`", torch_form="torch.ao.nn.quantized.Conv2d", fuses_clamp=True),
    Operator("conv_transpose2d", "`nn.ConvTranspose2d`, `F.conv_transpose2d` on the model's own parameters; "
             "`nn.BatchNorm2d` right after it is folded in", True,
             "exact int32 accumulator (the conv of the zero-inserted input with the flipped, transposed kernel, "
             "ops/conv_transpose2d.py) + bias, the target's conv requantizer (PyTorch's engines: fbgemm's rule on "
             "fbgemm, QNNPACK's on qnnpack, as measured)",
             "float conv of the zero-inserted input on straight-through weight codes, BatchNorm as torch.ao's QAT",
             "any stride, padding, output_padding, dilation, groups; no `output_size` argument; tflite/xnnpack/tflite-micro: "
             "dilation 1 and groups 1 (TRANSPOSE_CONV has neither; executorch-xnnpack likewise: XNNPACK's deconvolution takes per-channel weights only with groups 1); fbgemm/qnnpack: one weight scale "
             "per tensor, whatever `per_channel` says (PyTorch's quantized ConvTranspose2d takes no other)",
             refused_by={"x86": "PyTorch's x86 engine gives codes far from ConvTranspose2d's own definition whenever "
                                "in_channels != out_channels in a fresh process (hundreds of codes off by up to 140 "
                                "on torch 2.13 and 2.14, measured), and fbgemm's after the fbgemm engine ran: there "
                                "is no one rule to emulate; fbgemm runs the same layer exactly",
                         "onnxruntime": "ONNX has no quantized ConvTranspose and ONNX Runtime's CPU provider registers "
                                        "no com.microsoft QLinearConvTranspose (only its XNNPACK provider has one); "
                                        "its quantization tool runs ConvTranspose in float",
                         "tosa": "not lowered for target 'tosa' yet (TOSA's TRANSPOSE_CONV2D takes no dilation or "
                                 "groups, and qparity has no emitter for it)"},
             formats=("tflite", "pte"), torch_form="torch.ao.nn.quantized.ConvTranspose2d", fuses_clamp=True, aimet=False),
    Operator("linear", "`nn.Linear`, `F.linear` on the model's own parameters; `nn.BatchNorm1d` right after it "
             "folded in; `nn.BatchNorm1d` on [N, C] elsewhere as a diagonal linear with the BatchNorm folded in", True,
             "as conv2d (TFLite: FULLY_CONNECTED's rule)", "float linear on straight-through weight codes",
             torch_form="torch.ao.nn.quantized.Linear", fuses_clamp=True),
    Operator("add", "`a + b`, `torch.add`, `Tensor.add`", True, "the target's add of two grids",
             "float sum of the dequantized inputs",
             "two tensors (broadcasting, e.g. [N, C, H, W] + [N, C, 1, 1]; no constants), `alpha=1`; fbgemm/x86/"
             "qnnpack: equal shapes only (checked at prepare_qat: PyTorch's broadcast add runs another loop); "
             "xnnpack: s_a / s_y and s_b / s_y in [2^-10, 256)",
             torch_form="torch.ops.quantized.add", fuses_clamp=True),
    Operator("sub", "`a - b`, `torch.sub`, `Tensor.sub` of two tensors (broadcasting)", True,
             "the target's add with the second input negated (LiteRT reference: SUB runs the ADD kernel with "
             "input 2's Q31 multiplier negated, kernels/sub.cc; XNNPACK: its add with the second scale negated; "
             "ONNX Runtime: QLinearAdd of the second input's codes mirrored, q_max + q_min - q by BitwiseNot, on "
             "the mirrored grid, which holds -b exactly; `c - x` so too)",
             "float difference of the dequantized inputs",
             "two tensors (no constants), `alpha=1`; never fused with a following ReLU (a separate clamp); "
             "xnnpack: s_a / s_y and s_b / s_y in [2^-10, 256)",
             refused_by={t: _TORCH_NO_SUB for t in ("fbgemm", "x86", "qnnpack")},
             formats=("onnx", "tflite", "tosa", "pte")),
    Operator("mul", "`a * b`, `torch.mul`, `Tensor.mul` of two tensors (broadcasting); `x ** 2`, `torch.pow(x, 2)`, "
             "`Tensor.pow(2)` as `x * x`; `nn.SiLU` / `F.silu` "
             "become sigmoid then mul", True, "the target's product of two grids (LiteRT reference: MBQM; XNNPACK "
             "and ONNX Runtime: float32 multiplier; PyTorch's engines: float32 multiplier)",
             "float product of the dequantized inputs", "two tensors (no constants); xnnpack: s_a s_b / s_y in "
             "[2^-16, 256), where LiteRT's delegate runs it", torch_form="torch.ops.quantized.mul"),
    Operator("matmul", "`a @ b`, `torch.matmul`, `torch.bmm`, `Tensor.matmul`/`bmm` of two tensors of rank >= 2 "
             "(batch dimensions broadcast); `F.scaled_dot_product_attention` as matmul(q, k^T), mul by its scale, "
             "softmax, matmul with v; `nn.MultiheadAttention` self-attention as that between its in_proj and "
             "out_proj linear layers (ops/attention.py)", True,
             "exact int32 accumulator of (q_a - z_a)(q_b - z_b), the target's requantizer (LiteRT reference: "
             "BATCH_MATMUL's MBQM, as conv; ONNX Runtime: QLinearMatMul's float32 multiplier; TOSA: MATMUL, then RESCALE)",
             "float matmul of the dequantized inputs",
             "two tensors computed by the model; an inner dimension whose int32 accumulator cannot overflow; "
             "TFLite: ranks 2 to 5 (BATCH_MATMUL); scaled_dot_product_attention without mask, causal flag, "
             "dropout or GQA; nn.MultiheadAttention batch-first self-attention without masks, dropout, "
             "add_bias_kv, add_zero_attn or kdim/vdim, read only through [0]",
             refused_by={"executorch-xnnpack": _pte_float(
                             "generic_node_configs.py BMMConfig", "XNNPACK's float32 batch matrix multiply (GEMM "
                             "microkernels whose summation order depends on the CPU)"),
                         **{t: _TORCH_FLOAT_FALLBACK for t in ("fbgemm", "x86", "qnnpack")},
                         "xnnpack": _XNNPACK_MATMUL},
             formats=("onnx", "tflite", "tosa")),
    Operator("softmax", "`nn.Softmax`, `F.softmax`, `torch.softmax`, `Tensor.softmax` over the last dimension", True,
             "the target's softmax of each row of codes (numerics/softmax.py; LiteRT reference: gemmlowp fixed-point "
             "exp and reciprocal, output grid 1/256, -128; xnnpack: LiteRT's optimized kernel, a float32 expf table, "
             "same grid; ONNX Runtime: QLinearSoftmax's float32 exp table and sum, output grid 1/256, 0 (uint8) or "
             "1/255, -128 (int8); TOSA: qparity's int32 program of REDUCE_MAX, GATHER of a 2^16 exp table, REDUCE_SUM and "
             "INTDIV, output grid 1/256, -128: ExecuTorch's decomposition into int8 steps needs intermediate grids "
             "that qparity does not observe)",
             "torch.softmax of the dequantized input", "the last dimension only; no `dtype` argument; onnxruntime: "
             "more than one element; tosa: rows of at most 16384 entries",
             refused_by={"executorch-xnnpack": _pte_float(
                             "generic_node_configs.py SoftmaxConfig", "XNNPACK's float32 softmax (an exp "
                             "approximation in raddstoreexpminusmax, float sums)"),
                         **{t: _TORCH_FLOAT_FALLBACK for t in ("fbgemm", "x86", "qnnpack")}},
             formats=("onnx", "tflite", "tosa")),
    Operator("constant", "a Python number combined with a tensor: `x + c`, `c + x`, `x - c`, `c - x`, `x * c`, "
             "`c * x`, `x / c` (as `x * (1 / c)`; `x - c` as `x + (-c)`), `torch.add`/`sub`/`mul`/`div` and the Tensor "
             "methods", True,
             "a tensor of shape [1, ..., 1] holding the number's code on a grid of its own (int8: scale |c| / 127, "
             "zero point 0; uint8: zero point at the end opposite c), the second operand of add, sub or mul",
             "the number itself (no gradient)", "Python int/float constants; fbgemm/x86/qnnpack: the number itself "
             "to quantized::add_scalar / mul_scalar (BinaryOps.cpp), whose output grid the engine derives from the "
             "input's (add: zero point z - rne(c / s), or at the range's end with a widened scale and the codes "
             "requantized; mul: scale |c| s, codes mirrored for c < 0), as qparity's output grid; `c - x` refused "
             "there (no quantized rsub)",
             formats=("onnx", "tflite", "tosa", "pte"),
             golden=False, torch_form="the number, to torch.ops.quantized.add_scalar / mul_scalar"),
    Operator("parameter", "the weight and bias of `nn.LayerNorm` / `F.layer_norm` (`elementwise_affine=True`); a "
             "parameter of the model added to or multiplied with a tensor (a position embedding, RMSNorm's weight)", True,
             "a tensor of the parameter's codes on a grid of its own (the target's QUANTIZE rule; convert writes "
             "them into the node), the second operand of mul or add", "the parameter itself, straight-through (it "
             "learns)", "broadcasts against the other operand",
             formats=("onnx", "tflite", "tosa", "pte")),
    Operator("cat", "`torch.cat`, `torch.concat`", True,
             "each input rescaled to the output grid (a copy when the grids are equal)",
             "float concatenation of the dequantized inputs", "every input a tensor computed by the model",
             torch_form="torch.ops.quantized.cat"),
    Operator("hardswish", "`nn.Hardswish`, `F.hardswish`", True,
             "the target's hardswish of one code (a table of all codes where the result depends only on the code; "
             "LiteRT: TFLite's int16 fixed-point HARD_SWISH)",
             "F.hardswish of the dequantized input", "never fused into the layer before it",
             refused_by={"onnxruntime": _ORT_NO_KERNEL},
             formats=("tflite", "tosa", "pte"), torch_form="torch.ao.nn.quantized.Hardswish"),
    Operator("sigmoid", "`nn.Sigmoid`, `torch.sigmoid`, `F.sigmoid`, `Tensor.sigmoid`", True,
             "the target's table of all input codes (numerics/activations.py); LiteRT: output grid 1/256, -128; "
             "PyTorch's engines: 1/256, 0",
             "torch.sigmoid of the dequantized input",
             refused_by={t: _SLEEF for t in ("fbgemm", "x86")},
             formats=("onnx", "tflite", "tosa", "pte"), torch_form="torch.sigmoid (fixed grid 1/256, 0)"),
    Operator("tanh", "`nn.Tanh`, `torch.tanh`, `F.tanh`, `Tensor.tanh`", True,
             "the target's table of all input codes; LiteRT: output grid 1/128, 0; PyTorch's engines: 2/256, 128; "
             "executorch-xnnpack: XNNPACK's float32 f32-vtanh (rational 9/8, fused multiply-adds) between converts",
             "torch.tanh of the dequantized input",
             refused_by={**{t: _SLEEF for t in ("fbgemm", "x86")}, "onnxruntime": _ORT_NO_KERNEL},
             formats=("tflite", "tosa", "pte"), torch_form="torch.tanh (fixed grid 2/256, 128)"),
    Operator("hardsigmoid", "`nn.Hardsigmoid`, `F.hardsigmoid`", True,
             "the target's table of all input codes (fbgemm/x86: vector and scalar loops); PyTorch's engines: "
             "output grid 1/256, 0", "F.hardsigmoid of the dequantized input",
             refused_by={"onnxruntime": _ORT_NO_KERNEL, "tflite": _TFLITE_NO_KERNEL, "xnnpack": _TFLITE_NO_KERNEL,
                         "tflite-micro": _TFLITE_NO_KERNEL,
                         "executorch-xnnpack": "ExecuTorch 1.5.1's XNNPACK partitioner has no config for hardsigmoid "
                                               "(backends/xnnpack/partition/config/__init__.py), so it would run in "
                                               "ExecuTorch's portable kernels outside the delegate"},
             formats=("tosa",), torch_form="F.hardsigmoid (fixed grid 1/256, 0)", aimet=False),
    Operator("leaky_relu", "`nn.LeakyReLU`, `F.leaky_relu`", True,
             "the target's table of all input codes (PyTorch's engines: their vector and scalar loops; "
             "executorch-xnnpack: XNNPACK's float32 leaky relu between its qs8/f32 converts); the slope as float32", "F.leaky_relu of the dequantized input",
             formats=("onnx", "tflite", "tosa", "pte"), torch_form="torch.ops.quantized.leaky_relu"),
    Operator("gelu", "`nn.GELU`, `F.gelu` (approximate `\"none\"` or `\"tanh\"`)", True,
             "the target's table of all input codes (LiteRT: GELU's float32 table with the C library's erfcf / "
             "tanhf; XNNPACK takes only float GELU, so both LiteRT targets run it; executorch-xnnpack: XNNPACK's "
             "float32 f32-vgelu, a rational 12/10 erf by fused multiply-adds, between converts)",
             "F.gelu of the dequantized input", "executorch-xnnpack: approximate `\"none\"` (its delegate computes "
             "the erf form whatever `approximate` says; checked at prepare_qat)",
             refused_by={**{t: _SLEEF_EVERY_ENGINE for t in ("fbgemm", "x86", "qnnpack")},
                         "onnxruntime": _ORT_NO_KERNEL, "tflite-micro": _TFLM_NO_GELU},
             formats=("tflite", "tosa", "pte"), aimet=False),
    Operator("elu", "`nn.ELU`, `F.elu`", True,
             "the target's table of all input codes (XNNPACK: its reference ELU table with expm1f); alpha as "
             "float32", "F.elu of the dequantized input",
             "xnnpack: alpha = 1 (TFLite's ELU operator has no alpha; checked at prepare_qat)",
             refused_by={**{t: _SLEEF_EVERY_ENGINE for t in ("fbgemm", "x86", "qnnpack")},
                         "onnxruntime": _ORT_NO_KERNEL, "tflite": _TFLITE_REFERENCE_NO_ELU,
                         "tflite-micro": _TFLM_ELU,
                         "executorch-xnnpack": "ExecuTorch 1.5.1's XNNPACK partitioner leaves ELU out (EluConfig is "
                                               "commented out in backends/xnnpack/partition/config/__init__.py, "
                                               "'Waiting for PyTorch Pin Update'), so it would run in ExecuTorch's "
                                               "portable kernels outside the delegate"},
             formats=("tflite", "tosa"), aimet=False),
    Operator("prelu", "`nn.PReLU` (one slope, or one per channel on dim 1)", True,
             "x, or x times the slope's code, requantized by the target's rule (numerics/prelu.py: TFLite's two "
             "multipliers; PyTorch's qprelu in float32); the learned slope on a symmetric int8 grid s_a = f(1/k), "
             "k = floor(127 / max(1, max|a|)), so 1.0 is on it; convert writes its codes into the node",
             "F.prelu of the dequantized input with straight-through slope codes (the slope learns)",
             "|slope| <= 127", refused_by={"onnxruntime": _ORT_NO_KERNEL,
                                           "executorch-xnnpack": _pte_float(
                                               "node_configs.py PreluConfig", "XNNPACK's float32 PReLU with a float "
                                               "slope (not written by the .pte exporter yet)"),
                                           "tosa": "not lowered for target 'tosa' yet (ExecuTorch's Arm backend "
                                                   "decomposes PReLU into other operators; qparity has not matched "
                                                   "that decomposition)"},
             formats=("tflite",), torch_form="torch.ops.quantized.prelu (quint8 slope, zero point 128)", aimet=False),
    Operator("clamp", "`nn.ReLU`, `nn.ReLU6`, `nn.Hardtanh`, `F.relu`, `torch.relu`, `Tensor.relu`, `F.relu6`, "
             "`F.hardtanh`, `torch.clamp`/`clip`, `Tensor.clamp`/`clip`", False,
             "fused into the output range of the conv/linear/add right before it when that node has no other "
             "user; otherwise a clamp of the codes", "clamp, gradient 1 on the closed interval",
             "constant bounds", torch_form="torch.clamp (ReLU: fused modules)"),
    Operator("max_pool2d", "`nn.MaxPool2d`, `F.max_pool2d`, `nn.AdaptiveMaxPool2d` / `F.adaptive_max_pool2d` to "
             "sizes that divide the input, `nn.MaxPool1d` (on [N, C, 1, L])", False, "exact window maximum of the codes",
             "max pool of the codes", "`return_indices=False`", torch_form="F.max_pool2d"),
    Operator("amax", "`torch.amax`, `Tensor.amax` over any dims but the batch (keepdim either way)", False,
             "the maximum of the codes (LiteRT: REDUCE_MAX; ONNX Runtime: ReduceMax on the codes; PyTorch's engines: "
             "quantized max over one dim at a time; executorch-xnnpack: XNNPACK's qs8 max pooling over a view)", "amax of the codes (gradient to the maxima)",
             "not over dim 0 (an exported file runs any batch size)",
             formats=("onnx", "tflite", "tosa", "pte"), torch_form="torch.max(x, dim).values, one dim at a time"),
    Operator("avg_pool2d", "`nn.AvgPool2d`, `F.avg_pool2d`, `nn.AdaptiveAvgPool2d`, `F.adaptive_avg_pool2d`, "
             "`torch.mean`/`Tensor.mean` over (H, W) or over L of an [N, C, L] tensor, `nn.AdaptiveAvgPool1d`, "
             "`F.adaptive_avg_pool1d`, `nn.AvgPool1d` (on [N, C, 1, L])", False,
             "the target's average of exact window sums, PyTorch's divisors",
             "window mean of the codes", "no `divisor_override`; adaptive output sizes that do not divide the input "
             "(windows of differing sizes, PyTorch's start/end rule) only where the runtime has that kernel: exact, "
             "fbgemm, x86, qnnpack (refused at prepare_qat elsewhere); a mean only over H and W (qnnpack: no 1x1 "
             "avg_pool2d, as PyTorch's qnnpack; executorch-xnnpack: only the mean over the whole image)",
             torch_form="F.avg_pool2d / F.adaptive_avg_pool2d"),
    Operator("mean", "`torch.mean`, `Tensor.mean` over any dimensions but the batch (`keepdim` or not), except the "
             "means over (H, W) and over L that avg_pool2d runs", True,
             "the target's mean of the exact centered sums sum(q - z) (LiteRT: MEAN's reference kernel, "
             "QuantizedMeanOrSum; TOSA: REDUCE_SUM, then one RESCALE by s_x / (count s_y); executorch-xnnpack: "
             "XNNPACK's qs8 mean, one float32 scale on the raw int32 sum, as the .pte file runs it over a 4-D view)",
             "mean of the dequantized input", "not over the batch dimension",
             refused_by={**{t: _TORCH_MEAN for t in ("fbgemm", "x86", "qnnpack")},
                         "onnxruntime": "ONNX Runtime's CPU provider registers no kernel for com.microsoft "
                                        "QLinearReduceMean (its schema exists; a session fails with NOT_IMPLEMENTED, "
                                        "measured with onnxruntime 1.32)",
                         "xnnpack": _XNNPACK_MEAN},
             formats=("tflite", "tosa", "pte"), aimet=False),
    Operator("rsqrt", "`torch.rsqrt`, `Tensor.rsqrt`; `nn.LayerNorm` / `F.layer_norm` over the last dimension become "
             "mean, sub, mul (the square), mean, add (eps), rsqrt, mul, then mul and add by their parameter tensors", True,
             "the target's table of all input codes (LiteRT: RSQRT's fixed-point Newton-Raphson, numerics/rsqrt.py; "
             "exact: decided on the rational square; TOSA: a TABLE of torch.rsqrt, as Arm's backend builds it); the code of real 0 gives the top code",
             "torch.rsqrt of the dequantized input, floored at half a step",
             "a nonnegative input: its grid's zero point is the lowest code (checked once the grids are known)",
             refused_by={"executorch-xnnpack": _pte_float("generic_node_configs.py ReciprocalSquareRootConfig",
                                                          "XNNPACK's f32-vrsqrt microkernel"),
                         **{t: "PyTorch has no quantized rsqrt kernel" for t in ("fbgemm", "x86", "qnnpack")},
                         "onnxruntime": _ORT_NO_KERNEL,
                         "xnnpack": "LiteRT's XNNPACK delegate takes only float RSQRT, and qparity does not "
                                    "emulate the reference kernel inside the xnnpack target; target 'tflite' runs it"},
             formats=("tflite", "tosa"), aimet=False),
    Operator("upsample_nearest", "`nn.Upsample`, `F.interpolate` with mode='nearest' by integer factors", False,
             "copies codes: output[y, x] = input[y // k_h, x // k_w] (executorch-xnnpack: as XNNPACK's qs8 views "
             "and concatenations)", "nearest upsampling of the codes",
             "4-D inputs; integer factors where the runtimes' float32 index rule is exact (checked at capture)",
             formats=("onnx", "tflite", "tosa", "pte"), torch_form="F.interpolate(mode='nearest')"),
    Operator("upsample_bilinear", "`nn.Upsample`, `F.interpolate` with mode='bilinear' (align_corners False or "
             "True) to any size or by integer factors", False,
             "the target's interpolation of the four neighbouring codes (numerics/resampling.py; LiteRT reference: "
             "10-bit fixed point, rounding half away; XNNPACK: 11-bit weights; PyTorch's engines: float32, round "
             "half even on NCHW tensors; exact: correctly rounded)",
             "bilinear interpolation of the codes",
             "4-D inputs; `antialias=False`; a non-integer scale_factor only as a size",
             refused_by={"onnxruntime": "ONNX Runtime runs Resize (linear) on 8-bit codes with two kernels that round "
                                        "differently, chosen by session options: float32 weights truncated "
                                        "(UpsampleBilinear, NCHW, graph optimizations off) and 10-bit integer weights "
                                        "(NhwcUpsampleBilinearInteger, after its NHWC transformer with optimizations "
                                        "on; 1-4% of codes 1 apart, measured), so no one rule gives a file's codes",
                         "tosa": _TOSA_NO_RESIZE,
                         "executorch-xnnpack": _pte_float("generic_node_configs.py UpsampleBilinear2dConfig",
                                                          "XNNPACK's float32 bilinear resize (1,482 of 27,648 codes "
                                                          "differ from the qs8 rule, measured)")},
             formats=("tflite",), torch_form="F.interpolate(mode='bilinear') on NCHW (contiguous) tensors", aimet=False),
    Operator("pad", "`F.pad` (constant 0), `nn.ZeroPad2d`, `nn.ConstantPad2d(value=0)`, `nn.ZeroPad1d`, "
             "`nn.ConstantPad1d(value=0)`", False, "pads the codes with the zero point's code (real 0)",
             "the same padding of the codes", "zeros only; no negative padding", torch_form="F.pad"),
    Operator("dropout", "`nn.Dropout`, `F.dropout`", False,
             "identity (eval and the integer program)",
             "in QAT training, dropout of the dequantized values requantized on the same grid",
             golden=False, torch_form="identity"),
    Operator("call", "`torch.flatten`, `nn.Flatten`, `Tensor.view`/`reshape`/`flatten`/`permute`/`transpose`/"
             "`contiguous`/`squeeze`/`unsqueeze`/`chunk`/`split`/`t`, `torch.reshape`/`permute`/`transpose`/"
             "`squeeze`/`unsqueeze`/`chunk`/`split`, indexing, `nn.PixelShuffle`/`nn.PixelUnshuffle` (and their functions), "
             "`nn.Identity` (removed)", False,
             "moves codes unchanged", "the same call on the codes", "one tensor input",
             torch_form="the same call on quantized tensors"),
    Operator("aten_float", "none: `qparity.from_torch` of a convert_pt2e model, for a value its quantizer leaves in "
             "float32 (torchao's X86InductorQuantizer: an operator whose output no int8 operator takes, a model "
             "output)", False, "the graph's own ATen call in float32 on the dequantized inputs (ops/aten_float.py)",
             "none (not trained)", "the ATen calls listed in ops/aten_float.py; a float32 value, no grid",
             refused_by={t: _PT2E_ONLY for t in TARGET_NAMES}, formats=(), golden=False, captured=False,
             aimet=False),
    Operator("quantize", "none: `qparity.from_torch` of a convert_pt2e model, for the quantize_per_tensor of a value "
             "its quantizer left in float32", True, "the target's QUANTIZE rule on the float32 value",
             "none (not trained)", "a float32 input (an aten_float node's)",
             refused_by={t: _PT2E_ONLY for t in TARGET_NAMES}, formats=(), golden=False, captured=False,
             aimet=False),
)}

CAPTURED_OPS = tuple(name for name, op in OPERATORS.items() if op.captured)
FLOAT_VALUE_OPS = ("aten_float",)  # operators whose result is a float32 tensor, on no grid
NEW_GRID_OPS = tuple(name for name, op in OPERATORS.items() if op.new_grid)
LAYER_OPS = ("conv2d", "conv_transpose2d", "linear")  # the operators with weights (a QATLayer each)
CLAMP_FUSING_OPS = tuple(name for name, op in OPERATORS.items() if op.fuses_clamp)


def operator(name: str) -> Operator:
    return OPERATORS[name]


def refuse_if_target_cannot_run(op_name: str, where: str, target_name: str) -> None:
    """Raise UnsupportedOpError, naming where the operator is, when the registry says the target refuses it."""
    op = OPERATORS[op_name]
    if target_name in op.refused_by:
        raise UnsupportedOpError(
            f"{op_name} at {where} cannot run on target {target_name!r}: {op.refused_by[target_name]}; "
            f"targets that run it: {', '.join(op.targets())}")


def ops_markdown() -> str:
    """docs/ops.md, generated from the registry."""
    lines = [
        "# Supported operators",
        "",
        "<!-- Generated by `python -m qparity.ops.registry > docs/ops.md` from src/qparity/ops/registry.py; "
        "tests/test_registry.py fails when this file is stale. -->",
        "",
        "`prepare_qat` traces the model with `torch.fx` (or, where tracing fails, exports it with `torch.export` and",
        "reads its ATen ops as the same PyTorch forms) and maps every node to one operator of the integer",
        "program; anything else raises `UnsupportedOpError` naming the operator and where it is. An operator a",
        "target cannot run exactly is refused at `prepare_qat`, naming the module and the targets that can run it.",
        "\"Own grid\": the output gets quantization parameters of its own (an observer, frozen by `freeze`); the",
        "other operators keep their input's grid. Each target's arithmetic is in [numerics.md](numerics.md).",
        "",
        "| operator | PyTorch forms | own grid | integer program | QAT gradient | restrictions |",
        "|---|---|---|---|---|---|",
    ]
    for op in OPERATORS.values():
        lines.append(f"| {op.name} | {op.forms} | {'yes' if op.new_grid else 'no'} | {op.integer} | "
                     f"{op.surrogate} | {op.restrictions} |")
    lines += ["", "## Operators x targets", "",
              "| operator | " + " | ".join(TARGET_NAMES) + " | " + " | ".join(f".{f}" for f in FILE_FORMATS)
              + " | golden | to_torch | AIMET encodings |",
              "|---|" + "---|" * (len(TARGET_NAMES) + len(FILE_FORMATS) + 3)]
    # The operators only from_torch of a convert_pt2e graph writes run on no training target: one line below,
    # not a row of refusals.
    trained = [op for op in OPERATORS.values() if op.captured]
    for op in trained:
        cells = ["yes" if t in op.targets() else "refused" for t in TARGET_NAMES]
        cells += ["yes" if f in op.formats else "no" for f in FILE_FORMATS]
        cells += ["yes" if op.golden else "codes only", op.torch_form or "no", "yes" if op.aimet else "no"]
        lines.append(f"| {op.name} | " + " | ".join(cells) + " |")
    supported = sum(len(op.targets()) for op in trained)
    lines += ["", f"{supported} of {len(trained) * len(TARGET_NAMES)} (operator, target) pairs run.", ""]
    lines += [f"`{op.name}` runs on no training target: {_PT2E_ONLY} (target `pt2e-reference`)."
              for op in OPERATORS.values() if not op.captured]
    lines += ["", "## Why a target refuses an operator", ""]
    for op in trained:
        for target, why in op.refused_by.items():
            lines.append(f"- {op.name} on `{target}`: {why}.")
    lines += ["", "Per-configuration refusals, raised with the layer's name: `xnnpack` refuses requantization "
              "scales and add ratios outside the ranges where LiteRT's default interpreter stays in XNNPACK; "
              "LiteRT and ONNX Runtime targets refuse adaptive average pools whose output size does not divide the "
              "input; `qnnpack` refuses 1x1 `avg_pool2d` and the add ratios PyTorch's qnnpack itself rejects. Exporters refuse what "
              "their file format cannot express (see `qparity.export`).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(ops_markdown(), end="")
