"""Launched by ``torchrun --nproc_per_node 2`` from test_training.py: a tiny DDP training run on gloo (CPU).

Each rank writes ``rank<R>.json`` with its step count and a checksum of its final weights.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "DeepRegistration"))

import torch  # noqa: E402

from DeepRegistrationLib.learning.training import TrainConfig, train  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    cfg = TrainConfig(mode="unsupervised", steps=4, shape=(16, 16, 16), checkpoint_every=2, output_dir=str(out),
                      seed=3, num_labels=4)
    result = train(cfg)
    import torch.distributed as dist

    rank = dist.get_rank()
    flat = torch.cat([p.detach().flatten() for p in result.model.parameters()])
    (out / f"rank{rank}.json").write_text(json.dumps({"step": result.step, "world": dist.get_world_size(),
                                                     "checksum": float(flat.double().sum()),
                                                     "first_loss": result.losses[0],
                                                     "env_world": os.environ.get("WORLD_SIZE")}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Leave without interpreter finalization: gloo's background threads can otherwise abort the process
    # at exit ("terminate called without an active exception", seen once in ~10 runs) after all work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
