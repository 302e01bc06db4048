"""The native decode step's fp32 matvecs split between two threads in four ways, in one run (item 68).

Builds `decode_split.cc` (next to this script) against the kernel's source, `klq_jax/kernels/decode_cpu.cc`, as its
AVX2 build is built (`g++ -O3 -mavx2 -mfma`), and runs it: a SmolLM2 step's 121 fp32 matvecs of 8 rows through the
kernel's tile loop, split in runs of at most 16 tiles (the split before item 68), one run per thread, one run per
thread with the next matrix's first tile streamed into L2 (the kernel's AVX2 split now), and as one flat stream over
the same bytes (the bound without matvec boundaries). The four take turns within each round; the figures are the
medians of the paired ratios, which hold on a VM whose speed swings between runs. Needs AVX2, FMA and a C++
compiler; prints a table and a last line `RESULT ...`.

    python benchmarks/decode_split.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

from klq_jax.models import cpu_decode


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    if args.rounds < 1:
        sys.exit(f"--rounds={args.rounds}: expected a positive number of rounds")
    if not cpu_decode.isa_runs_here("avx2"):
        sys.exit("this machine cannot run the kernel's AVX2 build (it needs an x86-64 CPU with AVX2 and FMA)")
    compiler = cpu_decode._compiler()  # the one the kernel's own build uses
    if compiler is None:
        sys.exit("no C++ compiler (g++, or $CXX)")
    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "decode_split"
        build = [compiler, "-O3", "-std=c++17", *cpu_decode.ISAS["avx2"][0], "-pthread", "-w", "-I",
                 jax.ffi.include_dir(), f'-DKERNEL_SOURCE="{cpu_decode.SOURCE}"', str(here / "decode_split.cc"),
                 "-o", str(exe)]
        subprocess.run(build, check=True)
        subprocess.run([str(exe), str(args.rounds)], check=True)


if __name__ == "__main__":
    main()
