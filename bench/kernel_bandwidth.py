"""Per-layer speed of the quantized matrix products against this machine's memory bandwidth, in one run.

    python bench/kernel_bandwidth.py                  # SmolLM2-135M's linear layers, M = 1, 2, 4, 8, 16 activation rows
    python bench/kernel_bandwidth.py --rows 1 8 --rounds 7
    python bench/kernel_bandwidth.py --shapes 1b --layers 4 --rows 1 --group-size 32 --grid symmetric

A model's worth of layers (30 x q, k, v, o, gate, up, down at SmolLM2's shapes, random weights: ~540 MB in float32,
far more than any cache) is streamed through each product, so every weight comes from memory as in a decode step.
Bandwidth is a plain read of a 1 GiB tensor (``sum``), timed in the same rounds. Prints, per number of activation
rows, the bytes of weights each product reads per second and that as a share of the read bandwidth: float32
``F.linear``, and raypress's float32, int8 (per-channel) and int4 (groups of --group-size, 64 by default, on the
--grid) kernels on each instruction set this CPU has (AVX2 always; AVX-512 where present). --shapes 1b and 3b are
the layers of TinyLlama-1.1B and Llama-3.2-3B (2048 x 2048 ... 2048 x 5632; 3072 x 3072 ... 3072 x 8192); --head
their output heads (32000 x 2048, 128256 x 3072) or SmolLM2's. The symmetric grid's products read no offsets (as the
layers pass them), and its bytes do not count them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress import kernels  # noqa: E402
from compress.cpu import cpu_description  # noqa: E402
from compress.qmodules import quantize_groupwise, quantize_per_channel  # noqa: E402


def _llama(hidden: int, inter: int, q: int, kv: int) -> list[tuple[int, int]]:
    """(N, K) of one Llama layer's q, k, v, o, gate, up and down."""
    return [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (inter, hidden), (inter, hidden), (hidden, inter)]


# per layer, and the output head (one large matrix): SmolLM2-135M, TinyLlama-1.1B, Llama-3.2-3B
SHAPES = {"smollm2": (_llama(576, 1536, 576, 192), [(49152, 576)]),
          "1b": (_llama(2048, 5632, 2048, 256), [(32000, 2048)]),
          "3b": (_llama(3072, 8192, 3072, 1024), [(128256, 3072)])}


def layers(n_layers: int, group_size: int, grid: str, shapes: list[tuple[int, int]]) -> dict[str, list]:
    torch.manual_seed(0)
    f32, i8, i4 = [], [], []
    for _ in range(n_layers):
        for n, k in shapes:
            w = torch.randn(n, k) * 0.02
            f32.append(w)
            i8.append(quantize_per_channel(w))
            q, scale, offset = quantize_groupwise(w, group_size, grid=grid)
            i4.append((kernels.pack_int4(q), scale.contiguous(), kernels.int4_kernel_offset(scale, offset)))
    return {"float32": f32, "int8": i8, "int4": i4}


def timed(fn, weights, xs) -> tuple[float, int]:
    start = time.perf_counter()
    nbytes = 0
    for w in weights:
        nbytes += fn(xs, w)
    return time.perf_counter() - start, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--grid", choices=["zero_point", "symmetric"], default="zero_point", help="int4's grid")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--head", action="store_true",
                        help="stream the output head (one call per product, 4 copies) instead of the layers: the "
                             "kernels' rate without the fixed cost of each call on a small layer")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    gs = args.group_size
    per_layer, head = SHAPES[args.shapes]
    weights = layers(4, gs, args.grid, head) if args.head else layers(args.layers, gs, args.grid, per_layer)

    def f32(xs, w):
        F.linear(xs[w.shape[1]], w)
        return w.numel() * 4

    def f32k(xs, w):
        kernels.f32_linear(xs[w.shape[1]], w, None)
        return w.numel() * 4

    def i8(xs, qw):
        kernels.int8_linear(xs[qw[0].shape[1]], qw[0], qw[1], None)
        return qw[0].numel() + qw[1].numel() * 4

    def i4(xs, pw):
        packed, scale, offset = pw  # offset: empty on the symmetric grid
        ops.int4_gemv(xs[packed.shape[1] * 2], [packed], [scale], [offset], gs)
        return packed.numel() + (scale.numel() + offset.numel()) * 4

    ops = kernels.ops()
    if ops is None:
        sys.exit("the raypress CPU kernels are not built here (they need AVX2, FMA and a C++ compiler)")

    isas = [isa for isa in ("avx2", "avx512") if isa in kernels.available_isas()]
    products = {"float32 F.linear": f32}
    for isa in isas:
        products |= {f"f32 {isa}": (isa, f32k), f"int8 {isa}": (isa, i8), f"int4 {isa}": (isa, i4)}
    data = {"float32 F.linear": weights["float32"]}
    for isa in isas:
        data |= {f"f32 {isa}": weights["float32"], f"int8 {isa}": weights["int8"], f"int4 {isa}": weights["int4"]}
    big = torch.ones(1 << 28)  # 1 GiB
    samples: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        start = time.perf_counter()
        big.sum()
        samples.setdefault(("read", 0), []).append(big.numel() * 4 / (time.perf_counter() - start))
        for m in args.rows:
            xs = {k: torch.randn(m, k) for k in {k for _, k in per_layer + head}}
            for name, fn in products.items():
                if isinstance(fn, tuple):
                    kernels.use_isa(fn[0])
                    fn = fn[1]
                seconds, nbytes = timed(fn, data[name], xs)
                samples.setdefault((name, m), []).append(nbytes / seconds)
    read = statistics.median(samples[("read", 0)])
    model = {"smollm2": "SmolLM2-135M", "1b": "TinyLlama-1.1B", "3b": "Llama-3.2-3B"}[args.shapes]
    what = f"4 copies of {model}'s output head" if args.head else f"{args.layers} layers of {model}'s shapes"
    what += f"; int4 in groups of {gs}, {args.grid} grid"
    print(f"{what}, medians of {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads, raypress kernels: {kernels.kernels_available()}\n"
          f"CPU: {cpu_description()}\nmemory read bandwidth (sum of 1 GiB): {read / 1e9:.1f} GB/s")
    kernels.use_isa("")
    print("GB/s of weights read (share of the read bandwidth)")
    print(f"{'product':<18}" + "".join(f"{'M=' + str(m):>14}" for m in args.rows))
    for name in products:
        cells = [statistics.median(samples[(name, m)]) for m in args.rows]
        print(f"{name:<18}" + "".join(f"{rate / 1e9:>8.1f} ({rate / read:>3.0%})" for rate in cells))


if __name__ == "__main__":
    main()
