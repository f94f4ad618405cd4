// TinyLM's training attention on CPU in fp32: GPT-Neo's causal softmax attention (no 1/sqrt(hd) scale) of each
// (batch, head) slice, global or local (a query sees the last `window` keys), forward and backward. What
// scaled_dot_product_attention computes; at small head sizes (TinyStories-1M's is 4) its blocked kernel spends
// its time on per-block overhead, while a query's scores, all in cache, vectorize over keys here. model.py calls
// these through native.py (SelfAttention._attend), which compiles this file once per machine.
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

// dst (cols, rows) = src (rows, cols)
static void transpose(float *dst, const float *src, int rows, int cols) {
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) dst[(size_t)c * rows + r] = src[(size_t)r * cols + c];
}

static int first_key(int i, int window) {
    return window > 0 && i >= window ? i - window + 1 : 0;
}

// The forward pass of one (batch, head) slice: q, out (T, hd); kt, vt (hd, T), keys along rows; p: T floats of
// scratch. Inlined with a constant hd (see FOR_HEAD_SIZES), the loops over hd unroll into registers and each
// loop over keys is one vectorized pass.
static inline __attribute__((always_inline)) void forward_slice(const float *q, const float *kt, const float *vt,
                                                                float *out, float *lse, float *p, int T, int hd,
                                                                int window) {
    for (int i = 0; i < T; i++) {
        int lo = first_key(i, window), n = i + 1 - lo;
        const float *qi = q + (size_t)i * hd, *k0 = kt + lo, *v0 = vt + lo;
        float mx = -INFINITY, sum = 0.f;
        #pragma omp simd reduction(max:mx)
        for (int j = 0; j < n; j++) {
            float s = 0.f;
            for (int d = 0; d < hd; d++) s += qi[d] * k0[(size_t)d * T + j];
            p[j] = s;
            mx = s > mx ? s : mx;
        }
        #pragma omp simd reduction(+:sum)
        for (int j = 0; j < n; j++) {
            p[j] = exp_nonpositive(p[j] - mx);
            sum += p[j];
        }
        for (int d = 0; d < hd; d++) {
            const float *row = v0 + (size_t)d * T;
            float acc = 0.f;
            #pragma omp simd reduction(+:acc)
            for (int j = 0; j < n; j++) acc += p[j] * row[j];
            out[(size_t)i * hd + d] = acc / sum;
        }
        lse[i] = mx + logf(sum);
    }
}

// The backward pass of one slice, as forward_slice: dq (T, hd); dkt, dvt (hd, T) accumulate; p, ds: T floats each
static inline __attribute__((always_inline)) void backward_slice(const float *q, const float *kt, const float *vt,
                                                                 const float *out, const float *lse,
                                                                 const float *dout, float *dq, float *dkt,
                                                                 float *dvt, float *p, float *ds, int T, int hd,
                                                                 int window) {
    for (int i = 0; i < T; i++) {
        int lo = first_key(i, window), n = i + 1 - lo;
        const float *qi = q + (size_t)i * hd, *doi = dout + (size_t)i * hd, *k0 = kt + lo, *v0 = vt + lo;
        float di = 0.f, li = lse[i];
        for (int d = 0; d < hd; d++) di += doi[d] * out[(size_t)i * hd + d];
        #pragma omp simd
        for (int j = 0; j < n; j++) {
            float s = 0.f, dp = 0.f;
            for (int d = 0; d < hd; d++) {
                s += qi[d] * k0[(size_t)d * T + j];
                dp += doi[d] * v0[(size_t)d * T + j];
            }
            p[j] = exp_nonpositive(s - li);
            ds[j] = p[j] * (dp - di);
        }
        for (int d = 0; d < hd; d++) {
            const float *krow = k0 + (size_t)d * T;
            float *dkrow = dkt + (size_t)d * T + lo, *dvrow = dvt + (size_t)d * T + lo;
            float qd = qi[d], dod = doi[d], acc = 0.f;
            #pragma omp simd reduction(+:acc)
            for (int j = 0; j < n; j++) {
                acc += ds[j] * krow[j];
                dkrow[j] += ds[j] * qd;
                dvrow[j] += p[j] * dod;
            }
            dq[(size_t)i * hd + d] = acc;
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
        size_t slice = (size_t)hd * T;
        float *kt = malloc(sizeof(float) * (2 * slice + T)), *vt = kt + slice, *p = vt + slice;
        #pragma omp for schedule(dynamic)
        for (int bh = 0; bh < BH; bh++) {
            size_t base = (size_t)bh * T * hd;
            transpose(kt, k + base, T, hd);
            transpose(vt, v + base, T, hd);
#define FORWARD(HD) forward_slice(q + base, kt, vt, out + base, lse + (size_t)bh * T, p, T, HD, window)
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
        size_t slice = (size_t)hd * T;
        float *kt = malloc(sizeof(float) * (4 * slice + 2 * (size_t)T));
        float *vt = kt + slice, *dkt = vt + slice, *dvt = dkt + slice, *p = dvt + slice, *ds = p + T;
        #pragma omp for schedule(dynamic)
        for (int bh = 0; bh < BH; bh++) {
            size_t base = (size_t)bh * T * hd;
            transpose(kt, k + base, T, hd);
            transpose(vt, v + base, T, hd);
            memset(dkt, 0, sizeof(float) * 2 * slice);  // dkt and dvt
#define BACKWARD(HD) backward_slice(q + base, kt, vt, out + base, lse + (size_t)bh * T, dout + base, dq + base, \
                                    dkt, dvt, p, ds, T, HD, window)
            FOR_HEAD_SIZES(BACKWARD)
            transpose(dk + base, dkt, hd, T);
            transpose(dv + base, dvt, hd, T);
        }
        free(kt);
    }
}

