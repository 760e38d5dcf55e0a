"""Runs every lo_ops CUDA op a few times on small tensors of every kind (0-d to 5-d, square,
non-contiguous, empty, fp32 and bf16), for compute-sanitizer (see perf/gpu_check.sh)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import lo_ops  # noqa: E402
from helpers import SHAPES  # noqa: E402
from test_cuda import _cuda, _small_fc_args, _velo_args  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    for dtype in (torch.float32, torch.bfloat16):
        small_fc = _cuda(_small_fc_args(SHAPES, dtype))
        step, inputs = (_cuda(a) for a in _velo_args(SHAPES, dtype))
        for _ in range(2):
            torch.ops.lo_ops.small_fc_lopt_step_(*small_fc)
            torch.ops.lo_ops.velo_lstm_input(*inputs)
            torch.ops.lo_ops.velo_step_(*step)
    torch.cuda.synchronize()
    print("ran small_fc_lopt_step_, velo_lstm_input and velo_step_ on", len(SHAPES) + 1, "tensors,",
          "fp32 and bf16;", "lo_ops", lo_ops.__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
