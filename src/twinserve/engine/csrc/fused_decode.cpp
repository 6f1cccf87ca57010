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
  for (int64_t i = 0; i < n; ++i) {
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
    for (int64_t r = 0; r < rows; ++r) {
      TORCH_CHECK(slp[r] >= 0 && slp[r] < k_cache.size(0) && pp[r] >= 0 && pp[r] < k_cache.size(2),
                  "slot or position outside the cache");
      const scalar_t* x = src + r * row_stride;
      const scalar_t* cr = cp + r * head_dim;
      const scalar_t* sr = sp + r * head_dim;
      for (int64_t h = 0; h < n_q + n_kv; ++h) {
        const scalar_t* xh = x + h * head_dim;
        scalar_t* out = h < n_q ? qp + (r * n_q + h) * head_dim
                                : kp + slp[r] * ks0 + (h - n_q) * ks1 + pp[r] * ks2;
        for (int64_t d = 0; d < head_dim; ++d) {
          const int64_t rolled = d < half ? d + half : d - half;
          const scalar_t a = rnd<scalar_t>(float(xh[d]) * float(cr[d]));
          const scalar_t b = rnd<scalar_t>(float(xh[rolled]) * float(sr[d]));
          out[d] = rnd<scalar_t>(float(a) + float(b));
        }
      }
      const scalar_t* v = x + (n_q + n_kv) * head_dim;
      for (int64_t h = 0; h < n_kv; ++h) {
        scalar_t* out = vp + slp[r] * vs0 + h * vs1 + pp[r] * vs2;
        for (int64_t d = 0; d < head_dim; ++d) out[d] = v[h * head_dim + d];
      }
    }
  });
  return q;
}

// silu(gate) * up of a fused [rows, 2 * inter] gate/up output, into a dense [rows, inter].
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && gate_up.stride(1) == 1, "gate_up shape");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  auto out = at::empty({rows, inter}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* src = gate_up.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t stride = gate_up.stride(0);
    // silu as ATen's vectorized kernel computes it, x / (1 + exp(-x)) in fp32 vectors
    using Vec = at::vec::Vectorized<float>;
    const int64_t width = Vec::size();
    std::vector<float> buf(width);
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* gate = src + r * stride;
      const scalar_t* up = gate + inter;
      scalar_t* o = dst + r * inter;
      int64_t j = 0;
      for (; j + width <= inter; j += width) {
        for (int64_t l = 0; l < width; ++l) buf[l] = float(gate[j + l]);
        const Vec x = Vec::loadu(buf.data());
        (x / (Vec(1.f) + x.neg().exp())).store(buf.data());
        for (int64_t l = 0; l < width; ++l)
          o[j + l] = rnd<scalar_t>(float(rnd<scalar_t>(buf[l])) * float(up[j + l]));
      }
      for (; j < inter; ++j) {
        const float g = float(gate[j]);
        o[j] = rnd<scalar_t>(float(rnd<scalar_t>(g / (1.f + std::exp(-g)))) * float(up[j]));
      }
    }
  });
  return out;
}

// Decode attention of rows that each attend keys 0..lengths[r]-1 of their own cache slot
// (slots 0..rows-1): q [rows, n_q, head_dim], caches [slots, n_kv, capacity, head_dim].
// The query heads of one KV head share its keys (GQA). Rounded as SDPA's CPU flash kernel
// rounds: scores scaled after the dot product, softmax weights rounded to the dtype before
// they weigh the values, their sum kept in fp32, one rounding of the output.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q shape");
  const int64_t rows = q.size(0), n_q = q.size(1), hd = q.size(2), n_kv = k_cache.size(1);
  TORCH_CHECK(n_q % n_kv == 0 && k_cache.size(3) == hd && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "cache layout");
  auto len = lengths.to(at::kLong).contiguous();
  TORCH_CHECK(len.numel() == rows && rows <= k_cache.size(0), "one length per row");
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
    at::parallel_for(0, rows * n_kv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores, acc(hd), qf(hd);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r = task / n_kv, g = task % n_kv, n = lp[r];
        TORCH_CHECK(n >= 1 && n <= k_cache.size(2), "length outside the cache");
        scores.resize(n);
        const scalar_t* keys = kp + r * ks0 + g * ks1;
        const scalar_t* values = vp + r * vs0 + g * vs1;
        for (int64_t h = g * group; h < (g + 1) * group; ++h) {
          const scalar_t* qh = qp + (r * n_q + h) * hd;
          for (int64_t d = 0; d < hd; ++d) qf[d] = float(qh[d]);
          float top = -INFINITY;
          for (int64_t j = 0; j < n; ++j) {
            scores[j] = dot(qf.data(), keys + j * ks2, hd) * float(scale);
            top = scores[j] > top ? scores[j] : top;
          }
          // exp and sum as the flash kernel's fused loop computes them: vectors through
          // exp_u20 (built for the CPU capability ATen runs, see fused.py), the tail scalar
          using Vec = at::vec::Vectorized<float>;
          const int64_t width = Vec::size(), whole = n - n % width;
          const Vec vtop(top);
          Vec vsum(0.f);
          for (int64_t j = 0; j < whole; j += width) {
            const Vec e = (Vec::loadu(scores.data() + j) - vtop).exp_u20();
            vsum += e;
            e.store(scores.data() + j);
          }
          float total = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, vsum);
          for (int64_t j = whole; j < n; ++j) {
            scores[j] = std::exp(scores[j] - top);
            total += scores[j];
          }
          for (int64_t j = 0; j < n; ++j) scores[j] = float(rnd<scalar_t>(scores[j]));
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t j = 0; j < n; ++j) {
            const scalar_t* vj = values + j * vs2;
            const float w = scores[j];
            for (int64_t d = 0; d < hd; ++d) acc[d] += w * float(vj[d]);
          }
          scalar_t* oh = op + r * n_q * hd + h * hd;
          const float reciprocal = 1.f / total;
          for (int64_t d = 0; d < hd; ++d) oh[d] = rnd<scalar_t>(acc[d] * reciprocal);
        }
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
    for (int64_t r = 0; r < x.size(0); ++r)
      norm_row(x.const_data_ptr<scalar_t>() + r * x.stride(0), weight.const_data_ptr<scalar_t>(),
               out.data_ptr<scalar_t>() + r * x.size(1), x.size(1), float(eps));
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
    const int64_t n = h.size(1);
    for (int64_t r = 0; r < h.size(0); ++r) {
      const scalar_t* a = h.const_data_ptr<scalar_t>() + r * n;
      const scalar_t* b = delta.const_data_ptr<scalar_t>() + r * delta.stride(0);
      scalar_t* s = sum.data_ptr<scalar_t>() + r * n;
      for (int64_t i = 0; i < n; ++i) s[i] = rnd<scalar_t>(float(a[i]) + float(b[i]));
      norm_row(s, weight.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>() + r * n, n, float(eps));
    }
  });
  return {sum, out};
}

}  // namespace

TORCH_LIBRARY(twinserve, m) {
  m.def(
      "rope_write_kv(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slots, Tensor positions, int n_q, int n_kv, int head_dim) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, float scale) -> Tensor");
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
