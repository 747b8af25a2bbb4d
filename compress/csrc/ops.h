// The extension's ops as C++ functions (defined in qgemv.cpp and decode_ops.cpp), for ops that call other ops
// without going back through PyTorch's dispatcher.
#pragma once

#include <torch/extension.h>

torch::Tensor f32_gemv(const torch::Tensor& x, at::TensorList w);
torch::Tensor int8_gemv(const torch::Tensor& x, at::TensorList q, at::TensorList scale);
torch::Tensor int8_dynamic_gemv(const torch::Tensor& x, at::TensorList q, at::TensorList scale);
torch::Tensor int4_gemv(const torch::Tensor& x, at::TensorList q, at::TensorList scale, at::TensorList offset,
                        int64_t gs);
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor add_rms_norm_(torch::Tensor h, const torch::Tensor& delta, const torch::Tensor& weight, double eps);
torch::Tensor silu_mul(const torch::Tensor& gu);
void rope_write_(torch::Tensor qkv, const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor keys,
                 torch::Tensor values, const torch::Tensor& blocks, const torch::Tensor& offsets, int64_t heads);
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                               const torch::Tensor& tables, const torch::Tensor& lengths, double scale,
                               int64_t window);
