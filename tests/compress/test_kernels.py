import pytest
import torch
import torch.nn.functional as F

from compress import kernels, quantize


@pytest.fixture(scope="module")
def ext():
    ext = kernels._extension()
    assert ext is not None, "the AVX2 kernels must build on this machine (g++ and ninja are installed by make)"
    return ext


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 13, 16, 41])
@pytest.mark.parametrize("n,k", [(37, 64), (128, 576), (6, 1536)])
def test_int8_gemv_matches_the_dequantized_matmul(ext, m, n, k):
    torch.manual_seed(m * n)
    q, scale = quantize.quantize_per_channel(torch.randn(n, k))
    x = torch.randn(m, k)
    ref = F.linear(x.double(), q.double()) * scale.double()
    assert torch.allclose(ext.int8_gemv(x, q, scale).double(), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("m", [1, 3, 8, 16, 33])
@pytest.mark.parametrize("n,k,gs", [(37, 64, 32), (128, 576, 128), (5, 192, 64)])
def test_int4_gemv_matches_the_dequantized_matmul_with_a_partial_last_group(ext, m, n, k, gs):
    torch.manual_seed(m + n)
    q, scale, offset = quantize.quantize_groupwise(torch.randn(n, k), gs)
    packed = kernels.pack_int4(q)
    assert torch.equal(kernels.unpack_int4(packed), q)
    x = torch.randn(m, k)
    ref = F.linear(x.double(), kernels.dequantize_int4(packed, scale, offset, gs).double())
    assert torch.allclose(ext.int4_gemv(x, packed, scale, offset, gs).double(), ref, rtol=1e-4, atol=1e-3)


def test_widen_ops_match_the_portable_dequantization(ext):
    torch.manual_seed(0)
    w = torch.randn(70, 576)
    q, scale = quantize.quantize_per_channel(w)
    out = torch.empty(30, 576)
    ext.int8_widen_into(q, scale, 40, out)  # rows 40..69
    assert torch.allclose(out, q[40:].float() * scale[40:, None], rtol=1e-6, atol=0)
    q4, s4, o4 = quantize.quantize_groupwise(w, 128)  # 576 = 4 x 128 + 64: a partial last group
    packed = kernels.pack_int4(q4)
    portable = kernels.dequantize_int4(packed, s4, o4, 128)
    out = torch.empty(70, 576)
    ext.int4_widen_into(packed, s4, o4, 128, 0, out)
    assert torch.allclose(out, portable, rtol=1e-5, atol=1e-6)
    assert torch.allclose(kernels.widen_int4(packed, s4, o4, 128), portable, rtol=1e-5, atol=1e-6)


def assert_linear_ops_match_the_dequantized_weights(x: torch.Tensor, n: int, group_size: int) -> None:
    torch.manual_seed(n)
    w, bias = torch.randn(n, x.shape[-1]), torch.randn(n)
    q, scale = quantize.quantize_per_channel(w)
    q4, s4, o4 = quantize.quantize_groupwise(w, group_size)
    packed = kernels.pack_int4(q4)
    with torch.inference_mode():
        ref8 = F.linear(x, q.float() * scale[:, None], bias)
        assert torch.allclose(kernels.int8_linear(x, q, scale, bias), ref8, rtol=1e-4, atol=1e-4)
        ref4 = F.linear(x, kernels.dequantize_int4(packed, s4, o4, group_size), bias)
        assert torch.allclose(kernels.int4_linear(x, packed, s4, o4, group_size, bias), ref4, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, kernels.MAX_INT8_KERNEL_ROWS + 1, kernels.MAX_INT4_KERNEL_ROWS + 1, 200])
def test_linear_ops_agree_with_the_portable_path_on_either_side_of_the_kernel_cutoff(ext, rows):
    assert_linear_ops_match_the_dequantized_weights(torch.randn(rows, 1, 128), 96, 32)


def test_layers_larger_than_the_workspace_are_multiplied_a_chunk_of_rows_at_a_time(ext, monkeypatch):
    monkeypatch.setattr(kernels, "WORKSPACE_FLOATS", 20 * 128)  # 20 rows of 128: chunks of 20 over 96 rows
    assert_linear_ops_match_the_dequantized_weights(torch.randn(2, 30, 128), 96, 64)


def test_dynamic_int8_on_fbgemm_matches_exact_per_token_int8():
    torch.manual_seed(0)
    w, x = torch.randn(64, 128) * 0.05, torch.randn(10, 128)
    x[:, 5] *= 40  # an outlier channel, as in real models
    q, scale = quantize.quantize_per_channel(w)
    packed = kernels.fbgemm_prepack(q, scale)
    xq, sx = kernels.quantize_per_token(x)
    exact = F.linear(xq, q.float()) * scale * sx
    fast = kernels.int8_dynamic_linear(x, q, scale, None, packed)
    assert (fast - exact).norm() / exact.norm() < 0.02
    assert torch.allclose(kernels.int8_dynamic_linear(x, q, scale, None, None), exact, atol=1e-4)


def test_kernel_loops_run_on_all_of_torchs_threads(ext):
    """Compiled without OpenMP, ATen's parallel_for inside the extension runs on one thread, silently (that cost
    the decode kernels half their speed on 2 cores before it was noticed)."""
    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("torch runs one intra-op thread here: nothing to share out")
    assert ext.parallel_threads(1024) == threads


def test_kernels_refuse_scales_of_the_wrong_shape_instead_of_reading_past_them(ext):
    q, scale, offset = quantize.quantize_groupwise(torch.randn(8, 128), 32)  # 4 groups per row
    packed, x = kernels.pack_int4(q), torch.randn(1, 128)
    with pytest.raises(RuntimeError, match="ceil"):
        ext.int4_gemv(x, packed, scale[:, :2].contiguous(), offset[:, :2].contiguous(), 32)
    with pytest.raises(RuntimeError, match="scale must be contiguous f32"):
        ext.int8_gemv(x, q.to(torch.int8), torch.ones(7))
