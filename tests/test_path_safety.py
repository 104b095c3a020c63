"""Labels are data, never paths: labels named '..', '../x' or an absolute path go into
labels.json and predictions.jsonl as values, and nothing a stage or tool writes (the run,
its evaluation, embed, export-hf) lands outside the directories it was given. (A class
folder cannot be named '..'; class folders starting with '.' are not classes.)"""

import json
import os

import pytest

from tests.conftest import launch

MODEL = [
    '--config.model.hidden_size=32',
    '--config.model.num_layers=1',
    '--config.model.num_heads=2',
    '--config.model.mlp_dim=64',
    '--config.model.vocab_size=1024',
    '--config.data.seq_len=16',
    '--config.batch_size=8',
    '--config.eval_steps=1',
    '--config.total_steps=2',
    '--config.eval_every=2',
    '--config.checkpoint_every=2',
]


def walk(root) -> set[str]:
    return {
        os.path.relpath(os.path.join(d, n), root)
        for d, dirs, files in os.walk(root)
        for n in dirs + files
    }


@pytest.mark.parametrize('labels', [('..', '../x', '../../escape')])
def test_labels_that_look_like_paths_write_nothing_outside(tmp_path, pydoc_vocab, labels):
    outside = str(tmp_path / 'outside')  # an absolute path as a label, too
    labels = (*labels, outside)
    data = tmp_path / 'data'
    data.mkdir()
    for split, n in (('train', 8), ('dev', 4), ('test', 4)):
        rows = [
            f'word{i} text {labels[i % len(labels)]}\t{labels[i % len(labels)]}' for i in range(n)
        ]
        (data / f'{split}.tsv').write_text('text\tlabel\n' + '\n'.join(rows) + '\n')
    area = tmp_path / 'area'
    area.mkdir()
    run = area / 'run'
    before = walk(tmp_path)

    config = ['--config', 'configs/text_cls.py:tiny', '--workdir', str(run)]
    config += [
        f'--config.data.{k}_files={data}/{s}.tsv' for k, s in (('eval', 'dev'), ('test', 'test'))
    ]
    config += [f'--config.data.files={data}/train.tsv', f'--config.data.vocab_file={pydoc_vocab}']
    for args in (
        ['finetune', *config, *MODEL],
        ['evaluate', *config, *MODEL],
        ['embed', '--workdir', str(run), '--input', f'{data}/dev.tsv', '--output', f'{run}/f.npy'],
        ['export-hf', '--from', str(run), '--to', str(area / 'export')],
    ):
        r = launch(*args)
        assert r.returncode == 0, (args[0], r.stderr[-3000:])

    with open(run / 'labels.json') as f:
        assert sorted(json.load(f)['classes']) == sorted(labels)  # values, as written
    with open(run / 'predictions.jsonl') as f:
        predicted = [json.loads(line) for line in f]
    assert {p['label'] for p in predicted} <= set(labels) and len(predicted) == 4
    new = walk(tmp_path) - before
    assert all(p.startswith(('area/run', 'area/export')) for p in new), sorted(new)
    assert not os.path.lexists(outside)
    assert not any(os.path.basename(p) in ('x', 'escape') for p in walk(tmp_path))
