"""Every Triton kernel lowers to GPU code (PTX + cubin for sm_90, via the ptxas that ships with
Triton) -- checked on a machine without a GPU, so CI catches what the interpreter cannot (type
errors in loops, layouts, unsupported ops). Runs in a subprocess: compiled-mode @triton.jit needs
TRITON_INTERPRET unset when the kernel modules are imported.

Also runnable directly: ``python tests/test_kernels_aot.py [sm] [--all] [--ptxas]`` (``--ptxas``:
registers and spills of each from ``ptxas -v``) (``--all``: every dtype and
constexpr variant, 120 compilations; the test compiles a representative subset).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

# (kernel, pointer dtypes by argument name, float arguments, int64 arguments, constexpr variants)
F32, F16, BF16, F64 = "fp32", "fp16", "bf16", "fp64"


def _cases(full: bool):
    import triton.language as tl
    from fastweedout.kernels import bn_act as K
    from fastweedout.kernels import grouped_conv as G
    acc = {F64: tl.float64}
    cases = []
    for dt in (BF16, F16, F32, F64) if full else (BF16, F64):
        a = acc.get(dt, tl.float32)
        st = F64 if dt == F64 else F32
        for cl in (False, True):
            # runtime specialisation: unit strides become constexpr 1 (channels_last: sc = ss = 1, NCHW: ss = 1)
            tiles = dict(BR=16, BC=128, BS=1, sc=1, ss=1) if cl else dict(BR=1, BC=2, BS=1024, ss=1)
            cases.append((K._bn_stats_kernel, {"x_ptr": dt, "pmean_ptr": st, "pm2_ptr": st}, dict(tiles, ACC=a)))
            for running in (False, True):
                for mask in (False, True) if full else (running,):
                    ptrs = {"x_ptr": dt, "y_ptr": dt, "w_ptr": F32, "b_ptr": F32, "m_ptr": F32, "mean_ptr": st,
                            "sd_ptr": st}
                    cases.append((K._bn_apply_kernel, ptrs, dict(tiles, RUNNING=running, HAS_MASK=mask, ACC=a)))
                    bptrs = dict(ptrs, dy_ptr=dt, dx_ptr=dt, part_ptr=st)
                    bptrs.pop("y_ptr")
                    cases.append((K._bn_bwd_reduce_kernel, bptrs, dict(tiles, RUNNING=running, HAS_MASK=mask, ACC=a)))
            bptrs = {"dy_ptr": dt, "x_ptr": dt, "dx_ptr": dt, "w_ptr": F32, "b_ptr": F32, "m_ptr": F32,
                     "mean_ptr": st, "sd_ptr": st, "sums_ptr": st}
            cases.append((K._bn_bwd_apply_kernel, bptrs, dict(tiles, HAS_MASK=True, ACC=a)))
        cases.append((K._bn_finalize_kernel, {"pmean_ptr": st, "pm2_ptr": st, "mean_ptr": st, "rstd_ptr": st},
                      dict(BT=32, BC=128, ACC=a)))
        for epi in (0, 1, 2) if full or dt != F64 else (0,):
            for k, s in ((3, 1), (3, 2), (1, 2)) if full else ((3, 2),) if dt == F64 else ((3, 1), (1, 2)):
                ptrs = {"x_ptr": dt, "w_ptr": dt, "y_ptr": dt, "bnw_ptr": F32, "bnb_ptr": F32, "mask_ptr": F32,
                        "rm_ptr": F32, "rv_ptr": F32, "pmean_ptr": st, "pm2_ptr": st}
                blocks = dict(BM=64, BN=32, BK=16) if dt == F64 else dict(BM=128, BN=64, BK=32)
                # channels_last x and y, K_out-contiguous weight: unit strides specialise to constexpr 1
                cases.append((G._gconv_kernel, ptrs,
                              dict(blocks, sxc=1, swo=1, syc=1, STRIDE=s, PAD=k // 2, KH=k, KW=k, EPI=epi,
                                   HAS_MASK=epi == 1, PREC="tf32" if dt == F32 else "ieee", ACC=a)))
    # Triton specialises integer arguments equal to 1 into constexprs: compile that corner too
    # (T = S = 1 chunks, one channel, one member, K_in = K_out = 1, 1x1 outputs).
    ones = {"T": 1, "S": 1, "CHUNK": 1, "RB": 1, "P": 1, "C": 1, "R": 1, "TOTAL": 1, "CHUNK_CNT": 1, "N": 1,
            "KIN": 1, "KOUT": 1, "CTOT": 1, "HO": 1, "WO": 1, "M": 1, "H": 1, "W": 1}
    seen = set()
    for fn, ptrs, consts in list(cases):
        if fn.__name__ in seen:
            continue
        seen.add(fn.__name__)
        extra = {k: v for k, v in ones.items() if k in fn.arg_names and k not in consts}
        cases.append((fn, ptrs, dict(consts, **extra)))
    return cases


_DIV16 = {"KIN", "KOUT", "CTOT", "sxb", "sxh", "sxw", "swp", "swi", "swr", "sws", "syb", "syh", "syw", "sp", "sr",
          "C"}


def _ptxas_info(ptx: str, sm: int) -> str:
    """'regs=N spill=B' from ptxas -v (the bundled ptxas that accepts this PTX version)."""
    import re
    import tempfile

    import triton.backends.nvidia as nv
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    bindir = os.path.join(os.path.dirname(nv.__file__), "bin")
    for exe in ("ptxas", "ptxas-blackwell"):
        r = subprocess.run([os.path.join(bindir, exe), "-v", f"--gpu-name=sm_{sm}a", f.name, "-o", os.devnull],
                           capture_output=True, text=True)
        if r.returncode == 0:
            regs = re.search(r"Used (\d+) registers", r.stderr)
            spill = re.search(r"(\d+) bytes spill stores", r.stderr)
            return f"regs={regs.group(1) if regs else '?'} spill={spill.group(1) if spill else '?'}"
    return "ptxas -v failed"


def compile_all(sm: int = 90, full: bool = False, report: bool = False) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    assert not triton.knobs.runtime.interpret, "run with TRITON_INTERPRET unset"
    target = GPUTarget("cuda", sm, 32)
    n = 0
    for fn, ptrs, consts in _cases(full):
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if fn.params[i].is_constexpr or name in consts:
                sig[name] = "constexpr"
            elif name in ptrs:
                sig[name] = "*" + ptrs[name]
                attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
            elif name == "eps":
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
                if name in _DIV16:  # sizes and strides that are multiples of 16 at WRN shapes
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn, sig, constexprs=dict(consts), attrs=attrs)
        nw = 8 if consts.get("BN", 0) >= 128 else 4
        out = triton.compile(src, target=target, options={"num_warps": nw, "num_stages": 3})
        assert out.asm.get("cubin"), fn.__name__
        if report:
            shown = {k: v for k, v in consts.items() if k != "ACC"}
            print(f"{fn.__name__:<24} {ptrs.get('x_ptr', ptrs.get('pmean_ptr'))} {shown} "
                  f"smem={out.metadata.shared} {_ptxas_info(out.asm['ptx'], sm)}")
        n += 1
    return n


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "compiled" in r.stdout


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    args = [a for a in sys.argv[1:] if a != "--all"]
    args = [a for a in args if a != "--ptxas"]
    n = compile_all(int(args[0]) if args else 90, full="--all" in sys.argv, report="--ptxas" in sys.argv)
    print(f"compiled {n} kernels")
