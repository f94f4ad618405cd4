// TinyLM's training attention on CPU in fp32: GPT-Neo's causal softmax attention (no 1/sqrt(hd) scale) of each
// (batch, head) slice, global or local (a query sees the last `window` keys), forward and backward. What
// scaled_dot_product_attention computes; at small head sizes (TinyStories-1M's is 4) its blocked kernel spends
// its time on per-block overhead, while a query's scores, all in cache, vectorize over keys here. model.py calls
// these through native.py (SelfAttention._attend), which compiles this file once per machine.
//
// Build: cc -O3 -march=native -fopenmp-simd -fno-math-errno -fno-trapping-math -shared -fPIC -fopenmp
//        -DTINYLM_MVEC -lmvec attention.c -o attention.so -lm
// native.py runs this once per machine (the compiler from $CC, else cc, gcc or clang), caches the library under
// ~/.cache/tinylm, and builds with fewer flags where OpenMP or glibc's libmvec is missing.
#include <math.h>
#include <stdlib.h>
#include <string.h>

// exp(x) for x <= 0 (a score minus its row's max or log-sum-exp), inlined so that the loops around it vectorize
// without calls: 2^n * e^r with n = round(x / ln 2), |r| <= ln 2 / 2, and e^r = 1 + r + r^2 P(r), Cephes' expf
// polynomial: within 1 ulp of exp (every 7th float of [-87, 0] checked). Below -87 (e^x under 2^-126) it gives
// e^-87.
static inline float exp_nonpositive(float x) {
    x = x < -87.f ? -87.f : x;
    float n = rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln 2 in two parts, so r keeps its low bits
    float e = 1.9875691500e-4f;
    e = e * r + 1.3981999507e-3f;
    e = e * r + 8.3334519073e-3f;
    e = e * r + 4.1665795894e-2f;
    e = e * r + 1.6666665459e-1f;
    e = e * r + 5.0000001201e-1f;
    e = e * r * r + r + 1.f;
    int bits = ((int)n + 127) << 23;  // 2^n, n in [-126, 0]
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x >= -87.f ? e * scale : x;  // NaN stays NaN
}

// keys (T, hd) -> rows (hd, S): positions along rows of stride S
static void to_rows(float *rows, const float *keys, int T, int hd, size_t S) {
    for (int t = 0; t < T; t++)
        for (int d = 0; d < hd; d++) rows[d * S + t] = keys[(size_t)t * hd + d];
}

// rows (hd, S) -> keys (T, hd)
static void from_rows(float *keys, const float *rows, int T, int hd, size_t S) {
    for (int t = 0; t < T; t++)
        for (int d = 0; d < hd; d++) keys[(size_t)t * hd + d] = rows[d * S + t];
}

// The row stride of the (hd, S) buffers: T rounded up to 16 floats, plus 16, so that rows start one cache line
// apart modulo 4 KB (with S = T = 512 every other row fell in the same L1 sets, and hd rows read at once evicted
// each other)
static size_t row_stride(int T) {
    return ((size_t)T + 15) / 16 * 16 + 16;
}

static int first_key(int i, int window) {
    return window > 0 && i >= window ? i - window + 1 : 0;
}

// The forward pass of one (batch, head) slice: q, out (T, hd); kt, vt (hd, S), keys along rows; p: T floats of
// scratch. Inlined with a constant hd (see FOR_HEAD_SIZES), the loops over hd unroll into registers and each
// loop over keys is one vectorized pass.
static inline __attribute__((always_inline)) void forward_slice(const float *q, const float *kt, const float *vt,
                                                                float *out, float *lse, float *p, int T, size_t S,
                                                                int hd, int window) {
    for (int i = 0; i < T; i++) {
        int lo = first_key(i, window), n = i + 1 - lo;
        const float *qi = q + (size_t)i * hd, *k0 = kt + lo, *v0 = vt + lo;
        float mx = -INFINITY, sum = 0.f;
        #pragma omp simd reduction(max:mx)
        for (int j = 0; j < n; j++) {
            float s = 0.f;
            for (int d = 0; d < hd; d++) s += qi[d] * k0[d * S + j];
            p[j] = s;
            mx = s > mx ? s : mx;
        }
        #pragma omp simd reduction(+:sum)
        for (int j = 0; j < n; j++) {
            p[j] = exp_nonpositive(p[j] - mx);
            sum += p[j];
        }
        // four rows of v at a time: p is read once for them, and four sums run side by side where one sum's
        // chain of adds would wait on each add's latency
        float *oi = out + (size_t)i * hd;
        int d = 0;
        for (; d + 4 <= hd; d += 4) {
            const float *r0 = v0 + d * S, *r1 = r0 + S, *r2 = r1 + S, *r3 = r2 + S;
            float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
            #pragma omp simd reduction(+:a0, a1, a2, a3)
            for (int j = 0; j < n; j++) {
                a0 += p[j] * r0[j];
                a1 += p[j] * r1[j];
                a2 += p[j] * r2[j];
                a3 += p[j] * r3[j];
            }
            oi[d] = a0 / sum, oi[d + 1] = a1 / sum, oi[d + 2] = a2 / sum, oi[d + 3] = a3 / sum;
        }
        for (; d < hd; d++) {
            const float *row = v0 + d * S;
            float acc = 0.f;
            #pragma omp simd reduction(+:acc)
            for (int j = 0; j < n; j++) acc += p[j] * row[j];
            oi[d] = acc / sum;
        }
        lse[i] = mx + logf(sum);
    }
}

// The backward pass of one slice, as forward_slice: dq (T, hd); dkt, dvt (hd, S) accumulate; p, ds: T floats each
static inline __attribute__((always_inline)) void backward_slice(const float *q, const float *kt, const float *vt,
                                                                 const float *out, const float *lse,
                                                                 const float *dout, float *dq, float *dkt,
                                                                 float *dvt, float *p, float *ds, int T, size_t S,
                                                                 int hd, int window) {
    for (int i = 0; i < T; i++) {
        int lo = first_key(i, window), n = i + 1 - lo;
        const float *qi = q + (size_t)i * hd, *doi = dout + (size_t)i * hd, *k0 = kt + lo, *v0 = vt + lo;
        float di = 0.f, li = lse[i];
        for (int d = 0; d < hd; d++) di += doi[d] * out[(size_t)i * hd + d];
        #pragma omp simd
        for (int j = 0; j < n; j++) {
            float s = 0.f, dp = 0.f;
            for (int d = 0; d < hd; d++) {
                s += qi[d] * k0[d * S + j];
                dp += doi[d] * v0[d * S + j];
            }
            p[j] = exp_nonpositive(s - li);
            ds[j] = p[j] * (dp - di);
        }
        // four key rows at a time, as forward_slice's values
        float *dqi = dq + (size_t)i * hd;
        int d = 0;
        for (; d + 4 <= hd; d += 4) {
            const float *k_0 = k0 + d * S, *k_1 = k_0 + S, *k_2 = k_1 + S, *k_3 = k_2 + S;
            float *dk_0 = dkt + d * S + lo, *dk_1 = dk_0 + S, *dk_2 = dk_1 + S, *dk_3 = dk_2 + S;
            float *dv_0 = dvt + d * S + lo, *dv_1 = dv_0 + S, *dv_2 = dv_1 + S, *dv_3 = dv_2 + S;
            float q_0 = qi[d], q_1 = qi[d + 1], q_2 = qi[d + 2], q_3 = qi[d + 3];
            float do_0 = doi[d], do_1 = doi[d + 1], do_2 = doi[d + 2], do_3 = doi[d + 3];
            float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
            #pragma omp simd reduction(+:a0, a1, a2, a3)
            for (int j = 0; j < n; j++) {
                float dsj = ds[j], pj = p[j];
                a0 += dsj * k_0[j], a1 += dsj * k_1[j], a2 += dsj * k_2[j], a3 += dsj * k_3[j];
                dk_0[j] += dsj * q_0, dk_1[j] += dsj * q_1, dk_2[j] += dsj * q_2, dk_3[j] += dsj * q_3;
                dv_0[j] += pj * do_0, dv_1[j] += pj * do_1, dv_2[j] += pj * do_2, dv_3[j] += pj * do_3;
            }
            dqi[d] = a0, dqi[d + 1] = a1, dqi[d + 2] = a2, dqi[d + 3] = a3;
        }
        for (; d < hd; d++) {
            const float *krow = k0 + d * S;
            float *dkrow = dkt + d * S + lo, *dvrow = dvt + d * S + lo;
            float qd = qi[d], dod = doi[d], acc = 0.f;
            #pragma omp simd reduction(+:acc)
            for (int j = 0; j < n; j++) {
                acc += ds[j] * krow[j];
                dkrow[j] += ds[j] * qd;
                dvrow[j] += p[j] * dod;
            }
            dqi[d] = acc;
        }
    }
}

// TinyLM's head sizes get their own unrolled copies; others run the same code with hd unknown
#define FOR_HEAD_SIZES(call) switch (hd) { \
    case 4: call(4); break; case 8: call(8); break; case 16: call(16); break; default: call(hd); }

// q, k, v, out (BH, T, hd); lse (BH, T): each query's log-sum-exp of its scores, for the backward pass
void tinylm_attention_forward(const float *q, const float *k, const float *v, float *out, float *lse, int BH, int T,
                              int hd, int window) {
    #pragma omp parallel
    {
        size_t S = row_stride(T), slice = (size_t)hd * S;
        float *kt = malloc(sizeof(float) * (2 * slice + T)), *vt = kt + slice, *p = vt + slice;
        #pragma omp for schedule(dynamic)
        for (int bh = 0; bh < BH; bh++) {
            size_t base = (size_t)bh * T * hd;
            to_rows(kt, k + base, T, hd, S);
            to_rows(vt, v + base, T, hd, S);
#define FORWARD(HD) forward_slice(q + base, kt, vt, out + base, lse + (size_t)bh * T, p, T, S, HD, window)
            FOR_HEAD_SIZES(FORWARD)
        }
        free(kt);
    }
}

// dq, dk, dv (BH, T, hd) from dout (BH, T, hd) and the forward's q, k, v, out and lse. Per query i, with
// p_j = exp(s_j - lse_i): dv_j += p_j dout_i; ds_j = p_j (dout_i . v_j - dout_i . out_i); dq_i = sum_j ds_j k_j;
// dk_j += ds_j q_i. One thread owns a (batch, head) slice, so its key gradients need no locks.
void tinylm_attention_backward(const float *q, const float *k, const float *v, const float *out, const float *lse,
                               const float *dout, float *dq, float *dk, float *dv, int BH, int T, int hd, int window) {
    #pragma omp parallel
    {
        size_t S = row_stride(T), slice = (size_t)hd * S;
        float *kt = malloc(sizeof(float) * (4 * slice + 2 * (size_t)T));
        float *vt = kt + slice, *dkt = vt + slice, *dvt = dkt + slice, *p = dvt + slice, *ds = p + T;
        #pragma omp for schedule(dynamic)
        for (int bh = 0; bh < BH; bh++) {
            size_t base = (size_t)bh * T * hd;
            to_rows(kt, k + base, T, hd, S);
            to_rows(vt, v + base, T, hd, S);
            memset(dkt, 0, sizeof(float) * 2 * slice);  // dkt and dvt
#define BACKWARD(HD) backward_slice(q + base, kt, vt, out + base, lse + (size_t)bh * T, dout + base, dq + base, \
                                    dkt, dvt, p, ds, T, S, HD, window)
            FOR_HEAD_SIZES(BACKWARD)
            from_rows(dk + base, dkt, T, hd, S);
            from_rows(dv + base, dvt, T, hd, S);
        }
        free(kt);
    }
}

