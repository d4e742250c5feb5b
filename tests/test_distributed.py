"""open_clip's --local-loss --gather-with-grad across 2 gloo processes equals the whole batch on one process."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kernels import clip_rd_loss
from tests.helpers import run_ranks

WORLD, LOCAL_BATCH, WIDTH = 2, 12, 16
WEIGHTS = {"task": 1.0, "fd": 5.0, "icl": 1.0, "hrd": 1.0, "vrd": 1.0, "xrd": 1.0, "intra": 1.0, "cross_kd": 1.0}
# gd is exact across ranks only with the process group (its gY sums span every rank's anchors)
WEIGHT_SETS = {"relational": WEIGHTS, "gd": {**WEIGHTS, "gd": 3.0}, "gd-code": {"task": 1.0, "gd": 1e3}}


class TinyStudent(nn.Module):
    """Two linear towers and a learnable logit scale: enough parameters to check DDP's averaged gradients."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(WIDTH, WIDTH, bias=False)
        self.text = nn.Linear(WIDTH, WIDTH, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.5))

    def forward(self, images, texts):
        return F.normalize(self.image(images), dim=1), F.normalize(self.text(texts), dim=1), self.logit_scale.exp()


def global_batch():
    g = torch.Generator().manual_seed(1)
    n = WORLD * LOCAL_BATCH
    raw = [torch.randn(n, WIDTH, generator=g) for _ in range(4)]
    return raw[0], raw[1], F.normalize(raw[2], dim=1), F.normalize(raw[3], dim=1)


def loss_of(student, images, texts, t_img, t_txt, backend, weights, row_start=0, row_stop=None, gather=lambda x: x,
            group=None):
    s_img, s_txt, scale = student(images, texts)
    convention = "clip-kd-code" if weights == "gd-code" else "paper"
    return clip_rd_loss(gather(s_img), gather(s_txt), t_img, t_txt, student_scale=scale, teacher_scale=30.0,
                        weights=WEIGHT_SETS[weights], row_start=row_start, row_stop=row_stop, backend=backend,
                        group=group, gd_convention=convention)["total"]


def gather_with_grad(x):
    import torch.distributed.nn  # differentiable all_gather: its backward sums every rank's gradient

    return torch.cat(torch.distributed.nn.all_gather(x), dim=0)


def _worker(rank, port, queue, backend, weights):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        images, texts, t_img, t_txt = global_batch()
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        model = DistributedDataParallel(TinyStudent())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        losses, grads = [], None
        for step in range(2):
            optimizer.zero_grad()
            # Teacher embeddings are gathered without gradient; here every rank already holds the global batch.
            loss = loss_of(model, images[rows], texts[rows], t_img, t_txt, backend, weights, rows.start, rows.stop,
                           gather_with_grad, dist.group.WORLD)
            loss.backward()
            if step == 0:
                grads = [p.grad.clone() for p in model.parameters()]
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            losses.append(mean_loss.item() / WORLD)
            optimizer.step()
        # numpy copies: tensors sent through a queue live in shared memory that dies with this process.
        queue.put((rank, (losses, [g.numpy() for g in grads], [p.detach().numpy().copy() for p in model.parameters()])))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("weights", sorted(WEIGHT_SETS))
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_two_gloo_ranks_match_one_process(backend, weights):
    results = run_ranks(_worker, WORLD, backend, weights)

    images, texts, t_img, t_txt = global_batch()
    model = TinyStudent()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(2):
        optimizer.zero_grad()
        loss = loss_of(model, images, texts, t_img, t_txt, backend, weights)
        loss.backward()
        for rank in range(WORLD):
            rank_losses, rank_grads, _ = results[rank]
            assert rank_losses[step] == pytest.approx(loss.item(), rel=1e-5)
            if step == 0:
                for got, want in zip(rank_grads, model.parameters()):
                    torch.testing.assert_close(torch.from_numpy(got), want.grad, rtol=1e-4, atol=1e-6)
        optimizer.step()
    for rank in range(WORLD):
        for got, want in zip(results[rank][2], model.parameters()):
            torch.testing.assert_close(torch.from_numpy(got), want.detach(), rtol=1e-4, atol=1e-6)
