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


def _window_worker(rank: int, world: int, port: int, tmp: str, method: str, backward: str) -> None:
    """Two micro-batches per rank (accumulation 2), driven the way the Trainer's loop drives them."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from pathlib import Path

    model = tiny_lora_model()
    batch = make_batch(B=16)
    trainer = make_trainer(model, Path(tmp) / f"r{rank}", method, rho=0.25, selection_seed=5, ddp_backend="gloo",
                           selection_backward=backward)
    trainer.current_gradient_accumulation_steps = 2
    calls = []
    real = torch.distributed.all_reduce
    torch.distributed.all_reduce = lambda t, *a, **k: (calls.append(t.numel()), real(t, *a, **k))[1]
    try:
        for j in range(2):  # micro-batch j holds rows 8j..8j+7: rank 0 the first 5, rank 1 the other 3
            lo, hi = (8 * j, 8 * j + 5) if rank == 0 else (8 * j + 5, 8 * j + 8)
            trainer.accelerator.gradient_state._set_sync_gradients(j == 1)
            trainer.training_step(trainer.model, {k: v[lo:hi] for k, v in batch.items()})
    finally:
        torch.distributed.all_reduce = real
    if rank == 0:
        recs = trainer.selection_records
        torch.save({"kept": sorted(r["row"] for r in recs if r["kept"]), "grads": trainable_grads(model),
                    "G": {r["row"]: r["G"] for r in recs}, "n": len(recs), "calls": calls,
                    "strategy": trainer._strategy}, os.path.join(tmp, "rank0.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("method, backward", [("moderate", "reuse"), ("moderate", "recompute"), ("random", "auto")])
def test_two_processes_with_accumulation_match_one_process_on_the_global_batch(tmp_path, method, backward):
    mp.spawn(_window_worker, args=(2, _free_port(), str(tmp_path), method, backward), nprocs=2, join=True)
    got = torch.load(tmp_path / "rank0.pt")
    assert got["n"] == 16  # the whole optimizer batch: 2 processes x 2 micro-batches
    assert got["strategy"] == {"reuse": "per_sample", "recompute": "recompute", "auto": "captures"}[backward]
    # the trainable gradients crossed the processes in ONE collective (one dtype), not one per parameter
    model = tiny_lora_model()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert got["calls"] == [n_trainable]

    trainer = make_trainer(model, tmp_path / "single", method, rho=0.25, selection_seed=5)
    trainer.training_step(trainer.model, make_batch(B=16))
    recs = trainer.selection_records
    kept = sorted(r["row"] for r in recs if r["kept"])
    assert got["kept"] == kept and len(kept) == 4  # floor(0.25 * 16)
    for r in recs:
        assert got["G"][r["row"]] == pytest.approx(r["G"], rel=1e-5, abs=1e-7, nan_ok=True)
    for n, g in trainable_grads(model).items():
        torch.testing.assert_close(got["grads"][n], g, rtol=1e-4, atol=1e-7, msg=n)
