/* C kernels of the CPU's hot paths: a decoding step (attention, log-sum-exp, GELU) and the
 * training loss (softmax cross-entropy and its gradient). Built by trainformer/nn/native.py
 * with the system's C compiler on first use.
 *
 * Attention: a few queries per row against its cached keys.
 * PyTorch's attention kernels pay a fixed cost per (row, head) block, which
 * dominates at decoding shapes (one query, a few to a few dozen keys, 48-64
 * dimensions): here each block is two short loops over its keys.
 *
 *   out[n, t, h, :] = softmax_s(scale * q[n, h, t, :] . k[n / group, h / (H / KV), s, :]) @ v[same]
 *
 * q: (N, H, T, D) with strides q_n, q_h, q_t and unit stride over D;
 * k, v: (N / group, KV, S, D) with strides (row, head, key) and unit stride over D;
 *   `group` rows of q share one row of k/v (a source's beams and its encoder memory);
 * mask: NULL, or (N / group, S) bytes with row stride mask_n, nonzero = may attend;
 * out: contiguous (N, T, H, D), the layout the output projection takes.
 * A query with no key to attend to gets NaN (as plain softmax attention does).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef TF_VECTOR_MATH /* glibc's vector expf and erff (libmvec), 16 lanes at a time */
#pragma omp declare simd notinbranch
extern float expf(float);
#pragma omp declare simd notinbranch
extern float erff(float);
#endif

#define STACK_KEYS 4096

/* One query against its S keys; D is a constant where the caller's switch makes it one. */
static inline __attribute__((always_inline)) void attend_one(const float *restrict qp, const float *restrict kp, const float *restrict vp,
                       const uint8_t *restrict mp, float *restrict op, float *restrict p,
                       int64_t S, int64_t D, int64_t k_s, int64_t v_s, float scale) {
    float best = -INFINITY;
    for (int64_t s = 0; s < S; s++) {
        if (mp && !mp[s]) {
            p[s] = -INFINITY;
            continue;
        }
        const float *kr = kp + s * k_s;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; d++) acc += qp[d] * kr[d];
        p[s] = acc * scale;
        if (p[s] > best) best = p[s];
    }
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t s = 0; s < S; s++) {
        p[s] = expf(p[s] - best); /* a masked key: exp(-inf) = 0 */
        total += p[s];
    }
    for (int64_t d = 0; d < D; d++) op[d] = 0.0f;
    for (int64_t s = 0; s < S; s++) {
        if (p[s] == 0.0f) continue;
        const float w = p[s];
        const float *vr = vp + s * v_s;
#pragma omp simd
        for (int64_t d = 0; d < D; d++) op[d] += w * vr[d];
    }
    const float inv = 1.0f / total;
#pragma omp simd
    for (int64_t d = 0; d < D; d++) op[d] *= inv;
}

int tf_decode_attention(const float *q, const float *k, const float *v, const uint8_t *mask, float *out,
                        int64_t N, int64_t H, int64_t T, int64_t S, int64_t D, int64_t KV, int64_t group,
                        int64_t q_n, int64_t q_h, int64_t q_t, int64_t k_n, int64_t k_h, int64_t k_s,
                        int64_t v_n, int64_t v_h, int64_t v_s, int64_t mask_n, float scale) {
    float stack[STACK_KEYS];
    float *p = S <= STACK_KEYS ? stack : malloc((size_t)S * sizeof(float));
    if (!p) return 1;
    const int64_t heads_per_kv = H / KV;
    for (int64_t n = 0; n < N; n++) {
        const int64_t r = n / group;
        const uint8_t *mp = mask ? mask + r * mask_n : NULL;
        for (int64_t t = 0; t < T; t++) {
            for (int64_t h = 0; h < H; h++) {
                const int64_t kh = h / heads_per_kv;
                const float *qp = q + n * q_n + h * q_h + t * q_t, *kp = k + r * k_n + kh * k_h;
                const float *vp = v + r * v_n + kh * v_h;
                float *op = out + ((n * T + t) * H + h) * D;
                switch (D) { /* the usual head sizes, unrolled by the compiler */
                case 32: attend_one(qp, kp, vp, mp, op, p, S, 32, k_s, v_s, scale); break;
                case 48: attend_one(qp, kp, vp, mp, op, p, S, 48, k_s, v_s, scale); break;
                case 64: attend_one(qp, kp, vp, mp, op, p, S, 64, k_s, v_s, scale); break;
                case 128: attend_one(qp, kp, vp, mp, op, p, S, 128, k_s, v_s, scale); break;
                default: attend_one(qp, kp, vp, mp, op, p, S, D, k_s, v_s, scale);
                }
            }
        }
    }
    if (p != stack) free(p);
    return 0;
}

/* What a beam-search step needs of the next-token logits, in one pass over each row:
 *
 *   lse[n] = log(sum_w exp(logits[n, w]))           (log_softmax = logits - lse)
 *   block_max[n, j] = max_{w in block j} logits[n, w]  (blocks of `block` consecutive words)
 *
 * logits: (N, V) with row stride `row`, unit stride over V; V a multiple of `block`.
 * block_max: contiguous (N, V / block). The sum of exponentials re-reads the row while it
 * is still in cache. Replaces a log_softmax over (N, V) and a max over its blocks.
 */
void tf_logsumexp_block_max(const float *logits, float *lse, float *block_max, int64_t N, int64_t V, int64_t row,
                            int64_t block) {
    const int64_t blocks = V / block;
    for (int64_t n = 0; n < N; n++) {
        const float *x = logits + n * row;
        float *bm = block_max + n * blocks;
        float best = -INFINITY;
        for (int64_t j = 0; j < blocks; j++) {
            const float *xb = x + j * block;
            float m = -INFINITY;
#pragma omp simd reduction(max : m)
            for (int64_t w = 0; w < block; w++) m = xb[w] > m ? xb[w] : m;
            bm[j] = m;
            best = m > best ? m : best;
        }
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t w = 0; w < V; w++) total += expf(x[w] - best);
        lse[n] = best + logf(total);
    }
}

/* GELU (erf form, as torch.nn.functional.gelu) in place over n contiguous floats. */
void tf_gelu_(float *x, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
}

/* bf16 <-> float: a bf16 is the top half of a float's bits; rounding to nearest even, as torch. */
static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Label-smoothed softmax cross-entropy of rows [lo, hi) and its gradient, one pass per row:
 *
 *   p = softmax(x[n]),  t = (1 - eps) onehot(label[n]) + eps / V
 *   loss[n] = -sum(t * log p) = (1 - eps)(lse - x[label]) + eps (lse - mean(x))
 *   grad[n] = p - t              (loss[n] = 0 and grad[n] = 0 where label[n] = ignore)
 *
 * x: (N, V) logits, row stride `ld`, unit stride over V, float32 (bf16 = 0) or bf16 (bf16 = 1);
 * grad: contiguous (N, V) in x's dtype; loss: (N,) float32; buf: V floats of scratch.
 * Returns 0, or 1 + the first row whose label is neither in [0, V) nor `ignore`.
 */
int64_t tf_softmax_xent(const void *x, int64_t ld, int bf16, const int64_t *labels, int64_t ignore, float eps,
                        void *grad, float *loss, int64_t lo, int64_t hi, int64_t V) {
    float *buf = malloc((size_t)V * sizeof(float));
    if (!buf) return -1;
    for (int64_t n = lo; n < hi; n++) {
        const int64_t label = labels[n];
        if (label == ignore) {
            memset((char *)grad + n * V * (bf16 ? 2 : 4), 0, (size_t)V * (bf16 ? 2 : 4));
            loss[n] = 0.0f;
            continue;
        }
        if (label < 0 || label >= V) {
            free(buf);
            return n + 1;
        }
        float m = -INFINITY, sum_x = 0.0f;
        if (bf16) {
            const uint16_t *row = (const uint16_t *)x + n * ld;
#pragma omp simd reduction(max : m) reduction(+ : sum_x)
            for (int64_t w = 0; w < V; w++) {
                const float f = bf16_to_float(row[w]);
                buf[w] = f;
                m = f > m ? f : m;
                sum_x += f;
            }
        } else {
            const float *row = (const float *)x + n * ld;
#pragma omp simd reduction(max : m) reduction(+ : sum_x)
            for (int64_t w = 0; w < V; w++) {
                buf[w] = row[w];
                m = row[w] > m ? row[w] : m;
                sum_x += row[w];
            }
        }
        const float target = buf[label];
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t w = 0; w < V; w++) {
            buf[w] = expf(buf[w] - m);
            total += buf[w];
        }
        const float lse = m + logf(total);
        loss[n] = (1.0f - eps) * (lse - target) + (eps != 0.0f ? eps * (lse - sum_x / (float)V) : 0.0f);
        const float inv = 1.0f / total, floor_t = eps / (float)V;
        buf[label] -= (1.0f - eps) * total; /* p[label] - (1 - eps), before the scaling by 1 / total */
        if (bf16) {
            uint16_t *g = (uint16_t *)grad + n * V;
#pragma omp simd
            for (int64_t w = 0; w < V; w++) g[w] = float_to_bf16(buf[w] * inv - floor_t);
        } else {
            float *g = (float *)grad + n * V;
#pragma omp simd
            for (int64_t w = 0; w < V; w++) g[w] = buf[w] * inv - floor_t;
        }
    }
    free(buf);
    return 0;
}
