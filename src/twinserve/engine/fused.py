"""The engine's compiled CPU decode kernels (`csrc/fused_decode.cpp`), built once per machine.

A single-stream decode step on 2 cores is bound by per-op dispatch as much as by the weights:
each op costs microseconds whatever its size. Five kernels leave a decode layer nine calls,
four of them its linears: RMSNorm (with the residual add before it), RoPE of q and k with
the K/V cache write, decode attention over each row's slot, and silu(gate) * up. Prefill
passes use all but the attention (theirs is SDPA over the K/V they wrote). They
round as the ops they replace, up to the order of fp32 sums; the engine test suite runs
with and without them (`TWINSERVE_FUSED_KERNELS=0` is the pure-PyTorch path).

Built with torch's C++ extension tooling (ninja, the system C++ compiler, `-march=native`,
so the build is keyed by the CPU's flags too) into torch's extensions folder
(`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions): `make kernels` builds it, and a
process that finds no build makes one (~15 s, under torch's lock). Where that fails (no
compiler) the engine logs why once and runs the pure-PyTorch path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch

from twinserve.config import get_settings

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "fused_decode.cpp"
# -fopenmp: at::parallel_for is inline OpenMP, serial without it; the build links the libgomp
# torch loaded (same soname), so the process keeps one OpenMP pool
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp")


def _capability_flags() -> list[str]:
    """ATen's vector code for the capability torch's own kernels run (its exp matches theirs)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX512", "AVX2"):
        return [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
    return []


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_name() -> str:
    """The extension's name: one per source, compiler flags, torch version and CPU."""
    flags = " ".join([*CFLAGS, *_capability_flags()])
    key = "\n".join([SOURCE.read_text(), flags, torch.__version__, _cpu_flags()])
    return "twinserve_fused_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _build_dir(name: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
    return Path(root) / name


@functools.cache
def _load() -> Any | None:
    name = build_name()
    directory = _build_dir(name)
    library = directory / f"{name}.so"
    try:
        if library.is_file() and not (directory / "lock").exists():  # built, and no build under way
            torch.ops.load_library(str(library))
        else:
            from torch.utils.cpp_extension import load

            log.info("building the engine's CPU decode kernels into %s (once per machine)", directory)
            directory.mkdir(parents=True, exist_ok=True)
            load(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=[*CFLAGS, *_capability_flags()],
                extra_ldflags=["-fopenmp"],
                build_directory=str(directory),
                is_python_module=False,
                verbose=False,
            )
    except Exception as exc:  # a missing compiler or ninja: the pure-PyTorch path serves
        log.warning("the engine's CPU decode kernels are unavailable, running pure PyTorch: %s", exc)
        return None
    return torch.ops.twinserve


class FusedOps:
    """The loaded kernels, each bound to its CPU kernel directly (skipping the Python op packet)."""

    def __init__(self, ops: Any) -> None:
        self.rope_write_kv = ops.rope_write_kv.default
        self.silu_mul = ops.silu_mul.default
        self.decode_attention = ops.decode_attention.default
        self.rms_norm = ops.rms_norm.default
        self.add_rms_norm = ops.add_rms_norm.default


def fused_ops(device: torch.device) -> FusedOps | None:
    """The kernels for a model on `device`; None = run pure PyTorch (GPU, switched off, or no build)."""
    if device.type != "cpu" or not get_settings().fused_kernels:
        return None
    ops = _load()
    return None if ops is None else FusedOps(ops)


def main() -> None:
    """`python -m twinserve.engine.fused`: build now (what `make kernels` runs)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ops = _load()
    if ops is None:
        raise SystemExit("the CPU decode kernels did not build; the engine will run pure PyTorch")
    print(f"CPU decode kernels ready: {_build_dir(build_name())}")


if __name__ == "__main__":
    main()
