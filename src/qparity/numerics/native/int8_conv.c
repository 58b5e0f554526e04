/* qparity's fused int8 convolution: exact int32 accumulation on AVX512-VNNI, then the target's requantization
 * (XNNPACK's and ONNX Runtime's float32 rule, or TFLite's fixed-point one) written straight to 8-bit codes while
 * the accumulator is in registers.
 *
 * What it computes, per output element (numerics/fused_layer.py is its Python side; tests/test_fused_layer.py
 * holds it equal, with torch.equal, to the unfused path: the layer's exact accumulator, then the target's
 * requantizer, numerics/arithmetic.py `requantize_float32` or `ShiftRequantizer.requantize`):
 *
 *     acc  = sum over taps and input channels of (x - z_x) * w  +  bias          (an exact int32)
 *     code = clamp(rne(f32(acc) * M[oc]) + z_y, lo, hi)                          (rule 0, float32)
 *     code = clamp(((acc * m[oc] + a[oc] + w[oc] * (acc >> 63)) >> s[oc]) + z, lo, hi)  (rule 1, fixed point)
 *
 * f32(acc) is the int32 -> float32 conversion with round-half-even, rne() rounds half to even. The rules and
 * where each runtime computes them are documented, with their sources, at the Python definitions this kernel
 * follows: float32_requantizer (XNNPACK's fp32 requantization, ONNX Runtime's MLAS requantization) and
 * ShiftRequantizer.gemmlowp (TFLite's MultiplyByQuantizedMultiplier, folded into one multiply-add and one
 * arithmetic shift, the constants computed there). Clamping the float product to [lo - z_y, hi - z_y] before
 * rounding, as XNNPACK does, equals clamping the rounded code after it: the bounds are integers and rounding is
 * monotone. Every float operation names its rounding (_MM_FROUND_TO_NEAREST_INT), so no MXCSR setting changes a
 * code.
 *
 * Accumulation: x arrives as uint8 (int8 codes with the top bit flipped: q + 128, zero point z_x + 128, the
 * same centered values). vpdpbusd multiplies four u8 x s8 pairs and adds them into an int32 lane without an
 * int16 step or saturation (the non-saturating form), so sum(x * w) is exact whenever every partial sum stays
 * in int32, which the caller proves (sum |w| * 255 < 2^31 per output channel). The zero point leaves as the
 * integer z_x * sum(w), folded with the bias into one int32 offset per channel; padding is the input's zero
 * point itself, written into the padded rows of a band (below), so border windows need no second code path. The
 * int32 additions wrap modulo 2^32 and the true sum is in int32 (the caller's overflow check), so the result
 * is exact even where an intermediate sum is not.
 *
 * Layout: the input is read, any strides, into the padded rows of one band of output rows at a time (NHWC, the
 * channels rounded up to a multiple of 4 with zero weights there, int8 codes flipped): a few rows of scratch per
 * thread instead of a copy of the input. The weights are packed [ceil(OC/16)][KH][KW][Cp/4][16][4], 16 output
 * channels per 512-bit register; the output is NHWC (PyTorch's channels-last), 8-bit. Rows (image, output row)
 * are split among threads.
 *
 * The file also holds two elementwise adds on int8 codes, XNNPACK's and TFLite's (below).
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

/* A register tile: PIXELS output pixels x BLOCKS blocks of 16 output channels, PIXELS * BLOCKS int32
 * accumulators plus BLOCKS weight registers and one broadcast within the 32 zmm registers. Each weight load
 * serves PIXELS pixels, each broadcast of four input codes BLOCKS blocks. */
#define MAX_PIXELS 28

typedef struct {
    /* input codes, any strides (elements), 8-bit; flip: 0x80 for int8 codes, 0 for uint8 */
    const uint8_t *src;
    int64_t src_n, src_c, src_h, src_w;
    int flip;
    uint8_t *scratch; /* per thread part: band_bytes for the padded rows of one band */
    const int8_t *weights;
    const int32_t *offset; /* bias - z_x * sum(w), per output channel, padded to 16 */
    const float *scale;    /* M, per output channel, padded to 16 */
    void *out;             /* [N][OH][OW][OC] */
    int N, C, H, W, Cp, pad_h, pad_w, pad_value;
    int OC, KH, KW, OH, OW, stride_h, stride_w, dil_h, dil_w;
    int zero_point, lo, hi;
    /* a band: band_rows output rows of one image, whose input rows (padded, flipped, NHWC with Cp channels) are
     * copied into the part's scratch first */
    int band_rows;
    int64_t band_bytes;
    /* rule 1, fixed point: per output channel (padded to 16) int64 constants of numerics/arithmetic.py's
     * ShiftRequantizer (rule 2: the same, every multiplier in [0, 2^31)); rule 0 reads `scale` instead */
    int rule;
    const int64_t *multiplier, *addend, *shift, *sign_weight;
} Conv;

/* fn(op, first, last) over items [0, count) in `threads` contiguous parts, the first on the calling thread; a part
 * whose thread cannot start runs here too. */
typedef void (*Range)(const void *op, int64_t first, int64_t last, int part);

typedef struct {
    Range fn;
    const void *op;
    int64_t first, last;
    int index;
} Part;

static void *run_part(void *arg) {
    const Part *part = (const Part *)arg;
    part->fn(part->op, part->first, part->last, part->index);
    return NULL;
}

static void split(Range fn, const void *op, int64_t count, int threads) {
    enum { MAX_THREADS = 256 };
    Part parts[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    if (threads > count) threads = (int)count;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    for (int t = 0; t < threads; ++t) {
        parts[t] = (Part){fn, op, count * t / threads, count * (t + 1) / threads, t};
    }
    int started = 0;
    for (int t = 1; t < threads && pthread_create(&ids[t], NULL, run_part, &parts[t]) == 0; ++t) started = t;
    run_part(&parts[0]);
    for (int t = 1; t <= started; ++t) pthread_join(ids[t], NULL);
    for (int t = started + 1; t < threads; ++t) run_part(&parts[t]);
}

/* Input row h of image n as the kernel reads it: Wp = W + 2 pad_w pixels of Cp uint8 codes (int8 codes flipped),
 * the padding and the channels past C holding the zero point; a row outside the image is all zero point. */
static void fill_row(const Conv *c, int64_t n, int64_t h, uint8_t *dst) {
    const int64_t Wp = c->W + 2 * c->pad_w;
    const uint8_t flip = (uint8_t)c->flip, fill = (uint8_t)c->pad_value;
    if (h < 0 || h >= c->H) {
        memset(dst, fill, (size_t)(Wp * c->Cp));
        return;
    }
    memset(dst, fill, (size_t)c->pad_w * c->Cp);
    memset(dst + (int64_t)(c->pad_w + c->W) * c->Cp, fill, (size_t)c->pad_w * c->Cp);
    const uint8_t *line = c->src + n * c->src_n + h * c->src_h;
    if (c->src_c == 1 && c->src_w == c->C && c->C == c->Cp) { /* a dense channels-last row: one loop */
        uint8_t *to = dst + (int64_t)c->pad_w * c->Cp;
        const int64_t count = (int64_t)c->W * c->C;
        for (int64_t i = 0; i < count; ++i) to[i] = line[i] ^ flip;
        return;
    }
    for (int w = 0; w < c->W; ++w) {
        uint8_t *pixel = dst + (int64_t)(c->pad_w + w) * c->Cp;
        const uint8_t *from = line + w * c->src_w;
        if (c->src_c == 1) {
            for (int ch = 0; ch < c->C; ++ch) pixel[ch] = from[ch] ^ flip;
        } else {
            for (int ch = 0; ch < c->C; ++ch) pixel[ch] = from[ch * c->src_c] ^ flip;
        }
        for (int ch = c->C; ch < c->Cp; ++ch) pixel[ch] = fill;
    }
}

/* clamp(rne(f32(acc) * M) + z, lo, hi) for 16 output channels (numerics/arithmetic.py requantize_float32) */
static inline void requantize_float32(const Conv *c, __m512i sum, int block, __mmask16 mask, int8_t *out) {
    const __m512 low = _mm512_set1_ps((float)(c->lo - c->zero_point));
    const __m512 high = _mm512_set1_ps((float)(c->hi - c->zero_point));
    const __m512 scale = _mm512_loadu_ps(c->scale + 16 * block);
    __m512 real = _mm512_cvt_roundepi32_ps(sum, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    real = _mm512_mul_round_ps(real, scale, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    real = _mm512_min_ps(_mm512_max_ps(real, low), high);
    const __m512i code = _mm512_add_epi32(_mm512_cvt_roundps_epi32(real, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                          _mm512_set1_epi32(c->zero_point));
    _mm_mask_storeu_epi8(out, mask, _mm512_cvtepi32_epi8(code));
}

/* clamp(((x * m + a + w * (x >> 63)) >> s) + z, lo, hi) in int64 for 8 output channels from `first`
 * (numerics/arithmetic.py ShiftRequantizer.requantize: TFLite's MultiplyByQuantizedMultiplier folded into one
 * multiply-add and one arithmetic shift; |x * m| < 2^62, so every step is exact in int64) */
static inline void requantize_fixed_point_8(const Conv *c, __m256i half, int first, int lanes, int8_t *out) {
    const __m512i x = _mm512_cvtepi32_epi64(half);
    const __m512i multiplier = _mm512_loadu_si512((const void *)(c->multiplier + first));
    /* rule 2: every multiplier is below 2^31, so the signed 32 x 32 -> 64-bit product (one uop) is the product */
    __m512i y = c->rule == 2 ? _mm512_mul_epi32(x, multiplier) : _mm512_mullo_epi64(x, multiplier);
    y = _mm512_add_epi64(y, _mm512_loadu_si512((const void *)(c->addend + first)));
    const __m512i negative = _mm512_srai_epi64(x, 63); /* all ones where x < 0 */
    y = _mm512_sub_epi64(y, _mm512_and_si512(negative, _mm512_loadu_si512((const void *)(c->sign_weight + first))));
    y = _mm512_srav_epi64(y, _mm512_loadu_si512((const void *)(c->shift + first)));
    y = _mm512_add_epi64(y, _mm512_set1_epi64(c->zero_point));
    y = _mm512_min_epi64(_mm512_max_epi64(y, _mm512_set1_epi64(c->lo)), _mm512_set1_epi64(c->hi));
    if (lanes > 0) {
        const __mmask16 mask = (__mmask16)((1u << (lanes < 8 ? lanes : 8)) - 1u);
        _mm_mask_storeu_epi8(out, mask, _mm512_cvtepi64_epi8(y));
    }
}

static inline void requantize_fixed_point(const Conv *c, __m512i sum, int block, int lanes, int8_t *out) {
    requantize_fixed_point_8(c, _mm512_castsi512_si256(sum), 16 * block, lanes, out);
    requantize_fixed_point_8(c, _mm512_extracti64x4_epi64(sum, 1), 16 * block + 8, lanes - 8, out + 8);
}

/* One tile's accumulation and requantization: output pixels p0 .. p0 + count - 1 (flattened over image, row and
 * column; all in the band of output rows from row0, whose padded input rows are at `band`), output channel blocks
 * b0 .. b0 + BLOCKS - 1. A last tile of fewer pixels recomputes its last pixel in the unused slots and stores only
 * `count`: every tile runs the same fully unrolled loop. */
static inline __attribute__((always_inline)) void tile(const Conv *c, const uint8_t *band, int64_t row0, int64_t p0,
                                                       int count, int b0, const int PIXELS, const int BLOCKS) {
    const int64_t pixel = c->Cp, line = (int64_t)(c->W + 2 * c->pad_w) * c->Cp;
    const int64_t block_weights = (int64_t)c->KH * c->KW * (c->Cp / 4) * 64;
    const int quads = c->Cp / 4;
    int64_t at[MAX_PIXELS];
    for (int r = 0; r < PIXELS; ++r) {
        const int64_t p = p0 + (r < count ? r : count - 1), row = p / c->OW, ow = p % c->OW;
        at[r] = (row - row0) * c->stride_h * line + ow * c->stride_w * pixel;
    }
    __m512i acc[MAX_PIXELS * 4];
#pragma GCC unroll 28
    for (int i = 0; i < PIXELS * BLOCKS; ++i) acc[i] = _mm512_setzero_si512();
    const int8_t *w = c->weights + b0 * block_weights;
    for (int kh = 0; kh < c->KH; ++kh) {
        for (int kw = 0; kw < c->KW; ++kw) {
            const uint8_t *tap = band + kh * c->dil_h * line + kw * c->dil_w * pixel;
            for (int q = 0; q < quads; ++q, w += 64) {
                __m512i wv[4];
#pragma GCC unroll 4
                for (int b = 0; b < BLOCKS; ++b) wv[b] = _mm512_loadu_si512((const void *)(w + b * block_weights));
                const uint8_t *p = tap + 4 * q;
#pragma GCC unroll 28
                for (int r = 0; r < PIXELS; ++r) {
                    int32_t four;
                    memcpy(&four, p + at[r], 4);
                    const __m512i x = _mm512_set1_epi32(four);
#pragma GCC unroll 4
                    for (int b = 0; b < BLOCKS; ++b) {
                        acc[r * BLOCKS + b] = _mm512_dpbusd_epi32(acc[r * BLOCKS + b], x, wv[b]);
                    }
                }
            }
        }
    }
    for (int b = 0; b < BLOCKS; ++b) {
        const int block = b0 + b;
        const __m512i offset = _mm512_loadu_si512((const void *)(c->offset + 16 * block));
        const int lanes = c->OC - 16 * block < 16 ? c->OC - 16 * block : 16;
        const __mmask16 mask = (__mmask16)((1u << lanes) - 1u);
        for (int r = 0; r < count; ++r) {
            const __m512i sum = _mm512_add_epi32(acc[r * BLOCKS + b], offset);
            int8_t *out = (int8_t *)c->out + (p0 + r) * c->OC + 16 * block;
            if (c->rule == 0)
                requantize_float32(c, sum, block, mask, out);
            else
                requantize_fixed_point(c, sum, block, lanes, out);
        }
    }
}

typedef void (*Tiles)(const Conv *, const uint8_t *, int64_t, int64_t, int, int);
static void tiles_1(const Conv *c, const uint8_t *band, int64_t row0, int64_t p0, int count, int b0) {
    tile(c, band, row0, p0, count, b0, 28, 1);
}
static void tiles_2(const Conv *c, const uint8_t *band, int64_t row0, int64_t p0, int count, int b0) {
    tile(c, band, row0, p0, count, b0, 14, 2);
}
static void tiles_4(const Conv *c, const uint8_t *band, int64_t row0, int64_t p0, int count, int b0) {
    tile(c, band, row0, p0, count, b0, 6, 4);
}

/* Output rows [first, last) of N * OH (this thread's part), band by band: a band's padded input rows are copied into
 * the part's scratch (each input row once per band that reads it), then its pixels run in tiles. The copy is a few
 * rows, not the image: no temporary of the input's size. */
static void conv_rows(const void *op, int64_t first, int64_t last, int part) {
    const Conv *c = (const Conv *)op;
    const int blocks = (c->OC + 15) / 16;
    const int group = blocks % 4 == 0 ? 4 : blocks % 2 == 0 ? 2 : 1;
    const int pixels = group == 4 ? 6 : group == 2 ? 14 : 28;
    const Tiles run = group == 4 ? tiles_4 : group == 2 ? tiles_2 : tiles_1;
    const int64_t line = (int64_t)(c->W + 2 * c->pad_w) * c->Cp;
    uint8_t *band = c->scratch + (int64_t)part * c->band_bytes;
    for (int64_t row = first; row < last;) {
        const int64_t n = row / c->OH, oh = row % c->OH;
        int64_t rows = c->OH - oh < c->band_rows ? c->OH - oh : c->band_rows;
        rows = last - row < rows ? last - row : rows;
        const int64_t inputs = (rows - 1) * c->stride_h + (int64_t)(c->KH - 1) * c->dil_h + 1;
        for (int64_t i = 0; i < inputs; ++i) fill_row(c, n, oh * c->stride_h - c->pad_h + i, band + i * line);
        const int64_t end = (row + rows) * c->OW;
        for (int64_t p0 = row * c->OW; p0 < end; p0 += pixels) {
            const int count = end - p0 < pixels ? (int)(end - p0) : pixels;
            for (int b0 = 0; b0 < blocks; b0 += group) run(c, band, row, p0, count, b0);
        }
        row += rows;
    }
}

int qparity_int8_conv(const Conv *c, int threads) {
    split(conv_rows, c, (int64_t)c->N * c->OH, threads);
    return 0;
}

/* The struct's size, so the Python side can check it built the same layout. */
int qparity_int8_conv_struct_size(void) { return (int)sizeof(Conv); }

/* XNNPACK's qs8-vadd on two int8 code tensors stored alike (numerics/xnnpack.py qs8_vadd, whose arithmetic this
 * is: clamp(z_y + (((q_a - z_a) m_a + (q_b - z_b) m_b + 2^(shift - 1)) >> shift), lo, hi), in int64, so no sum
 * can wrap whatever the constants). Elements [first, last) of `count`, split among threads as rows of BLOCK. */
typedef struct {
    const int8_t *a, *b;
    int8_t *out;
    int64_t count;
    int64_t zero_a, zero_b, multiplier_a, multiplier_b, shift, zero_out, lo, hi;
    int64_t int32_sum; /* 1: every partial sum provably within int32 (add_elements_int32) */
} Add;

/* The same in int32 lanes, for constants where numerics/xnnpack.py `_vadd_sum_dtype` proved that no partial sum
 * reaches 2^31 for any int8 codes (as XNNPACK's own lanes sum): twice the elements per vector. */
static void add_elements_int32(const void *op, int64_t first, int64_t last, int part) {
    (void)part;
    const Add *add = (const Add *)op;
    const int8_t *restrict a = add->a, *restrict b = add->b;
    int8_t *restrict out = add->out;
    const int32_t zero_a = (int32_t)add->zero_a, zero_b = (int32_t)add->zero_b;
    const int32_t multiplier_a = (int32_t)add->multiplier_a, multiplier_b = (int32_t)add->multiplier_b;
    const int32_t shift = (int32_t)add->shift, zero_out = (int32_t)add->zero_out;
    const int32_t lo = (int32_t)add->lo, hi = (int32_t)add->hi, half = (int32_t)(((int64_t)1 << shift) >> 1);
    for (int64_t i = first; i < last; ++i) {
        const int32_t sum = ((int32_t)a[i] - zero_a) * multiplier_a + ((int32_t)b[i] - zero_b) * multiplier_b;
        int32_t code = ((sum + half) >> shift) + zero_out; /* >> of a negative int32: arithmetic (gcc, clang) */
        code = code < lo ? lo : code;
        code = code > hi ? hi : code;
        out[i] = (int8_t)code;
    }
}

static void add_elements(const void *op, int64_t first, int64_t last, int part) {
    (void)part;
    const Add *add = (const Add *)op;
    const int8_t *restrict a = add->a, *restrict b = add->b;
    int8_t *restrict out = add->out;
    const int64_t zero_a = add->zero_a, zero_b = add->zero_b, multiplier_a = add->multiplier_a;
    const int64_t multiplier_b = add->multiplier_b, shift = add->shift, zero_out = add->zero_out;
    const int64_t lo = add->lo, hi = add->hi, half = (int64_t)1 << shift >> 1;
    for (int64_t i = first; i < last; ++i) {
        const int64_t sum = ((int64_t)a[i] - zero_a) * multiplier_a + ((int64_t)b[i] - zero_b) * multiplier_b;
        int64_t code = ((sum + half) >> shift) + zero_out; /* >> of a negative int64: arithmetic (gcc, clang) */
        code = code < lo ? lo : code;
        code = code > hi ? hi : code;
        out[i] = (int8_t)code;
    }
}

/* Elementwise kernels: a thread per ADD_PER_THREAD elements at most (below that a thread costs more than it saves) */
enum { ADD_PER_THREAD = 1 << 16 };

static int add_threads(int64_t count, int threads) {
    const int64_t most = count / ADD_PER_THREAD;
    return most < threads ? (int)(most > 0 ? most : 1) : threads;
}

int qparity_qs8_vadd(const Add *add, int threads) {
    split(add->int32_sum ? add_elements_int32 : add_elements, add, add->count, add_threads(add->count, threads));
    return 0;
}

int qparity_qs8_vadd_struct_size(void) { return (int)sizeof(Add); }

/* TFLite's int8 ADD (numerics/tflite.py TFLiteTarget._add, whose arithmetic this is: reference_integer_ops::Add,
 * kernels/internal/reference/integer_ops/add.h):
 *     code = clamp(z_y + MBQM(MBQM((q_a - z_a) 2^20, m_a, s_a) + MBQM((q_b - z_b) 2^20, m_b, s_b), m_y, s_y), lo, hi)
 * with MultiplyByQuantizedMultiplier (double rounding) exactly as numerics/arithmetic.py computes it, in int64:
 * products and sums wrap as PyTorch's int64 tensors do (computed in uint64), right shifts are arithmetic. */
typedef struct {
    const int8_t *a, *b;
    int8_t *out;
    int64_t count;
    int64_t zero_a, zero_b, multiplier_a, shift_a, multiplier_b, shift_b, multiplier_y, shift_y, zero_out, lo, hi;
} TfliteAdd;

static inline int64_t wrapping_mul(int64_t x, int64_t y) { return (int64_t)((uint64_t)x * (uint64_t)y); }

static inline int64_t multiply_by_quantized_multiplier(int64_t x, int64_t m0, int64_t shift) {
    const int64_t left = shift > 0 ? shift : 0, right = shift > 0 ? 0 : -shift;
    x = wrapping_mul(x, (int64_t)1 << left);
    /* saturating_rounding_doubling_high_mul: (x m0 + 2^30) >> 31, INT32_MAX for INT32_MIN * INT32_MIN */
    int64_t high = (int64_t)((uint64_t)wrapping_mul(x, m0) + ((uint64_t)1 << 30)) >> 31;
    high = (x == INT32_MIN && m0 == INT32_MIN) ? INT32_MAX : high;
    /* rounding_divide_by_pot: (x + 2^(e-1) - [x < 0 and e > 0]) >> e */
    const int64_t half = ((int64_t)1 << right) >> 1, fix = (high >> 63) & (right > 0);
    return (int64_t)((uint64_t)high + (uint64_t)half - (uint64_t)fix) >> right;
}

static void tflite_add_elements(const void *op, int64_t first, int64_t last, int part) {
    (void)part;
    const TfliteAdd *add = (const TfliteAdd *)op;
    const int8_t *restrict a = add->a, *restrict b = add->b;
    int8_t *restrict out = add->out;
    const TfliteAdd k = *add;
    for (int64_t i = first; i < last; ++i) {
        const int64_t term_a = multiply_by_quantized_multiplier(((int64_t)a[i] - k.zero_a) * (1 << 20), k.multiplier_a,
                                                                k.shift_a);
        const int64_t term_b = multiply_by_quantized_multiplier(((int64_t)b[i] - k.zero_b) * (1 << 20), k.multiplier_b,
                                                                k.shift_b);
        int64_t code = multiply_by_quantized_multiplier((int64_t)((uint64_t)term_a + (uint64_t)term_b), k.multiplier_y,
                                                        k.shift_y) + k.zero_out;
        code = code < k.lo ? k.lo : code;
        code = code > k.hi ? k.hi : code;
        out[i] = (int8_t)code;
    }
}

int qparity_tflite_add(const TfliteAdd *add, int threads) {
    split(tflite_add_elements, add, add->count, add_threads(add->count, threads));
    return 0;
}

int qparity_tflite_add_struct_size(void) { return (int)sizeof(TfliteAdd); }

/* ONNX Runtime's QLinearAdd on two 8-bit code tensors (numerics/onnxruntime.py OnnxRuntimeTarget.add_elementwise,
 * whose arithmetic this is): q = clamp(rne(fma(q_a, r_a, fma(q_b, r_b, F))), lo, hi) in float32, each fma rounded
 * once (the hardware's fused multiply-add, which the Python side emulates exactly with fma_f32), the clamp applied
 * to the float before rounding (integer bounds: the same codes; a NaN becomes lo, as the Python side's does). */
typedef struct {
    const uint8_t *a, *b;
    uint8_t *out;
    int64_t count;
    float ratio_a, ratio_b, offset;
    int32_t lo, hi, is_unsigned; /* is_unsigned: uint8 codes, else int8 */
} OrtAdd;

static inline __m512 codes_as_float(const OrtAdd *add, const uint8_t *codes, __mmask16 mask) {
    const __m128i bytes = _mm_maskz_loadu_epi8(mask, codes);
    const __m512i wide = add->is_unsigned ? _mm512_cvtepu8_epi32(bytes) : _mm512_cvtepi8_epi32(bytes);
    return _mm512_cvt_roundepi32_ps(wide, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); /* exact: |q| < 2^8 */
}

static void ort_add_elements(const void *op, int64_t first, int64_t last, int part) {
    (void)part;
    const OrtAdd *add = (const OrtAdd *)op;
    const __m512 ratio_a = _mm512_set1_ps(add->ratio_a), ratio_b = _mm512_set1_ps(add->ratio_b);
    const __m512 offset = _mm512_set1_ps(add->offset);
    const __m512 low = _mm512_set1_ps((float)add->lo), high = _mm512_set1_ps((float)add->hi);
    for (int64_t i = first; i < last; i += 16) {
        const __mmask16 mask = last - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (last - i)) - 1u);
        const __m512 qa = codes_as_float(add, add->a + i, mask), qb = codes_as_float(add, add->b + i, mask);
        const __m512 inner = _mm512_fmadd_round_ps(qb, ratio_b, offset, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 value = _mm512_fmadd_round_ps(qa, ratio_a, inner, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        value = _mm512_min_ps(_mm512_max_ps(value, low), high); /* maxps(NaN, low) is low */
        const __m512i code = _mm512_cvt_roundps_epi32(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_mask_storeu_epi8(add->out + i, mask, _mm512_cvtepi32_epi8(code));
    }
}

int qparity_ort_add(const OrtAdd *add, int threads) {
    split(ort_add_elements, add, add->count, add_threads(add->count, threads));
    return 0;
}

int qparity_ort_add_struct_size(void) { return (int)sizeof(OrtAdd); }
