"""Run by tests/distill/test_torchrun.py under `torchrun --standalone --nproc_per_node 2` (gloo, CPU).

Each rank trains its share of the slices; rank 0 gathers them, assembles the student and saves its state dict.
"""

import sys

import torch
import torch.distributed as dist

from distill.runner import distill
from distill.train_slice import SliceTrainConfig
from tests.distill.tiny import TinyResNet, calib_loader


def main(out_dir: str, result_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(3)
    teacher = TinyResNet(8).eval()
    res = distill(
        teacher,
        calib_loader(n=64, batch_size=16),
        ratio=2.0,
        out_dir=out_dir,
        config=SliceTrainConfig(max_steps=6, eval_every=3, batch_size=16),
        progress=False,
    )
    rank = dist.get_rank()
    if rank == 0:
        assert res.student is not None
        torch.save({"state": res.student.state_dict(), "trained0": res.trained}, result_path)
    else:
        assert res.student is None
        torch.save({"trained": res.trained}, result_path + f".rank{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
