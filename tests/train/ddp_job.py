"""A training job for ``torchrun``: used by test_ddp.py to compare 2-process gloo DDP with 1 process.

Usage: ``torchrun --standalone --nproc_per_node=N tests/train/ddp_job.py OUT_DIR``; rank 0 writes
``OUT_DIR/<objective>.pt`` with the trained weights and the logged losses.
"""
import sys
from pathlib import Path

import torch


def train(objective: str):
    from circuitkd.config import ModelSpec, TrainCfg
    from circuitkd.models.build import build_model
    from circuitkd.train.debias import make_objective
    from circuitkd.train.loop import cross_entropy_loss, train_loop
    from tests.train.toy import toy_task

    task = toy_task(0, n_train=256, n_test=16)
    cfg = TrainCfg(steps=6, batch_size=32, lr=3e-3, progress=False)
    model = build_model(ModelSpec(n_layers=1, d_model=32, n_heads=2), task, device="cpu")
    loss_fn, extra = cross_entropy_loss, []
    if objective != "ce":
        loss_fn, extra = make_objective(objective, task, model, cfg=cfg, seed=0)
    result = train_loop(model, task.train, cfg, loss_fn=loss_fn, params=list(model.parameters()) + list(extra))
    from circuitkd.models.checkpoint import full_state_dict

    state = {k: v.detach().clone() for k, v in full_state_dict(model).items()}
    state.update({f"extra.{i}": p.detach().clone() for i, p in enumerate(extra)})
    return state, result.losses


def main(out: str) -> None:
    import torch.distributed as dist

    from circuitkd.train.loop import init_distributed

    torch.set_num_threads(1)
    rank, world = init_distributed()
    for objective in ("ce", "learned_mixin_h"):
        state, losses = train(objective)
        if rank == 0:
            torch.save({"state": state, "losses": losses, "world": world}, Path(out) / f"{objective}.pt")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
