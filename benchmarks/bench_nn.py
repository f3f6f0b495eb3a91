"""Cost of porder.nn.PatchReorder per batch, for each ``channels`` option.

What it measures: milliseconds per batch of ``PatchReorder(measure, patch,
channels=...)`` forward (quantise + POR permutation + gather) and
forward+backward, on float32 feature maps (N, C, S, S) drawn from a smooth
random field (fixed seed) on the chosen device, the best of ``--repeat``
runs after one warm-up (the minimum: the machine is shared, and
interference only ever adds time), as wall-clock and as process CPU time
(all threads; on a GPU the host's share only). For scale, the same run times a 3x3 Conv2d(C, C) forward +
backward on the same map: the layer a PatchReorder would sit after.

Default shape: the brief's N=32, C=64, 16x16 maps, patch 4 (K=16 patches).
``--shape 32,64,32,32`` is ResNet-18's stem output on 32x32 images.
Prints JSON; ``--out FILE`` also writes it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from porder.nn import PatchReorder, histogram_input  # noqa: E402


def feature_maps(shape, device, seed=0):
    """Smooth, spatially correlated maps (like conv features), float32 (N, C, S, S)."""
    g = torch.Generator().manual_seed(seed)
    n, c, s, _ = shape
    x = torch.randn((n, c, s // 4 + 1, s // 4 + 1), generator=g)
    x = torch.nn.functional.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
    return (x + 0.2 * torch.randn(shape, generator=g)).to(device)


def timed(fn, repeat, device):
    """Best (minimum) wall seconds and process CPU seconds of fn() over ``repeat`` runs.

    CPU seconds (all threads of this process) are far less inflated than wall
    seconds when other jobs share the cores, so both are reported.
    """
    fn()
    wall, cpu = [], []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return min(wall), min(cpu)


def ms(t):
    """{'wall': ms, 'cpu': ms} from (wall s, cpu s)."""
    return {"wall": round(1e3 * t[0], 2), "cpu": round(1e3 * t[1], 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="32,64,16,16", help="N,C,S,S of the feature maps")
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--measures", default="mi,entropy,l1")
    ap.add_argument("--channels", default="mean,1,4,8,16,all",
                    help="comma-separated channels options ('mean', 'all' or ints)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default=None, help="porder.reorder backend (default: its own)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    device = torch.device(args.device)
    x = feature_maps(shape, device).requires_grad_()
    conv = torch.nn.Conv2d(shape[1], shape[1], 3, padding=1).to(device)

    def conv_step():
        conv(x).sum().backward()

    result = {
        "what": "ms per batch (wall, and process CPU time) of PatchReorder forward / forward+backward",
        "shape": list(shape), "patch": args.patch, "device": str(device),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "backend": args.backend,
        "conv3x3_fwd_bwd_ms": ms(timed(conv_step, args.repeat, device)),
        "rows": [],
    }
    for ch in args.channels.split(","):
        channels = ch if ch in ("mean", "all") else int(ch)
        quant = ms(timed(lambda: histogram_input(x.detach(), channels), args.repeat, device))
        for m in args.measures.split(","):
            layer = PatchReorder(m, args.patch, channels=channels, backend=args.backend)
            fwd = ms(timed(lambda: layer(x), args.repeat, device))
            both = ms(timed(lambda: layer(x).sum().backward(), args.repeat, device))
            result["rows"].append({"channels": ch, "measure": m, "quantise_ms": quant,
                                   "forward_ms": fwd, "fwd_bwd_ms": both})
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
