"""GPU code quality, proved on a machine without a GPU: every kernel variant is compiled ahead of time
for sm_90a (Triton's compile API and the ptxas it ships need no GPU) and its PTX / TTIR inspected.

What is checked (each a test below):

* every variant compiles (every dtype x every constexpr mode the launchers use, each conv geometry of
  a WRN, every autotune config, plus an unaligned specialisation of each kernel);
* bf16: no register spills (``ptxas -v``);
* the convolution uses wgmma (bf16 / fp16) and 16-byte ``cp.async``;
* BN statistics / apply and the conv epilogues (store, residual load) use 16-byte global accesses
  and no 2-byte ones, at the shapes the engines run (channels_last, channel counts padded to 16);
* ReLU keeps NaN: no ``max.f32`` (which maps NaN to 0), ``max.NaN.f32`` instead;
* every line tagged ``# i64`` in the kernel sources (offsets whose products can pass 2^31) computes
  in int64 in the TTIR, and every tag is exercised by some variant.

Integer arguments get what Triton's launcher gives them at run time: a value of 1 becomes a
constexpr, a multiple of 16 is marked divisible by 16 (values: WRN-28-10 stage 2, P=100, K=64 after
padding, 32 images). Compilation runs in a subprocess (compiled-mode ``@triton.jit`` needs
TRITON_INTERPRET unset at import) over a process pool; Triton's disk cache makes reruns fast.
Also runnable directly: ``python tests/test_kernels_aot.py [--sm 90] [--quick]`` (one line per variant).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "fastweedout" / "ops" / "triton"
DTYPES = ("fp16", "bf16", "fp32", "fp64")


# ------------------------------------------------------------------------------------ variants
def _st(dt: str) -> str:
    return "fp64" if dt == "fp64" else "fp32"


def _bn_values(cl: bool, aligned: bool = True) -> dict:
    """view3 of a folded activation [P*B, C, H, W]: P=100, B=32, C=320, 16x16 (aligned) or C=10, 7x5."""
    b, c, hw = (32, 320, 256) if aligned else (3, 10, 35)
    if cl:
        return dict(R=b * hw, C=c, S=1, sp=b * hw * c, sr=c, sc=1, ss=1)
    return dict(R=b, C=c, S=hw, sp=b * c * hw, sr=c * hw, sc=hw, ss=1)


def variants(quick: bool = False) -> list[dict]:
    from fastweedout.ops.triton import _conv, bn_stats
    out = []

    def add(kernel, module, dt, ptrs, ints, consts, nw=4, ns=3, tag=""):
        out.append(dict(kernel=kernel, module=module, dtype=dt, ptrs=ptrs, ints=ints, consts=consts, num_warps=nw,
                        num_stages=ns, tag=tag))

    for dt in ("bf16", "fp64") if quick else DTYPES:
        st = _st(dt)
        acc = "fp64" if dt == "fp64" else "fp32"
        for cl in (False, True):
            for aligned in (True, False):
                v = _bn_values(cl, aligned)
                br, bc, bs = bn_stats.tiles(v["R"], v["C"], v["S"], cl)
                tl_ = dict(BR=br, BC=bc, BS=bs, ACC=acc)
                tag = ("cl" if cl else "nchw") + ("" if aligned else "-unaligned")
                add("_bn_stats_kernel", "bn_stats", dt, dict(x_ptr=dt, pcnt_ptr=st, pmean_ptr=st, pm2_ptr=st),
                    dict(v, T=4, CHUNK=2048), dict(tl_, CL=cl), tag=tag)
                par = dict(swp=0, sbp=0, smp=v["C"], smup=v["C"], svp=v["C"])
                ptrs = dict(x_ptr=dt, y_ptr=dt, w_ptr="fp32", b_ptr="fp32", m_ptr="fp32", mean_ptr=st, var_ptr=st)
                for affine in (False, True):
                    for mask in (False, True):
                        if not aligned and (affine or not mask):  # unaligned: one mode is enough to compile
                            continue
                        add("_bn_apply_kernel", "bn_act", dt, ptrs, {**v, **par, "RB": 64},
                            dict(tl_, AFFINE=affine, HAS_MASK=mask, CL=cl), tag=tag)
                        if not aligned or affine:
                            continue
                        bptrs = dict(ptrs, dy_ptr=dt, dx_ptr=dt, part_ptr=st)
                        bptrs.pop("y_ptr")
                        for running in (False, True):
                            add("_bn_bwd_reduce_kernel", "bn_act_backward", dt, bptrs,
                                {**v, **par, "P": 100, "T": 4, "CHUNK": 2048},
                                dict(tl_, RUNNING=running, HAS_MASK=mask), tag=tag)
                        aptrs = {k: t for k, t in bptrs.items() if k != "part_ptr"}
                        add("_bn_bwd_apply_kernel", "bn_act_backward", dt, dict(aptrs, sums_ptr=st),
                            {**v, **par, "P": 100, "RB": 64, "N": v["R"] * v["S"]}, dict(tl_, HAS_MASK=mask, CL=cl),
                            tag=tag)
        if dt in ("fp32", "fp64"):
            for final in (False, True):
                names = ("icnt_ptr", "imean_ptr", "im2_ptr", "ocnt_ptr", "omean_ptr", "om2_ptr")
                add("_stats_merge_kernel", "bn_stats", dt, dict.fromkeys(names, dt),
                    dict(T=512, C=6400, G=16, T2=32) if not final else dict(T=32, C=6400, G=32, T2=1),
                    dict(FINAL=final, BT=16, BC=128, ACC=acc))
        # the convolution: x [32, 100*64, H, W] channels_last, weight packed [kh, kw, P, K_in, K_out]
        geometries = ((3, 1, 16), (3, 2, 32), (1, 2, 32), (1, 1, 16)) if dt in ("bf16", "fp32") else ((3, 1, 16),)
        for kh, stride, h in geometries:
            ho = (h + 2 * (kh // 2) - kh) // stride + 1
            p, k, b = 100, 64, 32
            ints = dict(H=h, W=h, HO=ho, WO=ho, M=b * ho * ho, KIN=k, KOUT=k, CTOT=p * k, P=p, NPROG=264,
                        sxb=h * h * p * k, sxc=1,
                        sxh=h * p * k, sxw=p * k, swp=k * k, swo=1, swi=k, swr=kh * p * k * k, sws=p * k * k,
                        syb=ho * ho * p * k, syc=1, syh=ho * p * k, syw=p * k)
            ints.update(srb=ints["syb"], src=1, srh=ints["syh"], srw=ints["syw"])
            cfg = _conv.default_config(ints["M"], k, k, _torch_dtype(dt))
            modes = [(0, False, False, False)]
            if (kh, stride) == (3, 1):  # every mode the launchers use: (EPI, PROLOGUE, RESIDUAL, HAS_MASK)
                modes = [(e, pro, res, False) for e in (0, 2) for pro in (False, True) for res in (False, True)]
                modes += [(1, False, False, False), (1, False, False, True)]
            for epi, pro, res, mask in modes:
                configs = [cfg]
                if dt in ("bf16", "fp16") and (epi, pro, res) in ((2, True, True), (0, False, False)) and not quick:
                    configs += [c for c in _conv.GPU_CONFIGS if c != cfg]  # every autotune candidate
                for bm, bn, bk, nw, ns, *persist in configs:
                    add("_conv_kernel", "_conv", dt, _conv_ptrs(dt),
                        ints, dict(STRIDE=stride, PAD=kh // 2, KH=kh, KW=kh, PROLOGUE=pro, RESIDUAL=res, EPI=epi,
                                   HAS_MASK=mask, PREC="tf32" if dt == "fp32" else "ieee", BM=bm, BN=bn, BK=bk,
                                   ACC=acc, PERSISTENT=bool(persist)), nw, ns,
                        tag=f"k{kh}s{stride}" + (f"-persistent{persist[0]}" if persist else ""))
        # an unaligned specialisation: odd sizes and strides, NCHW x
        odd = dict(H=7, W=5, HO=7, WO=5, M=70, KIN=5, KOUT=3, CTOT=9, P=3, NPROG=7, sxb=105, sxc=35, sxh=5, sxw=1,
                   swp=45, swo=45, swi=9, swr=3, sws=1, syb=315, syc=35, syh=5, syw=1, srb=315, src=35, srh=5, srw=1)
        add("_conv_kernel", "_conv", dt, _conv_ptrs(dt), odd,
            dict(STRIDE=1, PAD=1, KH=3, KW=3, PROLOGUE=True, RESIDUAL=True, EPI=2, HAS_MASK=False,
                 PREC="ieee", BM=64, BN=16, BK=16, ACC=acc, PERSISTENT=True), tag="unaligned")
    return out


def _torch_dtype(dt: str):
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[dt]


def _conv_ptrs(dt: str) -> dict:
    st = _st(dt)
    return dict(x_ptr=dt, w_ptr=dt, y_ptr=dt, res_ptr=dt, isc_ptr=st, ish_ptr=st, bnw_ptr="fp32", bnb_ptr="fp32",
                mask_ptr="fp32", rm_ptr="fp32", rv_ptr="fp32", pcnt_ptr=st, pmean_ptr=st, pm2_ptr=st)


# ------------------------------------------------------------------------------------ compiling
def _ptxas(ptx: str, sm: int) -> dict:
    import tempfile

    import triton.backends.nvidia as nv
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        r = subprocess.run([os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas"), "-v", f"--gpu-name=sm_{sm}a",
                            f.name, "-o", os.devnull], capture_output=True, text=True, timeout=300)
    finally:
        os.unlink(f.name)
    if r.returncode:
        return dict(ptxas_error=r.stderr[-500:])
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", r.stderr)]
    return dict(regs=int(regs.group(1)) if regs else None, spill_bytes=sum(spill))


def compile_variant(v: dict, sm: int = 90) -> dict:
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = getattr(importlib.import_module(f"fastweedout.ops.triton.{v['module']}"), v["kernel"])
    tldt = {"fp32": tl.float32, "fp64": tl.float64}
    consts = {k: (tldt[c] if k == "ACC" else c) for k, c in v["consts"].items()}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr or name in consts:
            sig[name] = "constexpr"
        elif v["ptrs"].get(name):
            sig[name] = "*" + v["ptrs"][name]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name in ("eps",):
            sig[name] = "fp32"
        elif name in v["ptrs"]:  # an unused pointer
            sig[name] = "*fp32"
        else:
            val = v["ints"][name]
            if val == 1:  # what the launcher does with an int equal to 1
                sig[name] = "constexpr"
                consts[name] = 1
            else:
                sig[name] = "i32"
                if val % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
    res = dict(kernel=v["kernel"], dtype=v["dtype"], tag=v["tag"],
               consts={k: c for k, c in v["consts"].items() if k != "ACC"}, num_warps=v["num_warps"],
               num_stages=v["num_stages"])
    try:
        out = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", sm, 32),
                             options={"num_warps": v["num_warps"], "num_stages": v["num_stages"]})
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"[-2000:]
        return res
    ptx, ttir = out.asm["ptx"], out.asm["ttir"]
    res["cubin"] = bool(out.asm.get("cubin"))
    res["shared"] = int(getattr(out.metadata, "shared", 0) or 0)
    res["global"] = sorted(set(re.findall(r"\b(?:ld|st)\.global[\w.:]*", ptx)))
    res["cp_async_16"] = bool(re.search(r"cp\.async\.\w+\.shared\.global[^;]*,\s*(?:16|0x10)\b", ptx))
    res["wgmma"] = "wgmma.mma_async" in ptx
    res["fmax"] = sorted(set(re.findall(r"\bmax(?:\.\w+)*\.f(?:16|32|64)\b", ptx)))
    # PTX has no max.NaN.f64: Triton lowers a NaN-propagating fp64 max to setp.nan + max + selp
    res["fmax_f64"] = len(re.findall(r"\bmax\.f64\b", ptx))
    res["setp_nan_f64"] = len(re.findall(r"\bsetp\.nan\.f64\b", ptx))
    res["i64"] = i64_report(ttir)
    if v["dtype"] == "bf16":
        res.update(_ptxas(ptx, sm))
    return res


def _tagged_lines() -> dict[str, set[int]]:
    assert KERNEL_DIR.is_dir(), f"{KERNEL_DIR}: the kernels moved"
    out = {}
    for f in KERNEL_DIR.glob("*.py"):
        lines = {i for i, line in enumerate(f.read_text().splitlines(), 1)
                 if line.rstrip().endswith("# i64") and not line.lstrip().startswith("#")}
        if lines:
            out[f.name] = lines
    return out


def i64_report(ttir: str) -> dict:
    """Integer muli/addi ops on the lines tagged ``# i64``: the i32 ones (violations) and the lines seen."""
    tagged = _tagged_lines()
    locs = dict(re.findall(r"^#(loc\d*) = loc\((.*)\)\s*$", ttir, re.M))

    def where(ref: str, depth: int = 0) -> set[tuple[str, int]]:
        body = locs.get(ref, "")
        m = re.match(r'"([^"]+)":(\d+):\d+$', body)
        if m:
            return {(os.path.basename(m.group(1)), int(m.group(2)))}
        found = set()
        if depth < 20:
            for r in re.findall(r"#(loc\d*)", body):
                found |= where(r, depth + 1)
        return found

    bad, seen = [], set()
    for m in re.finditer(r"= arith\.(muli|addi) [^\n]*?:\s*(\S+)\s+loc\(([^\n]*)\)\s*$", ttir, re.M):
        refs = re.findall(r"#(loc\d*)", m.group(3))
        places = set().union(*(where(r) for r in refs)) if refs else set()
        for f, line in places:
            if line in tagged.get(f, ()):
                seen.add(f"{f}:{line}")
                if "i64" not in m.group(2):
                    bad.append(f"{f}:{line} {m.group(1)} {m.group(2)}")
    return dict(violations=sorted(set(bad)), seen=sorted(seen))


def compile_all(sm: int = 90, quick: bool = False, workers: int | None = None) -> list[dict]:
    from concurrent.futures import ProcessPoolExecutor
    vs = variants(quick)
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    if workers == 1:
        return [compile_variant(v, sm) for v in vs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_variant, vs, [sm] * len(vs)))


# ------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def report() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, __file__, "--json"], env=env, capture_output=True, text=True, timeout=900,
                       cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert rows
    return rows


def _name(r: dict) -> str:
    return f"{r['kernel']}[{r['dtype']} {r['tag']} {r['consts']} w{r['num_warps']}s{r['num_stages']}]"


def test_every_variant_compiles(report):
    failed = [_name(r) + ": " + r.get("error", "no cubin") for r in report if not r.get("cubin")]
    assert not failed, "\n".join(failed)
    kernels = {r["kernel"] for r in report}
    assert kernels == {"_bn_stats_kernel", "_stats_merge_kernel", "_bn_apply_kernel", "_bn_bwd_reduce_kernel",
                       "_bn_bwd_apply_kernel", "_conv_kernel"}
    assert {r["dtype"] for r in report} == set(DTYPES)


def test_no_register_spills_in_bf16(report):
    bf16 = [r for r in report if r["dtype"] == "bf16"]
    assert bf16 and all("ptxas_error" not in r for r in bf16), [r.get("ptxas_error") for r in bf16]
    spilled = [f"{_name(r)}: {r['spill_bytes']} bytes, {r['regs']} registers" for r in bf16 if r["spill_bytes"]]
    assert not spilled, "\n".join(spilled)


#: one H100/H200 SM: 64k 32-bit registers, 227 KB of shared memory a block may use (of 228 KB)
SM90_REGISTERS, SM90_SHARED = 65536, 227 * 1024


def test_persistent_configs_fit_their_programs_per_sm(report):
    """A persistent conv config asks for k programs per SM; they must be resident at once (registers
    and shared memory of k blocks within one SM), or the schedule serialises into waves again. Each
    config's registers, shared memory and the occupancy they allow are in the report (``--json``)."""
    from fastweedout.ops.triton import _conv

    rows = [r for r in report if r["kernel"] == "_conv_kernel" and r["dtype"] == "bf16" and "persistent" in r["tag"]]
    assert len(rows) >= 2 * sum(len(c) > 5 for c in _conv.GPU_CONFIGS)  # two modes x every persistent config
    bad = []
    for r in rows:
        k = int(r["tag"].rsplit("persistent", 1)[1])
        regs = r["regs"] * 32 * r["num_warps"]
        if k * regs > SM90_REGISTERS or k * r["shared"] > SM90_SHARED:
            bad.append(f"{_name(r)}: {k} x ({r['regs']} regs x {32 * r['num_warps']} threads, {r['shared']} B shared)")
    assert not bad, "\n".join(bad)


def test_conv_uses_wgmma_and_16_byte_cp_async(report):
    conv = [r for r in report if r["kernel"] == "_conv_kernel" and r["dtype"] in ("bf16", "fp16")]
    assert conv and all(r["wgmma"] for r in conv), [_name(r) for r in conv if not r["wgmma"]]
    aligned = [r for r in conv if r["tag"] != "unaligned"]
    assert all(r["cp_async_16"] for r in aligned), [_name(r) for r in aligned if not r["cp_async_16"]]


def _narrow(ops: list[str]) -> list[str]:
    return [o for o in ops if re.search(r"\.[bus]16$", o)]


def test_16_byte_global_accesses(report):
    """BN statistics and apply (both layouts) and the conv epilogues move activations 16 bytes at a time."""
    checked = 0
    for r in report:
        if r["tag"].endswith("unaligned") or r["kernel"] not in ("_bn_stats_kernel", "_bn_apply_kernel",
                                                                 "_conv_kernel"):
            continue
        width = "v2.b64" if r["dtype"] == "fp64" else "v4.b32"
        ld = [o for o in r["global"] if o.startswith("ld.")]
        st = [o for o in r["global"] if o.startswith("st.")]
        assert not _narrow(r["global"]), f"{_name(r)}: 2-byte accesses {r['global']}"
        if r["kernel"] == "_conv_kernel":  # epilogue: the output store, and the residual load
            assert any(o.endswith(width) for o in st), f"{_name(r)}: {r['global']}"
            if r["consts"]["RESIDUAL"]:
                assert any(o.endswith(width) for o in ld), f"{_name(r)}: {r['global']}"
        else:
            assert any(o.endswith(width) for o in ld), f"{_name(r)}: {r['global']}"
            if r["kernel"] == "_bn_apply_kernel":
                assert any(o.endswith(width) for o in st), f"{_name(r)}: {r['global']}"
        checked += 1
    assert checked >= 40


def test_relu_keeps_nan(report):
    """No float max that drops NaN (max.f32 maps NaN to 0): the ReLU is max.NaN.f32, or for fp64 (PTX has
    no max.NaN.f64) max.f64 guarded by setp.nan.f64 + selp."""
    bad = [f"{_name(r)}: {r['fmax']}" for r in report
           if any(".NaN." not in op and not op.endswith(".f64") for op in r["fmax"])
           or r["fmax_f64"] > r["setp_nan_f64"]]
    assert not bad, "\n".join(bad)
    relu = [r for r in report if r["kernel"] == "_bn_apply_kernel" or (
        r["kernel"] == "_conv_kernel" and (r["consts"]["PROLOGUE"] or r["consts"]["EPI"] == 1))]
    assert relu and all(r["fmax"] for r in relu)


def test_offsets_are_int64_where_products_can_pass_2_31(report):
    bad = sorted({f"{_name(r)}: {v}" for r in report for v in r["i64"]["violations"]})
    assert not bad, "\n".join(bad)
    seen = set().union(*(set(r["i64"]["seen"]) for r in report))
    tagged = {f"{f}:{line}" for f, lines in _tagged_lines().items() for line in lines}
    assert tagged and tagged <= seen, f"tags no variant exercises: {sorted(tagged - seen)}"
    conv_tags = {t for t in tagged if t.startswith("_conv.py")}
    assert len(conv_tags) >= 8  # x, weight (taps), output, residual and partials offsets


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(ROOT))
    args = sys.argv[1:]
    sm = int(args[args.index("--sm") + 1]) if "--sm" in args else 90
    for row in compile_all(sm, quick="--quick" in args):
        print(json.dumps(row) if "--json" in args else f"{_name(row)} {row.get('error') or ''}"
              f" regs={row.get('regs')} spill={row.get('spill_bytes')} shared={row.get('shared')}"
              f" wgmma={row.get('wgmma')}"
              f" {row.get('global')}")
