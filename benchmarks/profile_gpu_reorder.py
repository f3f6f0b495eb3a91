"""Where the time of `porder train --reorder mi` goes on a GPU (issue 13): one batch of 512.

Times, for a uint8 batch (512, 32, 32, 3) already on the GPU:

* ``host``: CPU wall time per call of the step's reorder (Python + launches; no sync),
* ``device``: GPU time per call (CUDA events around 50 back-to-back calls),

for the fused CUDA kernel alone (CuPy in, CuPy out), the training loop's
``reorder_tensor`` (torch in and out through DLPack), and the same with CuPy
running on torch's current stream through ``__cuda_array_interface__``; and
the pieces of the torch path alone (torch -> CuPy, reorder of that CuPy view,
CuPy results -> torch), because the torch path showed 2.0 ms of stream time per
call on the H200 against 0.10 ms for the rest (not yet explained; the pieces
say which step it is). Prints one line per variant. Needs CuPy, torch and a CUDA GPU.

    python3 benchmarks/profile_gpu_reorder.py
"""
from __future__ import annotations

import json
import statistics
import time


def main() -> None:
    import cupy as cp
    import torch

    from porder.kernels.cuda import reorder_batch
    from porder.measures import get_measure
    from porder.reorder import reorder
    from porder.train.batches import reorder_tensor

    m = get_measure("mi")
    g = torch.Generator(device="cuda").manual_seed(0)
    x_t = torch.randint(0, 256, (512, 32, 32, 3), dtype=torch.uint8, device="cuda", generator=g)
    x_c = cp.asarray(x_t)
    idx = torch.arange(512)
    opts = dict(measure="mi", patch=8, bins=256, seed=0)

    def on_torch_stream(t):
        s = torch.cuda.current_stream()
        with cp.cuda.ExternalStream(s.cuda_stream):
            out = reorder(cp.asarray(t), m, 8, device="cuda")[0]
        return torch.as_tensor(out, device=t.device)

    out_c, perm_c = reorder(x_c, m, 8)
    variants = {
        "kernel (cupy in/out)": lambda: reorder_batch(x_c, m, 8, bins=256, reference=0,
                                                      descending=True),
        "porder.reorder (cupy)": lambda: reorder(x_c, m, 8),
        "porder.reorder (torch, dlpack)": lambda: reorder(x_t, m, 8),
        "train reorder_tensor": lambda: reorder_tensor(x_t, idx, **opts),
        "torch stream + CAI": lambda: on_torch_stream(x_t),
        "piece: torch -> cupy (dlpack)": lambda: cp.from_dlpack(x_t),
        "piece: reorder(cupy view of torch)": lambda: reorder(cp.from_dlpack(x_t), m, 8),
        "piece: cupy out, perm -> torch": lambda: (torch.from_dlpack(out_c),
                                                    torch.from_dlpack(perm_c)),
    }
    rows = []
    for name, fn in variants.items():
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        host = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            t0 = time.perf_counter()
            fn()
            host.append(time.perf_counter() - t0)
        end.record()
        torch.cuda.synchronize()
        rows.append({"variant": name, "host_ms": round(statistics.median(host) * 1e3, 3),
                     "device_ms_per_call": round(start.elapsed_time(end) / 50, 3)})
        print(f"{name:32s} host {rows[-1]['host_ms']:7.3f} ms/call   "
              f"stream {rows[-1]['device_ms_per_call']:7.3f} ms/call", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
