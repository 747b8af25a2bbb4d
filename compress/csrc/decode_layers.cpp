// A decode-only step's decoder layers (Llama family) in one op: the same ops engine/lean.py calls layer by layer,
// called here from C++. At batch 1 a step of a small model (SmolLM2: 30 layers, 9 ops each) spent about as long in
// Python and PyTorch's dispatch between its ops as in their arithmetic; here that cost is paid once per step.
//
//   raypress::decode_layers(h[n,D], weights, scales, offsets, kind, gs, norms, biases, cos[n,hd], sin[n,hd],
//                           keys, values, tables, lengths, token_blocks, token_offsets, heads, scaling, eps, window)
//       -> delta[n,D], the last layer's MLP output; h (the residual stream) is updated in place up to it, so the
//          model's output is norm(h + delta). Per layer l:
//          x = l == 0 ? rms_norm(h, norms[2l]) : add_rms_norm_(h, delta, norms[2l])
//          qkv = product(q, k, v)(x) + biases[l]; rope_write_(qkv, ..., keys[l], values[l]); attention over keys[l]
//          x = add_rms_norm_(h, product(o)(attention), norms[2l + 1]); delta = product(down)(silu_mul(gate, up)(x))
//       weights: 7 matrices per layer (q, k, v, o, gate, up, down), all of one kind: 0 float32 (no scales), 1 int8,
//       2 int8-dynamic (7 scales per layer), 3 packed int4 in groups of gs (7 scales and 7 offsets per layer; an
//       empty offset tensor is the symmetric grid, as int4_gemv takes it). biases: one per layer, the q, k and v
//       biases side by side, or an empty tensor. scaling: each layer's attention scale.
#include <torch/library.h>

#include "ops.h"

namespace {

constexpr int64_t kMatrices = 7;  // q, k, v, o, gate, up, down

enum Kind : int64_t { kF32 = 0, kInt8 = 1, kInt8Dynamic = 2, kInt4 = 3 };

struct Weights {
  at::TensorList w, s, o;
  int64_t kind, gs;

  // The product of x with matrices [first, first + count) of layer l, side by side.
  torch::Tensor product(const torch::Tensor& x, int64_t l, int64_t first, int64_t count) const {
    const int64_t at = l * kMatrices + first;
    switch (kind) {
      case kF32: return f32_gemv(x, w.slice(at, count));
      case kInt8: return int8_gemv(x, w.slice(at, count), s.slice(at, count));
      case kInt8Dynamic: return int8_dynamic_gemv(x, w.slice(at, count), s.slice(at, count));
      default: return int4_gemv(x, w.slice(at, count), s.slice(at, count), o.slice(at, count), gs);
    }
  }
};

}  // namespace

torch::Tensor decode_layers(torch::Tensor h, at::TensorList weights, at::TensorList scales, at::TensorList offsets,
                            int64_t kind, int64_t gs, at::TensorList norms, at::TensorList biases,
                            const torch::Tensor& cos, const torch::Tensor& sin, at::TensorList keys,
                            at::TensorList values, const torch::Tensor& tables, const torch::Tensor& lengths,
                            const torch::Tensor& token_blocks, const torch::Tensor& token_offsets, int64_t heads,
                            at::ArrayRef<double> scaling, double eps, int64_t window) {
  const int64_t L = static_cast<int64_t>(keys.size());
  TORCH_CHECK(kind >= kF32 && kind <= kInt4, "kind ", kind, ": expected 0 (float32), 1 (int8), 2 (int8-dynamic) ",
              "or 3 (int4)");
  TORCH_CHECK(L > 0 && static_cast<int64_t>(weights.size()) == L * kMatrices && values.size() == keys.size() &&
                  static_cast<int64_t>(norms.size()) == 2 * L && static_cast<int64_t>(biases.size()) == L &&
                  static_cast<int64_t>(scaling.size()) == L,
              "give 7 weight matrices, 2 norms, a bias (or an empty tensor), a scale and a key and a value cache per "
              "layer");
  TORCH_CHECK(scales.size() == (kind == kF32 ? 0 : weights.size()) &&
                  offsets.size() == (kind == kInt4 ? weights.size() : 0),
              "give a scale per matrix (none for float32) and an offset per matrix for int4 (only)");
  TORCH_CHECK(h.dim() == 2 && keys[0].dim() == 4, "h must be [tokens, hidden] and the caches [blocks, kv heads, "
              "block_size, head_dim]");
  const Weights w{weights, scales, offsets, kind, gs};
  const int64_t n = h.size(0), D = keys[0].size(3);
  torch::Tensor delta;
  for (int64_t l = 0; l < L; ++l) {
    auto x = l == 0 ? rms_norm(h, norms[0], eps) : add_rms_norm_(h, delta, norms[2 * l], eps);
    auto qkv = w.product(x, l, 0, 3);
    if (biases[l].numel() > 0) qkv.add_(biases[l]);
    rope_write_(qkv, cos, sin, keys[l], values[l], token_blocks, token_offsets, heads);
    const auto q = qkv.narrow(1, 0, heads * D).view({n, heads, D});
    const auto attention = decode_attention(q, keys[l], values[l], tables, lengths, scaling[l], window);
    x = add_rms_norm_(h, w.product(attention.view({n, heads * D}), l, 3, 1), norms[2 * l + 1], eps);
    delta = w.product(silu_mul(w.product(x, l, 4, 2)), l, 6, 1);
  }
  return delta;
}

TORCH_LIBRARY_FRAGMENT(raypress, m) {
  m.def("decode_layers(Tensor(a!) h, Tensor[] weights, Tensor[] scales, Tensor[] offsets, int kind, int gs, "
        "Tensor[] norms, Tensor[] biases, Tensor cos, Tensor sin, Tensor(b!)[] keys, Tensor(c!)[] values, "
        "Tensor tables, Tensor lengths, Tensor token_blocks, Tensor token_offsets, int heads, float[] scaling, "
        "float eps, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(raypress, CPU, m) { m.impl("decode_layers", &decode_layers); }
