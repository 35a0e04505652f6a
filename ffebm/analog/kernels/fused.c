/* Fused CPU kernels of the analog simulation, for float32 and float64.
 *
 * A read of W for the input vectors of x (ffebm/analog/tile.py) is, per vector v:
 *
 *   prologue:  alpha_v = max_f |x_fv|  (1 for an all-zero vector, at least 4 tiny / min(step, 1)
 *              otherwise so that (1 / alpha) / step is finite; 1 without noise management;
 *              NaN propagates)
 *              q_fv    = round(clamp(x_fv * ((1 / alpha_v) / step), +-ib))      (the DAC)
 *   product:   y = W q                                       (torch, outside this file)
 *   epilogue:  y_ov    = y_ov + std * n_ov,  n_ov ~ N(0, 1)  (output noise)
 *              clipped_v = any_o |y_ov| >= bound; y_ov = clamp(y_ov, +-bound)    (the ADC bound)
 *              y_ov    = round(y_ov * qscale) * (alpha_v * unit)                 (ADC, back to units)
 *
 * Tensors are [B, F, L] contiguous: vectors are indexed (b, l), features f run with stride L
 * (rows of [N, F] are the case L = 1; the im2col columns of a convolution are L > 1).
 * Besides: the pulsed update's signed bit trains (ffebm_bits) and row maxima of |v| (ffebm_absmax).
 *
 * Random numbers: xoshiro256++ streams seeded by splitmix64 from (seed, sample b), so the numbers
 * depend on the seed only, not on the number of threads. Normal draws: a 256-layer ziggurat
 * (Marsaglia and Tsang's construction; layer index, sign and abscissa from disjoint bits of one
 * draw), its rare slow part (tail, wedge) from a second stream of the sample.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#define ZIG_N 256
#define ZIG_R 3.6541528853610088
#define ZIG_V 0.00492867323399

static double zig_x[ZIG_N + 1]; /* zig_x[0] = V / f(R), zig_x[1] = R, ..., zig_x[N] = 0 */
static double zig_f[ZIG_N + 1]; /* f(zig_x[i]) = exp(-zig_x[i]^2 / 2) */
static float zig_xf[ZIG_N + 1]; /* zig_x in single precision, for the float32 draws */
static int zig_ready = 0;

/* The layer edges: layer i >= 1 is the rectangle [0, x_i] x [f(x_i), f(x_{i+1})] of area V, the
 * base layer 0 the rectangle [0, R] x [0, f(R)] plus the tail beyond R (area V as well). */
int ffebm_init(void) {
    if (zig_ready) return ZIG_N;
    double f_r = exp(-0.5 * ZIG_R * ZIG_R);
    zig_x[0] = ZIG_V / f_r;
    zig_f[0] = 0.0;
    zig_x[1] = ZIG_R;
    zig_f[1] = f_r;
    for (int i = 1; i < ZIG_N - 1; ++i) {
        double top = ZIG_V / zig_x[i] + zig_f[i];
        zig_x[i + 1] = sqrt(-2.0 * log(top));
        zig_f[i + 1] = top;
    }
    zig_x[ZIG_N] = 0.0;
    zig_f[ZIG_N] = 1.0;
    for (int i = 0; i <= ZIG_N; ++i) zig_xf[i] = (float)zig_x[i];
    zig_ready = 1;
    return ZIG_N;
}

typedef struct { uint64_t s[4]; } rng_t;

static inline uint64_t splitmix64(uint64_t *z) {
    uint64_t v = (*z += 0x9E3779B97F4A7C15ULL);
    v = (v ^ (v >> 30)) * 0xBF58476D1CE4E5B9ULL;
    v = (v ^ (v >> 27)) * 0x94D049BB133111EBULL;
    return v ^ (v >> 31);
}

static inline uint64_t rotl(uint64_t v, int k) { return (v << k) | (v >> (64 - k)); }

static inline uint64_t next_u64(rng_t *r) { /* xoshiro256++ */
    uint64_t *s = r->s;
    uint64_t out = rotl(s[0] + s[3], 23) + s[0];
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return out;
}

static inline double next_unit(rng_t *r) { /* (0, 1]: never 0, so log() is finite */
    return ((double)(int64_t)(next_u64(r) >> 11) + 1.0) * (1.0 / 9007199254740992.0);
}

static void seed_block(rng_t *r, uint64_t seed, uint64_t block) {
    uint64_t z = seed ^ (block * 0xD1B54A32D192ED03ULL);
    for (int k = 0; k < 4; ++k) r->s[k] = splitmix64(&z);
}

static double next_normal(rng_t *r);

/* the rare slow part of a draw (about 1.2 % of them): the tail of the base layer or the wedge
 * of layer i at abscissa z; a rejected draw starts over. It draws from its own stream ``r``,
 * so that the main stream's state never leaves registers in the hot loops. */
static __attribute__((noinline)) double normal_slow(rng_t *r, int i, double z, double sign) {
    if (i == 0) { /* the tail beyond R */
        double a, b;
        do {
            a = -log(next_unit(r)) / ZIG_R;
            b = -log(next_unit(r));
        } while (b + b < a * a);
        return sign * (ZIG_R + a);
    }
    /* the wedge: accept when a uniform height in the layer lies under the curve */
    double h = zig_f[i] + next_unit(r) * (zig_f[i + 1] - zig_f[i]);
    if (h < exp(-0.5 * z * z)) return sign * z;
    return next_normal(r);
}

static inline double normal_from(rng_t *slow, uint64_t u) {
    int i = (int)(u & 0xFF);
    double sign = 1.0 - (double)(int)((u >> 7) & 2); /* bit 8: -1 or +1, without a branch */
    double z = (double)(int64_t)(u >> 11) * (1.0 / 9007199254740992.0) * zig_x[i]; /* [0, x_i) */
    if (__builtin_expect(z < zig_x[i + 1], 1)) return sign * z; /* under the curve */
    return normal_slow(slow, i, z, sign);
}

static double next_normal(rng_t *r) { return normal_from(r, next_u64(r)); }


/* m (rounded up to even) 32-bit random words, two per 64-bit draw */
static inline void words32(rng_t *r, uint32_t *w, int64_t m) {
    for (int64_t j = 0; j < m; j += 2) {
        uint64_t u = next_u64(r);
        w[j] = (uint32_t)u;
        w[j + 1] = (uint32_t)(u >> 32);
    }
}

/* n <= CHUNK normal draws in single precision: two per 64-bit number (per 32 bits: 8 for the
 * layer, 1 for the sign, 23 for the abscissa); the table lookups, products and compares of a
 * whole chunk run as one loop (vectorised), and the few draws outside the layers' inner parts
 * (about 1.2 %) go through the double-precision tail / wedge test afterwards. */
#define CHUNK 256
static inline void normals_f32(rng_t *r, rng_t *slow, float *restrict out, int64_t n) {
    uint32_t w[CHUNK + 1]; /* room for an odd n's extra draw */
    int32_t rej[CHUNK];
    words32(r, w, n);
    int32_t any = 0;
    for (int64_t j = 0; j < n; ++j) {
        uint32_t i = w[j] & 0xFF;
        float z = (float)(int32_t)(w[j] >> 9) * (1.0f / 8388608.0f) * zig_xf[i];
        rej[j] = !(z < zig_xf[i + 1]);
        any |= rej[j];
        out[j] = (w[j] & 0x100) ? -z : z;
    }
    if (!any) return;
    for (int64_t j0 = 0; j0 < n; j0 += 8) { /* eight flags at a time: most groups have none */
        const int64_t j1 = j0 + 8 < n ? j0 + 8 : n;
        int32_t group = 0;
        for (int64_t j = j0; j < j1; ++j) group |= rej[j];
        if (!group) continue;
        for (int64_t j = j0; j < j1; ++j)
            if (rej[j]) {
                uint32_t i = w[j] & 0xFF;
                double z = (double)(int32_t)(w[j] >> 9) * (1.0 / 8388608.0) * zig_x[i];
                out[j] = (float)normal_slow(slow, (int)i, z, (w[j] & 0x100) ? -1.0 : 1.0);
            }
    }
}

static inline void normals_f64(rng_t *r, rng_t *slow, double *restrict out, int64_t n) {
    for (int64_t j = 0; j < n; ++j) out[j] = normal_from(slow, next_u64(r));
}

/* round half to even without a libm call (x86-64's baseline has no rounding instruction):
 * adding and subtracting 1.5 * 2^(mantissa bits) leaves the nearest integer in the default
 * rounding mode; values this large are integers already */
static inline float round_f32(float v) {
    const float m = 12582912.0f; /* 1.5 * 2^23 */
    return (v < 4194304.0f && v > -4194304.0f) ? (v + m) - m : v;
}
static inline float round_small_f32(float v) { return (v + 12582912.0f) - 12582912.0f; } /* |v| < 2^22 */
static inline double round_small_f64(double v) { return (v + 6755399441055744.0) - 6755399441055744.0; }
static inline double round_f64(double v) {
    const double m = 6755399441055744.0; /* 1.5 * 2^52 */
    return (v < 2251799813685248.0 && v > -2251799813685248.0) ? (v + m) - m : v;
}

/* x86-64 Linux with GCC: an AVX2 copy of each kernel besides the baseline one, chosen at
 * load time by the CPU (the same numbers either way: no FMA contraction) */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

#define GEN(T, I, MASK, TINY, SFX, ROUND, ROUND_SMALL, NORMALS)                                                                        \
/* the DAC side of a read: alpha and rinv = (1 / alpha) / step [B * L], q [B, F, L] from x [B, F, L] */ \
CLONES void ffebm_prologue_##SFX(const T *restrict x, T *restrict q, T *restrict alpha, T *restrict rinv,    \
                          int64_t B, int64_t F, int64_t L, double step, double bound, int absmax, \
                          int clamp, int quant, int nthreads) {                                   \
    const T st = (T)step, ib = (T)(bound / step);                                                 \
    const T lo = (T)(4.0 * (double)TINY / (step < 1.0 ? step : 1.0)); /* least alpha, as the torch path */ \
    if (L == 1) { /* rows: one vector per row, features contiguous */                             \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)")       \
        for (int64_t b = 0; b < B; ++b) {                                                         \
            const T *restrict xb = x + b * F;                                                     \
            T *restrict qb = q + b * F;                                                           \
            /* max |x| as the max of the bit patterns with the sign cleared: for floats >= 0 the   \
             * integer order is the float order (a NaN sorts above inf), and an integer max      \
             * reduction vectorises */                                                            \
            const I *restrict xi = (const I *)xb;                                                 \
            I mb = 0;                                                                             \
            int64_t f = 0;                                                                        \
            if (absmax)                                                                           \
                for (f = 0; f < F; ++f) {                                                         \
                    I v = xi[f] & MASK;                                                           \
                    mb = v > mb ? v : mb;                                                         \
                }                                                                                 \
            T acc0;                                                                               \
            memcpy(&acc0, &mb, sizeof acc0);                                                      \
            T a = acc0;                                                                         \
            if (!(a > 0) && a == a) a = (T)1;                                                     \
            else if (a < lo) a = lo; /* a subnormal max: (1 / a) / step would overflow */         \
            const T r = ((T)1 / a) / st;                                                          \
            alpha[b] = a;                                                                         \
            rinv[b] = r;                                                                          \
            if (clamp && quant)                                                                   \
                for (f = 0; f < F; ++f) {                                                         \
                    T v = xb[f] * r;                                                              \
                    qb[f] = ROUND_SMALL(v < -ib ? -ib : (v > ib ? ib : v));                             \
                }                                                                                 \
            else                                                                                  \
                for (f = 0; f < F; ++f) {                                                         \
                    T v = xb[f] * r;                                                              \
                    if (clamp) v = v < -ib ? -ib : (v > ib ? ib : v);                             \
                    qb[f] = quant ? ROUND(v) : v;                                                 \
                }                                                                                 \
        }                                                                                         \
        return;                                                                                   \
    }                                                                                             \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)")           \
    for (int64_t b = 0; b < B; ++b) {                                                             \
        const T *restrict xb = x + b * F * L;                                                     \
        T *restrict qb = q + b * F * L;                                                           \
        T *restrict ab = alpha + b * L;                                                           \
        T *restrict rb = rinv + b * L;                                                            \
        I *restrict abi = (I *)ab; /* the maxima as bit patterns first (see the rows' case) */     \
        for (int64_t l = 0; l < L; ++l) abi[l] = 0;                                               \
        if (absmax) {                                                                             \
            for (int64_t f = 0; f < F; ++f) {                                                     \
                const I *restrict xf = (const I *)(xb + f * L);                                   \
                for (int64_t l = 0; l < L; ++l) {                                                 \
                    I v = xf[l] & MASK;                                                           \
                    abi[l] = v > abi[l] ? v : abi[l];                                             \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        for (int64_t l = 0; l < L; ++l) {                                                         \
            if (!(ab[l] > 0) && ab[l] == ab[l]) ab[l] = (T)1;                                     \
            else if (ab[l] < lo) ab[l] = lo;                                                      \
            rb[l] = ((T)1 / ab[l]) / st;                                                          \
        }                                                                                         \
        for (int64_t f = 0; f < F; ++f) {                                                         \
            const T *restrict xf = xb + f * L;                                                    \
            T *restrict qf = qb + f * L;                                                          \
            if (clamp && quant)                                                                   \
                for (int64_t l = 0; l < L; ++l) {                                                 \
                    T v = xf[l] * rb[l];                                                          \
                    qf[l] = ROUND_SMALL(v < -ib ? -ib : (v > ib ? ib : v));                             \
                }                                                                                 \
            else                                                                                  \
                for (int64_t l = 0; l < L; ++l) {                                                 \
                    T v = xf[l] * rb[l];                                                          \
                    if (clamp) v = v < -ib ? -ib : (v > ib ? ib : v);                             \
                    qf[l] = quant ? ROUND(v) : v;                                                 \
                }                                                                                 \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
/* the ADC side of a read, in place on y [B, F, L] with vector scales alpha [B, L]; returns the  \
 * number of vectors that reached the bound (flagged in clipped [B, L] when given). The noise of  \
 * sample b is the stream (seed, b): rows of [N, F] (L = 1) are samples of their own. */          \
CLONES int64_t ffebm_epilogue_##SFX(T *restrict y, const T *restrict alpha, int64_t B, int64_t F,         \
                             int64_t L, double std, uint64_t seed, double bound, double qscale,   \
                             double unit, uint8_t *restrict clipped, int nthreads) {              \
    ffebm_init();                                                                                 \
    const T ob = (T)bound, qs = (T)qscale, sd = (T)std, un = (T)unit;                             \
    const int has_bound = bound > 0 && isfinite(bound), has_q = qscale > 0;                       \
    int64_t n_clipped = 0;                                                                        \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1) reduction(+:n_clipped)") \
    for (int64_t b = 0; b < B; ++b) {                                                             \
        rng_t r = {{0}}, rs = {{0}};                                                              \
        if (std > 0) {                                                                            \
            seed_block(&r, seed, 2 * (uint64_t)b);                                                \
            seed_block(&rs, seed, 2 * (uint64_t)b + 1);                                           \
        }                                                                                         \
        T noise[CHUNK];                                                                           \
        I hit[CHUNK]; /* 1 where the output reached the bound (T-sized: the loop vectorises) */    \
        T scale[CHUNK];                                                                           \
        /* one run of the contiguous index: l (columns) or f (rows, L = 1) */                     \
        const int64_t runs = L > 1 ? F : 1, run = L > 1 ? L : F;                                  \
        uint8_t *restrict cb = clipped ? clipped + b * L : NULL;                                  \
        uint8_t row_hit = 0;                                                                      \
        if (cb) for (int64_t l = 0; l < L; ++l) cb[l] = 0;                                        \
        for (int64_t k = 0; k < runs; ++k) {                                                      \
            T *restrict yr = y + b * F * L + k * run;                                             \
            for (int64_t c0 = 0; c0 < run; c0 += CHUNK) {                                         \
                const int64_t n = run - c0 < CHUNK ? run - c0 : CHUNK;                            \
                T *restrict yc = yr + c0;                                                         \
                for (int64_t j = 0; j < n; ++j)                                                   \
                    scale[j] = (L > 1 ? alpha[b * L + c0 + j] : alpha[b]) * un;                   \
                if (std > 0) {                                                                    \
                    NORMALS(&r, &rs, noise, n);                                                   \
                    for (int64_t j = 0; j < n; ++j) yc[j] += noise[j] * sd;                       \
                }                                                                                 \
                if (has_bound) {                                                                  \
                    for (int64_t j = 0; j < n; ++j) {                                             \
                        T v = yc[j];                                                              \
                        hit[j] = (I)((v >= ob) | (v <= -ob));                                     \
                        yc[j] = v < -ob ? -ob : (v > ob ? ob : v);                                \
                    }                                                                             \
                    I any = 0;                                                                    \
                    for (int64_t j = 0; j < n; ++j) any |= hit[j];                                \
                    if (any > 0) {                                                                \
                        if (cb && L > 1) { for (int64_t j = 0; j < n; ++j) if (hit[j] > 0) cb[c0 + j] = 1; } \
                        else row_hit = 1;                                                         \
                    }                                                                             \
                }                                                                                 \
                if (has_q) for (int64_t j = 0; j < n; ++j) yc[j] = ROUND(yc[j] * qs) * scale[j];  \
                else for (int64_t j = 0; j < n; ++j) yc[j] = yc[j] * scale[j];                    \
            }                                                                                     \
        }                                                                                         \
        if (cb) {                                                                                 \
            if (L == 1) cb[0] = row_hit;                                                          \
            for (int64_t l = 0; l < L; ++l) n_clipped += cb[l];                                   \
        }                                                                                         \
    }                                                                                             \
    return n_clipped;                                                                             \
}                                                                                                  \
/* signed pulse bits [B, L, n]: out = sign where a uniform draw is below the probability, in     \
 * slots t < bl[b], 0 elsewhere (24-bit uniforms, as torch's float32 ones). Probabilities: p      \
 * [B, n] with sign [B, n] (1 when NULL); or, with scale [B], formed from the values p itself:     \
 * min(scale[b] |p|, 1) (0 where the product is NaN) with the sign of p (one pass instead of |v|,  \
 * the product, the clamps and sign(v)). The draws of sample b are the stream (seed, b). */        \
CLONES void ffebm_bits_##SFX(const T *restrict p, const T *restrict sign, const T *restrict scale,  \
                             const int64_t *restrict bl, T *restrict out, int64_t B, int64_t L,   \
                             int64_t n, uint64_t seed, int nthreads) {                            \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)")           \
    for (int64_t b = 0; b < B; ++b) {                                                             \
        rng_t r;                                                                                  \
        seed_block(&r, seed ^ 0x9E6C63D0676A9A99ULL, (uint64_t)b);                               \
        uint32_t w[CHUNK + 1];                                                                    \
        const T *restrict pb = p + b * n;                                                         \
        const T *restrict sb = sign ? sign + b * n : NULL;                                        \
        const T sc = scale ? scale[b] : (T)0;                                                     \
        for (int64_t t = 0; t < L; ++t) {                                                         \
            T *restrict ot = out + (b * L + t) * n;                                               \
            if (t >= bl[b]) {                                                                     \
                for (int64_t j = 0; j < n; ++j) ot[j] = (T)0;                                     \
                continue;                                                                         \
            }                                                                                     \
            for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {                                           \
                const int64_t m = n - j0 < CHUNK ? n - j0 : CHUNK;                                \
                words32(&r, w, m);                                                                \
                const T *restrict pc = pb + j0;                                                   \
                T *restrict oc = ot + j0;                                                         \
                if (scale)                                                                        \
                    for (int64_t j = 0; j < m; ++j) {                                             \
                        const T x = pc[j];                                                        \
                        T q = sc * (x < 0 ? -x : x);                                              \
                        q = q == q ? (q > (T)1 ? (T)1 : q) : (T)0;                                \
                        const T sg = x > 0 ? (T)1 : (x < 0 ? (T)-1 : (T)0);                       \
                        oc[j] = ((T)(int32_t)(w[j] >> 8) * (T)(1.0 / 16777216.0) < q) ? sg : (T)0; \
                    }                                                                             \
                else if (sb)                                                                      \
                    for (int64_t j = 0; j < m; ++j)                                               \
                        oc[j] = ((T)(int32_t)(w[j] >> 8) * (T)(1.0 / 16777216.0) < pc[j]) ? sb[j0 + j] : (T)0; \
                else                                                                              \
                    for (int64_t j = 0; j < m; ++j)                                               \
                        oc[j] = ((T)(int32_t)(w[j] >> 8) * (T)(1.0 / 16777216.0) < pc[j]) ? (T)1 : (T)0; \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
                                                                                                  \
/* max_j |v_bj| of each row of v [B, n] (the max of the bit patterns with the sign cleared, as in \
 * the prologue: NaN propagates) */                                                               \
CLONES void ffebm_absmax_##SFX(const T *restrict v, T *restrict out, int64_t B, int64_t n,        \
                               int nthreads) {                                                    \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)")           \
    for (int64_t b = 0; b < B; ++b) {                                                             \
        const I *restrict vi = (const I *)(v + b * n);                                            \
        I mb = 0;                                                                                 \
        for (int64_t j = 0; j < n; ++j) {                                                         \
            I a = vi[j] & MASK;                                                                   \
            mb = a > mb ? a : mb;                                                                 \
        }                                                                                         \
        memcpy(out + b, &mb, sizeof mb);                                                          \
    }                                                                                             \
}


GEN(float, int32_t, 0x7FFFFFFF, FLT_MIN, f32, round_f32, round_small_f32, normals_f32)
GEN(double, int64_t, 0x7FFFFFFFFFFFFFFFLL, DBL_MIN, f64, round_f64, round_small_f64, normals_f64)
