"""Accelerator chips for ``jaxinf plan --chip``: peak matrix throughput and HBM bandwidth, and the roofline.

A step's time on a chip is estimated as a roofline of XLA's cost analysis of the
step's partitioned program (per device, per call):

    compute = F_model / peak(model dtype, default precision) + F_statistics / peak(float32 at run.matmul_precision)
    memory  = bytes accessed / HBM bandwidth
    time    = max(compute, memory), and the larger one names the binding resource.

``F_model`` is the FLOPs of the model's own pass (forward, and backward to the
tracked layers, with a statistic that does no arithmetic), ``F_statistics`` the
rest of the step: the statistic contractions, which run in float32 at
``run.matmul_precision`` (:mod:`jaxinf.engine.precision`) whatever the model's dtype.
Their rate is the chip's float32 matrix rate for that precision: on a TPU, the
bfloat16 peak divided by the passes (``highest``: 6, ``high``: 3, ``default``:
1); on a GPU, the float32 (``highest``) or TF32 (``high``, ``default``) peak.

Figures are the vendors' dense (no sparsity) peaks per chip (one GPU, one TPU
chip) and HBM bandwidths: H100 SXM, H200 SXM, A100 SXM 80 GB; TPU v5e, v5p,
v6e (Trillium). A roofline is a lower bound on time: real steps reach a
fraction of both peaks (see docs/benchmarks.md for measured ratios).
"""

from __future__ import annotations

import dataclasses
import math

TFLOP = 1e12
GBPS = 1e9


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip: peak dense matrix FLOP/s per dtype, HBM bytes/s and memory."""

    name: str
    bf16: float  # FLOP/s, bfloat16 matrix units
    f32: float  # FLOP/s, float32 at full precision (GPU: CUDA cores; TPU: bf16 / 6)
    tf32: float | None  # FLOP/s, TF32 (GPU); None on a TPU
    hbm: float  # bytes/s
    memory_gib: float
    tpu: bool = False

    def peak(self, dtype: str, precision: str = "highest") -> float:
        """The matrix FLOP/s for operands of ``dtype`` (``bfloat16``, ``float32``, ``float64``) at ``precision``."""
        if dtype == "bfloat16":
            return self.bf16
        if self.tpu:
            return self.bf16 / {"highest": 6, "high": 3, "default": 1}[precision]
        if precision == "highest":
            return self.f32
        assert self.tf32 is not None, f"{self.name}: a GPU chip has a TF32 peak"  # None only on a TPU
        return self.tf32


CHIPS = {
    "h100": Chip("h100", bf16=989 * TFLOP, f32=67 * TFLOP, tf32=494 * TFLOP, hbm=3350 * GBPS, memory_gib=80),
    "h200": Chip("h200", bf16=989 * TFLOP, f32=67 * TFLOP, tf32=494 * TFLOP, hbm=4800 * GBPS, memory_gib=141),
    "a100": Chip("a100", bf16=312 * TFLOP, f32=19.5 * TFLOP, tf32=156 * TFLOP, hbm=2039 * GBPS, memory_gib=80),
    "v5e": Chip("v5e", bf16=197 * TFLOP, f32=197 / 6 * TFLOP, tf32=None, hbm=819 * GBPS, memory_gib=16, tpu=True),
    "v5p": Chip("v5p", bf16=459 * TFLOP, f32=459 / 6 * TFLOP, tf32=None, hbm=2765 * GBPS, memory_gib=95, tpu=True),
    "v6e": Chip("v6e", bf16=918 * TFLOP, f32=918 / 6 * TFLOP, tf32=None, hbm=1640 * GBPS, memory_gib=32, tpu=True),
}


def chip(name: str | None, peak_tflops: float | None = None, hbm_gbps: float | None = None) -> Chip | None:
    """The chip called ``name``, with a custom peak (TFLOP/s, every dtype and precision) and/or HBM bandwidth
    (GB/s) replacing its own; without a name, a custom chip needs both. None when nothing is given."""
    if name is None and peak_tflops is None and hbm_gbps is None:
        return None
    if name is not None and name not in CHIPS:
        raise ValueError(f"--chip {name!r}: unknown chip (choose from {', '.join(CHIPS)})")
    if name is None and (peak_tflops is None or hbm_gbps is None):
        raise ValueError("a custom chip needs both --peak-tflops and --hbm-gbps (or name one with --chip)")
    for flag, value in (("--peak-tflops", peak_tflops), ("--hbm-gbps", hbm_gbps)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} {value:g}: must be a positive finite number")
    c = CHIPS[name] if name is not None else Chip("custom", 0.0, 0.0, None, 0.0, 0.0)
    if peak_tflops is not None:
        p = peak_tflops * TFLOP
        c = dataclasses.replace(c, name=f"{c.name} (peak {peak_tflops:g} TFLOP/s)", bf16=p, f32=p, tf32=p, tpu=False)
    if hbm_gbps is not None:
        c = dataclasses.replace(c, name=f"{c.name} (HBM {hbm_gbps:g} GB/s)", hbm=hbm_gbps * GBPS)
    return c


def roofline(
    c: Chip,
    flops: float,
    bytes_accessed: float,
    model_flops: float | None,
    model_dtype: str,
    stats_dtype: str,
    precision: str,
) -> dict:
    """Seconds of one call of a step on chip ``c`` (see the module docstring): ``compute_s``, ``memory_s``,
    ``seconds`` (the larger) and ``bound`` (``compute``, ``compute (statistics)`` when the statistics' share of the
    compute time is the larger, or ``HBM``)."""
    model = flops if model_flops is None else min(model_flops, flops)
    stats = flops - model
    model_s = model / c.peak(model_dtype, "default")  # the model's own dots pass no precision
    stats_s = stats / c.peak("float32" if stats_dtype == "float64" else stats_dtype, precision)
    compute = model_s + stats_s
    memory = bytes_accessed / c.hbm
    bound = "HBM" if memory > compute else ("compute (statistics)" if stats_s > model_s else "compute")
    return {
        "compute_s": compute,
        "memory_s": memory,
        "seconds": max(compute, memory),
        "bound": bound,
        "statistics_flops": stats,
    }
