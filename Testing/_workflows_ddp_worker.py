"""Launched by ``torchrun --nproc_per_node 2`` from test_workflows.py: ``register-batch`` split over 2 gloo
CPU processes. Argument: PAIRS.csv OUT. Each rank writes ``OUT/rank<R>.json`` with the rows it saw."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "DeepRegistration"))

from DeepRegistrationLib.core.config import RegistrationConfig  # noqa: E402
from DeepRegistrationLib.workflows.batch import read_pairs, run_batch  # noqa: E402


def main() -> None:
    cfg = RegistrationConfig(spacing=6.0, levels=2, iterations=5, affine_iterations=10, initialization="moments",
                             threads=1)
    summary = run_batch(read_pairs(sys.argv[1]), sys.argv[2], cfg, write_png=False)
    import torch.distributed as dist

    rank = dist.get_rank()
    (Path(sys.argv[2]) / f"rank{rank}.json").write_text(json.dumps(
        {"world": dist.get_world_size(), "rows": summary.rows, "env_world": os.environ.get("WORLD_SIZE")}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's background threads can abort at interpreter exit (see _ddp_train_worker.py)
