"""The one-off probe behind BENCHMARKS.md's GPU dropout figure (H200, 2026-11-30): pretrax's
BERT MLM step (benchmarks/mlm_step.py's, bf16, batch 256, seq 128) timed alone, hidden
dropout 0.1 against 0.0; median of 20 steps after 3.

    PYTHONPATH=. python benchmarks/logs/gpu_h200_2026-11-30/dropout_probe.py

On the H200 the call's 170 s limit ended it after base (large did not finish).
"""

import argparse
import time

import numpy as np

from benchmarks import common, mlm_step

for size in ('base', 'large'):
    for dropout in (0.1, 0.0):
        mlm_step.DROPOUT = dropout
        args = argparse.Namespace(
            steps=20,
            warmup=3,
            remat='none',
            scan_layers=False,
            precision='bfloat16',
            attention_impl='auto',
        )
        start = time.time()
        step = mlm_step.pretrax_step(mlm_step.SIZES[size], mlm_step.make_batch(256), args)
        ms = common.timed_rounds({'pretrax': step.step}, 20, 3)['pretrax']
        print(
            f'{size} batch 256 dropout {dropout}: alone median {np.median(ms):.1f} ms '
            f'min {ms.min():.1f} max {ms.max():.1f} (built+timed in {time.time() - start:.0f}s)',
            flush=True,
        )
