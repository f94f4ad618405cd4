// TinyLM's per-token decoding step in C, for CPU and fp32: what GPTNeo.decode_step (model.py) computes,
// without the per-operation overhead that dominates a small model's step in PyTorch. native.py compiles
// this file on first use and calls tinylm_decode_step through ctypes.
//
// Build: cc -O3 -march=native -fopenmp-simd -fno-math-errno -fno-trapping-math -shared -fPIC -fopenmp
//        -DTINYLM_MVEC -lmvec decode.c -o decode.so -lm
// native.py runs this once per machine (the compiler from $CC, else cc, gcc or clang), caches the library under
// ~/.cache/tinylm, and builds with fewer flags where OpenMP or glibc's libmvec is missing.
#include <math.h>
#include <stddef.h>
#include <string.h>

#ifdef TINYLM_MVEC
// glibc's vector math (libmvec) has SIMD versions of expf and tanhf; declaring them lets the compiler
// vectorize the softmax and GELU loops (math.h declares them only under -ffast-math, which is not used here).
#pragma omp declare simd notinbranch
float expf(float);
#pragma omp declare simd notinbranch
float tanhf(float);
#endif

typedef struct {
    int n_layer, n_head, n_embd, n_inner, vocab_size, window_size, max_len, batch_size;
    float eps;
    const int *local_heads;  // (n_layer,): the first local_heads[l] heads of layer l are local
    const float *wte, *wpe, *lnf_w, *lnf_b;
    // (n_layer,) arrays of pointers; qkv_w is q, k and v stacked: (3 * n_embd, n_embd)
    const float **ln1_w, **ln1_b, **qkv_w, **out_w, **out_b, **ln2_w, **ln2_b, **fc_w, **fc_b, **proj_w, **proj_b;
    // Keys then values with positions along rows, so attention loops run over positions:
    // global (2, B, n_head - nl, hd, max_len) and local ring (2, B, nl, hd, min(window_size, max_len)), or NULL
    float **global_kv, **local_kv;
    float *scratch;  // (7 * n_embd + n_inner + max_len + batch_size * n_embd) floats
    // For greedy decoding (else NULL): wte rounded to bf16 in tiles (see lm_head_candidates), and its rows' L2
    // norms (vocab_size)
    const unsigned short *wte_bf16;
    const float *wte_norms;
} Model;

static float dot(const float *a, const float *b, int n) {
    float acc = 0.f;
    #pragma omp simd reduction(+:acc)
    for (int i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

static void layer_norm(float *out, const float *x, const float *w, const float *b, int n, float eps) {
    float mean = 0.f, var = 0.f;
    for (int i = 0; i < n; i++) mean += x[i];
    mean /= n;
    for (int i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    float rstd = 1.f / sqrtf(var / n + eps);
    for (int i = 0; i < n; i++) out[i] = (x[i] - mean) * rstd * w[i] + b[i];
}

// out[0..3] = the four rows of w (4, n) dotted with x: x is loaded once for four rows, and the four sums
// share one horizontal reduction's latency (a row at a time, a 64-wide layer spends more on reducing than on
// multiplying)
static void dot4(float *out, const float *w, const float *x, int n) {
    const float *w0 = w, *w1 = w0 + n, *w2 = w1 + n, *w3 = w2 + n;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    #pragma omp simd reduction(+:a0, a1, a2, a3)
    for (int i = 0; i < n; i++) {
        a0 += w0[i] * x[i];
        a1 += w1[i] * x[i];
        a2 += w2[i] * x[i];
        a3 += w3[i] * x[i];
    }
    out[0] = a0, out[1] = a1, out[2] = a2, out[3] = a3;
}

// out = w @ x (+ bias) for w (rows, n)
static void matvec(float *out, const float *w, const float *x, const float *bias, int rows, int n) {
    int r = 0;
    for (; r + 4 <= rows; r += 4) dot4(out + r, w + (size_t)r * n, x, n);
    for (; r < rows; r++) out[r] = dot(w + (size_t)r * n, x, n);
    if (bias)
        for (r = 0; r < rows; r++) out[r] += bias[r];
}

// Softmax attention of q (hd) over the first n positions of kt, vt (hd, S) into out (hd). GPT-Neo does not
// scale q.k by 1/sqrt(hd).
static void attend(float *out, const float *q, const float *kt, const float *vt, int n, int hd, size_t S,
                   float *scores) {
    for (int j = 0; j < n; j++) scores[j] = 0.f;
    for (int d = 0; d < hd; d++) {
        const float *row = kt + d * S;
        float qd = q[d];
        #pragma omp simd
        for (int j = 0; j < n; j++) scores[j] += qd * row[j];
    }
    float mx = -INFINITY, sum = 0.f;
    #pragma omp simd reduction(max:mx)
    for (int j = 0; j < n; j++) mx = scores[j] > mx ? scores[j] : mx;
    #pragma omp simd reduction(+:sum)
    for (int j = 0; j < n; j++) {
        scores[j] = expf(scores[j] - mx);
        sum += scores[j];
    }
    for (int d = 0; d < hd; d++) out[d] = dot(scores, vt + d * S, n) / sum;
}

static float gelu_new(float x) {
    return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// out[lo..hi) of one row's logits (lo a multiple of 4, hi a multiple of 4 or V): dot4 on rows in aligned fours,
// dot on the last V % 4, split over all cores. The one way decode.c computes fp32 logits, so
// lm_head_candidates gives lm_head's numbers bit for bit: never inlined, since a compiler may vectorize the
// same loop differently at two inlined sites (clang -march=native with AVX-512 did, summing in another order).
#if defined(__GNUC__)
__attribute__((noinline))
#endif
static void exact_rows(const Model *m, const float *h, float *out, int lo, int hi) {
    int C = m->n_embd, fours = m->vocab_size - m->vocab_size % 4, end = hi < fours ? hi : fours;
    #pragma omp parallel for schedule(static)
    for (int r = lo; r < end; r += 4) dot4(out + r, m->wte + (size_t)r * C, h, C);
    for (int r = end > lo ? end : lo; r < hi; r++) out[r] = dot(m->wte + (size_t)r * C, h, C);
}

// logits (B, V) = hidden (B, C) @ wte.T: the step's largest cost (it reads all of wte)
static void lm_head(const Model *m, const float *hidden, float *logits) {
    for (int b = 0; b < m->batch_size; b++)
        exact_rows(m, hidden + (size_t)b * m->n_embd, logits + (size_t)b * m->vocab_size, 0, m->vocab_size);
}

#define TILE_ROWS 64

static float bf16_to_float(unsigned short x) {
    unsigned int bits = (unsigned int)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

// out (64) = the 64 rows of a (n, 64) tile of bf16 weights (rows along columns) dotted with x, in fp32:
// with rows across lanes, the sums need no horizontal reduction, which is what a row at a time costs most
static void tile_dot_bf16(float *out, const unsigned short *tile, const float *x, int n) {
    float acc[TILE_ROWS] = {0.f};
    for (int i = 0; i < n; i++) {
        const unsigned short *w = tile + (size_t)i * TILE_ROWS;
        float xi = x[i];
        #pragma omp simd
        for (int l = 0; l < TILE_ROWS; l++) acc[l] += xi * bf16_to_float(w[l]);
    }
    memcpy(out, acc, sizeof acc);
}

// What greedy decoding needs of lm_head, reading half its bytes: the fp32 logits that could be the largest,
// exactly as lm_head computes them, and -inf where a logit cannot be. A row's logit from bf16 weights, a,
// differs from lm_head's, l, by at most bound = slack * |h| * |w_row|: rounding to bf16 moves each weight by at
// most 2^-9 of itself, and either fp32 sum is within (n + 1) * 2^-24 of the exact one (Cauchy-Schwarz turns
// sum |h_i w_i| into the norms). So the largest l is at least top_low = max(a - bound), and a row with
// a + bound < top_low is below it: only the other rows (about one in 50257 for TinyStories models, trained or
// random) are computed in fp32. wte_bf16 holds the first V - V % 64 rows as (n_embd, 64) tiles; the rest are
// always computed in fp32.
static void lm_head_candidates(const Model *m, const float *hidden, float *logits) {
    int C = m->n_embd, V = m->vocab_size, tiled = V - V % TILE_ROWS;
    double slack = 1.01 * (ldexp(1., -9) + 2. * (C + 2) * ldexp(1., -24));  // 1.01: rounding in the bound itself
    for (int b = 0; b < m->batch_size; b++) {
        const float *h = hidden + (size_t)b * C;
        float *out = logits + (size_t)b * V;
        double h_norm = 0.;
        for (int i = 0; i < C; i++) h_norm += (double)h[i] * h[i];
        float scale = (float)(slack * sqrt(h_norm));
        float top_low = -INFINITY;
        #pragma omp parallel for schedule(static) reduction(max:top_low)
        for (int r = 0; r < tiled; r += TILE_ROWS) {
            tile_dot_bf16(out + r, m->wte_bf16 + (size_t)r * C, h, C);
            for (int j = r; j < r + TILE_ROWS; j++) {
                float low = out[j] - scale * m->wte_norms[j];
                top_low = low > top_low ? low : top_low;
            }
        }
        exact_rows(m, h, out, tiled, V);
        for (int j = tiled; j < V; j++) top_low = out[j] > top_low ? out[j] : top_low;
        if (!isfinite(top_low) || !isfinite(scale)) {  // NaN or inf in the hidden state: all logits, as lm_head
            exact_rows(m, h, out, 0, tiled);
            continue;
        }
        #pragma omp parallel for schedule(static)
        for (int r = 0; r < tiled; r += 4) {
            int candidate = 0;
            for (int j = r; j < r + 4; j++) candidate |= out[j] + scale * m->wte_norms[j] >= top_low;
            if (candidate)  // by exact_rows itself (inside this parallel loop it runs on this thread alone)
                exact_rows(m, h, out, r, r + 4);
            else
                out[r] = out[r + 1] = out[r + 2] = out[r + 3] = -INFINITY;
        }
    }
}

// logits (B, V) after tokens (B,) at position pos; every earlier position is in the caches, which get this one.
void tinylm_decode_step(const Model *m, const long long *tokens, long long pos, float *logits) {
    int C = m->n_embd, nh = m->n_head, hd = C / nh, I = m->n_inner, B = m->batch_size;
    int W = m->window_size < m->max_len ? m->window_size : m->max_len;
    float *x = m->scratch, *h = x + C, *att = h + C, *y = att + C, *qkv = y + C, *u = qkv + 3 * C;
    float *scores = u + I, *hidden = scores + m->max_len;
    for (int b = 0; b < B; b++) {
        for (int i = 0; i < C; i++) x[i] = m->wte[(size_t)tokens[b] * C + i] + m->wpe[(size_t)pos * C + i];
        for (int l = 0; l < m->n_layer; l++) {
            int nl = m->local_heads[l];
            layer_norm(h, x, m->ln1_w[l], m->ln1_b[l], C, m->eps);
            matvec(qkv, m->qkv_w[l], h, NULL, 3 * C, C);  // (3, n_head, hd)
            for (int head = 0; head < nh; head++) {
                int local = head < nl, heads = local ? nl : nh - nl, i = local ? head : head - nl;
                // a local head keeps position p in ring slot p % W, and sees every filled slot
                size_t S = local ? W : m->max_len, slot = local ? pos % W : pos;
                int n = local ? (pos + 1 < W ? pos + 1 : W) : pos + 1;
                float *kt = (local ? m->local_kv[l] : m->global_kv[l]) + ((size_t)b * heads + i) * hd * S;
                float *vt = kt + (size_t)B * heads * hd * S;
                for (int d = 0; d < hd; d++) {
                    kt[d * S + slot] = qkv[C + head * hd + d];
                    vt[d * S + slot] = qkv[2 * C + head * hd + d];
                }
                attend(att + head * hd, qkv + head * hd, kt, vt, n, hd, S, scores);
            }
            matvec(y, m->out_w[l], att, m->out_b[l], C, C);
            for (int i = 0; i < C; i++) x[i] += y[i];
            layer_norm(h, x, m->ln2_w[l], m->ln2_b[l], C, m->eps);
            matvec(u, m->fc_w[l], h, m->fc_b[l], I, C);
            #pragma omp simd
            for (int i = 0; i < I; i++) u[i] = gelu_new(u[i]);
            matvec(y, m->proj_w[l], u, m->proj_b[l], C, I);
            for (int i = 0; i < C; i++) x[i] += y[i];
        }
        layer_norm(hidden + (size_t)b * C, x, m->lnf_w, m->lnf_b, C, m->eps);
    }
    if (m->wte_bf16)
        lm_head_candidates(m, hidden, logits);
    else
        lm_head(m, hidden, logits);
}
