from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compress import fbgemm, kernels, qmodules

ISAS = ["avx2", "avx512"]


@pytest.fixture(scope="module", params=ISAS)
def ext(request):
    """The kernels on each instruction set: AVX2 runs everywhere (forced on AVX-512 machines too)."""
    ext = kernels._extension()
    assert ext is not None, "the kernels must build on this machine (g++ and ninja are installed by make)"
    if request.param not in kernels.available_isas():
        pytest.skip(f"this CPU has no {request.param}")
    before = ext.isa()
    assert kernels.use_isa(request.param) == request.param
    yield ext
    kernels.use_isa(before)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 16])
@pytest.mark.parametrize("n,k", [(37, 64), (128, 576), (6, 1536)])
def test_f32_gemv_matches_an_exact_matmul(ext, m, n, k):
    torch.manual_seed(m * n + k)
    w, x = torch.randn(n, k), torch.randn(m, k)
    ref = F.linear(x.double(), w.double())
    assert torch.allclose(ext.f32_gemv(x, [w]).double(), ref, rtol=1e-4, atol=1e-3)
    with torch.inference_mode():
        assert torch.allclose(kernels.f32_linear(x[:, None], w, None).double()[:, 0], ref, rtol=1e-4, atol=1e-3)


def int16_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activation rows: integers in [-32767, 32767] and one scale per row (an independent copy)."""
    sx = x.abs().amax(1, keepdim=True) / 32767  # float32 arithmetic, as the kernel rounds
    return torch.round(x / sx).double(), sx.double()


def assert_near_float(y: torch.Tensor, exact_float: torch.Tensor, unquantized: torch.Tensor) -> None:
    """15-bit activations cost under a tenth of what rounding the weights costs (even with an outlier channel
    stretching each row's scale), and every row within 3e-3 of the float product."""
    row_err = ((y.double() - exact_float).norm(dim=1) / exact_float.norm(dim=1)).max()
    err = (y.double() - exact_float).norm() / exact_float.norm()
    weight_err = (exact_float - unquantized).norm() / unquantized.norm()
    assert row_err < 3e-3 and err < weight_err / 10, (row_err, err, weight_err)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 13, 16, 41, 130])
@pytest.mark.parametrize("n,k", [(37, 64), (128, 576), (6, 1536), (5, 4096 + 32)])
def test_int8_gemv_is_the_integer_product_of_int16_activations_and_int8_weights(ext, m, n, k):
    """From 12 rows on the product runs as the tiled integer GEMM: odd counts of rows and columns reach its edge
    tiles, and K = 4128 its flush of the int32 sums every 2048 weights."""
    torch.manual_seed(m * n)
    w = torch.randn(n, k)
    q, scale = qmodules.quantize_per_channel(w)
    x = torch.randn(m, k)
    x[:, 3] *= 30  # an outlier channel, as in real models
    xq, sx = int16_rows(x)
    exact_int = (xq.long() @ q.long().T).double() * sx * scale.double()  # integer matmul: no float rounding at all
    y = ext.int8_gemv(x, [q], [scale]).double()
    assert torch.allclose(y, exact_int, rtol=1e-5, atol=1e-5 * exact_int.abs().max())
    assert_near_float(y, F.linear(x.double(), q.double()) * scale.double(), F.linear(x.double(), w.double()))


def int8_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 kernel's activations: each block of 32 (zeros past K) as integers in [-127, 127] and its scale."""
    m, k = x.shape
    blocks = F.pad(x, (0, -k % 32)).view(m, -1, 32)
    xs = blocks.abs().amax(2, keepdim=True) / 127  # float32 arithmetic, as the kernel rounds
    xq = torch.where(xs > 0, torch.round(blocks / xs), torch.zeros_like(blocks))
    return xq.double(), xs.double()[..., 0]


def int4_exact(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, gs: int,
               symmetric: bool) -> torch.Tensor:
    """What the int4 kernel computes, in exact integers per block where it has them: for groups of 32 or of whole
    64-weight chunks, int8 activation blocks times the unsigned 4-bit values, each block scaled by its group's scale
    and its own; the symmetric grid's zero point subtracted in the integers, other grids' offsets applied to the
    groups' sums of the activations as rounded. Other group sizes: int16 activation rows (one scale per row), the
    offsets on the groups' float sums."""
    n, k = q.shape
    G = scale.shape[1]
    groups = torch.arange(k) // gs
    if gs == 32 or gs % 64 == 0:
        xq, xs = int8_blocks(x)
        qb = F.pad(q.double(), (0, -k % 32)).view(n, -1, 32)
        dots = torch.einsum("mbi,nbi->mnb", xq, qb)  # integer dot products per block of 32
        block_group = torch.arange(dots.shape[2]) * 32 // gs
        if symmetric:
            dots = dots - 8 * xq.sum(2)[:, None, :]
        y = (dots * scale.double()[:, block_group] * xs[:, None, :]).sum(2)
        rounded_sums = torch.zeros(x.shape[0], G, dtype=torch.float64).index_add_(1, block_group, xq.sum(2) * xs)
        return y if symmetric else y + rounded_sums @ offset.double().T
    xsum = torch.stack([x[:, groups == g].double().sum(1) for g in range(G)], 1)
    xq, sx = int16_rows(x)
    by_group = torch.zeros(x.shape[0], n, G, dtype=torch.long)
    for g in range(G):
        cols = groups == g
        by_group[:, :, g] = xq[:, cols].long() @ q[:, cols].long().T
    return (by_group.double() * scale.double()).sum(2) * sx + xsum @ offset.double().T


@pytest.mark.parametrize("m", [1, 3, 8, 16, 33])
@pytest.mark.parametrize("n,k,gs", [(37, 64, 32), (128, 576, 128), (5, 192, 64), (9, 208, 64), (6, 576, 32),
                                    (7, 96, 32), (5, 112, 32), (4, 2048 + 48, 32), (6, 96, 48), (5, 160, 16)])
@pytest.mark.parametrize("grid", ["zero_point", "symmetric"])
def test_int4_gemv_is_its_integer_product_with_a_partial_last_group(ext, m, n, k, gs, grid):
    """Every group size, grid and tail of K (a half chunk, a quarter, a partial group) against the exact integer
    model of the kernel; the symmetric grid given without offsets, as the layers pass it. Rounding the activations
    costs at most a quarter of what rounding the weights costs, and no row more than two thirds of it."""
    torch.manual_seed(m + n + k)
    w = torch.randn(n, k)
    q, scale, offset = qmodules.quantize_groupwise(w, gs, grid=grid)
    packed = kernels.pack_int4(q)
    assert torch.equal(kernels.unpack_int4(packed), q)
    x = torch.randn(m, k)
    x[:, 3] *= 10  # an outlier channel, as in real models
    symmetric = grid == "symmetric"
    kernel_offset = kernels.int4_kernel_offset(scale, offset)
    assert (kernel_offset.numel() == 0) == symmetric
    y = ext.int4_gemv(x, [packed], [scale], [kernel_offset], gs).double()
    exact = int4_exact(x, q, scale, offset, gs, symmetric)
    assert torch.allclose(y, exact, rtol=1e-5, atol=1e-5 * exact.abs().max())
    exact_float = F.linear(x.double(), kernels.dequantize_int4(packed, scale, offset, gs).double())
    unquantized = F.linear(x.double(), w.double())
    err = (y - exact_float).norm() / exact_float.norm()
    weight_err = (exact_float - unquantized).norm() / unquantized.norm()
    row_err = ((y - exact_float).norm(dim=1) / exact_float.norm(dim=1)).max()
    assert err < weight_err / 4 and row_err < weight_err / 1.5, (err, weight_err, row_err)
    if symmetric:  # given its offsets, the kernel gives the same numbers
        assert torch.allclose(ext.int4_gemv(x, [packed], [scale], [offset], gs).double(), y, rtol=1e-4,
                              atol=1e-4 * y.abs().max())


def test_int4_widen_op_matches_the_portable_dequantization(ext):
    torch.manual_seed(0)
    w = torch.randn(70, 576)
    q4, s4, o4 = qmodules.quantize_groupwise(w, 128)  # 576 = 4 x 128 + 64: a partial last group
    packed = kernels.pack_int4(q4)
    portable = kernels.dequantize_int4(packed, s4, o4, 128)
    out = torch.empty(70, 576)
    ext.int4_widen_into(packed, s4, o4, 128, 0, out)
    assert torch.allclose(out, portable, rtol=1e-5, atol=1e-6)
    assert torch.allclose(kernels.widen_int4(packed, s4, o4, 128), portable, rtol=1e-5, atol=1e-6)


def assert_linear_ops_match_the_dequantized_weights(x: torch.Tensor, n: int, group_size: int) -> None:
    torch.manual_seed(n)
    w, bias = torch.randn(n, x.shape[-1]), torch.randn(n)
    q, scale = qmodules.quantize_per_channel(w)
    q4, s4, o4 = qmodules.quantize_groupwise(w, group_size)
    packed = kernels.pack_int4(q4)
    # int8 runs on 15-bit activations at any size (see assert_near_float), int4 on blocks of 8-bit activations for
    # decode-sized x (test_int4_gemv_is_its_integer_product...: here within 1% of the float product); the larger
    # int4 products on float GEMMs
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    with torch.inference_mode():
        ref8 = F.linear(x, q.float() * scale[:, None], bias)
        assert torch.allclose(kernels.int8_linear(x, q, scale, bias), ref8, rtol=2e-3, atol=2e-3)
        ref4 = F.linear(x, kernels.dequantize_int4(packed, s4, o4, group_size), bias)
        y4 = kernels.int4_linear(x, packed, s4, o4, group_size, bias)
        if rows <= kernels.MAX_INT4_KERNEL_ROWS:
            assert (y4 - ref4).norm() / ref4.norm() < 1e-2
        else:
            assert torch.allclose(y4, ref4, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, kernels.MAX_INT8_KERNEL_ROWS + 1, kernels.MAX_INT4_KERNEL_ROWS + 1, 200])
def test_linear_ops_agree_with_the_portable_path_on_either_side_of_the_kernel_cutoff(ext, rows):
    assert_linear_ops_match_the_dequantized_weights(torch.randn(rows, 1, 128), 96, 32)


def test_layers_larger_than_the_workspace_are_multiplied_a_chunk_of_rows_at_a_time(ext, monkeypatch):
    monkeypatch.setattr(kernels, "WORKSPACE_FLOATS", 20 * 128)  # 20 rows of 128: chunks of 20 over 96 rows
    assert_linear_ops_match_the_dequantized_weights(torch.randn(2, 30, 128), 96, 64)


def test_dynamic_int8_larger_products_are_exact_per_token_int8_on_every_cpu():
    """More rows than the decode kernel takes: fbgemm's GEMM where it is exact (VNNI), else raypress's integer GEMM;
    never fbgemm's saturating AVX2 path, which was 4% off on a Zen 3 EPYC."""
    torch.manual_seed(0)
    w, x = torch.randn(64, 576) * 0.05, torch.randn(kernels.MAX_INT8_KERNEL_ROWS + 10, 576)
    x[:, 5] *= 40  # an outlier channel, as in real models
    q, scale = qmodules.quantize_per_channel(w)
    packed = fbgemm.prepack(q, scale)
    assert (packed is not None) == fbgemm.exact()
    xq, sx = kernels.quantize_per_token(x)
    exact = F.linear(xq, q.float()) * scale * sx
    with torch.profiler.profile() as prof, torch.inference_mode():
        fast = kernels.int8_dynamic_linear(x, q, scale, None, packed)
    assert ("quantized::linear_dynamic" in {e.name for e in prof.events()}) == (packed is not None)
    assert (fast - exact).norm() / exact.norm() < 0.02
    with torch.inference_mode():
        assert torch.allclose(kernels.int8_dynamic_linear(x, q, scale, None, None), exact, rtol=1e-5, atol=1e-4)


def test_the_fbgemm_probe_tells_a_saturating_gemm_from_an_exact_one():
    """The probe's verdict is what fbgemm really does with full-range int8 activations on this CPU."""
    if not fbgemm.available():
        pytest.skip("this torch build has no fbgemm")
    q = torch.randint(-127, 128, (32, 256), dtype=torch.int8)
    packed = fbgemm._prepack(q, torch.ones(32))
    x = torch.randint(-127, 128, (4, 256)).float()
    x[:, 0] = 127  # the range is all of int8: fbgemm's own requantization moves each value by under half a step
    x[:, 1] = -127
    y = torch.ops.quantized.linear_dynamic(x, packed, False)
    error = ((y - x @ q.float().T).norm() / (x @ q.float().T).norm()).item()
    assert (error < 0.01) == fbgemm.exact(), error


@pytest.mark.parametrize("m", [1, 3, 8, 13, 50])
def test_a_stack_of_matrices_is_each_matrix_product_side_by_side(ext, m):
    """q, k and v (or gate and up) as one call: every column is exactly what the matrix's own product gives."""
    torch.manual_seed(m)
    sizes, k, gs = [96, 37, 37], 192, 64
    x = torch.randn(m, k)
    ws = [torch.randn(n, k) for n in sizes]
    assert torch.equal(ext.f32_gemv(x, ws), torch.cat([ext.f32_gemv(x, [w]) for w in ws], 1))
    q8 = [qmodules.quantize_per_channel(w) for w in ws]
    for product in (ext.int8_gemv, ext.int8_dynamic_gemv):
        stacked = product(x, [q for q, _ in q8], [s for _, s in q8])
        assert torch.equal(stacked, torch.cat([product(x, [q], [s]) for q, s in q8], 1))
    q4 = [qmodules.quantize_groupwise(w, gs) for w in ws]
    packed = [kernels.pack_int4(q) for q, _, _ in q4]
    stacked = ext.int4_gemv(x, packed, [s for _, s, _ in q4], [o for _, _, o in q4], gs)
    alone = [ext.int4_gemv(x, [p], [s], [o], gs) for p, (_, s, o) in zip(packed, q4, strict=True)]
    assert stacked.shape == (m, sum(sizes)) and torch.equal(stacked, torch.cat(alone, 1))
    with pytest.raises(RuntimeError, match="columns"):
        ext.f32_gemv(x, [ws[0], torch.randn(4, k + 16)])  # matrices of another K cannot share x


@pytest.mark.parametrize("m", [12, 13, 63])
def test_the_int8_gemm_gives_the_gemv_numbers(ext, m):
    """The GEMM and the GEMV sum the same integer products (in another order as floats), for weight-only int8
    and int8-dynamic, on a stack whose matrices' blocks of rows end mid-tile."""
    torch.manual_seed(m)
    sizes, k = [70, 33, 5], 2048 + 64
    x = torch.randn(m, k)
    q8 = [qmodules.quantize_per_channel(torch.randn(n, k)) for n in sizes]
    qs, scales = [q for q, _ in q8], [s for _, s in q8]
    for product in (ext.int8_gemv, ext.int8_dynamic_gemv):
        gemm = product(x, qs, scales)
        before = ext.use_gemm_from(1 << 30)
        try:
            gemv = product(x, qs, scales)
        finally:
            ext.use_gemm_from(before)
        assert before == 12 and torch.allclose(gemm, gemv, rtol=1e-5, atol=1e-5 * gemv.abs().max())


def test_kernel_loops_run_on_all_of_torchs_threads(ext):
    """Compiled without OpenMP, ATen's parallel_for inside the extension runs on one thread, silently (that cost
    the decode kernels half their speed on 2 cores before it was noticed)."""
    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("torch runs one intra-op thread here: nothing to share out")
    assert ext.parallel_threads(1024) == threads


def test_kernels_refuse_scales_of_the_wrong_shape_instead_of_reading_past_them(ext):
    q, scale, offset = qmodules.quantize_groupwise(torch.randn(8, 128), 32)  # 4 groups per row
    packed, x = kernels.pack_int4(q), torch.randn(1, 128)
    with pytest.raises(RuntimeError, match="ceil"):
        ext.int4_gemv(x, [packed], [scale[:, :2].contiguous()], [offset[:, :2].contiguous()], 32)
    with pytest.raises(RuntimeError, match="scale must be contiguous f32"):
        ext.int8_gemv(x, [q.to(torch.int8)], [torch.ones(7)])


def test_the_ops_are_torch_ops_with_shapes_known_without_running_them(ext):
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, scale = qmodules.quantize_per_channel(torch.randn(48, 64))
    q4, s4, o4 = qmodules.quantize_groupwise(torch.randn(48, 64), 32)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(3, 64)
        assert torch.ops.raypress.int8_gemv(x, [q, q[:5]], [scale, scale[:5]]).shape == (3, 53)
        assert torch.ops.raypress.int4_gemv(x, [kernels.pack_int4(q4)], [s4], [o4], 32).shape == (3, 48)
        assert torch.ops.raypress.f32_gemv(x, [torch.empty(48, 64)]).shape == (3, 48)
        assert torch.ops.raypress.silu_mul(torch.empty(3, 64)).shape == (3, 32)


def test_raypress_isa_in_the_environment_forces_the_avx2_path():
    import os
    import subprocess
    import sys

    code = "from compress import kernels; print(kernels.kernel_isa())"
    env = {**os.environ, "RAYPRESS_ISA": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "avx2", out.stderr[-2000:]


@pytest.fixture(scope="module")
def ops():
    ext = kernels._extension()
    assert ext is not None
    return ext


def rms_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5).float() * w


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin[:, None]


def test_norm_and_mlp_ops_match_their_pytorch_definitions(ops):
    torch.manual_seed(0)
    x, w, delta = torch.randn(7, 576) * 3, torch.rand(576) + 0.5, torch.randn(7, 576)
    assert torch.allclose(ops.rms_norm(x, w, 1e-5), rms_reference(x, w), rtol=1e-5, atol=1e-5)
    h = x.clone()
    y = ops.add_rms_norm_(h, delta, w, 1e-5)
    assert torch.equal(h, x + delta)  # the residual stream is updated in place
    assert torch.allclose(y, rms_reference(x + delta, w), rtol=1e-5, atol=1e-5)
    gu = torch.randn(5, 2 * 1536) * 4
    assert torch.allclose(ops.silu_mul(gu), F.silu(gu[:, :1536]) * gu[:, 1536:], rtol=1e-5, atol=1e-6)
    with torch.inference_mode():  # the portable forms the lean forward uses without the extension
        assert torch.allclose(kernels.silu_mul(gu), F.silu(gu[:, :1536]) * gu[:, 1536:], rtol=1e-5, atol=1e-6)


def test_rope_write_rotates_q_and_k_in_place_and_caches_k_and_v(ops):
    torch.manual_seed(2)
    n, heads, kv_heads, d = 5, 9, 3, 64
    qkv = torch.randn(n, (heads + 2 * kv_heads) * d)
    angles = torch.randn(n, d // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    keys, values = torch.zeros(4, kv_heads, 16, d), torch.zeros(4, kv_heads, 16, d)
    slots, positions = torch.tensor([0, 1, 3, 3, 3]), torch.tensor([7, 0, 2, 3, 4])
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], 1)
    ref_q, ref_k = rope_reference(q.view(n, heads, d), cos, sin), rope_reference(k.view(n, kv_heads, d), cos, sin)
    ref_keys, ref_values, before = keys.clone(), values.clone(), q.clone()
    ref_keys[slots, :, positions], ref_values[slots, :, positions] = ref_k, v.reshape(n, kv_heads, d)
    ops.rope_write_(qkv, cos, sin, keys, values, slots, positions, heads)
    assert torch.allclose(qkv[:, : heads * d].view(n, heads, d), ref_q, atol=1e-6)
    assert torch.allclose(keys, ref_keys, atol=1e-6) and torch.equal(values, ref_values)
    with torch.inference_mode():
        assert torch.allclose(kernels.rope(before.view(n, heads, d), cos, sin), ref_q, atol=1e-6)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.rope_write_(qkv, cos, sin, keys, values, slots, torch.tensor([7, 0, 2, 3, 16]), heads)
    with pytest.raises(RuntimeError, match="heads"):
        ops.rope_write_(qkv, cos, sin, keys, values, slots, positions, heads + 1)


@pytest.mark.parametrize("window", [0, 5])
def test_decode_attention_matches_sdpa_over_each_sequences_blocks(ops, window):
    torch.manual_seed(window)
    n, heads, kv_heads, block, d = 4, 9, 3, 8, 64
    keys, values = torch.randn(24, kv_heads, block, d), torch.randn(24, kv_heads, block, d)
    tables = torch.randperm(24)[:20].view(n, 5)  # each sequence's 5 blocks, anywhere in the pool
    qkv, lengths = torch.randn(n, (heads + 2 * kv_heads) * d), torch.tensor([1, 17, 40, 9])
    q = qkv[:, : heads * d].view(n, heads, d)  # rows strided, as the lean forward passes them
    out = ops.decode_attention(q, keys, values, tables, lengths, 0.125, window)
    assert torch.equal(out, ops.decode_attention(q.contiguous(), keys, values, tables, lengths, 0.125, window))
    for i, length in enumerate(lengths.tolist()):
        start = max(0, length - window) if window else 0
        k_seq = keys[tables[i]].transpose(0, 1).reshape(kv_heads, -1, d)  # [kv heads, 40, d] in position order
        v_seq = values[tables[i]].transpose(0, 1).reshape(kv_heads, -1, d)
        k = k_seq[:, start:length].repeat_interleave(heads // kv_heads, 0)
        v = v_seq[:, start:length].repeat_interleave(heads // kv_heads, 0)
        ref = F.scaled_dot_product_attention(q[i][:, None], k, v, scale=0.125)[:, 0]
        assert torch.allclose(out[i], ref, atol=1e-5), i
    with pytest.raises(RuntimeError, match="out of 1..40"):
        ops.decode_attention(q, keys, values, tables, torch.tensor([1, 2, 41, 3]), 0.125, 0)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.decode_attention(q, keys, values, tables + 24, lengths, 0.125, 0)


def test_cache_write_puts_each_token_at_its_block_and_offset(ops):
    torch.manual_seed(1)
    keys, values = torch.zeros(4, 3, 16, 64), torch.zeros(4, 3, 16, 64)
    k, v = torch.randn(5, 3, 64), torch.randn(5, 3, 64)
    slots, positions = torch.tensor([0, 1, 3, 3, 3]), torch.tensor([7, 0, 2, 3, 4])
    ops.cache_write_(keys, values, k, v, slots, positions)
    ref_k, ref_v = torch.zeros_like(keys), torch.zeros_like(values)
    ref_k[slots, :, positions], ref_v[slots, :, positions] = k, v
    assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.cache_write_(keys, values, k, v, slots, torch.tensor([7, 0, 2, 3, 16]))


@pytest.mark.parametrize("m", [1, 3, 8, 13, 50])
def test_dynamic_int8_rows_are_exact_per_token_int8_on_the_kernels(ext, m):
    torch.manual_seed(m)
    w, x = torch.randn(96, 576) * 0.05, torch.randn(m, 576)
    x[:, 5] *= 40
    q, scale = qmodules.quantize_per_channel(w)
    xq, sx = kernels.quantize_per_token(x)
    exact = (xq.long() @ q.long().T).double() * scale.double() * sx.double()  # integer matmul
    with torch.inference_mode():
        y = kernels.int8_dynamic_linear(x, q, scale, None, None).double()
    assert torch.allclose(y, exact, rtol=1e-5, atol=1e-5 * exact.abs().max())


PORTABLE_LOGITS = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from compress import kernels, specs
torch.manual_seed(0)
config = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(config).eval()
specs.apply_(model, sys.argv[1])
ids = torch.arange(3, 3 + 40).remainder(320)[None]
with torch.inference_mode():
    one, many = model(ids[:, :1]).logits, model(ids).logits  # a decode-sized product and a GEMM-sized one
torch.save({"available": kernels.kernels_available(), "one": one, "many": many}, sys.argv[2])
"""


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "int8-dynamic"])
def test_the_portable_path_gives_the_kernels_logits_under_a_model(ops, tmp_path, scheme):
    """RAYPRESS_KERNELS=0 (what runs where the extension cannot build): the same model's logits, decode- and
    prefill-sized, agree with the kernel path's."""
    import os
    import subprocess
    import sys

    results = {}
    for env in ("0", "1"):
        out = tmp_path / f"{env}.pt"
        run = subprocess.run([sys.executable, "-c", PORTABLE_LOGITS, scheme, str(out)], capture_output=True,
                             text=True, timeout=300, env={**os.environ, "RAYPRESS_KERNELS": env},
                             cwd=Path(kernels.__file__).parents[1])
        assert run.returncode == 0, run.stderr[-2000:]
        results[env] = torch.load(out)
    assert results["0"]["available"] is False and results["1"]["available"] is True
    for key in ("one", "many"):
        portable, fast = results["0"][key], results["1"][key]
        # 15-bit activations on the kernels (8-bit for int8-dynamic on both paths: rounding may land apart; int4's
        # decode-sized products on blocks of 8-bit activations)
        tol = {"int8-dynamic": 5e-2, "int4-g32": 2e-2}.get(scheme, 1e-3)
        assert (fast - portable).norm() / portable.norm() < tol, (key, (fast - portable).norm() / portable.norm())
