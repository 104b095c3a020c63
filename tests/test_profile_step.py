"""benchmarks/profile_step.py's accounting, on inputs whose answer is known: matmul FLOPs
read from compiled HLO, each op's own time from nested profile events, and the cuDNN
fused-attention calls the step benchmarks report."""

import jax
import jax.numpy as jnp

from benchmarks import common, profile_step


def test_dot_flops_are_read_from_the_compiled_hlo():
    f = jax.jit(lambda a, b, c: jnp.tanh(a @ b) @ c)
    args = jnp.ones((64, 32)), jnp.ones((32, 16)), jnp.ones((16, 8))
    flops, names = profile_step.dot_flops_by_op(f.lower(*args).compile().as_text())
    assert sum(flops.values()) == 2 * 64 * 32 * 16 + 2 * 64 * 16 * 8
    assert set(flops) <= names


def test_op_self_times_subtract_nested_ops_per_thread():
    events = [
        {'ph': 'X', 'name': 'while.1', 'ts': 0, 'dur': 100, 'pid': 1, 'tid': 1},
        {'ph': 'X', 'name': 'dot.2', 'ts': 10, 'dur': 30, 'pid': 1, 'tid': 1},
        {'ph': 'X', 'name': 'dot.2', 'ts': 50, 'dur': 30, 'pid': 1, 'tid': 1},
        {'ph': 'X', 'name': 'dot.2', 'ts': 20, 'dur': 70, 'pid': 1, 'tid': 2},  # other thread
        {'ph': 'X', 'name': 'ThunkExecutor::Execute', 'ts': 0, 'dur': 200, 'pid': 1, 'tid': 1},
    ]
    times = profile_step.op_self_times(events, {'while.1', 'dot.2'})
    assert times['while.1'] == [40]
    assert sorted(times['dot.2']) == [30, 30, 70]


def test_covered_time_counts_overlapping_events_once():
    events = [
        {'ph': 'X', 'name': 'a.1', 'ts': 0, 'dur': 10, 'pid': 1, 'tid': 1},
        {'ph': 'X', 'name': 'b.1', 'ts': 5, 'dur': 10, 'pid': 1, 'tid': 2},
        {'ph': 'X', 'name': 'a.1', 'ts': 30, 'dur': 5, 'pid': 1, 'tid': 1},
        {'ph': 'X', 'name': 'runtime', 'ts': 0, 'dur': 100, 'pid': 1, 'tid': 1},
    ]
    assert profile_step.covered_us(events, {'a.1', 'b.1'}) == 20


def test_an_op_whose_completion_comes_after_its_event_is_asynchronous():
    events = [
        {'ph': 'X', 'name': 'ynn_fusion.1', 'ts': 0, 'dur': 500, 'pid': 1, 'tid': 1},
        {'ph': 'X', 'name': 'end: ynn_fusion.1', 'ts': 498, 'dur': 2, 'pid': 1, 'tid': 1},
        {'ph': 'X', 'name': 'dot.2', 'ts': 600, 'dur': 20, 'pid': 1, 'tid': 1},
        {'ph': 'X', 'name': 'end: dot.2', 'ts': 5000, 'dur': 1, 'pid': 1, 'tid': 2},
    ]
    assert profile_step.asynchronous_ops(events, {'ynn_fusion.1', 'dot.2'}) == {'dot.2'}


def test_fused_attention_calls_counts_cudnn_fmha_only():
    # The custom-call targets the H200 run's compiled BERT step held (BENCHMARKS.md "GPU"):
    # a forward and a backward fMHA per layer count; a cuDNN GEMM fusion does not.
    hlo = '\n'.join(
        [
            '%a = custom-call(...), custom_call_target="__cudnn$fmhaSoftmax", backend_config=',
            '%b = custom-call(...), custom_call_target="__cudnn$fmhaSoftmaxBackward"',
            '%c = custom-call(...), custom_call_target="__cudnn$fusion"',
            '%d = custom-call(...), custom_call_target="__cublas$gemm"',
        ]
    )
    assert common.fused_attention_calls(hlo) == 2
    assert common.fused_attention_calls(hlo.replace('fmha', 'gemm')) == 0
