"""GPU benchmark of the Triton kernels on WRN-28-10 shapes, P=100 members, bf16. One command:

    python bench/bench_kernels.py                 # full run, writes bench/results/kernels-<device>-<date>.json
    python bench/bench_kernels.py --batch 16 --etas 0,0.8
    python bench/bench_kernels.py --smoke         # tiny shapes; on CPU through TRITON_INTERPRET=1 (checks the script)

Measured side by side (``triton.testing.do_bench``, median and 20/80% quantiles, ms):

* epilogues (population BN + ReLU + mask) on the folded layout ``[P*B, C, H, W]`` and the compact
  layout ``[B, P*K, H, W]`` (channels_last): Triton running (1 pass), Triton batch (stats + apply),
  the eager PyTorch reference, ``torch.compile`` of the reference; bandwidth against a measured
  device-to-device copy (``y.copy_(x)``). "useful GB/s" counts one read + one write of the
  activation for every method (the minimum any epilogue must move); the issue's target is the
  epilogues at >= 75% of the copy bandwidth.
* compacted population convolution (each stage's 3x3 stride-1 conv, the 3x3 stride-2 and 1x1
  stride-2 convs that enter stages 2 and 3) at each eta: Triton plain / with the fused running
  epilogue / with the fused batch epilogue (partial sums + apply), cuDNN grouped convolution
  (``F.conv2d(groups=P)``), cuDNN grouped conv + the eager reference epilogue, ``torch.compile`` of the
  reference conv+epilogue, and the dense folded convolution (``[P*B, C]`` at full width, what the
  folded engine runs). "useful TFLOP/s" = FLOPs of the live sub-networks (2 per multiply-add, the
  FlopCounterMode convention) / time, against the 989 TFLOP/s dense bf16 peak of an H100 SXM.
  Targets: compacted conv >= 2x cuDNN grouped at eta=0.8, and >= 30% of peak.

Raw results (every row, plus device, torch/triton/CUDA versions, git rev, date, arguments) go to a
JSON file under ``bench/results/``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16
WRN28_10 = [(160, 32), (320, 16), (640, 8)]  # (width, spatial) of the three stages


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32, help="images per member (the compact conv's B)")
    ap.add_argument("--etas", default="0,0.4,0.8")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--only", choices=["epilogue", "conv"], default=None)
    ap.add_argument("--stages", default="1,2,3", help="WRN stages to run (epilogues and 3x3 convs)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: interpreter, fp32, eager timer)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/kernels-<device>-<date>.json)")
    return ap.parse_args(argv)


def _meta(args, device: torch.device) -> dict:
    import triton
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                                    timeout=10).stdout.strip())
    except Exception:
        rev, dirty = None, None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": name, "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "git_rev": rev, "git_dirty": dirty,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "args": vars(args),
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
    }


def _peak(name: str) -> float | None:
    for k, v in PEAK_TFLOPS.items():
        if k in name:
            return v
    return None


def _bench(fn, cuda: bool) -> dict:
    """Median and 20/80% quantiles in ms."""
    if cuda:
        import triton.testing
        q = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"ms": q[0], "ms_p20": q[1], "ms_p80": q[2]}
    fn()
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    return {"ms": ts[1], "ms_p20": ts[0], "ms_p80": ts[2]}


def _try(rows, base: dict, name: str, fn, cuda: bool, **extra):
    row = dict(base, method=name, **extra)
    try:
        row.update(_bench(fn, cuda))
    except Exception as e:  # keep going: one failing baseline must not lose the run
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    rows.append(row)
    if cuda:
        torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------------
def bench_epilogues(args, dev, dt, compile_ok, rows):
    from fastweedout import functional as ref
    from fastweedout.kernels import bn_act
    cuda = dev.type == "cuda"
    P, B = args.members, args.batch
    want = {int(v) for v in args.stages.split(",")}
    stages = [s for i, s in enumerate(WRN28_10, 1) if i in want] if not args.smoke else [(10, 7), (12, 4)]
    etas = [float(e) for e in args.etas.split(",")]
    compiled = torch.compile(ref.population_bn_act, dynamic=False) if compile_ok else None
    copy_bw = {}
    for width, hw in stages:
        cases = [("folded", 0.0, width)] + [("compact", e, max(1, round((1 - e) * width))) for e in etas]
        for layout, eta, K in cases:
            if layout == "folded":
                shape, members, C = (P * B, width, hw, hw), P, width
                w = torch.rand(C, device=dev) + 0.5
                b = torch.randn(C, device=dev)
            else:
                shape, members, C = (B, P * K, hw, hw), 1, P * K
                w = torch.rand(C, device=dev) + 0.5
                b = torch.randn(C, device=dev)
            x = torch.randn(shape, device=dev, dtype=dt).to(memory_format=torch.channels_last)
            m = (torch.rand(members, C, device=dev) > 0.3).float()
            rm, rv = torch.randn(C, device=dev) * 0.1, torch.rand(C, device=dev) + 0.5
            nbytes = x.numel() * x.element_size()
            base = {"bench": "epilogue", "layout": layout, "eta": eta, "width": width, "K": K, "hw": hw,
                    "shape": list(shape), "bytes": nbytes}
            y = torch.empty_like(x)
            copy = _try(rows, base, "copy", lambda: y.copy_(x), cuda)
            copy_bw[(layout, width, eta)] = 2 * nbytes / copy["ms"] / 1e6 if "ms" in copy else None
            del y
            meths = [
                ("triton_running", lambda: bn_act.population_bn_act(x, members, w, b, m, rm, rv), 2),
                ("triton_batch", lambda: bn_act.population_bn_act(x, members, w, b, m), 3),
                ("eager_running", lambda: ref.population_bn_act(x, members, w, b, m, rm, rv), None),
                ("eager_batch", lambda: ref.population_bn_act(x, members, w, b, m), None),
            ]
            if compiled is not None:
                meths += [("compile_running", lambda: compiled(x, members, w, b, m, rm, rv), None),
                          ("compile_batch", lambda: compiled(x, members, w, b, m), None)]
            for name, fn, passes in meths:
                r = _try(rows, base, name, fn, cuda)
                if "ms" in r:
                    r["useful_GBps"] = 2 * nbytes / r["ms"] / 1e6
                    if passes:
                        r["traffic_GBps"] = passes * nbytes / r["ms"] / 1e6
                    if copy_bw[(layout, width, eta)]:
                        r["vs_copy"] = r["useful_GBps"] / copy_bw[(layout, width, eta)]
            # backward of the batch epilogue (training with masks / search during training)
            xg = x.detach().requires_grad_()
            gy = torch.randn_like(x)
            _try(rows, base, "triton_batch_fwd_bwd",
                 lambda: bn_act.population_bn_act(xg, members, w, b, m).backward(gy), cuda)
            _try(rows, base, "eager_batch_fwd_bwd",
                 lambda: ref.population_bn_act(xg, members, w, b, m).backward(gy), cuda)
            _print_rows(rows, base)
            del x, xg, gy


# ------------------------------------------------------------------------------------------------
def _conv_shapes(smoke: bool):
    """(name, C_in, C_out, spatial_in, kernel, stride) of WRN-28-10's distinct conv shapes."""
    if smoke:
        return [("s1_3x3", 10, 10, 7, 3, 1), ("s2_in_3x3_s2", 10, 12, 7, 3, 2), ("s2_sc_1x1_s2", 10, 12, 7, 1, 2)]
    (w1, h1), (w2, h2), (w3, h3) = WRN28_10
    return [("stage1_3x3", w1, w1, h1, 3, 1), ("stage2_3x3", w2, w2, h2, 3, 1), ("stage3_3x3", w3, w3, h3, 3, 1),
            ("stage2_in_3x3_s2", w1, w2, h1, 3, 2), ("stage3_in_3x3_s2", w2, w3, h2, 3, 2),
            ("stage2_sc_1x1_s2", w1, w2, h1, 1, 2), ("stage3_sc_1x1_s2", w2, w3, h2, 1, 2)]


def bench_convs(args, dev, dt, compile_ok, rows, peak):
    import torch.nn.functional as F

    from fastweedout import functional as ref
    from fastweedout.kernels import grouped_conv as G
    cuda = dev.type == "cuda"
    P, B = args.members, args.batch
    etas = [float(e) for e in args.etas.split(",")]
    compiled = torch.compile(ref.grouped_conv_bn_act, dynamic=False) if compile_ok else None
    want = {f"stage{v}" for v in args.stages.split(",")}
    for name, cin, cout, hw, k, s in _conv_shapes(args.smoke):
        if not args.smoke and name.split("_")[0] not in want:
            continue
        pad = k // 2
        ho = (hw + 2 * pad - k) // s + 1
        dense_x = dense_w = None
        for eta in etas:
            ki, ko = max(1, round((1 - eta) * cin)), max(1, round((1 - eta) * cout))
            flops = 2.0 * B * ho * ho * P * ko * ki * k * k  # useful: the live sub-networks
            base = {"bench": "conv", "conv": name, "eta": eta, "C_in": cin, "C_out": cout, "K_in": ki, "K_out": ko,
                    "hw": hw, "kernel": k, "stride": s, "useful_flops": flops}
            x = torch.randn(B, P * ki, hw, hw, device=dev, dtype=dt).to(memory_format=torch.channels_last)
            w = (torch.randn(P, ko, ki, k, k, device=dev) / (ki * k * k) ** 0.5).to(dt)
            # the same weights K_out-contiguous (what gather_weight writes for free)
            w_kin = G.pack_weight(w)
            w_flat = w.reshape(P * ko, ki, k, k).contiguous(memory_format=torch.channels_last)
            n = P * ko
            bnw, bnb = torch.rand(n, device=dev) + 0.5, torch.randn(n, device=dev)
            mk = (torch.rand(n, device=dev) > 0.3).float()
            rm, rv = torch.randn(n, device=dev) * 0.1, torch.rand(n, device=dev) + 0.5
            meths = [
                ("triton_repack_w", lambda: G.grouped_conv(x, w, s, pad)),
                ("triton", lambda: G.grouped_conv(x, w_kin, s, pad)),
                ("triton_fused_running", lambda: G.grouped_conv_bn_act(x, w_kin, s, pad, bnw, bnb, mk, rm, rv)),
                ("cudnn_grouped+eager_running_epilogue",
                 lambda: ref.population_bn_act(F.conv2d(x, w_flat, stride=s, padding=pad, groups=P), 1, bnw, bnb,
                                               mk[None], rm, rv)),
                ("triton_fused_batch", lambda: G.grouped_conv_bn_act(x, w_kin, s, pad, bnw, bnb, mk)),
                ("cudnn_grouped", lambda: F.conv2d(x, w_flat, stride=s, padding=pad, groups=P)),
                ("cudnn_grouped+eager_batch_epilogue",
                 lambda: ref.population_bn_act(F.conv2d(x, w_flat, stride=s, padding=pad, groups=P), 1, bnw, bnb,
                                               mk[None])),
                ("cudnn_grouped+triton_batch_epilogue",
                 lambda: ref_free_epilogue(F.conv2d(x, w_flat, stride=s, padding=pad, groups=P), bnw, bnb, mk)),
            ]
            if compiled is not None:
                meths += [("compile_ref_batch", lambda: compiled(x, w, s, pad, bnw, bnb, mk)),
                          ("compile_ref_running", lambda: compiled(x, w, s, pad, bnw, bnb, mk, rm, rv))]
            for mname, fn in meths:
                r = _try(rows, base, mname, fn, cuda)
                _flops(r, flops, peak)
            # gather cost: building the per-member weights (engine's indexing, and straight into the packed layout)
            full_w = torch.randn(cout, cin, k, k, device=dev, dtype=dt)
            io = torch.stack([torch.randperm(cout, device=dev)[:ko] for _ in range(P)])
            ii = torch.stack([torch.randperm(cin, device=dev)[:ki] for _ in range(P)])
            _try(rows, base, "weight_gather", lambda: full_w[io[:, :, None], ii[:, None, :]], cuda)
            _try(rows, base, "weight_gather_packed", lambda: G.gather_weight(full_w, io, ii), cuda)
            del x, w, w_kin, w_flat, full_w
            # dense folded conv: full width, FLOPs independent of eta (time once, report per eta)
            if dense_x is None:
                dense_x = torch.randn(P * B, cin, hw, hw, device=dev, dtype=dt).to(memory_format=torch.channels_last)
                dense_w = torch.randn(cout, cin, k, k, device=dev, dtype=dt).to(memory_format=torch.channels_last)
                dense = _try(rows, dict(base, eta=None), "dense_folded",
                             lambda: F.conv2d(dense_x, dense_w, stride=s, padding=pad), cuda)
                _flops(dense, 2.0 * P * B * ho * ho * cout * cin * k * k, peak)
            if "ms" in dense:
                r = dict(base, method="dense_folded_useful", ms=dense["ms"])
                _flops(r, flops, peak)
                rows.append(r)
            _print_rows(rows, base)
        del dense_x, dense_w


def ref_free_epilogue(y, bnw, bnb, mk):
    from fastweedout.kernels import bn_act
    return bn_act.population_bn_act(y, 1, bnw, bnb, mk[None])


def _flops(r: dict, flops: float, peak: float | None):
    if "ms" in r:
        r["useful_TFLOPs"] = flops / r["ms"] / 1e9
        if peak:
            r["frac_peak"] = r["useful_TFLOPs"] / peak


def _print_rows(rows, base):
    keys = [k for k in base if k not in ("shape", "bytes", "useful_flops")]
    for r in rows:
        if all(r.get(k) == base[k] for k in keys) or (r.get("method", "").startswith("dense") and
                                                       r.get("conv") == base.get("conv")
                                                       and r.get("eta") in (None, base.get("eta"))):
            if r.get("_printed"):
                continue
            r["_printed"] = True
            tag = " ".join(f"{k}={base[k]}" for k in keys if k != "bench")
            val = f"{r['ms']:.4f} ms" if "ms" in r else r.get("error", "?")
            extra = " ".join(f"{k}={r[k]:.3g}" for k in ("useful_GBps", "vs_copy", "useful_TFLOPs", "frac_peak")
                             if r.get(k) is not None)
            print(f"[{base['bench']}] {tag} {r['method']:<36} {val} {extra}", flush=True)


def summarize(rows) -> dict:
    """The issue's targets, from the rows."""
    out = {}
    ep = [r for r in rows if r.get("bench") == "epilogue" and "vs_copy" in r and r["method"].startswith("triton")]
    if ep:
        out["epilogue_min_vs_copy"] = {m: min(r["vs_copy"] for r in ep if r["method"] == m)
                                       for m in sorted({r["method"] for r in ep})}
        out["epilogue_target_met(>=0.75 of copy)"] = all(v >= 0.75 for v in out["epilogue_min_vs_copy"].values())
    conv = {}
    for r in rows:
        if r.get("bench") == "conv" and "ms" in r and r.get("eta") is not None:
            conv.setdefault((r["conv"], r["eta"]), {})[r["method"]] = r
    sp = {}
    for (name, eta), d in conv.items():
        if "triton" in d and "cudnn_grouped" in d:
            sp[f"{name}@eta={eta}"] = {"speedup_vs_cudnn_grouped": d["cudnn_grouped"]["ms"] / d["triton"]["ms"],
                                       "frac_peak": d["triton"].get("frac_peak")}
            for fused, unfused in (("triton_fused_running", "cudnn_grouped+eager_running_epilogue"),
                                   ("triton_fused_batch", "cudnn_grouped+eager_batch_epilogue")):
                if fused in d and unfused in d:
                    sp[f"{name}@eta={eta}"][f"{fused}_speedup_vs_{unfused}"] = d[unfused]["ms"] / d[fused]["ms"]
    if sp:
        out["conv"] = sp
    return out


def main(argv=None) -> int:
    args = _args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            print("bench_kernels: no CUDA device here, nothing measured. The targets need an H100/H200; "
                  "run `python bench/bench_kernels.py` on one (or `--smoke` to check this script on CPU).")
            print("planned conv shapes (name, C_in, C_out, spatial, kernel, stride):")
            for s in _conv_shapes(False):
                print("  ", s)
            return 0
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("FASTWEEDOUT_AUTOTUNE", "1")  # the Triton conv picks its best block config per shape
    dev = torch.device("cuda" if cuda else "cpu")
    dt = getattr(torch, args.dtype) if cuda else torch.float32
    if args.smoke:
        args.members, args.batch = min(args.members, 3), min(args.batch, 2)
    compile_ok = not args.no_compile and cuda
    if compile_ok:  # one compiled graph per shape, static shapes: no silent fallback to eager
        from torch import _dynamo
        for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(_dynamo.config, knob):
                setattr(_dynamo.config, knob, 1024)
    meta = _meta(args, dev)
    peak = _peak(meta["device"])
    print(json.dumps({k: meta[k] for k in ("device", "torch", "triton", "cuda", "git_rev", "date")}), flush=True)
    rows: list[dict] = []
    t0 = time.time()
    if args.only in (None, "epilogue"):
        bench_epilogues(args, dev, dt, compile_ok, rows)
    if args.only in (None, "conv"):
        bench_convs(args, dev, dt, compile_ok, rows, peak)
    for r in rows:
        r.pop("_printed", None)
    result = {"meta": dict(meta, peak_tflops_bf16=peak, seconds=time.time() - t0), "summary": summarize(rows),
              "rows": rows}
    print(json.dumps(result["summary"], indent=1))
    if args.out:
        path = Path(args.out)
    elif cuda and not args.smoke:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        dname = meta["device"].replace(" ", "_").replace("/", "_")
        path = ROOT / "bench" / "results" / f"kernels-{dname}-{stamp}.json"
    else:
        path = None  # smoke runs are not results
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
