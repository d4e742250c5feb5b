"""Peak extra resident memory of one forward+backward of clip_rd_loss, run in a fresh process.

``python -m tests.memory_probe BACKEND N D`` prints the growth of the peak RSS (bytes) during the call, measured
from a peak reset (/proc/self/clear_refs) taken after the inputs exist, so imports and inputs do not count.
"""
import sys

import torch
import torch.nn.functional as F

from bench.memory import reset_peak_rss, status_bytes
from kernels import clip_rd_loss


def main(backend: str, n: int, d: int) -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    s_img, s_txt, t_img, t_txt = [F.normalize(torch.randn(n, d, generator=gen), dim=1) for _ in range(4)]
    s_img.requires_grad_(True)
    s_txt.requires_grad_(True)
    scale = torch.tensor(20.0, requires_grad=True)
    # Warm up allocator and kernels on a tiny problem so one-off buffers do not count against the real call.
    clip_rd_loss(*[x[:8] for x in (s_img, s_txt, t_img, t_txt)], student_scale=scale, teacher_scale=50.0,
                 backend=backend)["total"].backward()
    reset_peak_rss()
    baseline = status_bytes("VmHWM")
    out = clip_rd_loss(s_img, s_txt, t_img, t_txt, student_scale=scale, teacher_scale=50.0, weights="clip-rd",
                       backend=backend)
    out["total"].backward()
    print(status_bytes("VmHWM") - baseline)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
