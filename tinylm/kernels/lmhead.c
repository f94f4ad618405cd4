// TinyLM's LM head and cross-entropy for training on CPU in fp32: for hidden states h (N, C) and the tied
// embedding w (V, C), each row's log-sum-exp of its logits h w^T (forward), then the gradients of the loss
// sum_r scale_r (lse_r - logit_r[target_r]) with respect to h and w, less the target terms, which are one row
// each and added by the caller (backward). The (N, V) logits are never written: each 8-row x 16-entry tile of
// them is computed in registers and consumed from L1 cache, where PyTorch's blocked path writes blocks of
// logits and reads them back several times (exp, max, sum, two products). Computed twice (the forward's
// log-sum-exp, then the backward's probabilities), as the blocked path does for this vocabulary. model.py calls
// these through native.py (lm_head_cross_entropy), which compiles this file once per machine.
//
// Build: cc -O3 -march=native -fopenmp-simd -fno-math-errno -fno-trapping-math -shared -fPIC -fopenmp
//        -DTINYLM_MVEC -lmvec lmhead.c -o lmhead.so -lm
// native.py runs this once per machine (the compiler from $CC, else cc, gcc or clang), caches the library under
// ~/.cache/tinylm, and builds with fewer flags where OpenMP or glibc's libmvec is missing.
#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#pragma GCC target("prefer-vector-width=512")
#endif

// The arithmetic runs in the widest vectors the target has: 16 floats with AVX-512, 8 with AVX or AVX2, 4 with SSE2
// or NEON. (One 64-byte GCC vector on a target without AVX-512 is expanded piecewise through memory: the AVX2 build
// ran 13x slower than with these, bench/bench_thresholds.py under TINYLM_MARCH=x86-64-v3.)
#if defined(__AVX512F__)
#define VEC 16
#elif defined(__AVX__)
#define VEC 8
#else
#define VEC 4
#endif
typedef float vf __attribute__((vector_size(VEC * sizeof(float))));
#define LANES 16         // entries of w per tile (native.py's layout of wt), PARTS vectors of VEC floats
#define PARTS (LANES / VEC)
#define TILE_ROWS 8      // rows of h per tile of 16 logits a row
#define BLOCK 256        // vocabulary entries per block: a tile row's logits stay in L1
#define GROUP_ROWS 256   // rows of h per forward work unit, kept in L2 while all of w streams past them
#define CHUNK (4 * VEC)  // columns of C per pass of the gradient products: 4 vectors a row
// Rows of grad_h per pass of its products: 4 x 4 accumulators fill AVX-512's 32 registers; AVX2 and SSE2 have 16
// (AVX2 at 4 rows or 1: within 3%, bench/bench_thresholds.py under TINYLM_MARCH=x86-64-v3)
#define GRAD_ROWS (VEC == 16 ? 4 : 2)
typedef struct {
    vf part[PARTS];
} v16;                   // 16 floats (loadv and storev, through memcpy, may be unaligned)

#define INLINE static inline __attribute__((always_inline))
INLINE vf loadv(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

INLINE void storev(float *p, vf v) {
    memcpy(p, &v, sizeof v);
}

// 16 floats as PARTS target vectors, like zero16 and fma16
INLINE v16 load16(const float *p) {
    v16 v;
    for (int i = 0; i < PARTS; i++) v.part[i] = loadv(p + i * VEC);
    return v;
}

INLINE void store16(float *p, v16 v) {
    for (int i = 0; i < PARTS; i++) storev(p + i * VEC, v.part[i]);
}

INLINE v16 zero16(void) {
    v16 v;
    for (int i = 0; i < PARTS; i++) v.part[i] = (vf){0};
    return v;
}

// acc + s * x
INLINE v16 fma16(v16 acc, float s, v16 x) {
    for (int i = 0; i < PARTS; i++) acc.part[i] += s * x.part[i];
    return acc;
}

// The floats per vector this build computes in (native.py runs lmhead.c only where it is 16)
int tinylm_lm_head_vector_floats(void) {
    return VEC;
}

// exp(x), x <= 88 (a logit minus its row's max or log-sum-exp, up to rounding): 2^n * e^r with n = round(x / ln 2),
// Cephes' expf polynomial for e^r, as attention.c's exp_nonpositive (within 1 ulp); below -87 it gives e^-87
static inline float exp_clamped(float x) {
    x = x < -87.f ? -87.f : x > 88.f ? 88.f : x;
    float n = rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float e = 1.9875691500e-4f;
    e = e * r + 1.3981999507e-3f;
    e = e * r + 8.3334519073e-3f;
    e = e * r + 4.1665795894e-2f;
    e = e * r + 1.6666665459e-1f;
    e = e * r + 5.0000001201e-1f;
    e = e * r * r + r + 1.f;
    int bits = ((int)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x == x ? e * scale : x;  // NaN stays NaN
}

// The logits of TILE_ROWS rows of h (row stride C) against one tile of wt (C, 16): 16 entries of w, transposed
INLINE void tile_logits(const float *h, const float *wt, int C, float *out, int out_stride) {
    v16 acc[TILE_ROWS];
    for (int r = 0; r < TILE_ROWS; r++) acc[r] = zero16();
    for (int k = 0; k < C; k++) {
        v16 wk = load16(wt + (size_t)k * LANES);
        #pragma GCC unroll 8
        for (int r = 0; r < TILE_ROWS; r++) acc[r] = fma16(acc[r], h[(size_t)r * C + k], wk);
    }
    for (int r = 0; r < TILE_ROWS; r++) store16(out + (size_t)r * out_stride, acc[r]);
}

// A block's logits for TILE_ROWS rows: buf (TILE_ROWS, BLOCK), the first n entries of each row meaningful
static inline void block_logits(const float *h, const float *wt_block, int C, int n, float *buf) {
    for (int t = 0; t * LANES < n; t++) tile_logits(h, wt_block + (size_t)t * C * LANES, C, buf + t * LANES, BLOCK);
}

// lse (N): log sum_v exp(h_r . w_v). h (N, C) with N a multiple of TILE_ROWS; wt (ceil(V / 16), C, 16): w's
// rows sixteen at a time, transposed, zero past V
void tinylm_lm_head_lse(const float *h, const float *wt, int N, int C, int V, float *lse) {
    int groups = (N + GROUP_ROWS - 1) / GROUP_ROWS;
    #pragma omp parallel
    {
        float *buf = malloc(sizeof(float) * (TILE_ROWS * BLOCK + 2 * GROUP_ROWS));
        float *row_max = buf + TILE_ROWS * BLOCK, *row_sum = row_max + GROUP_ROWS;
        #pragma omp for schedule(dynamic)
        for (int g = 0; g < groups; g++) {
            int r0 = g * GROUP_ROWS, rows = N - r0 < GROUP_ROWS ? N - r0 : GROUP_ROWS;
            for (int r = 0; r < rows; r++) row_max[r] = -INFINITY, row_sum[r] = 0.f;
            for (int v0 = 0; v0 < V; v0 += BLOCK) {
                int n = V - v0 < BLOCK ? V - v0 : BLOCK;
                for (int rt = 0; rt < rows; rt += TILE_ROWS) {
                    block_logits(h + (size_t)(r0 + rt) * C, wt + (size_t)v0 * C, C, n, buf);
                    for (int r = 0; r < TILE_ROWS; r++) {
                        const float *row = buf + r * BLOCK;
                        float mx = -INFINITY, sum = 0.f, old = row_max[rt + r];
                        #pragma omp simd reduction(max:mx)
                        for (int j = 0; j < n; j++) mx = row[j] > mx ? row[j] : mx;
                        if (mx > old) {  // the running sum was taken against a smaller max
                            row_sum[rt + r] *= exp_clamped(old - mx);
                            row_max[rt + r] = old = mx;
                        }
                        #pragma omp simd reduction(+:sum)
                        for (int j = 0; j < n; j++) sum += exp_clamped(row[j] - old);
                        row_sum[rt + r] += sum;
                    }
                }
            }
            for (int r = 0; r < rows; r++) lse[r0 + r] = row_max[r] + logf(row_sum[r]);
        }
        free(buf);
    }
}

// grad_h (N, C) += sum_v p_rv w_v and grad_w (V, C) = sum_r p_rv h_r, p_rv = scale_r exp(h_r . w_v - lse_r): the
// loss's gradients less the target terms. w (V, C) as it is and wt as for tinylm_lm_head_lse; C a multiple of
// CHUNK. Each thread owns blocks of the vocabulary, so grad_w needs no locks; its grad_h is its own until the end.
void tinylm_lm_head_backward(const float *h, const float *w, const float *wt, const float *lse, const float *scale,
                             int N, int C, int V, float *grad_h, float *grad_w) {
    int blocks = (V + BLOCK - 1) / BLOCK;
    #pragma omp parallel
    {
        float *buf = malloc(sizeof(float) * TILE_ROWS * BLOCK);
        float *gh = calloc((size_t)N * C, sizeof(float));
        #pragma omp for schedule(dynamic)
        for (int b = 0; b < blocks; b++) {
            int v0 = b * BLOCK, n = V - v0 < BLOCK ? V - v0 : BLOCK;
            const float *wb = w + (size_t)v0 * C;
            float *gw = grad_w + (size_t)v0 * C;
            memset(gw, 0, sizeof(float) * n * C);
            for (int r0 = 0; r0 < N; r0 += TILE_ROWS) {
                const float *hr = h + (size_t)r0 * C;
                block_logits(hr, wt + (size_t)v0 * C, C, n, buf);
                for (int r = 0; r < TILE_ROWS; r++) {
                    float *row = buf + r * BLOCK, l = lse[r0 + r], s = scale[r0 + r];
                    #pragma omp simd
                    for (int j = 0; j < n; j++) row[j] = s * exp_clamped(row[j] - l);
                }
                for (int c = 0; c < C; c += CHUNK) {
                    // grad_h's rows, GRAD_ROWS at a time: each w row loaded once for all of them
                    for (int rh = 0; rh < TILE_ROWS; rh += GRAD_ROWS) {
                        vf acc[GRAD_ROWS][4];
                        for (int r = 0; r < GRAD_ROWS; r++)
                            for (int q = 0; q < 4; q++) acc[r][q] = loadv(gh + (size_t)(r0 + rh + r) * C + c + q * VEC);
                        for (int j = 0; j < n; j++) {
                            const float *wj = wb + (size_t)j * C + c;
                            vf w0 = loadv(wj), w1 = loadv(wj + VEC), w2 = loadv(wj + 2 * VEC), w3 = loadv(wj + 3 * VEC);
                            #pragma GCC unroll 4
                            for (int r = 0; r < GRAD_ROWS; r++) {
                                float p = buf[(rh + r) * BLOCK + j];
                                acc[r][0] += p * w0, acc[r][1] += p * w1, acc[r][2] += p * w2, acc[r][3] += p * w3;
                            }
                        }
                        for (int r = 0; r < GRAD_ROWS; r++)
                            for (int q = 0; q < 4; q++) storev(gh + (size_t)(r0 + rh + r) * C + c + q * VEC, acc[r][q]);
                    }
                    // grad_w's rows, two at a time: each row of h loaded once for both
                    for (int j = 0; j < n; j += 2) {
                        int two = j + 1 < n;
                        float *g0 = gw + (size_t)j * C + c, *g1 = two ? g0 + C : g0;
                        vf a[2][4];
                        for (int q = 0; q < 4; q++) a[0][q] = loadv(g0 + q * VEC), a[1][q] = (vf){0};
                        #pragma GCC unroll 8
                        for (int r = 0; r < TILE_ROWS; r++) {
                            const float *hrow = hr + (size_t)r * C + c;
                            float p0 = buf[r * BLOCK + j], p1 = two ? buf[r * BLOCK + j + 1] : 0.f;
                            vf h0 = loadv(hrow), h1 = loadv(hrow + VEC), h2 = loadv(hrow + 2 * VEC),
                               h3 = loadv(hrow + 3 * VEC);
                            a[0][0] += p0 * h0, a[0][1] += p0 * h1, a[0][2] += p0 * h2, a[0][3] += p0 * h3;
                            a[1][0] += p1 * h0, a[1][1] += p1 * h1, a[1][2] += p1 * h2, a[1][3] += p1 * h3;
                        }
                        for (int q = 0; q < 4; q++) storev(g0 + q * VEC, a[0][q]);
                        if (two)
                            for (int q = 0; q < 4; q++) storev(g1 + q * VEC, loadv(g1 + q * VEC) + a[1][q]);
                    }
                }
            }
        }
        #pragma omp critical
        for (size_t i = 0; i < (size_t)N * C; i++) grad_h[i] += gh[i];
        free(gh);
        free(buf);
    }
}

// Under bf16 mixed precision the LM head's products run in PyTorch (on AMX where the CPU has it) and give bf16
// blocks of logits; these two make each block's fp32 softmax work one pass over it instead of four (convert,
// max, subtract and exp, sum, and convert back), as lm_head_cross_entropy's blocked path does in PyTorch.
static inline float from_bf16(unsigned short x) {
    unsigned int bits = (unsigned int)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline unsigned short to_bf16(float f) {  // round to nearest even, as PyTorch's conversion
    unsigned int bits;
    memcpy(&bits, &f, sizeof bits);
    return (unsigned short)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// logits (n, vb) bf16, row stride ld: row_max (n) and row_sum (n), each row's running max and sum of
// exp(logit - max) over the blocks so far, take this block in
void tinylm_lse_update_bf16(const unsigned short *logits, int n, int vb, int ld, float *row_max, float *row_sum) {
    #pragma omp parallel for schedule(static)
    for (int r = 0; r < n; r++) {
        const unsigned short *row = logits + (size_t)r * ld;
        float mx = -INFINITY, sum = 0.f, old = row_max[r];
        #pragma omp simd reduction(max:mx)
        for (int j = 0; j < vb; j++) {
            float x = from_bf16(row[j]);
            mx = x > mx ? x : mx;
        }
        if (mx > old) {
            row_sum[r] *= exp_clamped(old - mx);
            row_max[r] = old = mx;
        }
        #pragma omp simd reduction(+:sum)
        for (int j = 0; j < vb; j++) sum += exp_clamped(from_bf16(row[j]) - old);
        row_sum[r] += sum;
    }
}

// out (n, vb) bf16 = exp(logits - row_max) for logits (n, vb) bf16; both of row stride ld, out may be logits
void tinylm_exp_bf16(const unsigned short *logits, int n, int vb, int ld, const float *row_max, unsigned short *out) {
    #pragma omp parallel for schedule(static)
    for (int r = 0; r < n; r++) {
        const unsigned short *row = logits + (size_t)r * ld;
        unsigned short *dst = out + (size_t)r * ld;
        float m = row_max[r];
        #pragma omp simd
        for (int j = 0; j < vb; j++) dst[j] = to_bf16(exp_clamped(from_bf16(row[j]) - m));
    }
}
