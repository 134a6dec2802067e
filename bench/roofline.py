"""This machine's peak, probed, and each method's share of it: the roofline every bench prints.

    python bench/roofline.py                 # print the probed peak (CPU, torch's thread count)
    python bench/roofline.py --device cuda

`probe()` measures what the machine can do in this process: dense matmul GFLOP/s in fp32, bf16
(oneDNN/AMX on CPU) and dynamic int8 (fbgemm, the path captioner/quantize.py uses), and read
bandwidth (a sum over a tensor far larger than the caches). Each is the best of a few repeats:
a peak is what the hardware reached, and on a shared machine other processes only lower it.

`Work` counts what a method asks of the machine, by running it once under a dispatch mode:
FLOPs of every matmul, convolution and attention kernel (torch's own flop formulas; a composite op
such as aten.linear is counted as the kernels it decomposes into, in inference_mode too), split by the
dtype they run in, and the bytes every kernel must at least read and write (its inputs and outputs,
each once; views move nothing; a broadcast operand is read once; an embedding lookup reads only its rows): for a batch-1 decode step that is mostly GPT-2's weights, for a
training step also the optimizer's pass over weights, gradients and moments. Its time floor is
max(sum of FLOPs / peak of their dtype, bytes / bandwidth); `share = floor / measured seconds`
is "how close to the limit", whichever limit binds (the bound column says which).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten
# CPU flash attention has no entry in torch's flop registry: q @ k^T and p @ v, and 2.5x that backward (torch's ratio)
_CPU_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu.default: 1.0,
             aten._scaled_dot_product_flash_attention_for_cpu_backward.default: 2.5}
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "bf16"}  # fp16 shares bf16's units


@dataclass
class Peak:
    device: str
    threads: int
    gflops: dict[str, float]  # dtype -> dense matmul GFLOP/s
    read_gbs: float  # memory read bandwidth, GB/s

    def line(self) -> str:
        rates = ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in self.gflops.items())
        where = f"{self.device}, {self.threads} threads" if self.device == "cpu" else self.device
        return f"probed peak ({where}): {rates}; read bandwidth {self.read_gbs:,.1f} GB/s"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _best(fn, device: str, repeats: int) -> float:
    """Fastest of `repeats` timed calls after one warm-up, in seconds."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def timed(fn, runs: int) -> tuple[float, object]:
    """(median seconds of `runs` calls after one untimed warm-up, the last call's result): a method's
    typical time, where `_best` above gives the hardware's best."""
    fn()
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


@torch.inference_mode()
def probe(device: str = "cpu", size: int = 2048, repeats: int = 5, read_mb: int = 512) -> Peak:
    """The machine's matmul peaks and read bandwidth, measured now in this process."""
    gflops = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        gflops[name] = 2 * size**3 / _best(lambda: torch.mm(a, b), device, repeats) / 1e9
    if device == "cpu":  # int8 weights, activations quantised on the fly: nn.quantized.dynamic.Linear's kernel
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():  # torch.ao's deprecation notices: the kernel is the one we serve with
            warnings.simplefilter("ignore")
            linear = quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(size, size)), {torch.nn.Linear: per_channel_dynamic_qconfig})
        assert isinstance(linear[0], DynamicLinear)
        x = torch.randn(size, size)
        gflops["int8"] = 2 * size**3 / _best(lambda: linear(x), device, repeats) / 1e9
    big = torch.ones(read_mb * 2**20 // 4, device=device)  # far past any cache
    read_gbs = big.numel() * 4 / _best(lambda: big.sum(), device, repeats) / 1e9
    threads = torch.get_num_threads()
    return Peak(torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", threads, gflops, read_gbs)


def _nbytes(x) -> int:
    """The bytes a tensor's elements occupy: a broadcast (stride-0) dimension is read once, not per copy."""
    if not isinstance(x, torch.Tensor):
        return 0
    if x.layout != torch.strided:  # oneDNN's opaque packed weight: mkldnn._linear_pointwise counts it
        return 0
    distinct = 1
    for size, stride in zip(x.shape, x.stride()):
        distinct *= size if stride else 1
    return distinct * x.element_size()


@dataclass
class Work:
    """FLOPs (by dtype) and minimum bytes of the matmul-like kernels a call ran."""

    flops: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    bytes: float = 0.0

    def scaled(self, factor: float) -> "Work":
        """The work of `factor` such calls (per caption, per step...)."""
        out = Work(bytes=self.bytes * factor)
        for k, v in self.flops.items():
            out.flops[k] = v * factor
        return out

    def minus(self, other: "Work") -> "Work":
        """The work of a call less that of a part of it (a decoding less its prefix pass)."""
        out = Work(bytes=self.bytes - other.bytes)
        for k in {*self.flops, *other.flops}:
            out.flops[k] = self.flops.get(k, 0.0) - other.flops.get(k, 0.0)
        return out

    def total_flops(self) -> float:
        return sum(self.flops.values())

    def compute_seconds(self, peak: Peak) -> float:
        """The FLOPs at the probed matmul rate of their dtype."""
        return sum(v / (peak.gflops[k] * 1e9) for k, v in self.flops.items())

    def floor(self, peak: Peak) -> tuple[float, str]:
        """(seconds the machine needs at least, which limit binds: compute or memory)."""
        compute = self.compute_seconds(peak)
        memory = self.bytes / (peak.read_gbs * 1e9)
        return (compute, "compute") if compute >= memory else (memory, "memory")

    def share(self, seconds: float, peak: Peak) -> tuple[float, str]:
        floor, bound = self.floor(peak)
        return floor / seconds, bound

    def cells(self, seconds: float, peak: Peak) -> list[str]:
        """Table cells: achieved GFLOP/s, GB/s, and the share of the roofline with its bound."""
        share, bound = self.share(seconds, peak)
        return [f"{self.total_flops() / seconds / 1e9:,.1f}", f"{self.bytes / seconds / 1e9:,.1f}", f"{100 * share:.0f} % ({bound})"]


COLUMNS = ("GFLOP/s", "GB/s", "% of peak (bound)")


def _counted_whole(func, packet, name: str) -> bool:
    """Whether `count` counts `func` as it is, rather than the kernels it decomposes into."""
    return (packet in flop_registry or func in _CPU_SDPA or func is aten.embedding.default
            or name.startswith("quantized.linear_dynamic") or name == "mkldnn._linear_pointwise")


class count(TorchDispatchMode):
    """`with count() as work: fn()` fills `work` (a Work) with what fn ran.

    Dynamic int8 linears (quantized::linear_dynamic) count as int8 FLOPs with their int8 weight's bytes;
    prepacked fp32 linears (mkldnn::_linear_pointwise) as the nn.Linear they replace."""

    def __init__(self):
        super().__init__()
        self.work = Work()

    def __enter__(self) -> Work:
        super().__enter__()
        return self.work

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = getattr(func, "overloadpacket", None)
        name = str(packet)
        if not _counted_whole(func, packet, name):
            # Under inference_mode composite ops (aten.linear, conv2d, matmul, scaled_dot_product_attention)
            # reach this mode before they decompose: run their decomposition here, so that its kernels
            # (addmm, convolution, the attention kernel) are counted, as torch's FlopCounterMode does
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if name.startswith("quantized.linear_dynamic"):
            x, weight = args[0], args[1].unpack()[0]  # (..., K), int8 (N, K)
            n, k = weight.shape
            self.work.flops["int8"] += 2 * (x.numel() // k) * n * k
            self.work.bytes += _nbytes(x) + n * k + _nbytes(out)
            return out
        if name == "mkldnn._linear_pointwise":  # captioner/prepack.py: fp32 weight (N, K) in oneDNN's layout
            x, weight, bias = args[0], args[1], args[2]
            n, k = weight.shape
            self.work.flops[_DTYPES.get(x.dtype, "fp32")] += 2 * (x.numel() // k) * n * k
            self.work.bytes += _nbytes(x) + n * k * weight.element_size() + _nbytes(bias) + _nbytes(out)
            return out
        if func is aten.embedding.default:  # a lookup reads the rows it returns, not the whole table (GPT-2's 154 MB wte)
            self.work.bytes += _nbytes(args[1]) + 2 * _nbytes(out)
            return out
        if packet in flop_registry or func in _CPU_SDPA:
            if func in _CPU_SDPA:
                q, k, v = args[:3] if func is aten._scaled_dot_product_flash_attention_for_cpu.default else args[1:4]
                flops = _CPU_SDPA[func] * 2 * q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
            else:
                flops = flop_registry[packet](*args, **kwargs, out_val=out)
            self.work.flops[_DTYPES.get(args[0].dtype if func not in _CPU_SDPA or len(args) < 4 else args[1].dtype, "fp32")] += flops
        # oneDNN's opaque tensors (a weight being packed) have no storage to compare and are not counted
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor) and a.layout == torch.strided]
        outputs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor) and o.layout == torch.strided]
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        in_place = name.endswith("_") and not name.endswith("__")
        if not in_place and outputs and all(o.untyped_storage().data_ptr() in storages for o in outputs):
            return out  # a view (reshape, transpose, slice...): no data moves
        # eager kernels read every input and write every output once: the least traffic they can have
        self.work.bytes += sum(_nbytes(t) for t in inputs) + sum(_nbytes(t) for t in outputs)
        return out


def measure(fn) -> Work:
    """The work of one call of `fn`."""
    with count() as work:
        fn()
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(probe(args.device).line())


if __name__ == "__main__":
    main()
