// Fused CPU kernels for the engine's decode step (twinserve.engine.fused loads them).
//
// A single-stream decode step is a few hundred small ops; on 2 cores each costs a few
// microseconds of dispatch whatever its size. These kernels each replace several of them
// and round exactly as the PyTorch ops they replace (one rounding to the tensor's dtype
// per op), so greedy output does not change: built with -ffp-contract=off.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

template <typename T>
inline T rnd(float x) {
  return static_cast<T>(x);
}

using Vec = at::vec::Vectorized<float>;

// Rows per thread below which a kernel stays on the calling thread: one stream's step is a
// few microseconds per kernel, less than waking the other OpenMP thread costs.
constexpr int64_t kRowGrain = 8;

inline Vec load_f32(const float* p) { return Vec::loadu(p); }
inline Vec load_f32(const double* p) {  // dispatched for completeness; the engine never runs fp64
  float lanes[Vec::size()];
  for (int64_t l = 0; l < Vec::size(); ++l) lanes[l] = float(p[l]);
  return Vec::loadu(lanes);
}
template <typename T>
inline Vec load_f32(const T* p) {
  Vec out;
  at::vec::load_to_float<T>(p, out);
  return out;
}

// x's Vec::size() lanes into dst, each rounded to the dtype as a scalar cast rounds it.
template <typename T>
inline void store_as(const Vec& x, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    x.store(dst);
  } else if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    at::vec::convert_from_float<T>(x, x).store(dst, Vec::size());
  } else {
    float lanes[Vec::size()];
    x.store(lanes);
    for (int64_t l = 0; l < Vec::size(); ++l) dst[l] = T(lanes[l]);
  }
}

// A vector of floats rounded to the dtype and back (the rounding each PyTorch op ends with).
template <typename scalar_t>
inline Vec round_trip(const Vec& x) {
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    return std::get<0>(at::vec::convert_to_float<scalar_t>(at::vec::convert_from_float<scalar_t>(x, x)));
  } else {
    return x;
  }
}

constexpr int64_t kLanes = 16;

// sum of a[i] * b[i] over 16 independent lanes, then the lanes: the compiler vectorizes it
// without reassociating anything (a plain running sum would stay scalar).
template <typename A, typename B>
inline float dot(const A* a, const B* b, int64_t n) {
  float lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += float(a[i + l]) * float(b[i + l]);
  float total = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) total += lane[l];
  for (; i < n; ++i) total += float(a[i]) * float(b[i]);
  return total;
}

// RMSNorm of one row, rounded as the engine's PyTorch rms_norm rounds: 16-bit inputs are
// normalised in fp32, cast, then scaled by the weight in the dtype (transformers' order);
// fp32 ones are normalised and scaled in fp32.
template <typename T>
inline void norm_row(const T* x, const T* weight, T* out, int64_t n, float eps) {
  const float inv = 1.f / std::sqrt(dot(x, x, n) / float(n) + eps);
  const int64_t width = Vec::size();
  const Vec vinv(inv);
  int64_t i = 0;
  for (; i + width <= n; i += width)
    store_as(round_trip<T>(load_f32(x + i) * vinv) * load_f32(weight + i), out + i);
  for (; i < n; ++i) {
    const T normed = rnd<T>(float(x[i]) * inv);
    out[i] = rnd<T>(float(normed) * float(weight[i]));
  }
}

// RoPE of q and k (x * cos + roll(x, half) * sin, sin sign-folded, as LlamaModel computes it),
// k written into k_cache[slot, head, position] and v into v_cache; returns the rotated q.
// qkv: [rows, (n_q + 2 n_kv) * head_dim]; cos, sin: [rows, head_dim] (any leading 1-dims);
// each row r writes its own slots[r] and positions[r].
at::Tensor rope_write_kv(
    const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache,
    at::Tensor v_cache, const at::Tensor& slots, const at::Tensor& positions, int64_t n_q,
    int64_t n_kv, int64_t head_dim) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (n_q + 2 * n_kv) * head_dim, "qkv shape");
  TORCH_CHECK(qkv.stride(1) == 1, "qkv rows must be dense");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "cache layout");
  TORCH_CHECK(k_cache.scalar_type() == qkv.scalar_type() && v_cache.scalar_type() == qkv.scalar_type(),
              "cache dtype");
  const int64_t rows = qkv.size(0);
  auto c = cos.reshape({rows, head_dim}).contiguous();
  auto s = sin.reshape({rows, head_dim}).contiguous();
  auto slot = slots.to(at::kLong).contiguous();
  auto pos = positions.to(at::kLong).reshape({rows}).contiguous();
  TORCH_CHECK(slot.numel() == rows && pos.numel() == rows, "one slot and position per row");
  auto q = at::empty({rows, n_q, head_dim}, qkv.options());
  const int64_t half = head_dim / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_write_kv", [&] {
    const scalar_t* src = qkv.const_data_ptr<scalar_t>();
    const scalar_t* cp = c.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* kp = k_cache.data_ptr<scalar_t>();
    scalar_t* vp = v_cache.data_ptr<scalar_t>();
    const int64_t* slp = slot.const_data_ptr<int64_t>();
    const int64_t* pp = pos.const_data_ptr<int64_t>();
    const int64_t ks0 = k_cache.stride(0), ks1 = k_cache.stride(1), ks2 = k_cache.stride(2);
    const int64_t vs0 = v_cache.stride(0), vs1 = v_cache.stride(1), vs2 = v_cache.stride(2);
    const int64_t row_stride = qkv.stride(0);
    for (int64_t r = 0; r < rows; ++r)
      TORCH_CHECK(slp[r] >= 0 && slp[r] < k_cache.size(0) && pp[r] >= 0 && pp[r] < k_cache.size(2),
                  "slot or position outside the cache");
    const int64_t width = Vec::size(), dense = half - half % width;
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* x = src + r * row_stride;
        const scalar_t* cr = cp + r * head_dim;
        const scalar_t* sr = sp + r * head_dim;
        for (int64_t h = 0; h < n_q + n_kv; ++h) {
          const scalar_t* xh = x + h * head_dim;
          scalar_t* out = h < n_q ? qp + (r * n_q + h) * head_dim
                                  : kp + slp[r] * ks0 + (h - n_q) * ks1 + pp[r] * ks2;
          // out[d] = x[d] cos[d] + x[d + half] sin[d], out[d + half] = x[d + half] cos[d + half] + x[d] sin[d + half]
          for (int64_t d = 0; d < dense; d += width) {
            const Vec lo = load_f32(xh + d), hi = load_f32(xh + d + half);
            store_as(round_trip<scalar_t>(lo * load_f32(cr + d)) + round_trip<scalar_t>(hi * load_f32(sr + d)),
                     out + d);
            store_as(round_trip<scalar_t>(hi * load_f32(cr + d + half)) +
                         round_trip<scalar_t>(lo * load_f32(sr + d + half)),
                     out + d + half);
          }
          for (int64_t d = dense; d < head_dim; ++d) {
            if (d >= half && d < half + dense) continue;  // done with its partner above
            const int64_t rolled = d < half ? d + half : d - half;
            const scalar_t a = rnd<scalar_t>(float(xh[d]) * float(cr[d]));
            const scalar_t b = rnd<scalar_t>(float(xh[rolled]) * float(sr[d]));
            out[d] = rnd<scalar_t>(float(a) + float(b));
          }
        }
        const scalar_t* v = x + (n_q + n_kv) * head_dim;
        for (int64_t h = 0; h < n_kv; ++h)
          std::copy(v + h * head_dim, v + (h + 1) * head_dim, vp + slp[r] * vs0 + h * vs1 + pp[r] * vs2);
      }
    });
  });
  return q;
}

// silu(gate) * up of a fused [rows, 2 * inter] gate/up output, into a dense [rows, inter]:
// silu as ATen's vectorized kernel computes it (x / (1 + exp(-x)) in fp32, rounded to the
// dtype), then the product, rounded again.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && gate_up.stride(1) == 1, "gate_up shape");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  auto out = at::empty({rows, inter}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* src = gate_up.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t stride = gate_up.stride(0);
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* gate = src + r * stride;
        scalar_t* o = dst + r * inter;
        if constexpr (std::is_same_v<scalar_t, double>) {  // dispatched for completeness only
          for (int64_t j = 0; j < inter; ++j) o[j] = gate[j] / (1 + std::exp(-gate[j])) * gate[inter + j];
        } else {
          at::vec::map2<scalar_t>(
              [](Vec x, Vec up) { return round_trip<scalar_t>(x / (Vec(1.f) + x.neg().exp())) * up; }, o,
              gate, gate + inter, inter);
        }
      }
    });
  });
  return out;
}

// Decode attention: query i (of `width` per slot) attends keys 0..lengths[i]-1 of cache slot
// i / width (slots 0..rows-1): q [rows * width, n_q, head_dim], caches [slots, n_kv, capacity,
// head_dim]. width 1 is a decode step; more are a verifying pass (a row's last token and its
// drafts, each with its own causal limit). Each query is computed as a decode row would be.
// The query heads of one KV head share its keys (GQA): each key and value is read once for
// all of them, in fp32 vectors. Rounded as SDPA's CPU flash kernel rounds: scores scaled
// after the dot product, softmax weights rounded to the dtype before they weigh the values,
// their sum kept in fp32, one rounding of the output; only the order of the fp32 sums differs.
constexpr int64_t kMaxChunks = 32;  // head_dim up to 32 vectors (512 with AVX-512, 256 with AVX2)

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v);
}

// exp(x - top) of n scores in place, as the flash kernel's fused loop computes it (vectors
// through exp_u20, built for the CPU capability ATen runs, see fused.py; the tail scalar),
// then rounded to the dtype; returns the fp32 sum of the unrounded values.
template <typename scalar_t>
inline float softmax_weights(float* x, int64_t n, float top) {
  const int64_t width = Vec::size(), whole = n - n % width;
  const Vec vtop(top);
  Vec vsum(0.f);
  for (int64_t j = 0; j < whole; j += width) {
    const Vec e = (Vec::loadu(x + j) - vtop).exp_u20();
    vsum += e;
    e.store(x + j);
  }
  float total = hsum(vsum);
  for (int64_t j = whole; j < n; ++j) {
    x[j] = std::exp(x[j] - top);
    total += x[j];
  }
  for (int64_t j = 0; j < n; ++j) x[j] = float(rnd<scalar_t>(x[j]));
  return total;
}

// The cache is read once per step from memory, and the hardware's prefetchers stop at every
// 4 KiB page: ask for the row kPrefetchRows ahead (past the end is harmless, prefetches never fault).
constexpr int64_t kPrefetchRows = 12;
template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  for (int64_t b = 0; b < int64_t(n * sizeof(T)); b += 64) __builtin_prefetch(reinterpret_cast<const char*>(p) + b);
}

// One (row, KV head) task of decode_attention: the `group` query heads qf (fp32, [group, hd])
// over n keys. C = head_dim / Vec::size() when known at compile time (the vectors then stay in
// registers), 0 for any other head_dim (`chunks` then, the rest of hd scalar).
template <int C, typename scalar_t>
void attend_group(const float* qf, const scalar_t* keys, int64_t ks, const scalar_t* values, int64_t vs,
                  int64_t n, int64_t group, int64_t hd, int64_t chunks, float scale, float* scores,
                  scalar_t* out) {
  constexpr int64_t width = Vec::size();
  const int64_t nc = C > 0 ? C : chunks, dense = nc * width;
  Vec part[C > 0 ? C : kMaxChunks];
  // scores: each key converted once, dotted with every query head of the group
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* kj = keys + j * ks;
    prefetch_row(kj + kPrefetchRows * ks, hd);
    for (int64_t c = 0; c < nc; ++c) part[c] = load_f32(kj + c * width);
    for (int64_t h = 0; h < group; ++h) {
      const float* qh = qf + h * hd;
      float s = 0.f;
      if (nc > 0) {
        Vec sum = Vec::loadu(qh) * part[0];
        for (int64_t c = 1; c < nc; ++c) sum = at::vec::fmadd(Vec::loadu(qh + c * width), part[c], sum);
        s = hsum(sum);
      }
      for (int64_t d = dense; d < hd; ++d) s += qh[d] * float(kj[d]);
      scores[h * n + j] = s * scale;
    }
  }
  // values: per head, fp32 accumulators in registers over the keys
  for (int64_t h = 0; h < group; ++h) {
    float* sh = scores + h * n;
    float top = -INFINITY;
    for (int64_t j = 0; j < n; ++j) top = sh[j] > top ? sh[j] : top;
    const float reciprocal = 1.f / softmax_weights<scalar_t>(sh, n, top);
    for (int64_t c = 0; c < nc; ++c) part[c] = Vec(0.f);
    float tail[width] = {};
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t* vj = values + j * vs;
      if (h == 0) prefetch_row(vj + kPrefetchRows * vs, hd);
      const Vec w(sh[j]);
      for (int64_t c = 0; c < nc; ++c) part[c] = at::vec::fmadd(w, load_f32(vj + c * width), part[c]);
      for (int64_t d = dense; d < hd; ++d) tail[d - dense] += sh[j] * float(vj[d]);
    }
    scalar_t* oh = out + h * hd;
    for (int64_t c = 0; c < nc; ++c) store_as(part[c] * Vec(reciprocal), oh + c * width);
    for (int64_t d = dense; d < hd; ++d) oh[d] = rnd<scalar_t>(tail[d - dense] * reciprocal);
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& lengths, double scale, int64_t width) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q shape");
  const int64_t rows = q.size(0), n_q = q.size(1), hd = q.size(2), n_kv = k_cache.size(1);
  TORCH_CHECK(width >= 1 && rows % width == 0, "queries per slot");
  TORCH_CHECK(n_q % n_kv == 0 && k_cache.size(3) == hd && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "cache layout");
  const int64_t chunks = hd / Vec::size();
  TORCH_CHECK(chunks <= kMaxChunks, "head_dim too large for decode_attention");
  auto len = lengths.to(at::kLong).contiguous();
  TORCH_CHECK(len.numel() == rows && rows / width <= k_cache.size(0), "one length per query");
  const int64_t group = n_q / n_kv;
  auto out = at::empty({rows, n_q * hd}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.const_data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t* lp = len.const_data_ptr<int64_t>();
    const int64_t ks0 = k_cache.stride(0), ks1 = k_cache.stride(1), ks2 = k_cache.stride(2);
    const int64_t vs0 = v_cache.stride(0), vs1 = v_cache.stride(1), vs2 = v_cache.stride(2);
    const bool exact = hd % Vec::size() == 0;
    auto attend = !exact         ? attend_group<0, scalar_t>
                  : chunks == 2  ? attend_group<2, scalar_t>
                  : chunks == 4  ? attend_group<4, scalar_t>
                  : chunks == 8  ? attend_group<8, scalar_t>
                  : chunks == 16 ? attend_group<16, scalar_t>
                                 : attend_group<0, scalar_t>;
    at::parallel_for(0, rows * n_kv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores, qf(group * hd);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r = task / n_kv, g = task % n_kv, n = lp[r], slot = r / width;
        TORCH_CHECK(n >= 1 && n <= k_cache.size(2), "length outside the cache");
        scores.resize(group * n);
        const int64_t first = (r * n_q + g * group) * hd;  // the group's query heads, in q and out
        for (int64_t i = 0; i < group * hd; ++i) qf[i] = float(qp[first + i]);
        attend(qf.data(), kp + slot * ks0 + g * ks1, ks2, vp + slot * vs0 + g * vs1, vs2, n, group, hd, chunks,
               float(scale), scores.data(), op + first);
      }
    });
  });
  return out;
}

// RMSNorm of each row of x [rows, hidden].
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && weight.is_contiguous() && weight.numel() == x.size(1),
              "rms_norm shapes");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm dtype");
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    at::parallel_for(0, x.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        norm_row(x.const_data_ptr<scalar_t>() + r * x.stride(0), weight.const_data_ptr<scalar_t>(),
                 out.data_ptr<scalar_t>() + r * x.size(1), x.size(1), float(eps));
    });
  });
  return out;
}

// h + delta (the residual stream, rounded to the dtype) and its RMSNorm, in one pass.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& h, const at::Tensor& delta,
                                                const at::Tensor& weight, double eps) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && delta.sizes() == h.sizes() && delta.stride(1) == 1,
              "add_rms_norm shapes");
  TORCH_CHECK(delta.scalar_type() == h.scalar_type() && weight.scalar_type() == h.scalar_type(),
              "add_rms_norm dtype");
  auto sum = at::empty_like(h);
  auto out = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "add_rms_norm", [&] {
    const int64_t n = h.size(1), width = Vec::size(), dense = n - n % width;
    at::parallel_for(0, h.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* a = h.const_data_ptr<scalar_t>() + r * n;
        const scalar_t* b = delta.const_data_ptr<scalar_t>() + r * delta.stride(0);
        scalar_t* s = sum.data_ptr<scalar_t>() + r * n;
        for (int64_t i = 0; i < dense; i += width) store_as(load_f32(a + i) + load_f32(b + i), s + i);
        for (int64_t i = dense; i < n; ++i) s[i] = rnd<scalar_t>(float(a[i]) + float(b[i]));
        norm_row(s, weight.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>() + r * n, n, float(eps));
      }
    });
  });
  return {sum, out};
}

}  // namespace

TORCH_LIBRARY(twinserve, m) {
  m.def(
      "rope_write_kv(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slots, Tensor positions, int n_q, int n_kv, int head_dim) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, float scale, int width) -> "
      "Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor h, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(twinserve, CPU, m) {
  m.impl("rope_write_kv", &rope_write_kv);
  m.impl("silu_mul", &silu_mul);
  m.impl("decode_attention", &decode_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
}
