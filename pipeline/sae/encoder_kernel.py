"""Which CPU kernel computes the sparse TopK path's pre-activations x @ W_enc + b_enc.

Two kernels give the same values (to float32 rounding): torch's matmul (MKL sgemm, the default)
and oneDNN's inner product (`torch.ops.mkldnn._linear_pointwise`, a private op, what
torch.compile emits for CPU linears). Which is faster depends on the CPU: oneDNN took 48-52 ms
against 59-60 ms on the AMD EPYC cores of bench/sae_step.py, but 91.4 against 56.6 ms on an
Intel Xeon (2 vCPUs). So the first call of each problem (d_model, d_sae, dtype and the rows
rounded up to a power of two, so a short last batch or an evaluation batch reuses the training
batch's choice) times both on its own inputs (a few calls each, interleaved), checks oneDNN
against the matmul, keeps the faster for the rest of the process and says so in one line. Problems below PROBE_MIN_MACS keep the
matmul unprobed: there the kernel costs nothing worth measuring, and a choice made by timing
noise would differ between processes.

A checkpoint records the choices (kernel_choices) and a resumed run pins them
(pin_kernel_choices): the kernels round differently, and a resume must stay bitwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor

from pipeline.sae.path_choice import fastest, power_of_two_class, say

Kernel = Callable[[Tensor, Tensor, Tensor], Tensor]
DEFAULT_KERNEL = "matmul"
PROBE_MIN_MACS = 2**27  # rows * d_model * d_sae; 1/36 of a 4096-row step at 384 -> 3072
PROBE_ROUNDS = 3  # timed calls of each kernel (the fastest counts), after one untimed call
PROBE_MARGIN = 0.95  # another kernel must take < 95% of the default's time to replace it
MATCH_TOLERANCE = 1e-4  # relative to the largest |pre-activation|


def _matmul(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    # an in-place bias add, not addmm: addmm first copies the broadcast bias into the output
    return (x @ W_enc).add_(b_enc)


def _onednn(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        raise RuntimeError("this torch has no oneDNN linear")
    return torch.ops.mkldnn._linear_pointwise(x, W_enc.t(), b_enc, "none", [], "")


KERNELS: dict[str, Kernel] = {"matmul": _matmul, "onednn": _onednn}
_chosen: dict[str, str] = {}  # problem key -> kernel name, for this process
_pinned: dict[str, str] = {}  # from a checkpoint: used (if it still works) instead of a probe
_forced: list[str] = []  # force_kernel's stack


def pre_activations(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """x @ W_enc + b_enc by the kernel chosen for this problem (no autograd graph wanted: the
    caller runs it under no_grad)."""
    name = kernel_for(x, W_enc, b_enc)
    if name != DEFAULT_KERNEL:
        try:
            return KERNELS[name](x, W_enc, b_enc)
        except RuntimeError as error:  # e.g. a weight layout the op refuses: the default from now on
            say(f"{name} failed on {_key(x, W_enc)} ({error}); using {DEFAULT_KERNEL}")
            _chosen[_key(x, W_enc)] = DEFAULT_KERNEL
    return _matmul(x, W_enc, b_enc)


def kernel_for(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> str:
    """The kernel name for this problem: cached, forced, pinned, or probed on these inputs."""
    if torch.compiler.is_compiling():  # inductor cannot lower the op on unpacked weights; it picks its own GEMM
        return DEFAULT_KERNEL
    if x.device.type != "cpu" or x.dtype != torch.float32 or W_enc.dtype != torch.float32 or x.dim() != 2:
        return DEFAULT_KERNEL
    if _forced:
        return _forced[-1]
    key = _key(x, W_enc)
    if key not in _chosen:
        if key in _pinned:
            name = _pinned[key]
            _chosen[key] = name if name in KERNELS and matches_default(KERNELS[name], x, W_enc, b_enc) else DEFAULT_KERNEL
        elif x.shape[0] * W_enc.shape[0] * W_enc.shape[1] < PROBE_MIN_MACS:
            _chosen[key] = DEFAULT_KERNEL
        else:
            name, timings = probe(x, W_enc, b_enc)
            times = ", ".join(f"{kernel} {seconds * 1e3:.1f} ms" for kernel, seconds in timings.items())
            say(f"encoder kernel for {key}: {name} ({times or 'no other kernel works'})")
            _chosen[key] = name
    return _chosen[key]


def probe(x: Tensor, W_enc: Tensor, b_enc: Tensor, kernels: dict[str, Kernel] | None = None) -> tuple[str, dict[str, float]]:
    """(the kernel to use, the best seconds of each working kernel). A kernel that raises or
    disagrees with the default is dropped; the default stays unless another beats it by the margin."""
    kernels = KERNELS if kernels is None else kernels
    working = {DEFAULT_KERNEL: kernels[DEFAULT_KERNEL]}
    working.update({name: kernel for name, kernel in kernels.items()
                    if name != DEFAULT_KERNEL and matches_default(kernel, x, W_enc, b_enc, kernels[DEFAULT_KERNEL])})
    if len(working) == 1:
        return DEFAULT_KERNEL, {}
    # the agreement checks above ran every kernel once: no untimed call is needed
    return fastest({name: partial(kernel, x, W_enc, b_enc) for name, kernel in working.items()}, DEFAULT_KERNEL,
                   rounds=PROBE_ROUNDS, margin=PROBE_MARGIN, warmup=False)


def matches_default(kernel: Kernel, x: Tensor, W_enc: Tensor, b_enc: Tensor, default: Kernel = _matmul) -> bool:
    """The kernel runs on these inputs and gives the default's values (to float32 rounding)."""
    try:
        out = kernel(x, W_enc, b_enc)
    except RuntimeError:
        return False
    reference = default(x, W_enc, b_enc)
    if out.shape != reference.shape or not torch.isfinite(out).all():
        return False
    scale = float(reference.abs().max().clamp_min(1e-30))
    return float((out - reference).abs().max()) <= MATCH_TOLERANCE * scale


def kernel_choices() -> dict[str, str]:
    """This process's choices, {problem key: kernel}, for a checkpoint."""
    return dict(_chosen)


def pin_kernel_choices(choices: dict[str, str]) -> None:
    """Use a checkpoint's choices for those problems (each checked to still work, once)."""
    _pinned.update(choices)
    for key in choices:
        _chosen.pop(key, None)


@contextmanager
def force_kernel(name: str) -> Iterator[None]:
    """Every CPU float32 problem uses kernel `name` inside the block (tests, benchmarks)."""
    if name not in KERNELS:
        raise ValueError(f"unknown encoder kernel {name!r}; choose one of {sorted(KERNELS)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def _key(x: Tensor, W_enc: Tensor) -> str:
    return f"{power_of_two_class(x.shape[0])}x{W_enc.shape[0]}->{W_enc.shape[1]} {str(x.dtype).removeprefix('torch.')}"
