"""Would torch.compile speed up the frozen MobileNetV2 (the cold encode's bottleneck)? Eager vs inductor.

The BN-folded, channels-last trunk as the package runs it, 64 random 224-px images in the feature cache's
chunks of 8, fp32: best of 3 for eager and for ``torch.compile`` with inductor's weight freezing, the first
compiled call's time, and the largest output difference.

    python benchmarks/vision_compile.py
"""

import time, torch
import torch._inductor.config as ic
from jfe.models.vision import VisionTower
t = VisionTower(224, pretrained=True).eval()
eager = t._folded_part(t.split, torch.device("cpu"))
xs = [torch.randn(8, 3, 224, 224).contiguous(memory_format=torch.channels_last) for _ in range(8)]
def bench(f, n=3):
    with torch.inference_mode():
        f(xs[0]); best=1e9
        for _ in range(n):
            t0=time.perf_counter(); ys=[f(x) for x in xs]; best=min(best,time.perf_counter()-t0)
    return best, ys
te, ye = bench(eager); print("eager 64 imgs", round(te,3))
ic.freezing = True
c = torch.compile(eager)
t0=time.perf_counter()
with torch.inference_mode(): c(xs[0])
print("compile time", round(time.perf_counter()-t0,1))
tc, yc = bench(c); print("compiled 64 imgs", round(tc,3), "maxdiff", max((a-b).abs().max().item() for a,b in zip(ye,yc)))
