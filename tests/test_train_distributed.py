"""Two CPU processes (gloo): the selection runs over the GLOBAL batch, exactly as one process would."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from test_train_step import make_batch, make_trainer, tiny_lora_model, trainable_grads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tmp: str, method: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from pathlib import Path

    model = tiny_lora_model()
    batch = make_batch(B=10)
    # uneven shards: rank 0 holds 6 samples, rank 1 holds 4
    lo, hi = (0, 6) if rank == 0 else (6, 10)
    local = {k: v[lo:hi] for k, v in batch.items()}
    trainer = make_trainer(model, Path(tmp) / f"r{rank}", method, rho=0.3, selection_seed=5, ddp_backend="gloo")
    assert trainer.accelerator.num_processes == world
    trainer.training_step(trainer.model, local)
    if rank == 0:
        kept = [i for i, r in enumerate(trainer.selection_records) if r["kept"]]
        torch.save({"kept": kept, "grads": trainable_grads(model),
                    "G": [r["G"] for r in trainer.selection_records]}, os.path.join(tmp, "rank0.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["moderate", "random"])
def test_global_batch_selection_matches_one_process(tmp_path, method):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), method), nprocs=2, join=True)
    dist_out = torch.load(tmp_path / "rank0.pt")

    model = tiny_lora_model()
    trainer = make_trainer(model, tmp_path / "single", method, rho=0.3, selection_seed=5)
    trainer.training_step(trainer.model, make_batch(B=10))
    kept = [i for i, r in enumerate(trainer.selection_records) if r["kept"]]
    assert dist_out["kept"] == kept and len(kept) == 3
    G = torch.tensor([r["G"] for r in trainer.selection_records])
    torch.testing.assert_close(torch.tensor(dist_out["G"]), G, rtol=1e-5, atol=1e-7, equal_nan=True)
    single = trainable_grads(model)
    for n, g in single.items():
        torch.testing.assert_close(dist_out["grads"][n], g, rtol=1e-4, atol=1e-7, msg=n)
