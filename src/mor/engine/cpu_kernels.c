/* CPU decode kernels of the mor engine (issue 17); built and loaded by mor/engine/kernels.py.
 *
 * fp32 activations, K/V and norms; matrix weights (`wt`) in fp32 (0), bf16 (1: the opt-in
 * "bf16-weights" decode, each weight widened exactly to fp32) or int8 (2: weight-only int8,
 * y[o] = scale[o] * <x, q_o>, the opt-in "int8" decode), read at 4, 2 or 1 bytes each. Every output element is computed by the same sequence of operations whatever
 * the number of rows M, the tile it falls in and the number of threads: a token's result does
 * not depend on the batch it runs in (bit-exact "batch == alone").
 *
 * The vector type is GCC's generic vector extension (16 floats); with -march=native it
 * compiles to AVX-512 here, to pairs of AVX2 registers or NEON quads elsewhere.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define VW 16
typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4))); /* unaligned access */

static inline vf vload(const float *p) { return *(const vfu *)p; }

typedef uint16_t vh __attribute__((vector_size(VW * 2), aligned(2)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));

/* VW bf16 values widened to fp32 (exact: bf16 is the top half of an fp32) */
static inline vf vload_bf16(const uint16_t *p) {
    vu u = __builtin_convertvector(*(const vh *)p, vu) << 16;
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

typedef int8_t vq __attribute__((vector_size(VW), aligned(1)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

/* VW int8 values as fp32 (exact). GCC scalarises the generic int8 -> int32 conversion, so
 * x86 gets its sign-extension instruction. */
static inline vf widen_int8(const int8_t *p) {
#if defined(__AVX512F__)
    __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    vf v;
    memcpy(&v, &f, sizeof v);
    return v;
#elif defined(__AVX2__)
    __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))));
    vf v;
    memcpy(&v, &lo, sizeof lo);
    memcpy((char *)&v + sizeof lo, &hi, sizeof hi);
    return v;
#else
    return __builtin_convertvector(__builtin_convertvector(*(const vq *)p, vi), vf);
#endif
}

/* element i of a weight matrix stored as fp32 (wt = 0), bf16 (1) or int8 (2) */
static inline float wget(const void *w, int64_t i, int wt) {
    return wt == 2 ? (float)((const int8_t *)w)[i] : wt ? bf16_to_f32(((const uint16_t *)w)[i]) : ((const float *)w)[i];
}
static inline vf wload(const void *w, int64_t i, int wt) {
    if (wt == 2) return widen_int8((const int8_t *)w + i);
    return wt ? vload_bf16((const uint16_t *)w + i) : vload((const float *)w + i);
}
static inline const void *wrow(const void *W, int64_t o, int64_t I, int wt) {
    return (const char *)W + o * I * (wt == 2 ? 1 : wt ? 2 : 4);
}

/* fixed-order horizontal sum: halves, then quarters, ... (the same everywhere) */
static inline float hsum(vf v) {
    typedef float v8 __attribute__((vector_size(32)));
#if defined(__clang__) || __GNUC__ >= 12
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    float q0 = a[0] + a[4], q1 = a[1] + a[5], q2 = a[2] + a[6], q3 = a[3] + a[7];
#else /* no __builtin_shufflevector before GCC 12: the same sums through memory (slower) */
    float t[VW], u[8];
    v8 a, hi;
    memcpy(t, &v, sizeof t);
    memcpy(&a, t, sizeof a);
    memcpy(&hi, t + 8, sizeof hi);
    a += hi;
    memcpy(u, &a, sizeof u);
    float q0 = u[0] + u[4], q1 = u[1] + u[5], q2 = u[2] + u[6], q3 = u[3] + u[7];
#endif
    return (q0 + q2) + (q1 + q3);
}

#define AI __attribute__((always_inline))
#if defined(__clang__) || __GNUC__ >= 12
#define BATCHED_HSUM 1
/* r[j] = hsum(v[j]) for 16 vectors at once: the same additions in the same grouping as hsum
 * (so bit-identical, NaN payloads aside), done across vectors with two-input shuffles: about
 * 3 instructions per sum instead of 8. */
static inline AI void hsum16(const vf *v, float *r) {
    vf s[8], u[4], w[2];
    for (int j = 0; j < 8; j++) /* a = lo half + hi half, two vectors per result */
        s[j] = __builtin_shufflevector(v[2 * j], v[2 * j + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(v[2 * j], v[2 * j + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int j = 0; j < 4; j++) /* q_i = a_i + a_(i+4) */
        u[j] = __builtin_shufflevector(s[2 * j], s[2 * j + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               __builtin_shufflevector(s[2 * j], s[2 * j + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int j = 0; j < 2; j++) /* q0 + q2, q1 + q3 */
        w[j] = __builtin_shufflevector(u[2 * j], u[2 * j + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               __builtin_shufflevector(u[2 * j], u[2 * j + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    vf t = __builtin_shufflevector(w[0], w[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           __builtin_shufflevector(w[0], w[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    memcpy(r, &t, sizeof t);
}
#else
#define BATCHED_HSUM 0
#endif

#define MAXMT 6 /* rows of x per tile: 6 x 4 accumulators + 4 weight vectors fit 32 registers */
#define PF_ROWS 4 /* weight rows prefetched ahead of the tile being computed ... */
#define TILE_PAD (((MAXMT * 4 + 15) / 16) * 16) /* a tile's outputs, rounded up to whole groups of 16 */
_Static_assert(TILE_PAD % VW == 0, "vsilu reads a tile's products in whole vectors");
#define PF_AHEAD 8 /* ... starting this many rows ahead */

/* out[a * 4 + b] = <x_a, w_b> for MT (<= MAXMT) rows of x (stride ldx) and OT (<= 4) rows of W
 * (stride I), I elements each. Each dot product is one vector accumulator over VW-element
 * chunks, a fixed-order horizontal sum and a scalar tail: the same operations for every
 * element whatever MT and OT (which only decide how many loads are shared). */
static inline AI void tile(const float *x, int64_t ldx, const void *w, int64_t I, int MT, int OT, int wbf,
                           float *out, const char *pf, int64_t pf_row) {
    vf acc[MAXMT][4];
    for (int a = 0; a < MT; a++)
        for (int b = 0; b < OT; b++) acc[a][b] = (vf){0};
    int64_t i = 0;
    for (; i + VW <= I; i += VW) {
        vf wv[4], xv[MAXMT];
        if (pf && i * 4 < pf_row) /* one cache line per prefetched row per step (see products_part) */
            for (int b = 0; b < PF_ROWS; b++) __builtin_prefetch(pf + b * pf_row + i * 4, 0, 3);
        for (int b = 0; b < OT; b++) wv[b] = wload(w, b * I + i, wbf);
        for (int a = 0; a < MT; a++) xv[a] = vload(x + a * ldx + i);
        for (int a = 0; a < MT; a++)
            for (int b = 0; b < OT; b++) acc[a][b] += xv[a] * wv[b];
    }
    float sums[TILE_PAD];
#if BATCHED_HSUM
    if (MT * OT >= 8) { /* the tile's sums 16 at a time (zeros pad the last 16) */
        vf v[TILE_PAD];
        int n = 0;
        for (int a = 0; a < MT; a++)
            for (int b = 0; b < OT; b++) v[n++] = acc[a][b];
        for (; n % 16; n++) v[n] = (vf){0};
        for (int c = 0; c < n; c += 16) hsum16(v + c, sums + c);
    } else
#endif
    {
        for (int a = 0; a < MT; a++)
            for (int b = 0; b < OT; b++) sums[a * OT + b] = hsum(acc[a][b]);
    }
    for (int a = 0; a < MT; a++)
        for (int b = 0; b < OT; b++) {
            float s = sums[a * OT + b];
            for (int64_t k = i; k < I; k++) s += x[a * ldx + k] * wget(w, b * I + k, wbf);
            out[a * 4 + b] = s;
        }
}

/* t[a * 4 + b] = <x_{m+a}, w_b> for the mt rows of x from row m and ot (1 or 4) rows of W:
 * one specialised tile per (weight type, ot, mt), the constants known at compile time */
#define TILE_MT(WT, OT)                                                                            \
    switch (mt) {                                                                                  \
    case 6: tile(xm, I, w, I, 6, OT, WT, t, pf, pf_row); break;                                    \
    case 5: tile(xm, I, w, I, 5, OT, WT, t, pf, pf_row); break;                                    \
    case 4: tile(xm, I, w, I, 4, OT, WT, t, pf, pf_row); break;                                    \
    case 3: tile(xm, I, w, I, 3, OT, WT, t, pf, pf_row); break;                                    \
    case 2: tile(xm, I, w, I, 2, OT, WT, t, pf, pf_row); break;                                    \
    default: tile(xm, I, w, I, 1, OT, WT, t, pf, pf_row); break;                                   \
    }
#define TILE_OT(WT)                                                                                \
    if (ot == 4) {                                                                                 \
        TILE_MT(WT, 4)                                                                             \
    } else {                                                                                       \
        TILE_MT(WT, 1)                                                                             \
    }
static inline AI void tile_rows(const float *x, int64_t I, const void *w, int wbf, int64_t m, int mt, int ot,
                                float *t, const char *pf, int64_t pf_row) {
    const float *xm = x + m * I;
    if (wbf == 2) {
        TILE_OT(2)
    } else if (wbf) {
        TILE_OT(1)
    } else {
        TILE_OT(0)
    }
}

/* the rows of the a-th of the tiles that cover M rows of x: ceil(M / MAXMT) tiles of near-equal
 * size (13 rows: 5 + 4 + 4, not 6 + 6 + 1) */
static inline void row_tile(int64_t M, int64_t a, int64_t *m0, int *mt) {
    int64_t n = (M + MAXMT - 1) / MAXMT, base = M / n, extra = M % n;
    *m0 = a * base + (a < extra ? a : extra);
    *mt = (int)(base + (a < extra ? 1 : 0));
}

/* weight rows per tile: one at a time for 1-2 rows of x (a matrix-vector product: one stream
 * through memory), four for more (each x load shared by four weight rows) */
static inline int out_tile(int64_t M, int64_t left) { return M > 2 && left >= 4 ? 4 : 1; }

/* the [lo, hi) share of n items for thread `id` of `nt`, in units of `unit` */
static inline void share(int64_t n, int64_t unit, int id, int nt, int64_t *lo, int64_t *hi) {
    int64_t units = (n + unit - 1) / unit, per = units / nt, extra = units % nt;
    int64_t u0 = id * per + (id < extra ? id : extra), u1 = u0 + per + (id < extra ? 1 : 0);
    *lo = u0 * unit < n ? u0 * unit : n;
    *hi = u1 * unit < n ? u1 * unit : n;
}

#ifdef _OPENMP
#include <omp.h>
#define DO_PRAGMA(x) _Pragma(#x)
#define PARALLEL(n) DO_PRAGMA(omp parallel num_threads(n) if ((n) > 1))
#define THREAD_ID() omp_get_thread_num()
#define THREADS() omp_get_num_threads()
#else
#define PARALLEL(nt)
#define THREAD_ID() 0
#define THREADS() 1
#endif

/* e^x for x <= 0, 16 lanes at a time (Cephes' expf polynomial after x = n ln2 + r; relative
 * error ~2e-7); 0 below -87 (e^-87 is near the smallest normal float), and for -inf. */
static inline vf vexp_le0(vf x) {
    const vf z = {0}, lo = z - 87.0f;
    vi under = x < lo;
    x = (vf)(((vi)x & ~under) | ((vi)lo & under));
    vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
    vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vf p = z + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    vf e = p * r * r + r + 1.0f;
    vi scale = (__builtin_convertvector(n, vi) + 127) << 23;
    return (vf)((vi)(e * (vf)scale) & ~under);
}

/* silu(g) = g sigmoid(g) on VW lanes, with e = e^-|g| <= 1 (no overflow): sigmoid is 1 / (1 + e)
 * for g >= 0 and e / (1 + e) below. Elementwise, so a value's result does not depend on its lane. */
static inline vf vsilu(vf g) {
    const vf z = {0}, one = z + 1.0f;
    vi neg = g < z;
    const vi sign = (vi){0} + INT32_MIN;
    vf e = vexp_le0((vf)((vi)g | sign)); /* -|g| */
    vf num = (vf)(((vi)e & neg) | ((vi)one & ~neg));
    return g * num / (one + e);
}

/* outputs [lo, hi) of y (M, O) = [residual +] x (M, I) @ W (O, I)^T, or with a second matrix
 * W2: silu(x @ W^T) * (x @ W2^T) (the gated MLP's first half). int8 weights are scaled per
 * output row by s / s2. For each tile of weight rows (read once from memory), every tile of
 * up to MAXMT rows of x. */
static void products_part(const float *x, int64_t M, int64_t I, const void *W, const void *W2, int wbf,
                          const float *s, const float *s2, int64_t O, float *y, const float *residual, int64_t lo,
                          int64_t hi) {
    float g[TILE_PAD] = {0}, u[TILE_PAD]; /* a tile's MAXMT x 4 products (g: whole vectors for vsilu) */
    int64_t ntiles = (M + MAXMT - 1) / MAXMT;
    int64_t row_bytes = (const char *)wrow(W, 1, I, wbf) - (const char *)W;
    for (int64_t o = lo; o < hi;) {
        int ot = out_tile(M, hi - o);
        /* Weights come from memory once per call: with 3 or more rows of x (tiles of 4 weight
         * rows), the first row tile prefetches the PF_ROWS rows PF_AHEAD rows ahead, so that
         * their memory latency overlaps this tile's arithmetic. A matrix-vector product (one
         * sequential stream) is left to the hardware prefetcher. */
        int64_t ahead = o + PF_AHEAD;
        int pf_now = M > 2 && ahead + PF_ROWS <= hi;
        for (int64_t r = 0; r < ntiles; r++) {
            int64_t m;
            int mt;
            row_tile(M, r, &m, &mt);
            int pfr = pf_now && r == 0;
            tile_rows(x, I, wrow(W, o, I, wbf), wbf, m, mt, ot, g, pfr ? (const char *)wrow(W, ahead, I, wbf) : 0,
                      row_bytes);
            if (W2)
                tile_rows(x, I, wrow(W2, o, I, wbf), wbf, m, mt, ot, u,
                          pfr ? (const char *)wrow(W2, ahead, I, wbf) : 0, row_bytes);
            if (W2) { /* the gate's scale, then SiLU on the vectors holding the tile's values */
                if (s)
                    for (int a = 0; a < mt; a++)
                        for (int b = 0; b < ot; b++) g[a * 4 + b] *= s[o + b];
                for (int c = 0; c < (mt - 1) * 4 + ot; c += VW) {
                    vf v = vsilu(vload(g + c));
                    memcpy(g + c, &v, sizeof v);
                }
            }
            for (int a = 0; a < mt; a++)
                for (int b = 0; b < ot; b++) {
                    int64_t k = (m + a) * O + o + b;
                    float v = g[a * 4 + b];
                    if (W2)
                        v *= s2 ? s2[o + b] * u[a * 4 + b] : u[a * 4 + b];
                    else if (s)
                        v = s[o + b] * v;
                    y[k] = residual ? residual[k] + v : v;
                }
        }
        o += ot;
    }
}

static inline void linear_part(const float *x, int64_t M, int64_t I, const void *W, int wbf, const float *scale,
                               int64_t O, float *y, const float *residual, int64_t lo, int64_t hi) {
    products_part(x, M, I, W, 0, wbf, scale, 0, O, y, residual, lo, hi);
}

static inline void silu_mul_part(const float *x, int64_t M, int64_t I, const void *Wg, const void *Wu, int wbf,
                                 const float *sg, const float *su, int64_t O, float *y, int64_t lo, int64_t hi) {
    products_part(x, M, I, Wg, Wu, wbf, sg, su, O, y, 0, lo, hi);
}

/* rows [lo, hi) of y (M, D) = w * (x * rsqrt(mean(x^2) + eps)), the model's RMSNorm in fp32 */
static void rms_norm_rows(const float *x, int64_t D, const float *w, float eps, float *y, int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; m++) {
        const float *xm = x + m * D;
        vf acc = (vf){0};
        int64_t i = 0;
        for (; i + VW <= D; i += VW) {
            vf v = vload(xm + i);
            acc += v * v;
        }
        float s = hsum(acc);
        for (; i < D; i++) s += xm[i] * xm[i];
        float r = 1.0f / sqrtf(s / (float)D + eps);
        for (int64_t k = 0; k < D; k++) y[m * D + k] = w[k] * (xm[k] * r);
    }
}

/* rotary embedding in place on row m of x (M, heads, hd) with that row's cos/sin (hd,):
 * x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[hd/2:], x[:hd/2]) */
static void rope_row(float *x, int64_t heads, int64_t hd, const float *c, const float *s) {
    int64_t h2 = hd / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * hd;
        for (int64_t i = 0; i < h2; i++) {
            float a = v[i], b = v[i + h2];
            v[i] = a * c[i] + (-b) * s[i];
            v[i + h2] = b * c[i + h2] + a * s[i + h2];
        }
    }
}

/* Decode attention of query p = m * H + h (row m, head h) over a paged cache.
 * q (H, hd) of row m; caches (blocks, bs, KV, hd); the row reads keys 0..n-1 of its sequence,
 * key t living in block blocks[(t / bs) * sb] at offset t % bs; head h reads KV head g.
 * out (hd,) = softmax(q k^T * scale) v, block by block with a running maximum. */
static void attend_one(const float *qv, int64_t g, int64_t KV, int64_t hd, const float *kc, const float *vc,
                       int64_t bs, const int64_t *blocks, int64_t sb, int64_t n, float scale, float *out) {
    float sc[256 + VW], acc[512];
    float mx = -INFINITY, l = 0.0f;
    int64_t row = KV * hd; /* floats from one key's head g to the next key's */
    for (int64_t i = 0; i < hd; i++) acc[i] = 0.0f;
    for (int64_t b0 = 0; b0 < n; b0 += bs) {
        int64_t blk = blocks[(b0 / bs) * sb];
        int64_t cnt = n - b0 < bs ? n - b0 : bs;
        if (b0 + bs < n) { /* the next block's keys and values: scattered in the pool, so fetched ahead */
            int64_t nxt = blocks[(b0 / bs + 1) * sb], ncnt = n - b0 - bs < bs ? n - b0 - bs : bs;
            ncnt = ncnt < 32 ? ncnt : 32; /* the first keys; the hardware follows the rest */
            for (int64_t t = 0; t < ncnt; t++)
                for (int64_t i = 0; i < hd; i += 16) {
                    __builtin_prefetch(kc + (nxt * bs + t) * row + g * hd + i, 0, 3);
                    __builtin_prefetch(vc + (nxt * bs + t) * row + g * hd + i, 0, 3);
                }
        }
        const float *kb = kc + blk * bs * row + g * hd, *vb = vc + blk * bs * row + g * hd;
        int64_t t = 0;
#if BATCHED_HSUM
        for (; t + 8 <= cnt; t += 16) { /* 8-16 keys' dot products, reduced together (as hsum) */
            int nk = cnt - t < 16 ? (int)(cnt - t) : 16;
            vf a[16];
            for (int j = 0; j < 16; j++) a[j] = (vf){0};
            int64_t i = 0;
            for (; i + VW <= hd; i += VW) {
                vf qi = vload(qv + i);
                for (int j = 0; j < nk; j++) a[j] += qi * vload(kb + (t + j) * row + i);
            }
            hsum16(a, sc + t);
            for (int j = 0; j < nk; j++) {
                float s = sc[t + j];
                for (int64_t k = i; k < hd; k++) s += qv[k] * kb[(t + j) * row + k];
                sc[t + j] = s * scale;
            }
        }
#endif
        for (; t < cnt; t++) {
            const float *kv = kb + t * row;
            vf a = (vf){0};
            int64_t i = 0;
            for (; i + VW <= hd; i += VW) a += vload(qv + i) * vload(kv + i);
            float s = hsum(a);
            for (; i < hd; i++) s += qv[i] * kv[i];
            sc[t] = s * scale;
        }
        float bmx = -INFINITY;
        for (t = 0; t < cnt; t++) bmx = sc[t] > bmx ? sc[t] : bmx;
        float nmx = bmx > mx ? bmx : mx;
        float corr = expf(mx - nmx); /* 0 on the first block (mx = -inf) */
        l *= corr;
        for (int64_t i = 0; i < hd; i++) acc[i] *= corr;
        for (t = cnt; t < cnt + VW; t++) sc[t] = -INFINITY; /* lanes past cnt: weight 0 */
        vf lsum = (vf){0};
        for (t = 0; t < cnt; t += VW) { /* the weights e^(s - max), VW at a time, and their sum */
            vf e = vexp_le0(vload(sc + t) - nmx);
            lsum += e;
            memcpy(sc + t, &e, sizeof e);
        }
        l += hsum(lsum);
        /* acc += e_t v_t over the block's keys in order, 4 vectors of acc held in registers */
        int64_t i0 = 0;
        for (; i0 + 4 * VW <= hd; i0 += 4 * VW) {
            vf a0 = vload(acc + i0), a1 = vload(acc + i0 + VW), a2 = vload(acc + i0 + 2 * VW),
               a3 = vload(acc + i0 + 3 * VW);
            for (t = 0; t < cnt; t++) {
                const float *vv = vb + t * row + i0;
                vf e = (vf){0} + sc[t];
                a0 += e * vload(vv);
                a1 += e * vload(vv + VW);
                a2 += e * vload(vv + 2 * VW);
                a3 += e * vload(vv + 3 * VW);
            }
            memcpy(acc + i0, &a0, sizeof a0);
            memcpy(acc + i0 + VW, &a1, sizeof a1);
            memcpy(acc + i0 + 2 * VW, &a2, sizeof a2);
            memcpy(acc + i0 + 3 * VW, &a3, sizeof a3);
        }
        for (t = 0; t < cnt && i0 < hd; t++) {
            const float *vv = vb + t * row;
            for (int64_t i = i0; i < hd; i++) acc[i] += sc[t] * vv[i];
        }
        mx = nmx;
    }
    float inv = 1.0f / l;
    for (int64_t i = 0; i < hd; i++) out[i] = acc[i] * inv;
}

/* ------------------------------------------------------------------ profiling counters */
/* seconds per phase, accumulated while profiling is on (mor_profile): the phases of
 * each layer of mor_decode_layers (measured by thread 0 after each barrier, so a phase includes waiting for
 * the slowest thread) and mor_linear calls. Names in kernels.py PROFILE_PHASES. */
#define NPHASE 9
static double prof_s[NPHASE];
static int prof_on = 0;

static inline double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#define TICK(phase)                                                                                \
    if (prof_on && t == 0) {                                                                      \
        double n_ = now_s();                                                                      \
        prof_s[phase] += n_ - mark;                                                               \
        mark = n_;                                                                                \
    }

void mor_profile(int on) { prof_on = on; }

/* copy the counters to out (NPHASE doubles) and reset them */
void mor_profile_take(double *out) {
    for (int i = 0; i < NPHASE; i++) {
        out[i] = prof_s[i];
        prof_s[i] = 0.0;
    }
}

/* ------------------------------------------------------------------ exported kernels */

/* y (M, O) = [residual +] x (M, I) @ W (O, I)^T; output columns split across nt threads */
void mor_linear(const float *x, int64_t M, int64_t I, const void *W, int wbf, const float *scale, int64_t O,
                float *y, const float *residual, int nt) {
    double t0 = prof_on ? now_s() : 0.0;
    PARALLEL(nt) {
        int64_t lo, hi;
        share(O, 8, THREAD_ID(), THREADS(), &lo, &hi);
        linear_part(x, M, I, W, wbf, scale, O, y, residual, lo, hi);
    }
    if (prof_on) prof_s[8] += now_s() - t0;
}

/* y (M, O) = silu(x @ Wg^T) * (x @ Wu^T): the gated MLP's first half in one pass */
void mor_linear_silu_mul(const float *x, int64_t M, int64_t I, const void *Wg, const void *Wu, int wbf,
                         const float *sg, const float *su, int64_t O, float *y, int nt) {
    PARALLEL(nt) {
        int64_t lo, hi;
        share(O, 8, THREAD_ID(), THREADS(), &lo, &hi);
        silu_mul_part(x, M, I, Wg, Wu, wbf, sg, su, O, y, lo, hi);
    }
}

void mor_rms_norm(const float *x, int64_t M, int64_t D, const float *w, float eps, float *y) {
    rms_norm_rows(x, D, w, eps, y, 0, M);
}

/* rotary embedding in place on x (M, heads, hd) with per-row cos/sin (M, hd) */
void mor_rope(float *x, int64_t M, int64_t heads, int64_t hd, const float *cos, const float *sin) {
    for (int64_t m = 0; m < M; m++) rope_row(x + m * heads * hd, heads, hd, cos + m * hd, sin + m * hd);
}

/* store K/V rows (N, width) at physical rows rows[n] of the caches (rows of `width` floats) */
void mor_kv_write(const float *k, const float *v, int64_t N, int64_t width, const int64_t *rows, float *kc,
                  float *vc) {
    for (int64_t n = 0; n < N; n++) {
        memcpy(kc + rows[n] * width, k + n * width, width * sizeof(float));
        memcpy(vc + rows[n] * width, v + n * width, width * sizeof(float));
    }
}

/* Decode attention over a paged cache, one query per row: q (M, H, hd); row m attends to its
 * keys 0..qidx[m], key t in block blocks[m * sm + (t / bs) * sb]; head h reads KV head
 * h / (H / KV); out (M, H, hd). bs <= 256, hd <= 512. */
void mor_paged_attention(const float *q, int64_t M, int64_t H, int64_t KV, int64_t hd, const float *kc,
                         const float *vc, int64_t bs, const int64_t *blocks, int64_t sm, int64_t sb,
                         const int64_t *qidx, float scale, float *out, int nt) {
    PARALLEL(nt) {
        int64_t lo, hi;
        share(M * H, 1, THREAD_ID(), THREADS(), &lo, &hi);
        for (int64_t p = lo; p < hi; p++) {
            int64_t m = p / H, h = p % H;
            attend_one(q + p * hd, h / (H / KV), KV, hd, kc, vc, bs, blocks + m * sm, sb, qidx[m] + 1, scale,
                       out + p * hd);
        }
    }
}

/* One decoder layer for one token per row (the engine's decode step), run by thread t of T
 * inside a parallel region (a barrier between phases, and one at the end):
 *   a = rms(x); q = rope(a Wq^T); k = rope(a Wk^T), v = a Wv^T for the first n_write rows,
 *   stored at cache rows rows[m * rstride]; o = attention(q, cache); h = x + o Wo^T;
 *   out = h + (silu(rms(h) Wg^T) * (rms(h) Wu^T)) Wd^T.
 * The layer's weights: a LAYER_ROW entry of int64 [ln1, ln2, Wq, Wk, Wv, Wo, Wg, Wu, Wd (addresses),
 * scales (address of the 7 per-output-row fp32 int8 scales' addresses, or 0), weight type
 * (0 fp32, 1 bf16, 2 int8), the RMSNorm epsilon's fp32 bits]. x, out (M, D); cos, sin (M, hd).
 * Attention segments: seg (nseg, 6) int64 rows [a, b, blocks address, sm, sb, qidx address]:
 * rows [a, b) read layer `j` of their block tables (int64 at blocks + i * sm + t * sb + j, i the
 * row within the segment) up to their qidx. Scratch: work (M * (2 D + (H + 2 KV) hd + H hd + F)). */
#define LAYER_ROW 12
static void layer_phases(const float *x, float *out, int64_t M, int64_t D, const int64_t *lw, int64_t F, int64_t H,
                         int64_t KV, int64_t hd, const float *cos, const float *sin, int64_t n_write,
                         const int64_t *rows, int64_t rstride, float *kc, float *vc, int64_t bs, const int64_t *seg,
                         int64_t nseg, int64_t j, float *work, int t, int T, double *markp) {
    int64_t Oq = H * hd, Ok = KV * hd;
    float *a = work, *q = a + M * D, *k = q + M * Oq, *v = k + M * Ok, *o = v + M * Ok, *h = o + M * Oq,
          *g = h + M * D;
    const float *ln1 = (const float *)(intptr_t)lw[0], *ln2 = (const float *)(intptr_t)lw[1];
#define W(i) ((const void *)(intptr_t)lw[2 + (i)])
    const int64_t *scales = (const int64_t *)(intptr_t)lw[9];
    int wbf = (int)lw[10];
    int32_t eps_bits = (int32_t)lw[11];
    float eps;
    memcpy(&eps, &eps_bits, sizeof eps);
    float scale = 1.0f / sqrtf((float)hd);
#define S(i) (scales ? (const float *)(intptr_t)scales[i] : (const float *)0)
    double mark = *markp;
    int64_t lo, hi;
    share(M, 1, t, T, &lo, &hi);
    rms_norm_rows(x, D, ln1, eps, a, lo, hi);
#pragma omp barrier
    TICK(0)
    /* q, k, v as one output range [0, Oq + 2 Ok) */
    share(Oq + 2 * Ok, 8, t, T, &lo, &hi);
    if (lo < Oq) linear_part(a, M, D, W(0), wbf, S(0), Oq, q, 0, lo, hi < Oq ? hi : Oq);
    if (n_write) {
        int64_t l1 = lo > Oq ? lo - Oq : 0, h1 = hi - Oq < Ok ? hi - Oq : Ok;
        if (l1 < h1) linear_part(a, n_write, D, W(1), wbf, S(1), Ok, k, 0, l1, h1);
        int64_t l2 = lo > Oq + Ok ? lo - Oq - Ok : 0, h2 = hi - Oq - Ok;
        if (l2 < h2) linear_part(a, n_write, D, W(2), wbf, S(2), Ok, v, 0, l2, h2);
    }
#pragma omp barrier
    TICK(1)
    share(M, 1, t, T, &lo, &hi);
    for (int64_t m = lo; m < hi; m++) {
        rope_row(q + m * Oq, H, hd, cos + m * hd, sin + m * hd);
        if (m < n_write) {
            rope_row(k + m * Ok, KV, hd, cos + m * hd, sin + m * hd);
            memcpy(kc + rows[m * rstride] * Ok, k + m * Ok, Ok * sizeof(float));
            memcpy(vc + rows[m * rstride] * Ok, v + m * Ok, Ok * sizeof(float));
        }
    }
#pragma omp barrier
    TICK(2)
    share(M * H, 1, t, T, &lo, &hi);
    int64_t s = 0; /* rows only grow along p: the segment cursor only moves forward */
    for (int64_t p = lo; p < hi; p++) {
        int64_t m = p / H, hh = p % H;
        while (s + 1 < nseg && m >= seg[s * 6 + 1]) s++;
        const int64_t *sg = seg + s * 6;
        const int64_t *blocks = (const int64_t *)(intptr_t)sg[2] + (m - sg[0]) * sg[3] + j;
        const int64_t *qidx = (const int64_t *)(intptr_t)sg[5];
        attend_one(q + p * hd, hh / (H / KV), KV, hd, kc, vc, bs, blocks, sg[4], qidx[m - sg[0]] + 1, scale,
                   o + p * hd);
    }
#pragma omp barrier
    TICK(3)
    share(D, 8, t, T, &lo, &hi);
    linear_part(o, M, Oq, W(3), wbf, S(3), D, h, x, lo, hi);
#pragma omp barrier
    TICK(4)
    share(M, 1, t, T, &lo, &hi);
    rms_norm_rows(h, D, ln2, eps, a, lo, hi);
#pragma omp barrier
    TICK(5)
    share(F, 8, t, T, &lo, &hi);
    silu_mul_part(a, M, D, W(4), W(5), wbf, S(4), S(5), F, g, lo, hi);
#pragma omp barrier
    TICK(6)
    share(D, 8, t, T, &lo, &hi);
    linear_part(g, M, F, W(6), wbf, S(6), D, out, h, lo, hi);
#pragma omp barrier
    TICK(7)
    *markp = mark;
#undef S
#undef W
}

/* nl consecutive decoder layers (layer_phases) in one parallel region: weights table (nl,
 * LAYER_ROW); layer l reads the previous layer's output (the first reads x) and the last
 * writes out (tmp (M, D) holds the others); layer l stores its new K/V at cache rows
 * rows[m * rstride + l] and reads layer j0 + l of the block tables. */
void mor_decode_layers(const int64_t *table, int64_t nl, const float *x, float *out, float *tmp, int64_t M,
                       int64_t D, int64_t F, int64_t H, int64_t KV, int64_t hd, const float *cos, const float *sin,
                       int64_t n_write, const int64_t *rows, int64_t rstride, float *kc, float *vc, int64_t bs,
                       const int64_t *seg, int64_t nseg, int64_t j0, float *work, int nt) {
    double mark0 = prof_on ? now_s() : 0.0;
    PARALLEL(nt) {
        int t = THREAD_ID(), T = THREADS();
        double mark = mark0;
        const float *in = x;
        for (int64_t l = 0; l < nl; l++) {
            float *dst = (nl - 1 - l) % 2 == 0 ? out : tmp;
            layer_phases(in, dst, M, D, table + l * LAYER_ROW, F, H, KV, hd, cos, sin, n_write,
                         n_write ? rows + l : 0, rstride, kc, vc, bs, seg, nseg, j0 + l, work, t, T, &mark);
            in = dst;
        }
    }
}

/* The engine's decode calls (enter / recurse / finish): nl decoder layers (mor_decode_layers)
 * on one token per row, with the gathers, the cache addressing and the residual update done
 * here instead of by the caller. Row m:
 *   input   x[m] if x, else embed[tokens[m]] if embed, else state[slots[m]] (state (S + 1, D));
 *   RoPE    rows pos[m] of the tables cos_tab / sin_tab (npos, hd);
 *   writes  (m < n_write) its K/V for layer l at entry widx[m] of cache group wgroup[m] of
 *           sequence slots[m]: physical row ptab[((wgroup[m] S + slots[m]) MB + widx[m] / bs) ML
 *           + j0 + l] bs + widx[m] % bs, ptab being the pool's block tables (G, S, MB, ML);
 *   reads   entries 0..qidx[m] of group rgroup[m] of its sequence (layer j0 + l);
 *   result  mode 0: out[m] = y; 1: state[slots[m]] = y; 2: state[slots[m]] = in[m] + gate[slots[m]] y
 *           (the expert-choice update h + g * block(h), g per slot).
 * Every index is checked before anything is read or written; returns 0, or the first failed
 * check: 1 slot, 2 position, 3 token, 4 write group / entry, 5 write into a block the sequence
 * does not own (a zero table entry: block 0 is reserved), 6 read group / query index.
 * Scratch: work, decode_rows_floats(M, nl) floats (below; the int64 part 8-byte aligned). */
static int64_t decode_rows_float_part(int64_t M, int64_t D, int64_t F, int64_t H, int64_t KV, int64_t hd) {
    int64_t n = M * (2 * D + (H + 2 * KV) * hd + H * hd + F) + M * (3 * D + 2 * hd);
    return n + (n & 1); /* even: the int64 part that follows stays 8-byte aligned */
}

int mor_decode_rows(const int64_t *table, int64_t nl, const float *x, const float *embed, const int64_t *tokens,
                    int64_t V, float *state, const int64_t *slots, int64_t M, int64_t D, int64_t F, int64_t H,
                    int64_t KV, int64_t hd, const float *cos_tab, const float *sin_tab, int64_t npos,
                    const int64_t *pos, const int64_t *ptab, int64_t G, int64_t S, int64_t MB, int64_t ML,
                    const int64_t *wgroup, const int64_t *widx, int64_t n_write, const int64_t *rgroup,
                    const int64_t *qidx, int64_t j0, float *kc, float *vc, int64_t bs, int mode, const float *gate,
                    float *out, float *work, int nt) {
    if (nl > 0 && (j0 < 0 || j0 + nl > ML)) return 7;
    for (int64_t m = 0; m < M; m++) {
        if (slots[m] < 0 || slots[m] >= S) return 1;
        if (pos[m] < 0 || pos[m] >= npos) return 2;
        if (!x && embed && (tokens[m] < 0 || tokens[m] >= V)) return 3;
        if (nl > 0 && m < n_write) {
            if (wgroup[m] < 0 || wgroup[m] >= G || widx[m] < 0 || widx[m] >= MB * bs) return 4;
            const int64_t *bt = ptab + ((wgroup[m] * S + slots[m]) * MB + widx[m] / bs) * ML + j0;
            for (int64_t l = 0; l < nl; l++)
                if (bt[l] == 0) return 5;
        }
        if (nl > 0 && (rgroup[m] < 0 || rgroup[m] >= G || qidx[m] < 0 || qidx[m] >= MB * bs)) return 6;
    }
    float *in = work + M * (2 * D + (H + 2 * KV) * hd + H * hd + F), *tmp = in + M * D, *y = tmp + M * D,
          *cs = y + M * D, *sn = cs + M * hd;
    int64_t *rows = (int64_t *)(work + decode_rows_float_part(M, D, F, H, KV, hd)), *seg = rows + M * (nl > 0 ? nl : 1);
    for (int64_t m = 0; m < M; m++) {
        const float *src = x ? x + m * D : embed ? embed + tokens[m] * D : state + slots[m] * D;
        memcpy(in + m * D, src, D * sizeof(float));
        memcpy(cs + m * hd, cos_tab + pos[m] * hd, hd * sizeof(float));
        memcpy(sn + m * hd, sin_tab + pos[m] * hd, hd * sizeof(float));
        if (nl > 0 && m < n_write) {
            const int64_t *bt = ptab + ((wgroup[m] * S + slots[m]) * MB + widx[m] / bs) * ML + j0;
            for (int64_t l = 0; l < nl; l++) rows[m * nl + l] = bt[l] * bs + widx[m] % bs;
        }
        int64_t *sg = seg + m * 6; /* one attention segment per row: its own block table */
        sg[0] = m;
        sg[1] = m + 1;
        sg[2] = nl > 0 ? (int64_t)(intptr_t)(ptab + (rgroup[m] * S + slots[m]) * MB * ML) : 0;
        sg[3] = 0;
        sg[4] = ML;
        sg[5] = (int64_t)(intptr_t)(qidx + m);
    }
    float *res = mode == 0 ? out : y;
    if (nl > 0)
        mor_decode_layers(table, nl, in, res, tmp, M, D, F, H, KV, hd, cs, sn, n_write, rows, nl, kc, vc, bs, seg, M,
                          j0, work, nt);
    else
        memcpy(res, in, M * D * sizeof(float));
    if (mode == 0) return 0;
    for (int64_t m = 0; m < M; m++) {
        float *dst = state + slots[m] * D;
        const float *ym = y + m * D, *hm = in + m * D;
        if (mode == 1) {
            memcpy(dst, ym, D * sizeof(float));
        } else {
            float g = gate[slots[m]];
            for (int64_t i = 0; i < D; i++) dst[i] = hm[i] + g * ym[i];
        }
    }
    return 0;
}

/* mor_decode_rows with its 37 arguments in one int64 array, in the order of its parameters
 * (pointers as addresses, 0 for NULL): one foreign call of one argument for a caller that keeps
 * the array filled between calls (kernels.DecodeRows: the fixed operands once, ~20 fields per
 * call). */
#define P(T, i) ((T)(intptr_t)a[i])
int mor_decode_rows_packed(const int64_t *a) {
    return mor_decode_rows(P(const int64_t *, 0), a[1], P(const float *, 2), P(const float *, 3),
                           P(const int64_t *, 4), a[5], P(float *, 6), P(const int64_t *, 7), a[8], a[9], a[10],
                           a[11], a[12], a[13], P(const float *, 14), P(const float *, 15), a[16],
                           P(const int64_t *, 17), P(const int64_t *, 18), a[19], a[20], a[21], a[22],
                           P(const int64_t *, 23), P(const int64_t *, 24), a[25], P(const int64_t *, 26),
                           P(const int64_t *, 27), a[28], P(float *, 29), P(float *, 30), a[31], (int)a[32],
                           P(const float *, 33), P(float *, 34), P(float *, 35), (int)a[36]);
}

/* Expert-choice routing for one token per row (linear routers, one output each): with h =
 * state[slots[m]] (state (S, D)) and router i's logit <h, W_i> + b_i (routers: R int64 rows
 * [address of W_i, fp32; address of b_i, one fp32, or 0 for no bias; the length of W_i]),
 *   decision[m] = logit of router dec_idx[m]   (the token continues iff > 0)
 *   gate[slots[m]] = alpha act(logit of router gate_idx[m])   (the main router's weight g; act:
 *                    func 1 sigmoid, 2 tanh, 3 softmax over one logit = 1; func 0: no gate)
 * Every row is summed in the same order whatever the batch (batch-independent). Every index
 * is checked before anything is read or written: returns 0, or 1 (a slot outside the state),
 * 2 (a router index outside the table) or 3 (a router whose length is not D). */
static inline float router_logit(const float *h, const int64_t *router, int64_t D) {
    const float *w = (const float *)(intptr_t)router[0], *b = (const float *)(intptr_t)router[1];
    vf acc = {0};
    int64_t i = 0;
    for (; i + VW <= D; i += VW) acc += vload(h + i) * vload(w + i);
    float sum = hsum(acc);
    for (; i < D; i++) sum += h[i] * w[i];
    return b ? sum + *b : sum;
}

int mor_route_rows(const float *state, int64_t S, const int64_t *slots, int64_t M, int64_t D,
                   const int64_t *routers, int64_t R, const int64_t *dec_idx, const int64_t *gate_idx, int func,
                   float alpha, float *decision, float *gate) {
    for (int64_t m = 0; m < M; m++) {
        if (slots[m] < 0 || slots[m] >= S) return 1;
        if (dec_idx[m] < 0 || dec_idx[m] >= R || gate_idx[m] < 0 || gate_idx[m] >= R) return 2;
        if (routers[3 * dec_idx[m] + 2] != D || routers[3 * gate_idx[m] + 2] != D) return 3;
    }
    for (int64_t m = 0; m < M; m++) {
        const float *h = state + slots[m] * D;
        float main = router_logit(h, routers + 3 * gate_idx[m], D);
        decision[m] = dec_idx[m] == gate_idx[m] ? main : router_logit(h, routers + 3 * dec_idx[m], D);
        if (func == 1) gate[slots[m]] = alpha / (1.0f + expf(-main));
        else if (func == 2) gate[slots[m]] = alpha * tanhf(main);
        else if (func == 3) gate[slots[m]] = alpha;
    }
    return 0;
}

/* mor_route_rows with its pointer and integer arguments in one int64 array, in the order of
 * its parameters (alpha apart): kernels.RouteRows. */
int mor_route_rows_packed(const int64_t *a, float alpha) {
    return mor_route_rows(P(const float *, 0), a[1], P(const int64_t *, 2), a[3], a[4], P(const int64_t *, 5), a[6],
                          P(const int64_t *, 7), P(const int64_t *, 8), (int)a[9], alpha, P(float *, 10),
                          P(float *, 11));
}
#undef P

/* ------------------------------------------------------------------ one decode step */
/* The engine's decode step on the kernels in one call (kernels.DecodeStep; runner.execute
 * without prefill): enter (embedding + prefix layers), decide, the shared block (once with the
 * depth schedule; until every token left with the sequence schedule), decide, and finish
 * (suffix layers, final RMSNorm, LM head) for the tokens that leave. The same calls on the same
 * rows in the same order as the runner's Python path (enter, decide, recurse, decide, finish),
 * so the results are bit-identical; only the host work between them moves here.
 *
 * dr: a DecodeRows argument array (its fixed operands: state, RoPE tables, block tables, K/V);
 * rr: a RouteRows argument array, or NULL where nothing is routed (vanilla, recursive); st:
 * the step's arguments, named in STEP_ARGS (kernels.DecodeStep checks the names). The block's
 * rows are the entering tokens that continue (recursion 0, by slot) then the running ones (by
 * recursion, then slot: recursions >= 1). Leaving tokens are finished in (depth, slot) order.
 * Returns 0, a decode_rows error code (1-6), 10 + a route_rows error code, 20 (a block call
 * whose cache writers are not its first rows), 21 (more tokens than the capacity) or 22 (a
 * slot outside the state, or a running recursion outside 0..num_recursions-1). 21 and 22 are
 * checked before anything is read or written; the others stop the step where they occur, after
 * the calls before it have updated states, caches and `written` (as the Python path would):
 * the engine does not continue after such an error. */
#define STEP_ARGS                                                                                     \
    "prefix,n_prefix,block,n_block,suffix,n_suffix,suffix_j0,num_recursions,rec_write,rec_read,"     \
    "needs_decision,full,block_mode,decision_offset,lens,written,num_slots,embed,vocab_in,gate,"     \
    "norm_w,lm_head,lm_type,vocab,sequence,tokens,positions,n_enter,enter,n_run,run,run_recs,"      \
    "capacity,iwork,fwork,dwork,logits,exit_slots,exit_depths,next_slots,next_recs,block_recs,"     \
    "pass_rows,counts,phases,threads"
enum {
    S_PREFIX, S_NPREFIX, S_BLOCK, S_NBLOCK, S_SUFFIX, S_NSUFFIX, S_SUFFIX_J0, S_NR, S_REC_WRITE, S_REC_READ,
    S_NEEDS, S_FULL, S_BLOCK_MODE, S_DEC_OFF, S_LENS, S_WRITTEN, S_NSLOTS, S_EMBED, S_VOCAB_IN, S_GATE,
    S_NORM_W, S_LM_HEAD, S_LM_TYPE, S_VOCAB, S_SEQUENCE, S_TOKENS, S_POSITIONS, S_NENTER, S_ENTER, S_NRUN,
    S_RUN, S_RUN_RECS, S_CAP, S_IWORK, S_FWORK, S_DWORK, S_LOGITS, S_EXIT_SLOTS, S_EXIT_DEPTHS,
    S_NEXT_SLOTS, S_NEXT_RECS, S_BLOCK_RECS, S_PASS_ROWS, S_COUNTS, S_PHASES, S_THREADS, S_NARGS
};

const char *mor_decode_step_args(void) { return STEP_ARGS; }
int64_t mor_decode_step_nargs(void) { return S_NARGS; }

/* one decode_rows call on the N tokens of ints (7, N), bound operands from dr */
static int step_decode(const int64_t *dr, const int64_t *st, int64_t table, int64_t nl, int64_t j0,
                       const int64_t *ints, int64_t N, int64_t n_write, int mode, int embed, float *out) {
    int64_t a[37];
    memcpy(a, dr, sizeof a);
    a[0] = table; a[1] = nl; a[2] = 0;
    a[3] = embed ? st[S_EMBED] : 0; a[5] = embed ? st[S_VOCAB_IN] : 0;
    a[4] = (int64_t)(intptr_t)(ints + 6 * N); a[7] = (int64_t)(intptr_t)ints; a[8] = N;
    a[17] = (int64_t)(intptr_t)(ints + N); a[23] = (int64_t)(intptr_t)(ints + 2 * N);
    a[24] = (int64_t)(intptr_t)(ints + 3 * N); a[25] = n_write; a[26] = (int64_t)(intptr_t)(ints + 4 * N);
    a[27] = (int64_t)(intptr_t)(ints + 5 * N); a[28] = j0; a[32] = mode; a[33] = mode == 2 ? st[S_GATE] : 0;
    a[34] = (int64_t)(intptr_t)out; a[35] = st[S_DWORK]; a[36] = st[S_THREADS];
    return N ? mor_decode_rows_packed(a) : 0;
}

/* go[m] = whether token m (having run recs[m] recursions) runs one more: recs[m] < nr and,
 * with routers (rr), its decision logit > 0 where the recursion needs a decision; routing sets
 * the slot's gate (as runner.decide) */
static int step_decide(const int64_t *rr, float alpha, const int64_t *st, int64_t n, const int64_t *slots,
                       const int64_t *recs, int64_t *go, int64_t *scratch, float *decision) {
    const int64_t nr = st[S_NR], off = st[S_DEC_OFF];
    const int64_t *needs = (const int64_t *)(intptr_t)st[S_NEEDS];
    int64_t *rs = scratch, *rd = rs + n, *rg = rd + n, *map = rg + n, k = 0;
    for (int64_t m = 0; m < n; m++) {
        go[m] = recs[m] < nr;
        if (go[m] && rr) { rs[k] = slots[m]; rd[k] = recs[m] + off; rg[k] = recs[m]; map[k++] = m; }
    }
    if (!k) return 0;
    int64_t a[12];
    memcpy(a, rr, sizeof a);
    a[2] = (int64_t)(intptr_t)rs; a[3] = k; a[7] = (int64_t)(intptr_t)rd; a[8] = (int64_t)(intptr_t)rg;
    a[10] = (int64_t)(intptr_t)decision;
    int err = mor_route_rows_packed(a, alpha);
    if (err) return 10 + err;
    for (int64_t i = 0; i < k; i++)
        if (needs[rg[i]]) go[map[i]] = decision[i] > 0.0f;
    return 0;
}

/* ints (7, N) for tokens of the full cache group (prefix / suffix layers): entry = position */
static void step_full_ints(int64_t *ints, int64_t N, const int64_t *slots, const int64_t *positions,
                           const int64_t *tokens, int64_t full) {
    for (int64_t m = 0; m < N; m++) {
        int64_t s = slots[m], p = positions[s];
        ints[m] = s; ints[N + m] = p;
        ints[2 * N + m] = ints[4 * N + m] = full >= 0 ? full : 0;
        ints[3 * N + m] = ints[5 * N + m] = p;
        ints[6 * N + m] = tokens ? tokens[s] : 0;
    }
}

int mor_decode_step(const int64_t *dr, const int64_t *rr, float alpha, float eps, const int64_t *st) {
#define SP(T, k) ((T)(intptr_t)st[k])
    const int64_t cap = st[S_CAP], nr = st[S_NR], full = st[S_FULL], S = st[S_NSLOTS], D = dr[9];
    const int64_t *tokens = SP(const int64_t *, S_TOKENS), *positions = SP(const int64_t *, S_POSITIONS);
    const int64_t *rec_write = SP(const int64_t *, S_REC_WRITE), *rec_read = SP(const int64_t *, S_REC_READ);
    const int64_t *lens = SP(const int64_t *, S_LENS);
    int64_t *written = SP(int64_t *, S_WRITTEN);
    int64_t *ints = SP(int64_t *, S_IWORK), *rows = ints + 7 * cap, *recs = rows + cap, *go = recs + cap,
            *scratch = go + cap, *ls = scratch + 4 * cap, *ld = ls + cap;
    /* 64-byte aligned pieces (the products' vector loads must not straddle cache lines) */
    const int64_t capr = (cap + 15) & ~(int64_t)15, yr = (cap * D + 15) & ~(int64_t)15;
    float *decision = SP(float *, S_FWORK), *y = decision + capr, *yn = y + yr;
    int64_t *block_recs = SP(int64_t *, S_BLOCK_RECS), *pass_rows = SP(int64_t *, S_PASS_ROWS);
    double *phases = SP(double *, S_PHASES), t = phases ? now_s() : 0.0;
    const int64_t ne = st[S_NENTER], nrun = st[S_NRUN];
    const int64_t *enter = SP(const int64_t *, S_ENTER);
    int64_t n_exit = 0, nb = 0, n_pass = 0, n_block_recs = 0;
    int err;
    if (ne + nrun > cap) return 21;
    const int64_t *run = SP(const int64_t *, S_RUN), *run_recs = SP(const int64_t *, S_RUN_RECS);
    for (int64_t m = 0; m < ne; m++)
        if (enter[m] < 0 || enter[m] >= S) return 22;
    for (int64_t m = 0; m < nrun; m++)
        if (run[m] < 0 || run[m] >= S || run_recs[m] < 0 || run_recs[m] >= nr) return 22;
    /* enter: embedding + prefix layers, the result stored as the slot's state; then decide */
    if (ne) {
        step_full_ints(ints, ne, enter, positions, tokens, full);
        err = step_decode(dr, st, st[S_PREFIX], st[S_NPREFIX], 0, ints, ne, full >= 0 ? ne : 0, 1, 1, NULL);
        if (err) return err;
        if (full >= 0)
            for (int64_t m = 0; m < ne; m++) written[full * S + enter[m]] += 1;
        for (int64_t m = 0; m < ne; m++) recs[m] = 0;
        if (nr > 0) {
            err = step_decide(rr, alpha, st, ne, enter, recs, go, scratch, decision);
            if (err) return err;
        } else {
            for (int64_t m = 0; m < ne; m++) go[m] = 0;
        }
        for (int64_t m = 0; m < ne; m++) {
            if (go[m]) { rows[nb] = enter[m]; recs[nb++] = 0; }
            else { ls[n_exit] = enter[m]; ld[n_exit++] = 0; }
        }
    }
    for (int64_t m = 0; m < nrun; m++) { rows[nb] = run[m]; recs[nb++] = run_recs[m]; }
    if (phases) { double n = now_s(); phases[0] += n - t; t = n; }
    /* the shared block: one recursion for every row (each at its own depth), then decide */
    while (nb > 0) {
        int64_t n_write = 0;
        while (n_write < nb && rec_write[recs[n_write]] >= 0) n_write++;
        for (int64_t m = n_write; m < nb; m++)
            if (rec_write[recs[m]] >= 0) return 20;
        for (int64_t m = 0; m < nb; m++) {
            int64_t s = rows[m], r = recs[m], p = positions[s];
            ints[m] = s; ints[nb + m] = p; ints[4 * nb + m] = rec_read[r]; ints[6 * nb + m] = 0;
            if (m < n_write) {
                int64_t g = rec_write[r], e = lens[g * S + s] + written[g * S + s];
                ints[2 * nb + m] = g; ints[3 * nb + m] = ints[5 * nb + m] = e;
                written[g * S + s] += 1;
            } else {
                ints[2 * nb + m] = ints[3 * nb + m] = 0; ints[5 * nb + m] = p;
            }
            block_recs[n_block_recs + m] = r;
        }
        n_block_recs += nb;
        pass_rows[n_pass++] = nb;
        err = step_decode(dr, st, st[S_BLOCK], st[S_NBLOCK], 0, ints, nb, n_write, (int)st[S_BLOCK_MODE], 0, NULL);
        if (err) return err;
        for (int64_t m = 0; m < nb; m++) recs[m] += 1;
        err = step_decide(rr, alpha, st, nb, rows, recs, go, scratch, decision);
        if (err) return err;
        int64_t k = 0;
        for (int64_t m = 0; m < nb; m++) {
            if (go[m]) { rows[k] = rows[m]; recs[k++] = recs[m]; }
            else { ls[n_exit] = rows[m]; ld[n_exit++] = recs[m]; }
        }
        nb = k;
        if (!st[S_SEQUENCE]) break;
    }
    int64_t *next_slots = SP(int64_t *, S_NEXT_SLOTS), *next_recs = SP(int64_t *, S_NEXT_RECS);
    for (int64_t m = 0; m < nb; m++) { next_slots[m] = rows[m]; next_recs[m] = recs[m]; }
    if (phases && n_pass) { double n = now_s(); phases[1] += n - t; t = n; }
    /* the leaving tokens in (depth, slot) order (already so but for the rare merge) */
    for (int64_t i = 1; i < n_exit; i++) {
        int64_t s = ls[i], d = ld[i], j = i;
        while (j > 0 && (ld[j - 1] > d || (ld[j - 1] == d && ls[j - 1] > s))) { ls[j] = ls[j - 1]; ld[j] = ld[j - 1]; j--; }
        ls[j] = s; ld[j] = d;
    }
    int64_t *exit_slots = SP(int64_t *, S_EXIT_SLOTS), *exit_depths = SP(int64_t *, S_EXIT_DEPTHS);
    for (int64_t m = 0; m < n_exit; m++) { exit_slots[m] = ls[m]; exit_depths[m] = ld[m]; }
    /* finish: suffix layers, final norm, LM head */
    if (n_exit) {
        step_full_ints(ints, n_exit, ls, positions, NULL, full);
        err = step_decode(dr, st, st[S_SUFFIX], st[S_NSUFFIX], st[S_SUFFIX_J0], ints, n_exit, full >= 0 ? n_exit : 0, 0,
                          0, y);
        if (err) return err;
        rms_norm_rows(y, D, SP(const float *, S_NORM_W), eps, yn, 0, n_exit);
        mor_linear(yn, n_exit, D, SP(const void *, S_LM_HEAD), (int)st[S_LM_TYPE], NULL, st[S_VOCAB],
                   SP(float *, S_LOGITS), NULL, (int)st[S_THREADS]);
    }
    if (phases) phases[2] += now_s() - t;
    int64_t *counts = SP(int64_t *, S_COUNTS);
    counts[0] = n_exit; counts[1] = nb; counts[2] = n_pass;
    return 0;
#undef SP
}

/* ------------------------------------------------------------------ sampling */


/* logits b*VW .. b*VW+VW-1 of a row of V (past the end: -inf) */
static inline vf logit_block(const float *x, int64_t V, int64_t b) {
    if ((b + 1) * VW <= V) return vload(x + b * VW);
    float t[VW];
    for (int k = 0; k < VW; k++) t[k] = b * VW + k < V ? x[b * VW + k] : -INFINITY;
    vf v;
    memcpy(&v, t, sizeof v);
    return v;
}

/* e_i = exp((x_i - max) / T) for logits b*VW .. b*VW+VW-1 (0 past the end). Subtracting the
 * maximum first cannot overflow, whatever T. */
static inline vf exp_block(const float *x, int64_t V, int64_t b, float T, float mx) {
    vf d = logit_block(x, V, b) - mx;
    return vexp_le0(T == 1.0f ? d : d / T);
}

/* the first index of the value mx in a row of V (V - 1 if none) */
static int64_t first_equal(const float *x, int64_t V, float mx) {
    int64_t i = 0;
    while (i < V - 1 && !(x[i] == mx)) i++;
    return i;
}

#define SB 8 /* blocks per super-block: the unit of the first cumulative sum */

/* the sum of e over super-block s (blocks s*SB ..), in a fixed order */
static inline float super_sum(const float *x, int64_t V, int64_t nb, int64_t s, float T, float mx) {
    vf acc = {0};
    for (int64_t b = s * SB; b < nb && b < (s + 1) * SB; b++) acc += exp_block(x, V, b, T, mx);
    return hsum(acc);
}

/* One token from a row of V logits: T <= 0 picks the first largest logit; otherwise token i
 * with probability e_i / S, e_i = exp((x_i - max) / T), by walking the cumulative sum to u * S
 * (u in [0, 1)): over super-blocks of SB * VW tokens, then blocks of VW, then tokens (sums in
 * double), each level computed in a fixed order, so the draw depends only on the row, T and
 * u. Tokens with e_i = 0 (-inf logits) are never drawn. A row with a NaN logit returns the
 * first NaN (as torch.argmax); a row whose sum is not finite returns the first largest logit. */
static int64_t sample_row(const float *x, int64_t V, float T, float u) {
    int64_t nb = (V + VW - 1) / VW, ns = (nb + SB - 1) / SB;
    vf m = logit_block(x, V, 0);
    vi nan = m != m;
    for (int64_t b = 1; b < nb; b++) {
        vf v = logit_block(x, V, b);
        vi gt = v > m;
        nan |= v != v;
        m = (vf)(((vi)v & gt) | ((vi)m & ~gt));
    }
    int any_nan = 0;
    for (int k = 0; k < VW; k++) any_nan |= nan[k] != 0;
    if (any_nan) {
        int64_t i = 0;
        while (i < V - 1 && x[i] == x[i]) i++;
        return i;
    }
    float mx = m[0];
    for (int k = 1; k < VW; k++) mx = m[k] > mx ? m[k] : mx;
    if (!(T > 0.0f) || !(mx > -INFINITY) || mx == INFINITY) return first_equal(x, V, mx); /* greedy */
    double S = 0.0;
    for (int64_t s = 0; s < ns; s++) S += super_sum(x, V, nb, s, T, mx);
    if (!(S > 0.0) || S == INFINITY) return first_equal(x, V, mx);
    if (!(u >= 0.0f)) u = 0.0f;
    if (u >= 1.0f) u = 0x1.fffffep-1f; /* the largest float below 1 */
    double target = (double)u * S, c = 0.0;
    for (int64_t s = 0; s < ns; s++) {
        float ss = super_sum(x, V, nb, s, T, mx); /* the same value as in S */
        if (!(c + ss > target)) {
            c += ss;
            continue;
        }
        int64_t last = -1; /* this super-block's last possible token so far */
        for (int64_t b = s * SB; b < nb && b < (s + 1) * SB; b++) {
            vf e = exp_block(x, V, b, T, mx);
            float bs = hsum(e);
            if (c + bs > target) {
                for (int k = 0; k < VW; k++) {
                    if (e[k] > 0.0f) {
                        last = b * VW + k;
                        c += e[k];
                        if (c > target) return last;
                    }
                }
                return last >= 0 ? last : first_equal(x, V, mx); /* rounding of the in-block sum */
            }
            c += bs;
            for (int k = 0; k < VW; k++) last = e[k] > 0.0f ? b * VW + k : last;
        }
        return last >= 0 ? last : first_equal(x, V, mx); /* rounding of the in-super-block sums */
    }
    return first_equal(x, V, mx); /* not reached: the super-block sums add up to S > target */
}

/* out[m] = a token drawn from row m of logits (M, V) at temperature temps[m] (<= 0: greedy)
 * with uniform number u[m] (clamped to [0, 1)); rows with a NaN temperature are skipped
 * (out[m] = -1); every other row gets a token in [0, V). Rows split across nt threads. */
void mor_sample(const float *logits, int64_t M, int64_t V, const float *temps, const float *u, int64_t *out,
                int nt) {
    PARALLEL(nt) {
        int64_t lo, hi;
        share(M, 1, THREAD_ID(), THREADS(), &lo, &hi);
        for (int64_t m = lo; m < hi; m++)
            out[m] = temps[m] != temps[m] ? -1 : sample_row(logits + m * V, V, temps[m], u[m]);
    }
}
