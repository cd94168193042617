"""Comparing engine revisions in one run: a temporary git worktree of a baseline revision and one-thread child
processes run alternately (ABAB) per case, each printing one ``ROW {json}`` line.

Used by ``stage_cost.py`` and ``iteration_cost.py`` (per-stage / per-iteration CPU seconds) and, for its worktree,
by ``regression.py``; ``baseline_archive`` (the baseline's sources only) by ``fixed_costs.py`` and ``output_cost.py``.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def resolve(rev: str) -> str:
    """The full commit hash of ``rev`` in this repository."""
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", rev], check=True, capture_output=True,
                          text=True).stdout.strip()


@contextlib.contextmanager
def baseline_worktree(rev: str, parent: Path | None = None) -> Iterator[Path]:
    """A detached worktree of ``rev`` (in ``parent``, else a temporary folder), removed again at the end."""
    with contextlib.ExitStack() as stack:
        folder = parent if parent is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="baseline-")))
        path = folder / f"baseline-{rev[:10]}"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True,
                       capture_output=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], capture_output=True)


def baseline_archive(rev: str, dest: Path, path: str = "DeepRegistration") -> Path:
    """The files under ``path`` of ``rev`` extracted into ``dest`` (``git archive | tar -x``: no worktree, nothing of
    this checkout's git state changes); returns ``dest``, the root of that partial tree."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, path], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def alternating(variants: list[str], rep: int) -> list[str]:
    """The order of the variants in repeat ``rep``: as given in even repeats, reversed in odd ones (ABBA...)."""
    return list(variants) if rep % 2 == 0 else list(variants)[::-1]


def run_rows(trees: dict[str, Path], cases: list[str], repeats: int,
             command: Callable[[str, int, str], list[str]], threads: int = 1) -> list[dict]:
    """Runs ``command(case, rep, variant)`` once per repeat, case and variant (``trees``: variant → checkout; two
    variants may share a checkout), alternating, each in a fresh process on ``threads`` threads
    (``OMP_NUM_THREADS``/``MKL_NUM_THREADS``) with the variant's ``DeepRegistration/`` and this folder on
    ``PYTHONPATH``; returns (and prints) one row per run: ``{"case", "variant", "repeat", "ok"}`` and the child's
    last ``ROW`` JSON, or ``"error"`` (its stderr's tail)."""
    rows = []
    for rep in range(repeats):
        for case in cases:
            for variant in alternating(list(trees), rep):
                env = dict(os.environ, PYTHONPATH=f"{trees[variant] / 'DeepRegistration'}{os.pathsep}{HERE}",
                           OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
                proc = subprocess.run([sys.executable, *command(case, rep, variant)], env=env, capture_output=True,
                                      text=True)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
                row = {"case": case, "variant": variant, "repeat": rep, "ok": bool(line)}
                row.update(json.loads(line[-1][4:]) if line else {"error": proc.stderr[-800:]})
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def write_results(out: Path, name: str, environment: dict, rows: list[dict], md: list[str]) -> None:
    """Writes ``out/<name>.json`` (``{"environment", "rows"}``) and ``out/<name>.md`` (the lines ``md``, also
    printed)."""
    (out / f"{name}.json").write_text(json.dumps({"environment": environment, "rows": rows}, indent=1))
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
