// Fused elementwise kernels for the CPU training step (fp32, contiguous, row-major).
//
// Built on first use by gam_pretrain/models/cpu_kernels.py (g++ -O3 -march=native -fopenmp) and
// called through ctypes with raw pointers. The OpenMP runtime is the libgomp.so.1 torch has
// already loaded, so these loops share torch's thread pool and thread count.
//
// Each kernel replaces several ATen passes over a (tokens x channels) buffer with one; the
// functions are the ones in cpu_kernels.py's torch reference implementations, which the tests
// compare against.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <vector>

namespace {

inline float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }

// exp(x) to ~2 ulp: 2^n * poly(r), r = x - n ln2 in [-ln2/2, ln2/2]. Written so that GCC
// vectorizes loops calling it; exact 0 below -87 (no denormals).
inline float fast_exp(float x) {
    const float clamped = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // not fmin/fmax: GCC won't vectorize those
    const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const float n = (clamped * 1.44269504088896341f + magic) - magic;
    const float r = (clamped - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const float scale = bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
    return x < -87.0f ? 0.0f : p * scale;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }

// Normal CDF (as GELU uses it) by Abramowitz & Stegun 7.1.26 for erf (the formula ATen's
// vectorized erf uses; |error| < 1.5e-7), and the normal density, sharing one exp.
struct CdfPdf {
    float cdf, pdf;
};

inline CdfPdf normal_cdf_pdf(float x) {
    const float z = std::fabs(x) * 0.70710678118654752f;
    const float t = 1.0f / (1.0f + 0.3275911f * z);
    float poly = 1.061405429f;
    poly = poly * t - 1.453152027f;
    poly = poly * t + 1.421413741f;
    poly = poly * t - 0.284496736f;
    poly = poly * t + 0.254829592f;
    const float e = fast_exp(-z * z);  // = exp(-x^2 / 2)
    const float erf_abs = 1.0f - poly * t * e;
    const float erf = x < 0.0f ? -erf_abs : erf_abs;
    return CdfPdf{0.5f + 0.5f * erf, e * 0.39894228040143268f};
}

// Dropout keep-mask as a keyed counter hash: element i of a call with seed (k0, k1) is kept when
// the top 24 bits of hash(i) are >= threshold. No state, so backward regenerates the mask
// instead of storing it, and the result does not depend on the thread count.
inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

inline float keep_scale(uint32_t i, uint32_t k0, uint32_t k1, uint32_t threshold, float scale) {
    const uint32_t h = mix32(mix32(i * 0x9e3779b1u + k0) ^ k1);
    return (h >> 8) >= threshold ? scale : 0.0f;
}

struct Mask {
    uint32_t k0, k1, threshold;
    float scale;
    float at(int64_t i) const { return keep_scale(static_cast<uint32_t>(i), k0, k1, threshold, scale); }
};

// Inactive (no dropout): threshold 0 keeps every element, at scale 1.
Mask make_mask(uint64_t seed, uint32_t threshold, float scale, int active) {
    return active ? Mask{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), threshold, scale}
                  : Mask{0, 0, 0, 1.0f};
}

// [begin, end) of part `part` of n items split into `parts`, in multiples of `align`.
inline void split_range(int64_t n, int64_t align, int64_t part, int64_t parts, int64_t& begin, int64_t& end) {
    const int64_t blocks = (n + align - 1) / align;
    begin = std::min(n, (blocks * part / parts) * align);
    end = std::min(n, (blocks * (part + 1) / parts) * align);
}

// This thread's share of n items.
inline void thread_range(int64_t n, int64_t align, int64_t& begin, int64_t& end) {
    split_range(n, align, omp_get_thread_num(), omp_get_num_threads(), begin, end);
}

// Column sums (bias gradients) are accumulated over a fixed number of row chunks and then added in
// chunk order, so they do not depend on the thread count. scratch: kChunks * cols floats.
constexpr int64_t kChunks = 16;

inline void sum_chunks(const float* scratch, float* out, int64_t cols) {
    for (int64_t c = 0; c < cols; ++c) {
        float s = 0.0f;
        for (int64_t k = 0; k < kChunks; ++k) s += scratch[k * cols + c];
        out[c] = s;
    }
}

}  // namespace

extern "C" {

int64_t column_sum_chunks() { return kChunks; }

// out = residual + (x + bias) * mask; residual and bias may be null. x, out: (rows, cols).
void bias_dropout_add_forward(const float* __restrict residual, const float* __restrict x, const float* __restrict bias, float* __restrict out, int64_t rows,
                              int64_t cols, uint64_t seed, uint32_t threshold, float scale, int dropout_active,
                              int threads) {
    const Mask mask = make_mask(seed, threshold, scale, dropout_active);
#pragma omp parallel num_threads(threads)
    {
        int64_t begin, end;
        thread_range(rows, 1, begin, end);
        for (int64_t r = begin; r < end; ++r) {
            const int64_t o = r * cols;
#pragma omp simd
            for (int64_t c = 0; c < cols; ++c) {
                const float v = (x[o + c] + (bias ? bias[c] : 0.0f)) * mask.at(o + c);
                out[o + c] = residual ? residual[o + c] + v : v;
            }
        }
    }
}

// grad_x = grad * mask; with grad_bias, also its column sums (scratch: kChunks * cols floats).
void bias_dropout_add_backward(const float* __restrict grad, float* __restrict grad_x, float* __restrict grad_bias, float* __restrict scratch, int64_t rows,
                               int64_t cols, uint64_t seed, uint32_t threshold, float scale, int dropout_active,
                               int threads) {
    const Mask mask = make_mask(seed, threshold, scale, dropout_active);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t chunk = 0; chunk < kChunks; ++chunk) {
        int64_t begin, end;
        split_range(rows, 1, chunk, kChunks, begin, end);
        float* __restrict sums = scratch + chunk * cols;
        if (grad_bias) std::memset(sums, 0, sizeof(float) * cols);
        for (int64_t r = begin; r < end; ++r) {
            const int64_t o = r * cols;
#pragma omp simd
            for (int64_t c = 0; c < cols; ++c) grad_x[o + c] = grad[o + c] * mask.at(o + c);
            if (grad_bias) {
#pragma omp simd
                for (int64_t c = 0; c < cols; ++c) sums[c] += grad_x[o + c];
            }
        }
    }
    if (grad_bias) sum_chunks(scratch, grad_bias, cols);
}

// GAM's gated mix: out = residual + dropout(sigmoid(g_l) * local + sigmoid(g_g) * glob) where
// [g_l | g_g] = gates + gate_bias; gates: (rows, 2C); local, glob, residual, out: (rows, C).
void gated_mix_forward(const float* __restrict residual, const float* __restrict gates, const float* __restrict gate_bias, const float* __restrict local,
                       const float* __restrict glob, float* __restrict out, int64_t rows, int64_t channels, uint64_t seed,
                       uint32_t threshold, float scale, int dropout_active, int threads) {
    const Mask mask = make_mask(seed, threshold, scale, dropout_active);
#pragma omp parallel num_threads(threads)
    {
        int64_t begin, end;
        thread_range(rows, 1, begin, end);
        for (int64_t r = begin; r < end; ++r) {
            const float* __restrict gl = gates + r * 2 * channels;
            const float* __restrict gg = gl + channels;
            const float* __restrict bl = gate_bias;
            const float* __restrict bg = gate_bias + channels;
            const int64_t o = r * channels;
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) {
                const float mixed = sigmoid(gl[c] + bl[c]) * local[o + c] + sigmoid(gg[c] + bg[c]) * glob[o + c];
                out[o + c] = residual[o + c] + mixed * mask.at(o + c);
            }
        }
    }
}

// Gradients of gated_mix_forward for gates (= for gate_bias, summed over rows), local and glob;
// the residual's gradient is grad itself. scratch: kChunks * 2C floats.
void gated_mix_backward(const float* __restrict grad, const float* __restrict gates, const float* __restrict gate_bias, const float* __restrict local,
                        const float* __restrict glob, float* __restrict grad_gates, float* __restrict grad_gate_bias, float* __restrict grad_local,
                        float* __restrict grad_glob, float* __restrict scratch, int64_t rows, int64_t channels, uint64_t seed,
                        uint32_t threshold, float scale, int dropout_active, int threads) {
    const Mask mask = make_mask(seed, threshold, scale, dropout_active);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t chunk = 0; chunk < kChunks; ++chunk) {
        int64_t begin, end;
        split_range(rows, 1, chunk, kChunks, begin, end);
        float* __restrict sums = scratch + chunk * 2 * channels;
        std::memset(sums, 0, sizeof(float) * 2 * channels);
        for (int64_t r = begin; r < end; ++r) {
            const float* __restrict gl = gates + r * 2 * channels;
            const float* __restrict gg = gl + channels;
            float* __restrict dgl = grad_gates + r * 2 * channels;
            float* __restrict dgg = dgl + channels;
            const float* __restrict bl = gate_bias;
            const float* __restrict bg = gate_bias + channels;
            const int64_t o = r * channels;
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) {
                const float d_mixed = grad[o + c] * mask.at(o + c);
                const float sl = sigmoid(gl[c] + bl[c]), sg = sigmoid(gg[c] + bg[c]);
                grad_local[o + c] = d_mixed * sl;
                grad_glob[o + c] = d_mixed * sg;
                dgl[c] = d_mixed * local[o + c] * sl * (1.0f - sl);
                dgg[c] = d_mixed * glob[o + c] * sg * (1.0f - sg);
            }
#pragma omp simd
            for (int64_t c = 0; c < 2 * channels; ++c) sums[c] += dgl[c];
        }
    }
    sum_chunks(scratch, grad_gate_bias, 2 * channels);
}

// out = GELU(x + bias) (exact, erf form) and deriv = GELU'(x + bias), which backward needs: it
// falls out of the same exp here, and saving it instead of x makes backward a multiply.
// x, out, deriv: (rows, cols); bias: (cols).
void bias_gelu_forward(const float* __restrict x, const float* __restrict bias, float* __restrict out,
                       float* __restrict deriv, int64_t rows, int64_t cols, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t begin, end;
        thread_range(rows, 1, begin, end);
        for (int64_t r = begin; r < end; ++r) {
            const float* __restrict xr = x + r * cols;
            float* __restrict outr = out + r * cols;
            float* __restrict dr = deriv + r * cols;
#pragma omp simd
            for (int64_t c = 0; c < cols; ++c) {
                const float v = xr[c] + bias[c];
                const CdfPdf n = normal_cdf_pdf(v);
                outr[c] = v * n.cdf;
                dr[c] = n.cdf + v * n.pdf;
            }
        }
    }
}

// grad_x = grad * deriv; grad_bias = its column sums (scratch: kChunks * cols floats).
void bias_gelu_backward(const float* __restrict grad, const float* __restrict deriv, float* __restrict grad_x,
                        float* __restrict grad_bias, float* __restrict scratch, int64_t rows, int64_t cols, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t chunk = 0; chunk < kChunks; ++chunk) {
        int64_t begin, end;
        split_range(rows, 1, chunk, kChunks, begin, end);
        float* __restrict sums = scratch + chunk * cols;
        std::memset(sums, 0, sizeof(float) * cols);
        for (int64_t r = begin; r < end; ++r) {
            const float* __restrict dr = deriv + r * cols;
            const float* __restrict gr = grad + r * cols;
            float* __restrict dxr = grad_x + r * cols;
#pragma omp simd
            for (int64_t c = 0; c < cols; ++c) {
                const float d = gr[c] * dr[c];
                dxr[c] = d;
                sums[c] += d;
            }
        }
    }
    sum_chunks(scratch, grad_bias, cols);
}

// Depthwise causal conv over time: out[b, t] = bias + sum_j w[j] * x[b, t - (k - 1) + j] (zero
// before t = 0). x, out: (batch, time, C); wt: the weight as (k, C); bias: (C) or null.
void causal_conv_forward(const float* __restrict x, const float* __restrict wt, const float* __restrict bias,
                         float* __restrict out, int64_t batch, int64_t time, int64_t channels, int64_t k,
                         int threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t begin, end;
        thread_range(batch * time, 1, begin, end);
        for (int64_t r = begin; r < end; ++r) {
            const int64_t t = r % time;
            float* __restrict o = out + r * channels;
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) o[c] = bias ? bias[c] : 0.0f;
            for (int64_t j = 0; j < k; ++j) {
                const int64_t lag = k - 1 - j;
                if (t < lag) continue;
                const float* __restrict xs = x + (r - lag) * channels;
                const float* __restrict w = wt + j * channels;
#pragma omp simd
                for (int64_t c = 0; c < channels; ++c) o[c] += w[c] * xs[c];
            }
        }
    }
}

// Gradients of causal_conv_forward: grad_x, and grad_params = [grad_wt (k, C) | grad_bias (C)]
// (scratch: kChunks * (k + 1) * C floats).
void causal_conv_backward(const float* __restrict grad, const float* __restrict x, const float* __restrict wt,
                          float* __restrict grad_x, float* __restrict grad_params, float* __restrict scratch, int64_t batch, int64_t time, int64_t channels, int64_t k,
                          int threads) {
    const int64_t rows = batch * time;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t chunk = 0; chunk < kChunks; ++chunk) {
        int64_t begin, end;
        split_range(rows, 1, chunk, kChunks, begin, end);
        float* __restrict sums = scratch + chunk * (k + 1) * channels;  // k weight rows, then the bias
        std::memset(sums, 0, sizeof(float) * (k + 1) * channels);
        for (int64_t r = begin; r < end; ++r) {
            const int64_t t = r % time;
            const float* __restrict g = grad + r * channels;
            float* __restrict dx = grad_x + r * channels;
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) dx[c] = 0.0f;
            for (int64_t j = 0; j < k; ++j) {
                const int64_t lag = k - 1 - j;
                const float* __restrict w = wt + j * channels;
                if (t + lag < time) {  // x[r] feeds out[r + lag] through w[j]
                    const float* __restrict g_out = grad + (r + lag) * channels;
#pragma omp simd
                    for (int64_t c = 0; c < channels; ++c) dx[c] += w[c] * g_out[c];
                }
                if (t >= lag) {  // out[r] read x[r - lag] through w[j]
                    const float* __restrict xs = x + (r - lag) * channels;
                    float* __restrict sw = sums + j * channels;
#pragma omp simd
                    for (int64_t c = 0; c < channels; ++c) sw[c] += g[c] * xs[c];
                }
            }
            float* __restrict sb = sums + k * channels;
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) sb[c] += g[c];
        }
    }
    sum_chunks(scratch, grad_params, (k + 1) * channels);
}

// LayerNorm over the last dim: out = (x - mean) * rstd * weight + bias; also writes each row's mean
// and rstd = 1 / sqrt(var + eps) (biased variance, as torch). x, out: (rows, cols).
void layer_norm_forward(const float* __restrict x, const float* __restrict weight, const float* __restrict bias,
                        float* __restrict out, float* __restrict mean, float* __restrict rstd, int64_t rows,
                        int64_t cols, float eps, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t begin, end;
        thread_range(rows, 1, begin, end);
        for (int64_t r = begin; r < end; ++r) {
            const float* __restrict xr = x + r * cols;
            float* __restrict o = out + r * cols;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t c = 0; c < cols; ++c) sum += xr[c];
            const float m = sum / static_cast<float>(cols);
            float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
            for (int64_t c = 0; c < cols; ++c) sq += (xr[c] - m) * (xr[c] - m);
            const float rs = 1.0f / std::sqrt(sq / static_cast<float>(cols) + eps);
#pragma omp simd
            for (int64_t c = 0; c < cols; ++c) o[c] = (xr[c] - m) * rs * weight[c] + bias[c];
            mean[r] = m;
            rstd[r] = rs;
        }
    }
}

// Gradients of layer_norm_forward: grad_x, and grad_params = [grad_weight | grad_bias] as column
// sums (scratch: kChunks * 2 * cols floats).
void layer_norm_backward(const float* __restrict grad, const float* __restrict x, const float* __restrict mean,
                         const float* __restrict rstd, const float* __restrict weight, float* __restrict grad_x,
                         float* __restrict grad_params, float* __restrict scratch,
                         int64_t rows, int64_t cols, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t chunk = 0; chunk < kChunks; ++chunk) {
        int64_t begin, end;
        split_range(rows, 1, chunk, kChunks, begin, end);
        float* __restrict sw = scratch + chunk * 2 * cols;
        float* __restrict sb = sw + cols;
        std::memset(sw, 0, sizeof(float) * 2 * cols);
        for (int64_t r = begin; r < end; ++r) {
            const float* __restrict xr = x + r * cols;
            const float* __restrict g = grad + r * cols;
            float* __restrict dx = grad_x + r * cols;
            const float m = mean[r], rs = rstd[r];
            float dot = 0.0f, total = 0.0f;  // sum(g * w * xhat), sum(g * w)
#pragma omp simd reduction(+ : dot, total)
            for (int64_t c = 0; c < cols; ++c) {
                const float xhat = (xr[c] - m) * rs;
                const float gw = g[c] * weight[c];
                dot += gw * xhat;
                total += gw;
                sw[c] += g[c] * xhat;
                sb[c] += g[c];
            }
            const float a = dot / static_cast<float>(cols), b = total / static_cast<float>(cols);
#pragma omp simd
            for (int64_t c = 0; c < cols; ++c) {
                const float xhat = (xr[c] - m) * rs;
                dx[c] = rs * (g[c] * weight[c] - xhat * a - b);
            }
        }
    }
    sum_chunks(scratch, grad_params, 2 * cols);
}

// Cross-entropy rows, in place: logits (rows, vocab) become exp(logit - row max); per row,
// loss = max + log(sum) - logit[target] and inv_sum = 1 / sum. The caller forms the gradient
// (softmax - onehot) from these without another pass over the logits.
void softmax_cross_entropy_forward(float* __restrict logits, const int64_t* __restrict targets, float* __restrict loss, float* __restrict inv_sum,
                                   int64_t rows, int64_t vocab, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t begin, end;
        thread_range(rows, 1, begin, end);
        for (int64_t r = begin; r < end; ++r) {
            float* __restrict row = logits + r * vocab;
            float m = -INFINITY;
#pragma omp simd reduction(max : m)
            for (int64_t v = 0; v < vocab; ++v) m = row[v] > m ? row[v] : m;
            const float target_logit = row[targets[r]];
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t v = 0; v < vocab; ++v) {
                const float e = fast_exp(row[v] - m);
                row[v] = e;
                s += e;
            }
            loss[r] = m + std::log(s) - target_logit;
            inv_sum[r] = 1.0f / s;
        }
    }
}

}  // extern "C"
