"""Targets `fbgemm`, `x86`, `qnnpack`: PyTorch's own quantized CPU engines (torch.ao eager/FX convert).

Activations are quint8 (uint8 codes), weights qint8 with zero point 0, and the bias stays a FLOAT32 tensor:
the engines take the float bias and fold it in their own way (`Target.float_bias`). Notation: f() rounds
to float32, rne is round half to even, sat clamps to [lo, hi], P = f(s_x * s_w), M = f(P / s_y),
inv = f(1 / s); all arithmetic float32 unless said.

Two roundings depend on the PyTorch release (pytorch_versions.py, chosen by torch.__version__ and stored in
saved models): Q_vec(x) = quantize_vec, rne(fma(x, inv, z)) in 2.13 and rne(f(x * inv)) + z in 2.14; and
Q_val(x) = the scalar loops' quantize_val, rne(f(f(x * inv) + z)) in 2.13 and rne(f(x * inv)) + z in 2.14.

Two settings of the machine change fbgemm's and x86's codes, so each target records them
(`configured(threads=, memory_format=)`; docs/determinism.md): the thread count splits add, hardswish,
leaky_relu and hardsigmoid into parallel chunks (below), and the layout of the model's inputs decides the
layouts downstream (add's output takes its first input's, the pools choose nhwc or nchw kernels by it).
prepare_qat fixes both from torch.get_num_threads() and the example inputs; the kernels below read
`engine_threads()`, and `arrange_input` stores the model's inputs in the recorded layout.

- quantize (quantize_per_tensor / QuantStub), every engine: q = sat(Q_vec(x)) (fbgemm's Quantize, reached
  through at::native::quantize_vec; measured on every element, ties included).
- conv2d / linear:
  * fbgemm:  q = sat(rne(f(f(acc) + f(b / P)) * M) + z_y). fbgemm's ReQuantizeOutput with a float bias
    (include/fbgemm/OutputProcessing-inl.h, requantizeOutputProcessingAvx2 in src/QuantUtilsAvx2.cc):
    `raw_f = raw + bias[j] / act_times_w_scale[j]; lrintf(raw_f * C_multiplier[j]) + C_zero_point`, with
    act_times_w_scale and the multiplier made in float by PyTorch (aten/.../quantized/cpu/qconv.cpp,
    qlinear.cpp: `output_multiplier_float = act_times_w_scale / output_scale`).
  * x86: conv routes to oneDNN when the weights are symmetric and groups <= 100 (aten/.../quantized/cpu/
    qconv.cpp, `should_use_onednn_quant`). PyTorch hands ideep 1/s_x and 1/s_y, which ideep inverts again,
    and oneDNN's brgemm kernel applies each scale, the float bias and the zero point one float32 step at a
    time (jit_brgemm_kernel.cpp store_accumulators_apply_post_ops): with s_x' = f(1 / f(1 / s_x)),
    q = sat(rne(f(f(f(f(acc * s_x') * s_w) + b) * f(1 / s_y)) + z_y)). Linear on x86 is fbgemm.
  * qnnpack: the bias is first quantized to int32 with quantize_per_tensor at scale P
    (aten/.../quantized/cpu/qnnpack_utils.h), then QNNPACK's fp32 requantization
    (qnnpack/src/requantization/fp32-*.c, `vfpacc * scale` and magic-number rounding), with its multiplier
    made as P * f(1 / s_y) (qnnpack_utils.h, generate_requantization_scales):
    q = sat(rne(f((acc + rne(b * f(1 / P))) * f(P * f(1 / s_y)))) + z_y).
- add (quantized::add, FloatFunctional.add / add_relu):
  * fbgemm, x86 (aten/.../quantized/cpu/kernels/QuantizedOpKernels.cpp, qadd_kernel): the vectorized loop
    dequantizes with fma(q, s, f(-z * s)), sums in float32 and quantizes as rne(f(sum * inv_y)) + z_y
    (QuantizeAvx512); the scalar loop, for what the vector loop leaves, dequantizes f((q - z) * s) and
    quantizes Q_val(sum) (measured; an fma here disagrees on half-code sums). The vector loop covers whole 64-element blocks of each chunk the
    elements are split into by at::parallel_for (GRAIN_SIZE 32768 elements; chunks of ceil(n / threads)).
    Position = position in memory order: qparity's codes keep PyTorch's layouts (conv outputs channels-last,
    model inputs NCHW). Inputs stored in different layouts take the scalar loop for every element.
  * qnnpack (qnnpack/src/add.c, requantization.h pytorch_qnnp_compute_add_quantization_params and
    pytorch_qnnp_add_quantize): fixed point. shift = 21 - exponent(max(r_a, r_b)) with r = f(s / s_y),
    multipliers m = lrintf(r * 2^shift), acc = m_a (q_a - z_a) + m_b (q_b - z_b) in int32, divided by
    2^shift rounding half away from zero, plus z_y.
- cat (quantized cat): each input on another grid is requantized. 4-D channels-last inputs joined on
  channels take qcat_nhwc_kernel (QuantizedOpKernels.cpp), which runs at AVX2 capability here (its 32-lane
  and 8-float loops; measured): whole 8-channel blocks as rne(f(fma(q, s, f(-z * s)) * inv_y)) + z_y, the
  other channels Q_val(f((q - z) * s));
  other inputs are dequantized f((q - z) * s) and quantized with quantize_per_tensor's rule. Equal grids copy.
- average pools (sum = sum(q - z), exact; multiplier = f(f(s_x / s_y) / N); inv = f(1 / f(1 / multiplier))):
  * fbgemm, x86 (QuantizedOpKernels.cpp, _qavg_pool_nhwc_kernel and _qadaptive_avg_pool_kernel): channels-last
    inputs run whole 16-channel blocks (adaptive: 8, measured on 2.13) in a vector loop, avg_pool2d's as rne(f(sum * multiplier)) + z
    (QuantizeAvx512), adaptive_avg_pool2d's as Q_vec(sum); the other channels as Q_val(sum) with
    inv = 1 / multiplier. A one-channel input counts as channels-last (measured on 2.14). NCHW inputs run the
    nchw kernels: avg_pool2d's rne(f(f(sum * inv) + z)) in every release; adaptive_avg_pool2d's
    (AdaptiveAveragePooling.cpp) averages the raw codes, rne(f(f(sum_q) * f(f(1 / kH) / kW))).
    The output keeps the input's layout (channels-last in, channels-last out).
  * qnnpack: adaptive_avg_pool2d q = rne(f(sum * f(s / f(s * N)))) + z; avg_pool2d without ceil_mode the same
    with N = kH * kW always (AveragePool2d.cpp qnnpack_avg_pool2d, qnnpack/src/average-pooling.c: padding is the
    zero point, count_include_pad ignored; measured); avg_pool2d with ceil_mode the fbgemm kernels above.
- hardswish (quantized::hardswish, torch.ao.nn.quantized.Hardswish), with h(x) = f(f(x * c) / 6),
  c = min(max(f(x + 3), 0), 6), all float32:
  * fbgemm, x86 (QuantizedOpKernels.cpp, qhardswish_kernel): like qadd, the vector loop (whole 64-element
    blocks of each parallel chunk, in memory order) dequantizes x = fma(q, s, f(-z * s)) and quantizes
    rne(f(h(x) * inv_y)) + z_y; the scalar loop x = f((q - z) * s), Q_val(h(x)).
    The output keeps the input's memory format (measured), so both run in the input's memory order.
  * qnnpack (qnnpack/src/hardswish.c, pytorch_qnnp_create_hardswish_nc_q8): a 256-entry lookup table built
    in float as x = f(s * (q - z)), lrintf(clamp(f(f(inv_y * h(x)) + z_y))): the scalar formula above for
    every element (no fma; QNNPACK's own code, the same in every release; measured).
"""
from __future__ import annotations

from functools import cached_property, lru_cache

import torch

from ..errors import TargetSettingError, UnsupportedOpError
from . import pooling, resampling
from ..qparams import QParams
from .arithmetic import fma_f32, rounding_divide_by_pot
from .activations import TableCache
from .prelu import engine_prelu
from .pytorch_versions import PyTorchKernels, installed_kernels, kernels_named
from .target import Target, channel_view, grid_views

ENGINE_FIXED_GRIDS = {"sigmoid": QParams(1.0 / 256.0, 0, "uint8"), "tanh": QParams(2.0 / 256.0, 128, "uint8"),
                      "hardsigmoid": QParams(1.0 / 256.0, 0, "uint8")}
VECTOR_BLOCK = 64          # qadd's vector loop covers whole 64-element blocks (cpu_kernel_vec; measured)
PARALLEL_GRAIN = 32768     # at::internal::GRAIN_SIZE
CAT_BLOCK = 8              # qcat_nhwc_kernel's vector loops (AVX2 dispatch: 32 and 8 lanes) cover 8-channel blocks
POOL_BLOCK = 16            # avg_pool2d's nhwc AVX512 loop covers 16-channel blocks
# adaptive_avg_pool2d's nhwc vector loop covers 8-channel blocks (measured on 2.13 with ties, where its rounding
# differs from the scalar tail's; on 2.14 the two round alike, so the width does not show)
ADAPTIVE_POOL_BLOCK = 8
# add answers from a table of every code pair (FbgemmAddTable) once a tensor is larger than the table.
ADD_TABLE_MAX_PAIRS = 256 * 256
ADD_TABLE_MIN_ELEMENTS = 2 * ADD_TABLE_MAX_PAIRS


def _f32(value) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32)


def _reciprocal(scale: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(scale, dtype=torch.float32) / scale.to(torch.float32)


def bias_in_accumulator_units(rule: str, bias: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
    """The float bias in accumulator units, as the fbgemm and qnnpack rules add it before the multiplier.

    qnnpack quantizes it to int32 first: quantize_per_tensor(b, P) = rne(b * f(1 / P)) (float64 holding
    integers); fbgemm adds f(b / P), P = f(s_x * s_w) per channel (act_times_w_scale).
    """
    if rule == "qnnpack":
        return torch.round(bias * _reciprocal(product)).to(torch.float64)
    return bias / product


def fbgemm_depthwise_path(geometry, weight_shape) -> bool:
    """Whether PyTorch runs a conv through fbgemm's depthwise kernels (FbgemmConv.cc takeDepthWiseFastPath).

    groups == C_in with C_out = C_in or 2 C_in, C_in a multiple of 8, a square 3x3, 5x5 or 7x7 kernel
    (7x7 measured on torch 2.13), strides 1 or 2, dilation 1 and padding (K - 1) / 2; measured on 400
    random models with 0 mismatched codes, and exact int32 accumulation everywhere else.
    """
    out_channels, per_group, kh, kw = weight_shape
    in_channels = per_group * geometry.groups
    padding = geometry.padding
    return (per_group == 1 and out_channels in (in_channels, 2 * in_channels) and in_channels % 8 == 0
            and kh == kw and kh in (3, 5, 7) and all(s in (1, 2) for s in geometry.stride)
            and tuple(geometry.dilation) == (1, 1) and not isinstance(padding, str)
            and tuple(padding) == ((kh - 1) // 2, (kw - 1) // 2))


MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
# What a .qp file written before the settings were recorded runs with (docs/determinism.md): one thread (one
# parallel chunk, PyTorch's sequential semantics) and PyTorch's default layout.
UNRECORDED_THREADS = 1
UNRECORDED_MEMORY_FORMAT = "contiguous"


def _checked_threads(threads):
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise TargetSettingError(f"engine thread count {threads!r}: give a positive int (what torch.set_num_threads "
                                 "would be set to on the machine that runs the model)")
    return threads


def _checked_memory_format(memory_format):
    if memory_format is None or memory_format in MEMORY_FORMATS:
        return memory_format
    raise TargetSettingError(f"memory format {memory_format!r}: give one of {', '.join(map(repr, MEMORY_FORMATS))} "
                             "(the layout of the model's 4-D inputs)")


def _layout_name(x: torch.Tensor) -> str:
    # quantize_per_tensor allocates its output in the input's suggest_memory_format.
    strictly_channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return "channels_last" if strictly_channels_last else "contiguous"


def input_memory_format(example_inputs) -> str:
    """The layout PyTorch would run the example inputs in: channels_last when the 4-D inputs are stored so."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    found = {_layout_name(x) for x in inputs if isinstance(x, torch.Tensor) and x.dim() == 4}
    if len(found) > 1:
        raise TargetSettingError("the example inputs mix contiguous and channels_last 4-D tensors; choose one layout "
                                 "for the model: target=get_target(name).configured(memory_format=...)")
    return found.pop() if found else "contiguous"


class PyTorchEngineTarget(Target):
    """What every PyTorch engine shares; subclasses name the conv, linear and add rules they use."""

    activation_dtypes = ("uint8",)
    uneven_adaptive_pool = True  # quantized adaptive_avg_pool2d (AdaptiveAveragePooling.cpp)
    float_bias = True
    conv_rule = "fbgemm"
    # ConvTranspose2d: the conv rule on the exact accumulator (measured on torch 2.13 and 2.14,
    # tests/test_conv_transpose2d.py; x86 is refused, ops/registry.py); per-tensor weights, as PyTorch's prepack requires.
    conv_transpose_rule = "fbgemm"
    per_channel_transposed_conv = False
    linear_rule = "fbgemm"
    add_rule = "fbgemm"
    add_takes_float_codes = True  # FbgemmAddTable, QnnpackAddTable: float32 codes in, float32 codes out
    pool_rule = "fbgemm"
    prelu = staticmethod(engine_prelu)  # qprelu_out_kernel (numerics/prelu.py)

    def __init__(self, kernels: PyTorchKernels | None = None, threads: int | None = None,
                 memory_format: str | None = None):
        # The PyTorch release whose kernels this target reproduces (pytorch_versions.py): the running one
        # unless a saved model names another.
        self.kernels = kernels or installed_kernels()
        # The thread count and input layout the engine is taken to run with (docs/determinism.md). None follows
        # the calling process as PyTorch does; prepare_qat, IntegerModel and load fix both.
        self.threads = _checked_threads(threads)
        self.memory_format = _checked_memory_format(memory_format)

    def for_release(self, release: str) -> "PyTorchEngineTarget":
        """This engine as PyTorch `release` ('2.13', '2.14') computes it."""
        if release == self.kernels.release:
            return self
        return type(self)(kernels_named(release), self.threads, self.memory_format)

    def configured(self, threads: int | None = None, memory_format: str | None = None) -> "PyTorchEngineTarget":
        """This engine run by `threads` threads (torch.set_num_threads) on inputs stored `memory_format`
        ("contiguous" or "channels_last"); a setting left None keeps this target's."""
        return type(self)(self.kernels, self.threads if threads is None else threads,
                          self.memory_format if memory_format is None else memory_format)

    def with_defaults_for(self, example_inputs) -> "PyTorchEngineTarget":
        """Every open setting fixed as PyTorch would run now: this process's thread count, the layout of the
        example inputs."""
        return self.configured(self.threads or torch.get_num_threads(),
                               self.memory_format or input_memory_format(example_inputs))

    def settings(self) -> dict:
        return {"pytorch_kernels": self.kernels.release, "engine_threads": self.threads,
                "memory_format": self.memory_format}

    def engine_threads(self) -> int:
        """The thread count that splits elementwise kernels into parallel chunks (`vector_loop_mask`)."""
        return self.threads or torch.get_num_threads()

    def arrange_input(self, x: torch.Tensor) -> torch.Tensor:
        # A 4-D input's layout decides the layout of what follows it (add's output takes its first input's,
        # mixed layouts run add's scalar loop only, the pools pick nhwc or nchw kernels), so the model's
        # inputs take the recorded one, whatever the caller's.
        if self.memory_format is None:
            return x
        if x.dim() == 4:
            return x.contiguous(memory_format=MEMORY_FORMATS[self.memory_format])
        return x.contiguous()

    # -- accumulation -------------------------------------------------------------------------------------
    def accumulation(self, geometry, weight_shape):
        """fbgemm's depthwise kernels saturate (x86 runs some convs through them too: X86Target.layer_target)."""
        if geometry.kind != "conv2d":
            return "exact"
        if self.conv_rule == "fbgemm" and fbgemm_depthwise_path(geometry, weight_shape):
            return "int16_pairs"
        return "exact"

    # -- quantize -------------------------------------------------------------------------------------------
    def quantize_unclamped(self, x, qp):
        scale, zero_point = grid_views(qp, x)
        inv, zero_point = _reciprocal(scale), zero_point.to(torch.float32)
        return self.kernels.quantize_vector(x.to(torch.float32), inv, zero_point).to(torch.float64)

    def quantize_bias(self, bias, input_scale, weight_scale):
        """The engines take the float bias as it is (float32); each requantizer folds it its own way."""
        return bias.detach().to(torch.float32)

    def int32_bias(self, op):
        # QNNPACK quantizes the float bias to qint32 at run time, which clamps it (measured on 2.14: a bias code of
        # 8.6e9 runs as 2^31 - 1, and the accumulator then wraps); fbgemm and oneDNN add it in float.
        return (self.conv_rule if op == "conv2d" else self.linear_rule) == "qnnpack"

    # -- conv / linear --------------------------------------------------------------------------------------
    def requantizer(self, op, input_qp, weight_scale, output_qp, lo, hi, channel_axis, ndim, bias=None):
        rule = {"conv2d": self.conv_rule, "conv_transpose2d": self.conv_transpose_rule}.get(op, self.linear_rule)
        product = input_qp.scale.to(torch.float32) * weight_scale.to(torch.float32)  # P = f(s_x * s_w)
        zero_point = int(output_qp.zero_point)
        scale_y = output_qp.scale.to(torch.float32)
        view = lambda t: channel_view(t, ndim, channel_axis)  # noqa: E731
        bias = None if bias is None else bias.detach().to(torch.float32).reshape(-1)

        if rule == "onednn":
            # PyTorch's x86 engine (aten/src/ATen/native/quantized/cpu/qconv.cpp, PackedConvWeightsOnednn::
            # apply_impl) hands ideep src_scales = 1.0 / input_scale and dst scale 1.0 / output_scale (double,
            # stored as float), and the per-channel weight scales as float; ideep (include/ideep/operators/
            # conv.hpp) turns them back into oneDNN scales with 1.0f / x, so oneDNN's src scale is
            # s_x' = f(1 / f(1 / s_x)), which differs from s_x for about 1 float in 6. oneDNN's brgemm int8 conv
            # (src/cpu/x64/brgemm/jit_brgemm_kernel.cpp, store_accumulators_apply_post_ops, v3.12) then does
            # cvt(acc) * src_scale, * wei_scale[c], + f32 bias, (relu), * dst_inv, + z_y, each a separate
            # float32 op, and rounds to nearest even when it saturates to u8; dst_inv = 1.f / dst_scale
            # (jit_brgemm_conv.cpp). So q = sat(rne(f(f(f(f(f(acc * s_x') * s_w[c]) + b) * inv_y') + z_y))),
            # inv_y' = f(1 / f(1 / f(1 / s_y))). Measured: 0 mismatched codes on every conv of the demo model
            # and on 400 random qparity-trained convs with full-range uint8 inputs (47M codes).
            one = torch.ones((), dtype=torch.float32)
            scale_x = one / (1.0 / input_qp.scale.to(torch.float64)).to(torch.float32)
            inv_y = one / (one / (1.0 / output_qp.scale.to(torch.float64)).to(torch.float32))
            scale_w = weight_scale.to(torch.float32)
            zero_point_f = _f32(zero_point)

            def requantize_onednn(acc: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
                # One float32 rounding per step; the first makes a new tensor (the caller keeps acc), the rest
                # run in place on it.
                real = acc.to(torch.float32) * scale_x.to(acc.device)
                real.mul_(view(scale_w).to(acc.device))
                if bias is not None:
                    real.add_(view(bias).to(acc.device))
                real.mul_(inv_y.to(acc.device)).add_(zero_point_f.to(acc.device)).round_()
                return real.clamp_(lo, hi).to(dtype)

            return requantize_onednn

        if rule == "qnnpack":  # qnnpack_utils.h generate_requantization_scales: (s_w * s_x) * f(1 / s_y)
            multiplier = view(product * _reciprocal(scale_y))
        else:
            multiplier = view(product / scale_y)
        offset = None if bias is None else view(bias_in_accumulator_units(rule, bias, product))

        def requantize(acc: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            if rule == "qnnpack":
                total = acc.to(torch.float64) if offset is None else acc.to(torch.float64) + offset.to(acc.device)
                total = total.to(torch.float32)  # int32 to float, as QNNPACK's fp32 requantization
            else:
                total = acc.to(torch.float32)
                if offset is not None:
                    total = total + offset.to(acc.device)  # a new tensor: the caller keeps acc
            value = torch.mul(total, multiplier.to(acc.device)).round_()
            return value.add_(zero_point).clamp_(lo, hi).to(dtype)

        return requantize

    # -- add ------------------------------------------------------------------------------------------------
    @cached_property
    def add_tables(self) -> TableCache:
        """FbgemmAddTables and QnnpackAddTables by grids (up to 1 MiB each; training makes new grids every step, so
        only a few are kept)."""
        return TableCache(size=16)

    def check_broadcast(self, op):
        if op == "add":
            raise UnsupportedOpError(BROADCAST_ADD)

    def add(self, qa, a, qb, b, out, lo, hi):
        if qa.shape != qb.shape:
            raise UnsupportedOpError(f"{BROADCAST_ADD} (shapes {tuple(qa.shape)} and {tuple(qb.shape)})")
        if self.add_rule == "qnnpack":
            return _qnnpack_add(qa, a, qb, b, out, lo, hi, self.add_tables)
        return _fbgemm_add(qa, a, qb, b, out, lo, hi, self.kernels, self.engine_threads(),
                           self.add_tables)

    # -- mul ------------------------------------------------------------------------------------------------
    def multiply(self, qa, a, qb, b, out, lo, hi):
        # quantized::mul / mul_relu, every engine (aten/.../quantized/cpu/BinaryOps.cpp, qmul_kernel in
        # QuantizedOpKernels.cpp): m = f(f(s_a * s_b) * f(1 / s_y)), q = rne(f(c * m)) + z_y with
        # c = (q_a - z_a)(q_b - z_b) an integer; the vector and scalar loops agree, so the result depends
        # on neither position, layout nor broadcasting (measured on torch 2.13 and 2.14, all engines).
        multiplier = (a.scale.to(torch.float32) * b.scale.to(torch.float32)) * _reciprocal(out.scale)
        product = ((qa - int(a.zero_point)) * (qb - int(b.zero_point))).to(torch.float32)
        return (torch.round(product * multiplier) + int(out.zero_point)).clamp_(lo, hi).to(torch.int64)

    # -- cat, pools -----------------------------------------------------------------------------------------
    def rescale(self, q, source, out):
        if source.same_grid(out):
            return q
        real = (q - int(source.zero_point)).to(torch.float32) * source.scale
        return self.quantize(real, out)

    def concatenate(self, codes, grids, out, dim):
        # quantized cat takes qcat_nhwc_kernel for 4-D channels-last inputs joined on channels
        # (QuantizedOpKernels.cpp, is_cat_nhwc_fast_path in TensorShape.cpp), else dequantize/cat/quantize.
        if all(q.dim() == 4 and q.is_contiguous(memory_format=torch.channels_last) for q in codes) and dim % 4 == 1:
            return torch.cat([_rescale_channels_last(q, grid, out, self.kernels) for q, grid in zip(codes, grids)],
                             dim=1)
        return super().concatenate(codes, grids, out, dim)

    def bilinear(self, codes, qp, out_hw, align_corners):
        # to_torch calls upsample on an NCHW tensor (.contiguous()), the kernel emulated; the result is NCHW too.
        value = resampling.pytorch_bilinear(codes.contiguous(), int(qp.zero_point), out_hw, align_corners)
        codes = self.kernels.quantize_scalar_loop(value, torch.ones(()), float(qp.zero_point))  # quantize_val
        return torch.clamp(codes, qp.qmin, qp.qmax).to(torch.int64).contiguous()

    def scalar_grid(self, op, value, source):
        return scalar_grid(op, value, source)

    def scalar_arithmetic(self, op, value, q, source, out, lo, hi):
        return scalar_arithmetic(op, value, q, source, out, lo, hi)

    average_pool_takes_narrow_codes = False  # its arithmetic below assumes int64 codes

    def average_pool(self, codes, qp, attrs):
        # Every engine's average pools allocate their output in the input's layout: channels-last in, channels-last
        # out (measured on 2.13 and 2.14, adaptive and not, even and uneven windows); the next layout-dependent
        # kernel (add, cat, another pool) chooses its loops by it.
        layout = torch.channels_last if (codes.dim() == 4 and _channels_last(codes)) else torch.contiguous_format
        return self._average_pool(codes, qp, attrs).contiguous(memory_format=layout)

    def _average_pool(self, codes, qp, attrs):
        sums, counts = pooling.window_sums_and_counts(codes, qp.zero_point.to(codes.device), attrs)
        sums = sums.to(torch.float32)  # exact: |sum| < 2^24
        # qnnpack's adaptive_avg_pool2d runs QNNPACK only for output sizes that divide the input, else the
        # generic kernels, as fbgemm (AdaptiveAveragePooling.cpp enable_qnnpack_for_ada_avgpool; measured).
        uneven = "uneven_output_size" in attrs
        if self.pool_rule == "qnnpack" and not uneven and (attrs.get("adaptive") or not attrs.get("ceil_mode")):
            if not attrs.get("adaptive"):
                # AveragePool2d.cpp avg_pool2d_quantized_cpu: quint8 without ceil_mode runs QNNPACK
                # (qnnpack/src/average-pooling.c): padding reads the input zero point and the divisor is always
                # kH * kW, whatever count_include_pad says; 4-D only, 1x1 pooling refused. ceil_mode runs the
                # generic kernels, as on fbgemm (below).
                if codes.dim() != 4 or tuple(attrs["kernel_size"]) == (1, 1) or attrs.get("divisor_override"):
                    raise UnsupportedOpError(
                        f"avg_pool2d {attrs} on a {codes.dim()}-D input on target 'qnnpack' is not emulated "
                        "(PyTorch's qnnpack avg_pool2d takes 4-D inputs, pools of 2+ elements, no divisor_override)")
                kh, kw = attrs["kernel_size"]
                counts = torch.full_like(counts, kh * kw)
            # rne(f(sum * f(s / f(s * N)))) + z, as QNNPACK's average pooling requantizes.
            multiplier = qp.scale / (qp.scale * counts.to(torch.float32))
            value = torch.round(sums * multiplier) + float(qp.zero_point)
            return torch.clamp(value, qp.qmin, qp.qmax).to(torch.int64)
        value = _fbgemm_average(sums, counts, qp, codes, bool(attrs.get("adaptive")), self.kernels)
        return torch.clamp(value, qp.qmin, qp.qmax).to(torch.int64)

    def clamp_codes(self, q, lo, hi, clamp=torch.clamp):
        # quantized relu / clamp allocate their output with the input's suggest_memory_format(): channels-last
        # for a channels-last 4-D tensor, else contiguous (measured), and the layout decides which kernels the
        # next layout-dependent op (pools, add) runs.
        layout = torch.channels_last if (q.dim() == 4 and _channels_last(q)) else torch.contiguous_format
        return clamp(q, lo, hi).contiguous(memory_format=layout)

    # -- activations ----------------------------------------------------------------------------------------
    def fixed_output_qparams(self, kind, dtype):
        # torch.ao gives sigmoid, hardsigmoid (1/256, 0) and tanh (2/256, 128) fixed output qparams
        # (FixedQParamsFakeQuantize; the kernels quantize onto them), measured on every engine.
        return ENGINE_FIXED_GRIDS.get(kind)

    def activation_table(self, kind, source, out, attrs):
        if self.name == "qnnpack" and kind in ("sigmoid", "tanh", "hardsigmoid"):
            return _qnnpack_table(kind, source)
        raise UnsupportedOpError(f"{kind} is not emulated for target {self.name!r}: its vector loop uses Sleef's "
                                 "vectorized exp/tanh")

    def activation(self, kind, q, source, out, attrs):
        if kind == "leaky_relu":  # leaky_qrelu_out_kernel on every engine (PyTorch never calls QNNPACK's)
            slope = torch.tensor(attrs["negative_slope"], dtype=torch.float32)
            inv_y = _reciprocal(out.scale)
            codes = _vector_and_scalar_loops(
                kind, q, source, self.engine_threads(),
                lambda x: torch.round(x * torch.where(x > 0, 1.0, slope) * inv_y) + float(out.zero_point),
                lambda x: self.kernels.quantize_scalar_loop(torch.where(x > 0, x, x * slope), inv_y,
                                                            float(out.zero_point)))
            return codes.clamp_(out.qmin, out.qmax).to(torch.int64)
        if kind == "hardsigmoid" and self.name != "qnnpack":  # qhardsigmoid_kernel: the grid is (1/256, 0)
            codes = _vector_and_scalar_loops(kind, q, source, self.engine_threads(),
                                             lambda x: torch.round(_hardsigmoid_real(x) * 256.0),
                                             lambda x: torch.round(_hardsigmoid_real(x) * 256.0))
            return codes.clamp_(out.qmin, out.qmax).to(torch.int64)
        return super().activation(kind, q, source, out, attrs)

    # -- hardswish ------------------------------------------------------------------------------------------
    def hardswish(self, q, source, out):
        if self.name == "qnnpack":
            return _qnnpack_hardswish(q, source, out)
        return _fbgemm_hardswish(q, source, out, self.kernels, self.engine_threads())

    def elementwise_hardswish(self, numel):
        return self.name == "qnnpack"  # QNNPACK itself runs a lookup table; fbgemm's depends on the position

    def machine_note(self) -> str:
        return "" if self.name == "qnnpack" else f"fbgemm path: {fbgemm_path()}"


def fbgemm_path() -> str:
    """fbgemm's uint8 x int8 kernels: VNNI/AMX accumulate in int32; AVX2 adds pairs in int16 with saturation."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        flags = ""
    if "avx512_vnni" in flags or "amx_int8" in flags or "avx_vnni" in flags:
        return "VNNI (exact int32 accumulation, no int16 saturation)"
    return "AVX2 without VNNI (pairs of products saturate in int16: layers with full-range activations may differ)"


def _fbgemm_average(sums, counts, qp: QParams, codes, adaptive: bool, kernels: PyTorchKernels) -> torch.Tensor:
    """QuantizedOpKernels.cpp: a channels-last input (a one-channel input is one too) runs the nhwc kernel,
    whole 16-channel blocks (8 for the adaptive pool) in its vector loop and the other channels in its scalar
    tail; an NCHW input runs the nchw kernel (_adaptive_nchw_average for the adaptive pool)."""
    multiplier = (qp.scale / qp.scale) / counts.to(torch.float32)  # f(f(s_x / s_y) / N)
    inverse = torch.ones_like(multiplier) / (torch.ones_like(multiplier) / multiplier)  # f(1 / f(1 / multiplier))
    zero_point = float(qp.zero_point)
    if not (codes.dim() == 4 and codes.is_contiguous(memory_format=torch.channels_last)):
        if adaptive:
            return _adaptive_nchw_average(sums, counts, codes, zero_point)
        return kernels.quantize_nchw_pool(sums, inverse, zero_point)
    tail = kernels.quantize_scalar_loop(sums, inverse, zero_point)
    if adaptive:  # quantize_vec: fbgemm's Quantize
        vector = kernels.quantize_vector(sums, inverse, _f32(zero_point))
    else:  # QuantizeAvx512(acc, multiplier): rne(f(sum * multiplier)) + z
        vector = torch.round(sums * multiplier) + zero_point
    channels, block = codes.shape[1], ADAPTIVE_POOL_BLOCK if adaptive else POOL_BLOCK
    in_vector_loop = (torch.arange(channels, device=codes.device) < (channels // block) * block)
    in_vector_loop = in_vector_loop.reshape(1, -1, 1, 1)
    return torch.where(in_vector_loop, vector, tail)


def _adaptive_nchw_average(sums, counts, codes, zero_point: float) -> torch.Tensor:
    """adaptive_avg_pool2d's NCHW kernel (AdaptiveAveragePooling.cpp, adaptive_avg_pool_single_out_frame, the same
    in 2.13 and 2.14): no requantization (the output keeps the input's grid), the window's sum of raw codes times
    the float32 reciprocal f(f(1 / kH) / kW), rounded half to even: rne(f(f(sum_q) * f(f(1 / kH) / kW)))."""
    heights, widths = pooling.adaptive_window_sizes(tuple(codes.shape[-2:]), tuple(sums.shape[-2:]))
    reciprocal = ((torch.ones(()) / heights.to(torch.float32))[:, None] / widths.to(torch.float32)[None, :])
    raw_sums = (sums.to(torch.float64) + counts.to(torch.float64) * zero_point).to(torch.float32)  # exact integers
    return torch.round(raw_sums * reciprocal.to(sums.device))


def _rescale_channels_last(q, source: QParams, out: QParams, kernels: PyTorchKernels) -> torch.Tensor:
    """qcat_nhwc_kernel for one input: a copy on the same grid; else whole 8-channel blocks dequantize as
    fma(q, s, f(-z * s)) and quantize as rne(f(x * inv)) + z_y, the other channels as dequantize_val and
    quantize_val: quantize_val(f((q - z) * s))."""
    if source.same_grid(out):
        return q
    channels = q.shape[1]
    s, z = source.scale.to(torch.float32), float(source.zero_point)
    inv, zy = _reciprocal(out.scale), float(out.zero_point)
    fq = q.to(torch.float32)
    vector = torch.round(fma_f32(fq, s, s * -z) * inv) + zy
    scalar = kernels.quantize_scalar_loop((fq - z) * s, inv, zy)
    in_vector_loop = (torch.arange(channels, device=q.device) < (channels // CAT_BLOCK) * CAT_BLOCK)
    codes = torch.where(in_vector_loop.reshape(1, -1, 1, 1), vector, scalar)
    return torch.clamp(codes, out.qmin, out.qmax).to(torch.int64).contiguous(memory_format=torch.channels_last)


def _channels_last(t: torch.Tensor) -> bool | None:
    """True/False: a 4-D tensor stored channels-last/NCHW; None where both orders coincide (or not 4-D)."""
    if t.dim() != 4:
        return None
    nhwc, nchw = t.is_contiguous(memory_format=torch.channels_last), t.is_contiguous()
    return None if nhwc == nchw else nhwc


def _memory_order(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.permute(0, 2, 3, 1).reshape(-1) if channels_last else t.reshape(-1)


def _from_memory_order(flat: torch.Tensor, like: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last:
        n, c, h, w = like.shape
        return flat.reshape(n, h, w, c).permute(0, 3, 1, 2)  # a channels-last view, like PyTorch's output
    return flat.reshape(like.shape)


BROADCAST_ADD = ("add of tensors of different shapes (broadcasting) on PyTorch's engines: quantized::add then leaves "
                 "QNNPACK's fixed-point kernel (qadd.cpp takes it only for equal sizes) for TensorIterator's "
                 "broadcast loop, whose vector/scalar split follows the broadcast's inner dimension, which qparity "
                 "does not emulate; expand the smaller operand first. Targets that run it: exact, tflite, xnnpack, "
                 "onnxruntime")


@lru_cache(maxsize=16)  # a model has a few tensor sizes (and a last, smaller batch)
def vector_loop_mask(n: int, threads: int) -> torch.Tensor:
    """Which of n elements (in memory order) qadd's vector loop computes: whole 64-blocks of each chunk.
    Cached per size (the same tensor each call: read it, never write to it)."""
    chunks = max(1, min(threads, -(-n // PARALLEL_GRAIN)))
    chunk = max(1, -(-n // chunks))
    position = torch.arange(n)
    start = (position // chunk) * chunk
    length = torch.clamp(start + chunk, max=n) - start
    return (position - start) < (length // VECTOR_BLOCK) * VECTOR_BLOCK


def _fbgemm_add(qa, a: QParams, qb, b: QParams, out: QParams, lo, hi, kernels: PyTorchKernels, threads: int,
                tables: TableCache):
    # The output takes the first input's memory format (qadd.cpp: self.suggest_memory_format()); when the two
    # inputs are stored differently TensorIterator has no contiguous inner loop and runs the scalar loop only.
    layout_a, layout_b = _channels_last(qa), _channels_last(qb)
    mixed = None not in (layout_a, layout_b) and layout_a != layout_b
    channels_last = bool(layout_a if layout_a is not None else layout_b)
    ia, ib = _memory_order(qa, channels_last), _memory_order(qb, channels_last)
    threads = None if mixed else threads  # None: no element in the vector loop
    if ia.numel() >= ADD_TABLE_MIN_ELEMENTS and (a.qmax - a.qmin + 1) * (b.qmax - b.qmin + 1) <= ADD_TABLE_MAX_PAIRS:
        table = tables.get("add", {"b": (float(b.scale), int(b.zero_point)), "clamp": (lo, hi)}, a, out,
                           lambda: FbgemmAddTable(a, b, out, lo, hi, kernels))
        codes = table(ia, ib, threads)
    else:
        codes = fbgemm_add_loops(ia, a, ib, b, out, lo, hi, kernels, loop_mask(ia.numel(), threads).to(ia.device))
    return _from_memory_order(codes, qa, channels_last)


def loop_mask(n: int, threads: int | None) -> torch.Tensor:
    """vector_loop_mask, or no element in the vector loop for threads None (inputs in mixed layouts)."""
    return torch.zeros(n, dtype=torch.bool) if threads is None else vector_loop_mask(n, threads)


def fbgemm_add_loops(ia, a: QParams, ib, b: QParams, out: QParams, lo, hi, kernels: PyTorchKernels,
                     in_vector_loop: torch.Tensor) -> torch.Tensor:
    """qadd_kernel on flat codes: each element from the loop that computes it (the definition; FbgemmAddTable
    tabulates the same terms and sums)."""
    vector, scalar = _fbgemm_add_sums(_fbgemm_add_terms(ia, a), _fbgemm_add_terms(ib, b), out, kernels)
    return torch.where(in_vector_loop, vector, scalar).clamp_(lo, hi).to(torch.int64)


def _fbgemm_add_terms(q: torch.Tensor, grid: QParams):
    """Each input's dequantized value in the vector loop (fma(q, s, f(-z * s))) and in the scalar loop
    (f((q - z) * s)): a function of the code alone."""
    f, s, z = q.to(torch.float32), grid.scale.to(torch.float32), float(grid.zero_point)
    return fma_f32(f, s, s * -z), (f - z) * s


def _fbgemm_add_sums(terms_a, terms_b, out: QParams, kernels: PyTorchKernels):
    """The vector loop's and the scalar loop's codes (before the clamp) from both inputs' terms (broadcasting)."""
    inv_y, zy = _reciprocal(out.scale), float(out.zero_point)
    vector = torch.round((terms_a[0] + terms_b[0]) * inv_y) + zy
    scalar = kernels.quantize_scalar_loop(terms_a[1] + terms_b[1], inv_y, zy)
    return vector, scalar


class FbgemmAddTable:
    """fbgemm_add_loops evaluated once on every pair of codes in each loop, answered by one gather per element.

    qadd's result is a function of the two codes and of which loop computes the element, so a table indexed
    by (loop, q_a, q_b) holds every answer the kernel can give for these grids (2 x 256 x 256 codes for uint8).
    Each input's terms depend on its code alone, so they are computed once per code (256 float64 FMAs instead
    of 2 x 65536) and summed for every pair by broadcasting: the same float32 operations on the same values.
    """

    def __init__(self, a: QParams, b: QParams, out: QParams, lo: int, hi: int, kernels: PyTorchKernels):
        self.a_lo, self.b_lo, self.b_span = a.qmin, b.qmin, b.qmax - b.qmin + 1
        self.pairs = (a.qmax - a.qmin + 1) * self.b_span
        terms_a = [t.reshape(-1, 1) for t in _fbgemm_add_terms(torch.arange(a.qmin, a.qmax + 1), a)]
        terms_b = [t.reshape(1, -1) for t in _fbgemm_add_terms(torch.arange(b.qmin, b.qmax + 1), b)]
        vector, scalar = _fbgemm_add_sums(terms_a, terms_b, out, kernels)  # entries [pairs, 2 pairs): scalar loop
        self.table = torch.cat([vector.reshape(-1), scalar.reshape(-1)]).clamp_(lo, hi).to(torch.int64)
        self.float_table: torch.Tensor | None = None  # _gather's

    def __call__(self, ia: torch.Tensor, ib: torch.Tensor, threads: int | None) -> torch.Tensor:
        """Codes for flat inputs in memory order, each from its loop (loop_mask(n, threads)); float32 codes
        (the prepared model's) give float32 codes, looked up with the same index (code_index)."""
        # (ia - a_lo) * b_span + (ib - b_lo) + the loop's offset, in one to three passes
        index = torch.add(ib, ia, alpha=self.b_span)
        offsets = _loop_offsets(ia.numel(), threads, self.pairs)
        if offsets is not None:
            index.add_(offsets.to(ia.device))
        if self.a_lo * self.b_span + self.b_lo:
            index.sub_(self.a_lo * self.b_span + self.b_lo)
        return _gather(self, index)


def _gather(add_table, index: torch.Tensor) -> torch.Tensor:
    """add_table.table[index] for an int64 index; for a float32 one (formed from float32 codes: every partial sum
    an integer below 2^18, as the tables hold at most 2 x 2^16 entries of 8-bit codes, so float32 formed it
    exactly) the same entries in float32 (a copy made on the first such lookup: the integer model never needs
    it), gathered with the index as int32. index_select on the flat table: torch.take's gather, at about half its
    time (measured, 2^19 codes)."""
    table = add_table.table
    if index.is_floating_point():
        if add_table.float_table is None:
            add_table.float_table = table.to(torch.float32)
        table, index = add_table.float_table, index.to(torch.int32)
    return table.to(index.device).index_select(0, index.reshape(-1)).reshape(index.shape)


@lru_cache(maxsize=8)
def _loop_offsets(n: int, threads: int | None, pairs: int) -> torch.Tensor | None:
    """Per element, where its loop's half of an FbgemmAddTable starts: 0 (vector loop) or `pairs` (scalar); None
    where every element is in the vector loop (whole 64-blocks in every chunk: adding zeros, an int64 += int32
    pass, would cost more than the gather)."""
    offsets = torch.where(loop_mask(n, threads), 0, pairs).to(torch.int32)
    return offsets if bool(offsets.any()) else None


def _hardswish_real(x: torch.Tensor) -> torch.Tensor:
    """h(x) = x * min(max(x + 3, 0), 6) / 6 in float32, in the kernels' order of operations."""
    return (x * torch.clamp(x + 3.0, 0.0, 6.0)) / 6.0


def _qnnpack_hardswish(q, source: QParams, out: QParams) -> torch.Tensor:
    """rne(f(f(h(f((q - z) * s)) * inv_y) + z_y)), clamped: QNNPACK's own table (lrintf), in every release."""
    real = _hardswish_real((q.to(torch.float32) - float(source.zero_point)) * source.scale)
    codes = torch.round(real * _reciprocal(out.scale) + float(out.zero_point))
    return codes.clamp_(out.qmin, out.qmax).to(torch.int64)


def _fbgemm_hardswish(q, source: QParams, out: QParams, kernels: PyTorchKernels, threads: int) -> torch.Tensor:
    """qhardswish_kernel: dequantize (fma in the vector loop), h(x), quantize (release rule in the scalar loop)."""
    inv_y = _reciprocal(out.scale)
    return _vector_and_scalar_loops(
        "hardswish", q, source, threads,
        lambda x: torch.round(_hardswish_real(x) * inv_y) + float(out.zero_point),
        lambda x: kernels.quantize_scalar_loop(_hardswish_real(x), inv_y, float(out.zero_point))
    ).clamp_(out.qmin, out.qmax).to(torch.int64)


def _vector_and_scalar_loops(op: str, q, source: QParams, threads: int, vector, scalar) -> torch.Tensor:
    """An elementwise kernel whose vector and scalar loops round differently (cpu_kernel_vec): each element's
    code from the loop that computes it (vector_loop_mask over memory order, which TensorIterator walks for
    any dense layout), as a float tensor with q's strides (the kernels allocate their output like the input).
    vector(x) gets x = fma(q, s, f(-z * s)) (Vectorized dequantize), scalar(x) x = f((q - z) * s)."""
    order = sorted(range(q.dim()), key=lambda d: (-q.stride(d), d))
    stored = q.permute(order)
    if not stored.is_contiguous():
        raise UnsupportedOpError(f"{op} on codes of shape {tuple(q.shape)} and strides {q.stride()} (not dense) is "
                                 "not emulated for PyTorch's engines: which elements take the vector loop depends on "
                                 "the strides; make the input contiguous first")
    flat = stored.reshape(-1).to(torch.float32)
    s, z = source.scale.to(torch.float32), float(source.zero_point)
    codes = torch.where(vector_loop_mask(flat.numel(), threads),
                        vector(fma_f32(flat, s, s * -z)), scalar((flat - z) * s))
    return codes.reshape(stored.shape).permute([order.index(d) for d in range(q.dim())])


def _hardsigmoid_real(x: torch.Tensor) -> torch.Tensor:
    """f(min(max(f(x + 3), 0), 6) / 6), as the kernels and QNNPACK's table compute it."""
    return torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


def _qnnpack_table(kind: str, source: QParams) -> torch.Tensor:
    """QNNPACK's own lookup tables (qnnpack/src/sigmoid.c, tanh.c, hardsigmoid.c), built in float from
    x = f(s * (q - z)) on the fixed output grids; lrintf of the clamped value. expf and tanhf (glibc) are
    evaluated in float64 and rounded to float32; tanh's table is f(f(128 * tanhf(x)) + 128) (measured: the
    double-precision reading of tanh.c disagrees with PyTorch)."""
    x = source.scale.to(torch.float32) * (torch.arange(source.qmin, source.qmax + 1) - int(source.zero_point)).to(torch.float32)
    if kind == "sigmoid":
        value = 256.0 / (1.0 + torch.exp(-x.to(torch.float64)).to(torch.float32))
    elif kind == "tanh":
        value = 128.0 * torch.tanh(x.to(torch.float64)).to(torch.float32) + 128.0
    else:
        value = 256.0 * _hardsigmoid_real(x) + 0.0
    return torch.round(torch.clamp(value, 0.0, 255.0)).to(torch.int64)


def _qnnpack_add(qa, a: QParams, qb, b: QParams, out: QParams, lo, hi, tables: TableCache):
    multipliers = _qnnpack_add_multipliers(a, b, out, lo, hi)
    # qnnpack_add allocates its output in qa.suggest_memory_format(): channels-last 4-D or contiguous.
    channels_last = bool(qa.dim() == 4 and _channels_last(qa))
    if qa.numel() >= ADD_TABLE_MIN_ELEMENTS and (a.qmax - a.qmin + 1) * (b.qmax - b.qmin + 1) <= ADD_TABLE_MAX_PAIRS:
        # The result is a function of the two codes alone (no loop split): answered from a table of every pair.
        table = tables.get("qnnpack_add", {"b": (float(b.scale), int(b.zero_point), b.dtype), "clamp": (lo, hi)},
                           a, out, lambda: QnnpackAddTable(a, b, out, lo, hi, multipliers))
        codes = _from_memory_order(table(_memory_order(qa, channels_last), _memory_order(qb, channels_last)), qa,
                                   channels_last)
    else:  # m (q - z) passes 2^24: integers, whatever the codes came as
        codes = _qnnpack_add_codes(qa.to(torch.int64), a, qb.to(torch.int64), b, out, lo, hi, multipliers)
    return codes.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _qnnpack_add_multipliers(a: QParams, b: QParams, out: QParams, lo, hi):
    """(m_a, m_b, shift) of QNNPACK's add, refusing what PyTorch's qnnpack refuses."""
    ratio_a, ratio_b = a.scale / out.scale, b.scale / out.scale  # float32 quotients
    largest = torch.maximum(ratio_a, ratio_b)
    if not (2.0**-14 <= float(ratio_a) < 2.0**8 and 2.0**-14 <= float(ratio_b) < 2.0**8):
        raise UnsupportedOpError(f"qnnpack add needs input/output scale ratios in [2^-14, 2^8), got "
                                 f"{float(ratio_a):.6g} and {float(ratio_b):.6g}; PyTorch's qnnpack rejects them too")
    if lo >= hi:
        raise UnsupportedOpError(f"qnnpack add with the empty output range [{lo}, {hi}] (a fused ReLU on zero point "
                                 f"{int(out.zero_point)}); PyTorch's qnnpack rejects it too")
    exponent = int(torch.frexp(largest).exponent) - 1
    shift = 21 - exponent
    scale_multiplier = _f32(2.0**shift)
    return int(torch.round(ratio_a * scale_multiplier)), int(torch.round(ratio_b * scale_multiplier)), shift


def _qnnpack_add_codes(qa, a: QParams, qb, b: QParams, out: QParams, lo, hi, multipliers) -> torch.Tensor:
    """QNNPACK's add of codes elementwise (broadcasting): the definition QnnpackAddTable tabulates."""
    m_a, m_b, shift = multipliers
    acc = m_a * (qa - int(a.zero_point)) + m_b * (qb - int(b.zero_point))
    # Round half away from zero: QNNPACK's remainder test (`rem > threshold`, rem less one for negatives) is
    # gemmlowp's RoundingDivideByPOT.
    rounded = rounding_divide_by_pot(acc, shift)
    return torch.clamp(rounded + int(out.zero_point), lo, hi)


class QnnpackAddTable:
    """_qnnpack_add_codes on every pair of codes, from a column of a's codes and a row of b's (each input's
    product m (q - z) once per code), answered by one gather per element."""

    def __init__(self, a: QParams, b: QParams, out: QParams, lo: int, hi: int, multipliers):
        self.b_span = b.qmax - b.qmin + 1
        self.offset = -(a.qmin * self.b_span + b.qmin)
        column, row = torch.arange(a.qmin, a.qmax + 1).reshape(-1, 1), torch.arange(b.qmin, b.qmax + 1).reshape(1, -1)
        self.table = _qnnpack_add_codes(column, a, row, b, out, lo, hi, multipliers).reshape(-1).to(torch.int64)
        self.float_table: torch.Tensor | None = None  # _gather's

    def __call__(self, ia: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
        """Codes for flat inputs; float32 codes give float32 codes (_gather)."""
        index = torch.add(ib, ia, alpha=self.b_span)
        if self.offset:
            index.add_(self.offset)
        return _gather(self, index)


class FbgemmTarget(PyTorchEngineTarget):
    name = "fbgemm"
    summary = "PyTorch fbgemm engine: float bias over s_x*s_w, float32 multiplier, round half even"


class X86Target(PyTorchEngineTarget):
    name = "x86"
    summary = "PyTorch x86 engine: conv through oneDNN (scaled float bias), linear through fbgemm"
    conv_rule = "onednn"

    def layer_target(self, geometry) -> Target:
        # PyTorch's x86 engine runs a conv through oneDNN only with groups <= 100 (should_use_onednn_quant,
        # aten/src/ATen/native/quantized/cpu/OnednnUtils.h, 2.13 and 2.14); above that the layer is packed and
        # run by fbgemm: its accumulation (depthwise kernels included) and requantization.
        return self.fbgemm if geometry.kind == "conv2d" and geometry.groups > 100 else self

    @cached_property
    def fbgemm(self) -> "FbgemmTarget":
        """fbgemm with this target's release and settings: what runs the layers PyTorch routes to it."""
        return FbgemmTarget(self.kernels, self.threads, self.memory_format)


class QnnpackTarget(PyTorchEngineTarget):
    name = "qnnpack"
    summary = "PyTorch qnnpack engine: int32 bias, float32 multiplier, fixed-point add"
    conv_rule = "qnnpack"
    conv_transpose_rule = "qnnpack"
    linear_rule = "qnnpack"
    add_rule = "qnnpack"
    pool_rule = "qnnpack"

    def check_max_pool(self, attrs):
        # quantized max_pool2d on the qnnpack engine without ceil_mode is QNNPACK's operator, which refuses a window of
        # one element (pytorch_qnnp_create_max_pooling2d_nhwc_u8: "1x1 pooling is meaningless"): PyTorch raises an
        # internal assert at run time (torch 2.13, 2.14, measured). With ceil_mode it takes the generic kernel.
        kernel = attrs["kernel_size"]
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        if kernel == (1, 1) and not attrs.get("ceil_mode"):
            raise UnsupportedOpError(
                "PyTorch's QNNPACK refuses max pooling over a 1x1 window (the converted model fails at run time); "
                "the pool is the identity there: remove it, or use ceil_mode=True")


# -- a tensor and a Python number: quantized::add_scalar / mul_scalar ------------------------------------------
def _add_scalar_shift(value: float, source: QParams) -> int:
    """c_q = nearbyint(c / s) in double (BinaryOps.cpp _add_scalar_out): the number in codes of x's grid."""
    return round(value / float(source.scale))  # Python's round of a float is half to even, as nearbyint


def scalar_grid(op: str, value: float, source: QParams) -> QParams:
    """The output grid BinaryOps.cpp gives x + c (_add_scalar_out) or x * c (_mul_scalar_out), in double; the
    engine's kernels then read its scale as float32, as QParams holds it.

    add: z' = z - c_q with the same scale while that is a code; else the zero point at the range end the shift
    left and the scale widened to keep the range: s' = (q_max - (z - c_q)) / (q_max - q_min) s (or
    ((z - c_q) - q_min) / (q_max - q_min) s). mul: (c s, z) for c > 0, (1, 0) for c = 0, (|c| s, q_max + q_min - z)
    for c < 0."""
    s, z, qmin, qmax = float(source.scale), int(source.zero_point), source.qmin, source.qmax
    if op == "mul":
        if value > 0:
            return QParams(value * s, z, source.dtype)
        if value == 0:
            return QParams(1.0, 0, source.dtype)
        return QParams(abs(value) * s, qmax - (z - qmin), source.dtype)
    shifted = z - _add_scalar_shift(value, source)
    if qmin > shifted:
        return QParams((float(qmax) - shifted) / (float(qmax) - qmin) * s, qmin, source.dtype)
    if qmax < shifted:
        return QParams((float(shifted) - qmin) / (float(qmax) - qmin) * s, qmax, source.dtype)
    return QParams(s, shifted, source.dtype)


def scalar_arithmetic(op: str, value: float, q: torch.Tensor, source: QParams, out: QParams,
                      lo: int, hi: int) -> torch.Tensor:
    """The codes of x + c / x * c on `scalar_grid`'s grid. mul and an in-range add copy or mirror the codes;
    an add whose zero point left the range requantizes q - z + c_q with qadd_scalar_kernel's float32 multiplier
    f(s * f(1 / s')) (QuantizedOpKernels.cpp, requantize_from_int: z' + lrintf(acc * multiplier))."""
    if op == "mul":
        if value > 0:
            codes = q
        elif value == 0:
            codes = torch.zeros_like(q)
        else:
            codes = source.qmax + source.qmin - q
    else:
        shift = _add_scalar_shift(value, source)
        if out.scale == source.scale and int(out.zero_point) == int(source.zero_point) - shift:
            codes = q
        else:
            multiplier = source.scale * (torch.ones(()) / out.scale)
            acc = (q - int(source.zero_point) + shift).to(torch.float32)
            codes = torch.round(acc * multiplier) + int(out.zero_point)
    return torch.clamp(codes, lo, hi).to(torch.int64)
