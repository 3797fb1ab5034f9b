// The LLaMA decoder's one-token step for a batch of rows in one call: tinylm's compiled decode step.
// models/compiled.py builds this file with the machine's C++ compiler (-O3 -march=native -fopenmp) and calls
// `tinylm_step` through ctypes, so a step costs one call instead of ~150 PyTorch dispatches.
//
// The arithmetic is FastLlama's (models/decode.py), with the same folded matrices: RMSNorm gains, sqrt(dim) and
// 1/sqrt(head_dim) are in the weights, RMSNorm is x / hypot(|x|, sqrt(dim * eps)), RoPE is half-split from tables.
// Matrices come packed for the kernels below, outputs padded to a multiple of 16 with zeros:
//   float32  [out/16][in][16]       16 outputs side by side, one input at a time (one FMA into 16 lanes);
//   int8     [out/16][in/4][16][4]  the operand layout of AVX-512 VNNI's vpdpbusd (4 inputs of 16 outputs in 64
//            bytes), inputs padded to a multiple of 4; one scale per output (max |w| / 127). Activations are
//            quantised per row as they enter a product (max |x| / 127) and shifted to unsigned (+128); the shift's
//            share, 128 * sum(w), is kept per output and subtracted (as llama.cpp's q8_0 dot products, per row).
// Where the compiler has no AVX-512 VNNI, portable vector code computes the same integer sums.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512F__) && !defined(TINYLM_PORTABLE)
#include <immintrin.h>
#define TINYLM_VNNI 1
#endif

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

namespace {

constexpr int LANES = 16;
constexpr int ROW_TILE = 6;  // rows per register tile: 6 rows x 2 blocks = 12 accumulators, room for operands

}  // namespace

extern "C" {

struct Matrix {  // y = x @ W for x (rows, in)
    int32_t in, out, blocks, in4;  // blocks = ceil(out / 16); in4 = in rounded up to 4 (int8)
    const float* f32;               // float32 weights, or null
    const int8_t* i8;               // int8 weights, or null
    const float* scale;             // int8: per output
    const int32_t* shift;           // int8: 128 * sum of each output's weights
    const float* bias;              // per output, or null
};

struct Layer {
    Matrix qkv, wo, w13, w2;
};

struct Model {
    int32_t n_layers, dim, n_heads, n_kv_heads, head_dim, hidden, vocab, max_positions;
    float norm_floor;  // sqrt(dim * eps)
    const float* embedding;  // (vocab, dim)
    const float* cos;        // (max_positions, head_dim / 2)
    const float* sin;
    const Layer* layers;
    Matrix head;
};

struct Cache {  // one tensor each for all layers; strides in elements of all but the last dimension (contiguous)
    float* keys;    // (layers, rows, kv_heads, head_dim, positions): stored transposed
    float* values;  // (layers, rows, kv_heads, positions, head_dim)
    int64_t key_strides[4], value_strides[4];
};

}  // extern "C"

namespace {

inline f32x16 load(const float* p) {
    f32x16 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

inline i32x16 load(const int8_t* p) {
    i32x16 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// e^x for 16 lanes (Cephes' expf polynomial, about 1 ulp; x clamped to e^x's float range): plain arithmetic, so it
// vectorises, where libm's expf is one call per element.
inline f32x16 exp16(f32x16 x) {
    const f32x16 high = (f32x16){} + 88.3f, low = (f32x16){} - 87.3f, round = (f32x16){} + 12582912.f;  // 1.5 * 2^23
    x = x > high ? high : x;
    x = x < low ? low : x;
    f32x16 n = (x * 1.44269504088896341f + round) - round;  // round to nearest
    f32x16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    f32x16 p = 1.9875691500e-4f * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    i32x16 bits = (__builtin_convertvector(n, i32x16) + 127) << 23;
    f32x16 two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

// values[i] up to values[min(i + 16, count) - 1] as one vector, zeros past count.
inline f32x16 load_tail(const float* values, int64_t i, int64_t count) {
    f32x16 v = {};
    std::memcpy(&v, values + i, std::min<int64_t>(LANES, count - i) * sizeof(float));
    return v;
}

inline void store_tail(float* values, int64_t i, int64_t count, const f32x16& v) {
    std::memcpy(values + i, &v, std::min<int64_t>(LANES, count - i) * sizeof(float));
}

// scores[p] = e^(scores[p] - peak) for p < count; returns their sum (a softmax's denominator). `scores` has room
// for count rounded up to 16.
float exp_shifted(float* scores, int64_t count, float peak) {
    const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    f32x16 total = {};
    for (int64_t p = 0; p < count; p += LANES) {
        f32x16 e = exp16(load(scores + p) - peak);
        e = lane + (int32_t)p < (int32_t)count ? e : (f32x16){};
        total += e;
        std::memcpy(scores + p, &e, sizeof e);
    }
    float sum = 0.f;
    for (int j = 0; j < LANES; ++j) sum += total[j];
    return sum;
}

// Attention for G query heads that share one kv head, so that each key and value is read once for all of them.
// keys: transposed, a row of positions per dimension `key_stride` apart, each with room for 16 positions past count
// (the cache's padding); values: a row of head_dim per position, `value_stride` apart. q[g] and out[g] are head g's
// query and output; scores has G rows of `ld` floats (count rounded up to 16, and 16 more).
template <int G>
void attend_heads(float* const* q, const float* keys, int64_t key_stride, const float* values, int64_t value_stride,
                  int head_dim, int64_t count, float* scores, int64_t ld, float* const* out) {
    int64_t p = 0;
    for (; p + LANES < count; p += 2 * LANES) {  // two vectors of positions: longer runs of each key row
        f32x16 acc[G][2] = {};
        for (int d = 0; d < head_dim; ++d) {
            const f32x16 k0 = load(keys + d * key_stride + p), k1 = load(keys + d * key_stride + p + LANES);
            for (int g = 0; g < G; ++g) {
                acc[g][0] += q[g][d] * k0;
                acc[g][1] += q[g][d] * k1;
            }
        }
        for (int g = 0; g < G; ++g) std::memcpy(scores + g * ld + p, acc[g], sizeof acc[g]);
    }
    for (; p < count; p += LANES) {
        f32x16 acc[G] = {};
        for (int d = 0; d < head_dim; ++d) {
            const f32x16 k = load(keys + d * key_stride + p);
            for (int g = 0; g < G; ++g) acc[g] += q[g][d] * k;
        }
        for (int g = 0; g < G; ++g) std::memcpy(scores + g * ld + p, &acc[g], sizeof acc[g]);
    }
    float scale[G];
    for (int g = 0; g < G; ++g) {
        float* row = scores + g * ld;
        float peak = row[0];
        for (int64_t i = 1; i < count; ++i) peak = std::max(peak, row[i]);
        scale[g] = 1.f / exp_shifted(row, count, peak);
    }
    for (int d = 0; d < head_dim; d += LANES) {
        f32x16 acc[G] = {};
        const bool full = d + LANES <= head_dim;
        for (int64_t i = 0; i < count; ++i) {
            const float* row = values + i * value_stride;
            const f32x16 v = full ? load(row + d) : load_tail(row, d, head_dim);
            for (int g = 0; g < G; ++g) acc[g] += scores[g * ld + i] * v;
        }
        for (int g = 0; g < G; ++g) store_tail(out[g], d, head_dim, acc[g] * scale[g]);
    }
}

// SwiGLU's product: out = silu(gate) * up.
void swiglu(const float* gate, const float* up, float* out, int count) {
    for (int j = 0; j < count; j += LANES) {
        const f32x16 g = load_tail(gate, j, count);
        store_tail(out, j, count, g / (1.f + exp16(-g)) * load_tail(up, j, count));
    }
}

// y[r][o] (=|+=) the lanes of one 16-output block, with the output count of a ragged last block.
inline void store(float* y, const f32x16& v, int valid, bool accumulate) {
    for (int j = 0; j < valid; ++j) y[j] = accumulate ? y[j] + v[j] : v[j];
}

// The bias of outputs first .. first + valid - 1 (zeros without one, and past valid).
inline f32x16 bias_lanes(const Matrix& w, int first, int valid) {
    f32x16 bias = {};
    if (w.bias) std::memcpy(&bias, w.bias + first, valid * sizeof(float));
    return bias;
}

inline i32x16 dot4(i32x16 acc, i32x16 x_u8, i32x16 w_s8) {
#ifdef TINYLM_VNNI
    return (i32x16)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)x_u8, (__m512i)w_s8);
#else
    for (int t = 0; t < 4; ++t) {
        i32x16 w = (w_s8 << (24 - 8 * t)) >> 24;  // signed byte t of each lane
        i32x16 x = (x_u8 >> (8 * t)) & 255;       // unsigned byte t
        acc += w * x;
    }
    return acc;
#endif
}

// R rows by C blocks of float32 outputs, over all inputs.
template <int R, int C>
void tile_f32(const Matrix& w, const float* x, int ldx, int block, float* y, int ldy, bool accumulate) {
    f32x16 acc[R][C] = {};
    const float* panel = w.f32 + (int64_t)block * w.in * LANES;
    for (int k = 0; k < w.in; ++k) {
        f32x16 weights[C];
        for (int c = 0; c < C; ++c) weights[c] = load(panel + ((int64_t)c * w.in + k) * LANES);
        for (int r = 0; r < R; ++r) {
            f32x16 xr = (f32x16){} + x[r * ldx + k];
            for (int c = 0; c < C; ++c) acc[r][c] += xr * weights[c];
        }
    }
    for (int c = 0; c < C; ++c) {
        const int first = (block + c) * LANES, valid = std::min(LANES, w.out - first);
        const f32x16 bias = bias_lanes(w, first, valid);
        for (int r = 0; r < R; ++r) store(y + r * ldy + first, acc[r][c] + bias, valid, accumulate);
    }
}

// R rows by C blocks of int8 outputs; x_u8 holds each row's quantised inputs (ld w.in4), x_scale their scales.
template <int R, int C>
void tile_i8(const Matrix& w, const uint8_t* x_u8, const float* x_scale, int block, float* y, int ldy,
             bool accumulate) {
    i32x16 acc[R][C] = {};
    const int8_t* panel = w.i8 + (int64_t)block * w.in4 * LANES;
    for (int k = 0; k < w.in4; k += 4) {
        i32x16 weights[C];
        for (int c = 0; c < C; ++c) weights[c] = load(panel + ((int64_t)c * w.in4 + k) * LANES);
        for (int r = 0; r < R; ++r) {
            int32_t four;
            std::memcpy(&four, x_u8 + (int64_t)r * w.in4 + k, 4);
            i32x16 xr = (i32x16){} + four;
            for (int c = 0; c < C; ++c) acc[r][c] = dot4(acc[r][c], xr, weights[c]);
        }
    }
    for (int c = 0; c < C; ++c) {
        const int first = (block + c) * LANES, valid = std::min(LANES, w.out - first);
        const i32x16 shift = load(reinterpret_cast<const int8_t*>(w.shift + first));  // padded: 16 always readable
        const f32x16 scale = load(w.scale + first), bias = bias_lanes(w, first, valid);
        for (int r = 0; r < R; ++r) {
            f32x16 sums = __builtin_convertvector(acc[r][c] - shift, f32x16);
            store(y + r * ldy + first, sums * (scale * x_scale[r]) + bias, valid, accumulate);
        }
    }
}

// f(R, r) for the rows r .. r + R - 1 of `rows`, in tiles of ROW_TILE and one tile of the 1-5 left; R is a
// compile-time constant (std::integral_constant), so each tile size is its own unrolled kernel.
template <typename F>
void row_tiles(int rows, F f) {
    int r = 0;
    for (; r + ROW_TILE <= rows; r += ROW_TILE) f(std::integral_constant<int, ROW_TILE>{}, r);
    switch (rows - r) {
        case 1: f(std::integral_constant<int, 1>{}, r); break;
        case 2: f(std::integral_constant<int, 2>{}, r); break;
        case 3: f(std::integral_constant<int, 3>{}, r); break;
        case 4: f(std::integral_constant<int, 4>{}, r); break;
        case 5: f(std::integral_constant<int, 5>{}, r); break;
        default: break;
    }
}

struct Workspace {
    std::vector<uint8_t> x_u8;
    std::vector<float> x_scale;
};

// y (rows, w.out; ld ldy) = or += x (rows, w.in; ld ldx) @ W, blocks of 16 outputs split across threads.
void product(const Matrix& w, const float* x, int ldx, int rows, float* y, int ldy, bool accumulate, int threads,
             Workspace& ws) {
    if (w.i8) {
        ws.x_u8.assign((size_t)rows * w.in4, 128);
        ws.x_scale.resize(rows);
        for (int r = 0; r < rows; ++r) {
            const float* __restrict xr = x + (int64_t)r * ldx;
            float peak = 0.f;
#pragma omp simd reduction(max : peak)
            for (int k = 0; k < w.in; ++k) peak = std::max(peak, std::fabs(xr[k]));
            const float scale = peak > 0.f ? peak / 127.f : 1.f, inverse = 1.f / scale, round = 12582912.f;
            uint8_t* __restrict q = ws.x_u8.data() + (int64_t)r * w.in4;
#pragma omp simd
            for (int k = 0; k < w.in; ++k) q[k] = (uint8_t)((int32_t)((xr[k] * inverse + round) - round) + 128);
            ws.x_scale[r] = scale;
        }
    }
    const uint8_t* x_u8 = ws.x_u8.data();
    const float* x_scale = ws.x_scale.data();
    int pairs = (w.blocks + 1) / 2;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int pair = 0; pair < pairs; ++pair) {
        const int block = 2 * pair;
        const bool two = block + 1 < w.blocks;
        row_tiles(rows, [&](auto tile, int r) {
            constexpr int R = decltype(tile)::value;
            float* out = y + (int64_t)r * ldy;
            if (w.i8) {
                const uint8_t* xr = x_u8 + (int64_t)r * w.in4;
                if (two) tile_i8<R, 2>(w, xr, x_scale + r, block, out, ldy, accumulate);
                else tile_i8<R, 1>(w, xr, x_scale + r, block, out, ldy, accumulate);
            } else {
                const float* xr = x + (int64_t)r * ldx;
                if (two) tile_f32<R, 2>(w, xr, ldx, block, out, ldy, accumulate);
                else tile_f32<R, 1>(w, xr, ldx, block, out, ldy, accumulate);
            }
        });
    }
}

void rms_normed(const float* x, float* out, int rows, int dim, float floor) {
    for (int r = 0; r < rows; ++r) {
        const float* __restrict xr = x + (int64_t)r * dim;
        float* __restrict outr = out + (int64_t)r * dim;
        float squares = 0.f;
#pragma omp simd reduction(+ : squares)
        for (int k = 0; k < dim; ++k) squares += xr[k] * xr[k];
        const float inverse = 1.f / std::hypot(std::sqrt(squares), floor);
        for (int k = 0; k < dim; ++k) outr[k] = xr[k] * inverse;
    }
}

void rotate(float* v, const float* cos, const float* sin, int half) {
    for (int i = 0; i < half; ++i) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i] + a * sin[i];
    }
}

// Rotate q and k, store k and v at each row's position, and attend: att (rows, n_heads * head_dim).
void attend(const Model& m, const Cache& c, int layer, int rows, const int64_t* positions, float* qkv, float* att,
            int threads) {
    const int hd = m.head_dim, half = hd / 2, group = m.n_heads / m.n_kv_heads;
    const int width = (m.n_heads + 2 * m.n_kv_heads) * hd;
    const int64_t* ks = c.key_strides;
    const int64_t* vs = c.value_strides;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int item = 0; item < rows * m.n_kv_heads; ++item) {
        const int r = item / m.n_kv_heads, h = item % m.n_kv_heads;
        const int64_t pos = positions[r];
        float* row = qkv + (int64_t)r * width;
        const float* cos = m.cos + pos * half;
        const float* sin = m.sin + pos * half;
        float* keys = c.keys + layer * ks[0] + r * ks[1] + h * ks[2];      // (head_dim, positions)
        float* values = c.values + layer * vs[0] + r * vs[1] + h * vs[2];  // (positions, head_dim)
        float* k = row + (m.n_heads + h) * hd;
        const float* v = k + m.n_kv_heads * hd;
        rotate(k, cos, sin, half);
        for (int d = 0; d < hd; ++d) {
            keys[d * ks[3] + pos] = k[d];
            values[pos * vs[3] + d] = v[d];
        }
        const int64_t count = pos + 1, ld = (count + 2 * LANES - 1) / LANES * LANES;
        thread_local std::vector<float> scores;
        scores.resize(4 * ld);
        for (int first = 0; first < group; first += 4) {  // up to 4 query heads at a time
            float* q[4];
            float* out[4];
            const int heads = std::min(4, group - first);
            for (int g = 0; g < heads; ++g) {
                const int head = h * group + first + g;
                q[g] = row + head * hd;
                rotate(q[g], cos, sin, half);
                out[g] = att + (int64_t)r * m.n_heads * hd + head * hd;
            }
            const auto run = heads == 1 ? attend_heads<1> : heads == 2 ? attend_heads<2>
                           : heads == 3 ? attend_heads<3> : attend_heads<4>;
            run(q, keys, ks[3], values, vs[3], hd, count, scores.data(), ld, out);
        }
    }
}

}  // namespace

extern "C" {

// Feed ids[r] at positions[r] for each row; write (rows, vocab) logits for the next positions. Returns 0.
int tinylm_step(const Model* model, const Cache* cache, int32_t rows, const int64_t* ids, const int64_t* positions,
                float* logits, int32_t threads) {
    const Model& m = *model;
    const int dim = m.dim, hd = m.head_dim, width = (m.n_heads + 2 * m.n_kv_heads) * hd;
    std::vector<float> x((size_t)rows * dim), normed((size_t)rows * dim), qkv((size_t)rows * width),
        att((size_t)rows * m.n_heads * hd), gate_up((size_t)rows * 2 * m.hidden), hidden((size_t)rows * m.hidden);
    Workspace ws;
    for (int r = 0; r < rows; ++r) std::memcpy(&x[(size_t)r * dim], m.embedding + ids[r] * dim, dim * sizeof(float));
    for (int layer = 0; layer < m.n_layers; ++layer) {
        const Layer& w = m.layers[layer];
        rms_normed(x.data(), normed.data(), rows, dim, m.norm_floor);
        product(w.qkv, normed.data(), dim, rows, qkv.data(), width, false, threads, ws);
        attend(m, *cache, layer, rows, positions, qkv.data(), att.data(), threads);
        product(w.wo, att.data(), m.n_heads * hd, rows, x.data(), dim, true, threads, ws);
        rms_normed(x.data(), normed.data(), rows, dim, m.norm_floor);
        product(w.w13, normed.data(), dim, rows, gate_up.data(), 2 * m.hidden, false, threads, ws);
        for (int r = 0; r < rows; ++r) {
            const float* gate = &gate_up[(size_t)r * 2 * m.hidden];
            const float* up = gate + m.hidden;
            float* out = &hidden[(size_t)r * m.hidden];
            swiglu(gate, up, out, m.hidden);
        }
        product(w.w2, hidden.data(), m.hidden, rows, x.data(), dim, true, threads, ws);
    }
    rms_normed(x.data(), normed.data(), rows, dim, m.norm_floor);
    product(m.head, normed.data(), dim, rows, logits, m.vocab, false, threads, ws);
    return 0;
}

}  // extern "C"
