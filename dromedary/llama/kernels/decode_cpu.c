/* One decoding step of a LLaMA in bf16 on x86 CPUs with AVX512-BF16, all layers in one call.
 *
 * Decoding a few rows is bound by reading the weights. Through PyTorch, a step is ~40 small
 * tensor ops per layer between the projections, each a dispatch whose code and data the weight
 * stream has just pushed out of the caches, and the projections themselves (oneDNN) reach ~75%
 * of the read bandwidth in that company. Here a step is one call: one OpenMP region in which the
 * threads split each projection by output columns and the attention by kv head, meeting at a
 * barrier between stages. The shared prefix's keys and values are packed like weights (by
 * native.py, once per prefix), so its part of the attention is two more products.
 *
 * Arithmetic follows the PyTorch forward (dromedary/model.py) rounding for rounding: every
 * tensor the forward keeps in bf16 is rounded to bf16 here at the same point (RMSNorm output,
 * its product with the weight, each projection, q and k after the rotation, the attention
 * output, both residual sums, silu and its product with the up projection). Sums are fp32 in a
 * different order, so logits agree with the forward's to bf16 rounding, not bit for bit.
 *
 * Projection weights are packed by dromedary/native.py into blocks of 16 output rows, and within
 * a block by pairs of input columns: block[j][c][e] = W[16 * nb + c][2 * j + e]. One 64-byte
 * load is then 16 outputs x 2 inputs: the B operand layout of the AMX tile unit, and for AVX512
 * FMAs two fp32 vectors of 16 outputs each. Either way each output is summed in its own lane (no
 * horizontal reductions), in an order that does not depend on the batch or the thread count: a
 * row's logits are the same alone or in any batch.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef uint16_t bf16;

typedef struct {
    int32_t dim, n_heads, n_kv_heads, head_dim, ffn, vocab, n_layers;
    float eps;
    const bf16 *const *attention_norm; /* per layer, (dim) */
    const bf16 *const *ffn_norm;
    const bf16 *const *wqkv;           /* packed (H + 2 kvh) * head_dim x dim */
    const bf16 *const *wo;             /* packed dim x H * head_dim */
    const bf16 *const *w13;            /* packed 2 ffn x dim: w1 rows, then w3 rows */
    const bf16 *const *w2;             /* packed dim x ffn */
    const bf16 *norm;                  /* (dim) */
    const bf16 *output;                /* packed vocab x dim */
} Model;

typedef struct {
    int32_t batch;
    int32_t threads;       /* OpenMP threads to run on (PyTorch's intra-op count) */
    bf16 *x;               /* (B, dim): the token embeddings in, the residual stream while working */
    const int64_t *slot;   /* (B): the row's own cache slot for this token */
    const int64_t *pos;    /* (B): its position (prefix length + slot) */
    const float *rope;     /* (max_pos, head_dim / 2, 2): cos, sin */
    bf16 *const *k_cache;  /* per layer: (B, kvh, S, head_dim) rows' own keys */
    bf16 *const *v_cache;
    int64_t cache_row, cache_head;      /* strides in elements; a slot's stride is head_dim */
    const bf16 *const *prefix_k;        /* per layer: the shared prefix's keys, packed per kv head as
                                           weights of P outputs x head_dim inputs; or NULL */
    const bf16 *const *prefix_v;        /* per layer: its values transposed, packed per kv head as
                                           weights of head_dim outputs x P' inputs (P' = P rounded
                                           up to 32, zero past P) */
    int64_t prefix_len;                 /* P */
    int64_t max_span;                   /* max(slot) + 1 */
    bf16 *logits;                       /* (B, vocab) out */
} Step;

/* ---------------------------------------------------------------------------------------------
 * bf16 <-> fp32 */

static inline float bf16_to_f32(bf16 h) {
    union { uint32_t u; float f; } v = { .u = (uint32_t)h << 16 };
    return v.f;
}

static inline bf16 f32_to_bf16(float f) { /* round to nearest even, as PyTorch does */
    union { float f; uint32_t u; } v = { .f = f };
    if ((v.u & 0x7fffffff) > 0x7f800000) return (bf16)((v.u >> 16) | 0x40); /* NaN stays NaN */
    return (bf16)((v.u + 0x7fff + ((v.u >> 16) & 1)) >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

static inline __m512 load16(const bf16 *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline void store16(bf16 *p, __m512 v, __mmask16 m) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

static inline __mmask16 tail16(int n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

/* e^x for 16 lanes: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p of degree 6 (rel. err ~2e-7). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* ---------------------------------------------------------------------------------------------
 * Projections: y (B, N) fp32 = x (B, K) @ W^T, W packed as described above. Each 64-byte load
 * holds 16 output columns x 2 inputs; its even and odd halves become two fp32 vectors (a shift and
 * a mask) that are multiplied into per-row accumulators with fp32 FMAs against the broadcast
 * inputs (x converted to fp32 once per call). Every output is one lane summed in input order:
 * the result does not depend on the batch size or the thread count. (vdpbf16ps would save the
 * conversions, but on the CPUs measured it issues at half the FMA rate, and from 5 rows up the
 * products, not the memory, set the pace.) The threads share the output blocks; NB blocks x BB
 * rows are accumulated at once (NB * BB <= 16 registers). */

static inline __attribute__((always_inline)) void gemm_tile(const bf16 *P, int kpairs, const float *x, int64_t ldx,
                                                            float *y, int64_t ldy, int N, int nb, int NB, int BB) {
    __m512 acc[4][8];
    for (int i = 0; i < NB; i++)
        for (int b = 0; b < BB; b++) acc[i][b] = _mm512_setzero_ps();
    const bf16 *w[4];
    for (int i = 0; i < NB; i++) w[i] = P + (int64_t)(nb + i) * kpairs * 32;
    const __m512i high = _mm512_set1_epi32((int)0xffff0000);
    for (int j = 0; j < kpairs; j++) {
        __m512 even[4], odd[4];
        for (int i = 0; i < NB; i++) {
            __m512i v = _mm512_loadu_si512(w[i] + 32 * j);
            even[i] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            odd[i] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
        }
        for (int b = 0; b < BB; b++) {
            __m512 x0 = _mm512_set1_ps(x[b * ldx + 2 * j]), x1 = _mm512_set1_ps(x[b * ldx + 2 * j + 1]);
            for (int i = 0; i < NB; i++) acc[i][b] = _mm512_fmadd_ps(odd[i], x1, _mm512_fmadd_ps(even[i], x0, acc[i][b]));
        }
    }
    for (int i = 0; i < NB; i++) {
        int col = (nb + i) * 16;
        __mmask16 m = tail16(N - col);
        for (int b = 0; b < BB; b++) _mm512_mask_storeu_ps(y + b * ldy + col, m, acc[i][b]);
    }
}

#define TILE(NB_, BB_) gemm_tile(P, kpairs, x + b0 * ldx, ldx, y + b0 * ldy, ldy, N, nb, NB_, BB_)
/* The tile for bb (1..8) rows: each (NB, BB) pair is compiled with its loops unrolled. */
#define TILE_ROWS(NB_)                                                                                      \
    switch (bb) {                                                                                           \
    case 1: TILE(NB_, 1); break;                                                                            \
    case 2: TILE(NB_, 2); break;                                                                            \
    case 3: TILE(NB_, 3); break;                                                                            \
    case 4: TILE(NB_, 4); break;                                                                            \
    case 5: TILE(NB_, 5); break;                                                                            \
    case 6: TILE(NB_, 6); break;                                                                            \
    case 7: TILE(NB_, 7); break;                                                                            \
    default: TILE(NB_, 8); break;                                                                           \
    }

static void gemm_rows(const bf16 *P, int K, const float *x, int64_t ldx, int B, float *y, int64_t ldy, int N,
                      int nb, int NB) {
    int kpairs = K / 2;
    for (int b0 = 0; b0 < B; b0 += 8) {
        int bb = B - b0 < 8 ? B - b0 : 8;
        if (NB == 4) { /* only for B <= 4: 4 x 4 accumulators at most */
            switch (bb) {
            case 1: TILE(4, 1); break;
            case 2: TILE(4, 2); break;
            case 3: TILE(4, 3); break;
            default: TILE(4, 4); break;
            }
        } else if (NB == 2) {
            TILE_ROWS(2)
        } else {
            TILE_ROWS(1)
        }
    }
}

/* With vdpbf16ps (AVX512-BF16) each 64-byte load of a block is multiplied as it lies against one
 * broadcast pair of x's bf16 inputs: 16 outputs x 2 inputs per instruction, no conversions. Where
 * the instruction issues at the FMA rate (AMD Zen 4 and later) that is twice the products of the
 * FMA kernel per cycle; each output is again one lane summed pair by pair in input order. */

static inline __attribute__((always_inline)) void gemm_tile_dp(const bf16 *P, int kpairs, const bf16 *x, int64_t ldx,
                                                               float *y, int64_t ldy, int N, int nb, int NB, int BB) {
    __m512 acc[8][12];
    for (int i = 0; i < NB; i++)
        for (int b = 0; b < BB; b++) acc[i][b] = _mm512_setzero_ps();
    const bf16 *w[8];
    for (int i = 0; i < NB; i++) w[i] = P + (int64_t)(nb + i) * kpairs * 32;
    for (int j = 0; j < kpairs; j++) {
        __m512bh wv[8];
        for (int i = 0; i < NB; i++) wv[i] = (__m512bh)_mm512_loadu_si512(w[i] + 32 * j);
        for (int b = 0; b < BB; b++) {
            int32_t pair;
            memcpy(&pair, x + b * ldx + 2 * j, sizeof pair);
            __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            for (int i = 0; i < NB; i++) acc[i][b] = _mm512_dpbf16_ps(acc[i][b], wv[i], xv);
        }
    }
    for (int i = 0; i < NB; i++) {
        int col = (nb + i) * 16;
        __mmask16 m = tail16(N - col);
        for (int b = 0; b < BB; b++) _mm512_mask_storeu_ps(y + b * ldy + col, m, acc[i][b]);
    }
}

#define TILE_DP(NB_, BB_) gemm_tile_dp(P, kpairs, x + b0 * ldx, ldx, y + b0 * ldy, ldy, N, nb, NB_, BB_)

/* NB blocks at once: 8 for up to 2 rows (enough independent chains to cover the instruction's
 * latency when one row is all there is), 4 for 3 or 4 rows, else 2 blocks x 12 rows. */
static void gemm_rows_dp(const bf16 *P, int K, const bf16 *x, int64_t ldx, int B, float *y, int64_t ldy, int N,
                         int nb, int NB) {
    int kpairs = K / 2;
    if (NB >= 4) {
        int b0 = 0;
        if (NB == 8) {
            if (B == 1) TILE_DP(8, 1); else TILE_DP(8, 2);
            return;
        }
        switch (B) {
        case 1: TILE_DP(4, 1); break;
        case 2: TILE_DP(4, 2); break;
        case 3: TILE_DP(4, 3); break;
        default: TILE_DP(4, 4); break;
        }
        return;
    }
    for (int b0 = 0; b0 < B; b0 += 12) {
        int bb = B - b0 < 12 ? B - b0 : 12;
#define DP_ROWS(NB_)                                                                                        \
        switch (bb) {                                                                                       \
        case 1: TILE_DP(NB_, 1); break;                                                                     \
        case 2: TILE_DP(NB_, 2); break;                                                                     \
        case 3: TILE_DP(NB_, 3); break;                                                                     \
        case 4: TILE_DP(NB_, 4); break;                                                                     \
        case 5: TILE_DP(NB_, 5); break;                                                                     \
        case 6: TILE_DP(NB_, 6); break;                                                                     \
        case 7: TILE_DP(NB_, 7); break;                                                                     \
        case 8: TILE_DP(NB_, 8); break;                                                                     \
        case 9: TILE_DP(NB_, 9); break;                                                                     \
        case 10: TILE_DP(NB_, 10); break;                                                                   \
        case 11: TILE_DP(NB_, 11); break;                                                                   \
        default: TILE_DP(NB_, 12); break;                                                                   \
        }
        if (NB == 2) {
            DP_ROWS(2)
        } else {
            DP_ROWS(1)
        }
#undef DP_ROWS
    }
}

/* With AMX (Sapphire Rapids and later) the tile unit takes the products: 16 consecutive pairs of
 * a packed block are its B operand as they lie (1 KB: 16 outputs x 32 inputs), 16 rows of x
 * (zero-padded) the A operand. The caller pads x; K must be a multiple of 32. */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

static int use_amx = 0, amx_granted = 0;
static int use_dp = 0; /* vdpbf16ps instead of FMAs where AMX is off */

/* vdpbf16ps (on = 1) or FMAs (on = 0) for the products that AMX does not take; returns what is in use. */
int dromedary_set_dpbf16(int on) {
    use_dp = on != 0;
    return use_dp;
}

/* Use the tile unit (on = 1) or FMAs (on = 0) from now on; returns what is in use. The caller
 * checks the CPU flags first. */
int dromedary_set_amx(int on) {
    /* Linux makes a process ask for the AMX register state before its first tile instruction. */
    if (on && !amx_granted)
        amx_granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
    use_amx = on && amx_granted;
    return use_amx;
}

static void tiles_configure(void) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 7; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
}

/* `count` (1..4) blocks from block nb on, accumulated in tiles 0..3: four independent chains of
 * tile products; tile 4 holds x, tiles 5 and 6 the weights in turn. */
static void gemm_amx_blocks(const bf16 *P, int K, const bf16 *xpad, int rows, float *ctile, float *y, int64_t ldy,
                            int N, int nb, int count) {
    const int64_t block = (int64_t)K * 16; /* elements per packed block of 16 columns */
    const bf16 *w = P + nb * block;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int k = 0; k < K; k += 32) {
        const int64_t at = (int64_t)k * 16;
        _tile_loadd(4, xpad + k, K * 2);
        _tile_loadd(5, w + at, 64);
        _tile_dpbf16ps(0, 4, 5);
        if (count > 1) {
            _tile_loadd(6, w + block + at, 64);
            _tile_dpbf16ps(1, 4, 6);
        }
        if (count > 2) {
            _tile_loadd(5, w + 2 * block + at, 64);
            _tile_dpbf16ps(2, 4, 5);
        }
        if (count > 3) {
            _tile_loadd(6, w + 3 * block + at, 64);
            _tile_dpbf16ps(3, 4, 6);
        }
    }
    for (int t = 0; t < count; t++) {
        switch (t) {
        case 0: _tile_stored(0, ctile, 64); break;
        case 1: _tile_stored(1, ctile, 64); break;
        case 2: _tile_stored(2, ctile, 64); break;
        default: _tile_stored(3, ctile, 64); break;
        }
        int col = (nb + t) * 16;
        int n = N - col < 16 ? N - col : 16;
        for (int r = 0; r < rows; r++) memcpy(y + r * ldy + col, ctile + r * 16, sizeof(float) * n);
    }
}

/* Output blocks [first, last) of y = x @ W^T, by the calling thread alone. scratch: room for x in
 * fp32, (max(B, 16), K), which also holds x in bf16 padded to a multiple of 16 rows and one
 * output tile. */
static void gemm_blocks(const bf16 *P, int K, const bf16 *x, int B, float *scratch, float *y, int64_t ldy, int N,
                        int first, int last) {
    if (first >= last) return;
    if (use_amx && K % 32 == 0) {
        /* x zero-padded to whole groups of 16 rows; each run of four blocks is read from memory
         * once and from the cache for the groups after the first. */
        const int64_t padded = (B + 15) / 16 * 16;
        bf16 *xpad = (bf16 *)scratch;
        float *ctile = scratch + padded * K / 2;
        memcpy(xpad, x, sizeof(bf16) * B * K);
        memset(xpad + (int64_t)B * K, 0, sizeof(bf16) * (padded - B) * K);
        for (int nb = first; nb < last; nb += 4)
            for (int r0 = 0; r0 < B; r0 += 16)
                gemm_amx_blocks(P, K, xpad + (int64_t)r0 * K, B - r0 < 16 ? B - r0 : 16, ctile, y + r0 * ldy, ldy, N, nb,
                                last - nb < 4 ? last - nb : 4);
        return;
    }
    int NB = B <= 4 ? 4 : 2;
    if (use_dp) {
        NB = B <= 2 ? 8 : NB;
        for (int nb = first; nb < last; nb += NB) {
            if (nb + NB <= last) {
                gemm_rows_dp(P, K, x, K, B, y, ldy, N, nb, NB);
            } else {
                for (int i = nb; i < last; i++) gemm_rows_dp(P, K, x, K, B, y, ldy, N, i, 1);
            }
        }
        return;
    }
    for (int64_t i = 0; i < (int64_t)B * K; i++) scratch[i] = bf16_to_f32(x[i]);
    for (int nb = first; nb < last; nb += NB) {
        if (nb + NB <= last) {
            gemm_rows(P, K, scratch, K, B, y, ldy, N, nb, NB);
        } else {
            for (int i = nb; i < last; i++) gemm_rows(P, K, scratch, K, B, y, ldy, N, i, 1);
        }
    }
}

/* Called inside a parallel region by every thread: the output blocks are split between them in
 * runs of 4 (whole tiles of either kernel), then all meet at a barrier. */
static void gemm(const bf16 *P, int K, const bf16 *x, int B, float *scratch, float *y, int64_t ldy, int N) {
    int blocks = (N + 15) / 16, t = omp_get_thread_num(), nt = omp_get_num_threads();
    int per = ((blocks + nt - 1) / nt + 3) & ~3;
    int first = t * per < blocks ? t * per : blocks, last = first + per < blocks ? first + per : blocks;
    gemm_blocks(P, K, x, B, scratch, y, ldy, N, first, last);
    #pragma omp barrier
}

/* ---------------------------------------------------------------------------------------------
 * Row-wise pieces. */

static inline __m512 to_bf16_and_back(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

/* out = bf16(bf16(x * rsqrt(mean(x^2) + eps)) * w), x bf16 */
static void rms_norm(const bf16 *x, const bf16 *w, int dim, float eps, bf16 *out) {
    __m512 ss = _mm512_setzero_ps();
    for (int i = 0; i < dim; i += 16) {
        __m512 v = load16(x + i, tail16(dim - i));
        ss = _mm512_fmadd_ps(v, v, ss);
    }
    float scale = 1.0f / sqrtf(_mm512_reduce_add_ps(ss) / dim + eps);
    for (int i = 0; i < dim; i += 16) {
        __mmask16 m = tail16(dim - i);
        __m512 v = to_bf16_and_back(_mm512_mul_ps(load16(x + i, m), _mm512_set1_ps(scale)));
        store16(out + i, _mm512_mul_ps(v, load16(w + i, m)), m);
    }
}

/* x = bf16(x + bf16(y)), y fp32 */
static void add_residual(bf16 *x, const float *y, int dim) {
    for (int i = 0; i < dim; i += 16) {
        __mmask16 m = tail16(dim - i);
        __m512 r = _mm512_maskz_loadu_ps(m, y + i);
        store16(x + i, _mm512_add_ps(load16(x + i, m), to_bf16_and_back(r)), m);
    }
}

/* out = bf16(bf16(silu(bf16(g))) * bf16(u)), g and u fp32 */
static void silu_mul(const float *g, const float *u, int n, bf16 *out) {
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = tail16(n - i);
        __m512 a = to_bf16_and_back(_mm512_maskz_loadu_ps(m, g + i));
        __m512 b = to_bf16_and_back(_mm512_maskz_loadu_ps(m, u + i));
        __m512 s = _mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), a))));
        store16(out + i, _mm512_mul_ps(to_bf16_and_back(s), b), m);
    }
}

/* Rotate the interleaved pairs of one head (fp32 from the projection, rounded to bf16 first as
 * the forward does) and round the result to bf16. */
static void rotate(const float *src, const float *rope, int head_dim, bf16 *dst) {
    for (int i = 0; i < head_dim; i += 2) {
        float a = round_bf16(src[i]), b = round_bf16(src[i + 1]);
        float c = rope[i], s = rope[i + 1];
        dst[i] = f32_to_bf16(a * c - b * s);
        dst[i + 1] = f32_to_bf16(a * s + b * c);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Attention of one query row of one head over the prefix keys (may be none) and the row's own
 * keys [0, span), under one softmax. */

/* The sums of 16 vectors' lanes: lane t of the result is the sum of a[t]'s 16 lanes. A transposed
 * tree (pairs of unpacks, then 128-bit lane shuffles): 45 operations for 16 sums, where 16
 * horizontal reductions take about three times as many. The order of the additions is fixed. */
static inline __m512 sum16x16(__m512 a[16]) {
    __m512 b[8], c[4], d[2];
    for (int k = 0; k < 8; k++)
        b[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
    for (int k = 0; k < 4; k++) {
        __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(b[2 * k]), _mm512_castps_pd(b[2 * k + 1]));
        __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(b[2 * k]), _mm512_castps_pd(b[2 * k + 1]));
        c[k] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
    }
    /* c[k], 128-bit lane L: the partial sums (over lane L) of a[4k .. 4k + 3]. */
    for (int k = 0; k < 2; k++)
        d[k] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], 0x88), _mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
}

/* s[j] = q . k_j for the n keys k_j = k + j * hd: sixteen at a time (one dot-product chain per key,
 * summed by sum16x16), the rest one by one. */
static inline float dot_bf16(const bf16 *a, const bf16 *b, int n);
static void dots_bf16(const bf16 *q, const bf16 *k, int64_t n, int hd, float *s) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512 acc[16];
        for (int t = 0; t < 16; t++) acc[t] = _mm512_setzero_ps();
        for (int i = 0; i < hd; i += 32) {
            __mmask32 m = hd - i >= 32 ? (__mmask32)~0u : (__mmask32)((1u << (hd - i)) - 1);
            __m512bh qv = (__m512bh)_mm512_maskz_loadu_epi16(m, q + i);
            for (int t = 0; t < 16; t++)
                acc[t] = _mm512_dpbf16_ps(acc[t], qv, (__m512bh)_mm512_maskz_loadu_epi16(m, k + (j + t) * hd + i));
        }
        _mm512_storeu_ps(s + j, sum16x16(acc));
        if (j + 80 <= n)  /* four blocks ahead: the hardware prefetcher stops at each 4 KB page */
            for (int64_t c = 0; c < 16 * (int64_t)hd * 2; c += 64) _mm_prefetch((const char *)(k + (j + 64) * hd) + c, _MM_HINT_T0);
    }
    for (; j < n; j++) s[j] = dot_bf16(q, k + j * hd, hd);
}

static inline float dot_bf16(const bf16 *a, const bf16 *b, int n) {
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 32) {
        __mmask32 m = n - i >= 32 ? (__mmask32)~0u : (__mmask32)((1u << (n - i)) - 1);
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(m, a + i), (__m512bh)_mm512_maskz_loadu_epi16(m, b + i));
    }
    return _mm512_reduce_add_ps(acc);
}

/* Attention of the M = B x rep query rows that read kv head g (row m = b * rep + r is head
 * g * rep + r of batch row b), each over the shared prefix and its own keys [0, slot + 1), under
 * one softmax. The prefix part is two products on the packed prefix (scores = q K^T, then
 * probabilities in bf16 @ V, as PyTorch's CPU flash kernel rounds them for bf16); the few own keys
 * are walked one by one. */
typedef struct {
    bf16 *q;       /* (M, hd) */
    float *s;      /* (M, P + max_span) scores, then probabilities */
    bf16 *p;       /* (M, P') prefix probabilities in bf16 */
    float *o;      /* (M, hd) */
    float *inv;    /* (M) 1 / the softmax's sum */
    float *gemm;   /* gemm_blocks scratch */
} AttnScratch;

static void attend_group(const Step *st, int l, int g, int B, int H, int rep, int hd, const bf16 *q, const bf16 *kc,
                         const bf16 *vc, AttnScratch *w, bf16 *att) {
    const int M = B * rep;
    const int64_t P = st->prefix_k ? st->prefix_len : 0, Pp = (P + 31) / 32 * 32, ld = P + st->max_span;
    const float scale = 1.0f / sqrtf((float)hd);
    const int chunks = (hd + 15) / 16;
    for (int m = 0; m < M; m++) memcpy(w->q + (int64_t)m * hd, q + ((int64_t)(m / rep) * H + g * rep + m % rep) * hd, sizeof(bf16) * hd);
    if (P) {
        const bf16 *kp = st->prefix_k[l] + (int64_t)g * ((P + 15) / 16 * 16) * hd;
        gemm_blocks(kp, hd, w->q, M, w->gemm, w->s, ld, (int)P, 0, (int)((P + 15) / 16));
    }
    for (int m = 0; m < M; m++) {
        const int b = m / rep;
        const int64_t span = st->slot[b] + 1, n = P + span;
        const int64_t base = b * st->cache_row + g * st->cache_head;
        float *s = w->s + m * ld;
        const bf16 *qm = w->q + (int64_t)m * hd;
        dots_bf16(qm, kc + base, span, hd, s + P);
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < n; j += 16) {
            __mmask16 mk = tail16((int)(n - j < 16 ? n - j : 16));
            __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, s + j), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(s + j, mk, v);
            mx = _mm512_mask_max_ps(mx, mk, mx, v);
        }
        __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx)), sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            __mmask16 mk = tail16((int)(n - j < 16 ? n - j : 16));
            __m512 e = _mm512_maskz_mov_ps(mk, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + j), top)));
            sum = _mm512_add_ps(sum, e);
            _mm512_mask_storeu_ps(s + j, mk, to_bf16_and_back(e));
        }
        float inv = 1.0f / _mm512_reduce_add_ps(sum);
        bf16 *pm = w->p + m * Pp;
        for (int64_t j = 0; j < P; j++) pm[j] = f32_to_bf16(s[j]); /* exact: already bf16 values */
        for (int64_t j = P; j < Pp; j++) pm[j] = 0;
        w->inv[m] = inv;
    }
    if (P) {
        const int hd16 = (hd + 15) / 16 * 16;
        const bf16 *vt = st->prefix_v[l] + (int64_t)g * hd16 * Pp;
        gemm_blocks(vt, (int)Pp, w->p, M, w->gemm, w->o, hd, hd, 0, hd16 / 16);
    } else {
        memset(w->o, 0, sizeof(float) * (size_t)M * hd);
    }
    for (int m = 0; m < M; m++) {
        const int b = m / rep;
        const int64_t span = st->slot[b] + 1, base = b * st->cache_row + g * st->cache_head;
        const float *s = w->s + m * ld;
        __m512 acc[16];
        for (int c = 0; c < chunks; c++) acc[c] = _mm512_maskz_loadu_ps(tail16(hd - 16 * c), w->o + (int64_t)m * hd + 16 * c);
        for (int64_t j = 0; j < span; j++) {
            const bf16 *row = vc + base + j * hd;
            if (j + 64 < span)  /* as in dots_bf16 */
                for (int c = 0; c < hd * 2; c += 64) _mm_prefetch((const char *)(row + 64 * hd) + c, _MM_HINT_T0);
            __m512 p = _mm512_set1_ps(s[P + j]);
            for (int c = 0; c < chunks; c++) acc[c] = _mm512_fmadd_ps(p, load16(row + 16 * c, tail16(hd - 16 * c)), acc[c]);
        }
        __m512 inv = _mm512_set1_ps(w->inv[m]);
        bf16 *out = att + ((int64_t)b * H + g * rep + m % rep) * hd;
        for (int c = 0; c < chunks; c++) store16(out + 16 * c, _mm512_mul_ps(acc[c], inv), tail16(hd - 16 * c));
    }
}

/* ---------------------------------------------------------------------------------------------
 * The step. */

int dromedary_decode_step(const Model *m, const Step *st) {
    const int B = st->batch, dim = m->dim, H = m->n_heads, kvh = m->n_kv_heads, hd = m->head_dim;
    const int rep = H / kvh, n_qkv = (H + 2 * kvh) * hd, ffn = m->ffn;
    int wide = n_qkv > 2 * ffn ? n_qkv : 2 * ffn;
    if (wide < m->vocab) wide = m->vocab;
    int feat = dim > ffn ? dim : ffn;
    if (feat < H * hd) feat = H * hd;
    /* Shared: normed input / silu product (B, feat) bf16, projection outputs (B, wide) fp32,
     * attention output (B, H * hd) bf16, q (B, H, hd) bf16. Per thread: the attention's and the
     * products' scratch. */
    const int M = B * rep;
    const int64_t P = st->prefix_k ? st->prefix_len : 0, Pp = (P + 31) / 32 * 32, ld = P + st->max_span;
    int64_t gemm_len = (int64_t)(B > 16 ? B : 16) * feat;
    int64_t gemm_attn = (int64_t)(M > 16 ? M : 16) * (Pp > hd ? Pp : hd);
    gemm_len = (gemm_len > gemm_attn ? gemm_len : gemm_attn) + 256;
    const int64_t per_thread = gemm_len + (int64_t)M * ld + (int64_t)M * hd + M + 16 /* floats */
                               + ((int64_t)M * hd + (int64_t)M * Pp + 32) / 2 /* bf16 pairs */;
    bf16 *xn = malloc(sizeof(bf16) * (size_t)B * feat);
    float *y = malloc(sizeof(float) * (size_t)B * wide);
    bf16 *att = malloc(sizeof(bf16) * (size_t)B * H * hd);
    bf16 *q = malloc(sizeof(bf16) * (size_t)B * H * hd);
    int threads = st->threads > 0 ? st->threads : 1;
    float *work = malloc(sizeof(float) * (size_t)threads * per_thread);
    if (!xn || !y || !att || !q || !work) {
        free(xn); free(y); free(att); free(q); free(work);
        return 1;
    }
    #pragma omp parallel num_threads(threads)
    {
        float *mine = work + (int64_t)omp_get_thread_num() * per_thread;
        float *xf = mine;
        AttnScratch w = {
            .gemm = mine,
            .s = mine + gemm_len,
            .o = mine + gemm_len + M * ld,
            .inv = mine + gemm_len + M * ld + (int64_t)M * hd,
            .q = (bf16 *)(mine + gemm_len + M * ld + (int64_t)M * hd + M + 16),
        };
        w.p = w.q + (int64_t)M * hd + 32;
        if (use_amx) tiles_configure();
        for (int l = 0; l < m->n_layers; l++) {
            bf16 *kc = st->k_cache[l], *vc = st->v_cache[l];
            #pragma omp for schedule(static)
            for (int b = 0; b < B; b++) rms_norm(st->x + (int64_t)b * dim, m->attention_norm[l], dim, m->eps, xn + (int64_t)b * dim);
            gemm(m->wqkv[l], dim, xn, B, xf, y, n_qkv, n_qkv);
            /* Rotate q and k, round v; k and v go to the row's cache slot. */
            #pragma omp for schedule(static)
            for (int b = 0; b < B; b++) {
                const float *yb = y + (int64_t)b * n_qkv;
                const float *rope = st->rope + st->pos[b] * hd;
                for (int h = 0; h < H; h++) rotate(yb + h * hd, rope, hd, q + ((int64_t)b * H + h) * hd);
                for (int g = 0; g < kvh; g++) {
                    int64_t at = b * st->cache_row + g * st->cache_head + st->slot[b] * hd;
                    rotate(yb + (H + g) * hd, rope, hd, kc + at);
                    for (int i = 0; i < hd; i++) vc[at + i] = f32_to_bf16(yb[(H + kvh + g) * hd + i]);
                }
            }
            /* Attention: one kv head (all rows, all its query heads) per item. */
            #pragma omp for schedule(static)
            for (int g = 0; g < kvh; g++) attend_group(st, l, g, B, H, rep, hd, q, kc, vc, &w, att);
            gemm(m->wo[l], H * hd, att, B, xf, y, dim, dim);
            #pragma omp for schedule(static)
            for (int b = 0; b < B; b++) {
                add_residual(st->x + (int64_t)b * dim, y + (int64_t)b * dim, dim);
                rms_norm(st->x + (int64_t)b * dim, m->ffn_norm[l], dim, m->eps, xn + (int64_t)b * dim);
            }
            gemm(m->w13[l], dim, xn, B, xf, y, 2 * ffn, 2 * ffn);
            #pragma omp for schedule(static)
            for (int b = 0; b < B; b++) {
                const float *yb = y + (int64_t)b * 2 * ffn;
                silu_mul(yb, yb + ffn, ffn, xn + (int64_t)b * ffn);
            }
            gemm(m->w2[l], ffn, xn, B, xf, y, dim, dim);
            #pragma omp for schedule(static)
            for (int b = 0; b < B; b++) add_residual(st->x + (int64_t)b * dim, y + (int64_t)b * dim, dim);
        }
        #pragma omp for schedule(static)
        for (int b = 0; b < B; b++) rms_norm(st->x + (int64_t)b * dim, m->norm, dim, m->eps, xn + (int64_t)b * dim);
        gemm(m->output, dim, xn, B, xf, y, m->vocab, m->vocab);
        #pragma omp for schedule(static)
        for (int b = 0; b < B; b++) {
            for (int i = 0; i < m->vocab; i += 16) {
                __mmask16 mk = tail16(m->vocab - i);
                store16(st->logits + (int64_t)b * m->vocab + i, _mm512_maskz_loadu_ps(mk, y + (int64_t)b * m->vocab + i), mk);
            }
        }
        if (use_amx) _tile_release();
    }
    free(xn); free(y); free(att); free(q); free(work);
    return 0;
}
