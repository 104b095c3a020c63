"""`init_from` starts a run from another run's parameters (continued pretraining), and a
half-written checkpoint directory left by a crash is ignored on restart."""

import json
import os

from tests.conftest import SMALL_RUN, launch


def run(workdir, vocab, *overrides):
    return launch(
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        str(workdir),
        *SMALL_RUN,
        f'--config.data.vocab_file={vocab}',
        '--config.eval_every=5',
        '--config.log_every=5',
        '--config.checkpoint_every=5',
        *overrides,
    )


def eval_rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [r for r in map(json.loads, f) if r['split'] == 'eval']


def test_init_from_continues_from_the_parameters(tmp_path, pydoc_vocab):
    first, second = tmp_path / 'first', tmp_path / 'second'
    r = run(first, pydoc_vocab, '--config.total_steps=10')
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(second, pydoc_vocab, '--config.total_steps=5', f'--config.init_from={first}')
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'initialised params from' in r.stderr
    # Same eval data: the second run starts exactly where the first one ended.
    end_of_first = eval_rows(first)[-1]
    start_of_second = eval_rows(second)[0]
    assert start_of_second['step'] == 0
    assert abs(start_of_second['mlm_loss'] - end_of_first['mlm_loss']) < 1e-5
    # ... and not where a fresh model starts.
    assert abs(eval_rows(first)[0]['mlm_loss'] - end_of_first['mlm_loss']) > 1e-2


def test_half_written_checkpoint_is_ignored(tmp_path, pydoc_vocab):
    workdir = tmp_path / 'run'
    r = run(workdir, pydoc_vocab, '--config.total_steps=10')
    assert r.returncode == 0, r.stderr[-2000:]
    # What a crash during the save of step 10 leaves: the step still in its temporary
    # directory, never renamed; step 5 is the last complete one.
    checkpoints = workdir / 'checkpoints'
    (checkpoints / '10').rename(checkpoints / '10.orbax-checkpoint-tmp')
    (checkpoints / '10.orbax-checkpoint-tmp' / 'state' / 'garbage').write_bytes(b'\0' * 100)
    r = run(workdir, pydoc_vocab, '--config.total_steps=10')
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'resumed from' in r.stderr and '/checkpoints/5' in r.stderr
    assert sorted(os.listdir(checkpoints)) == ['10', '5']  # temporary directory cleaned up
    assert [r['step'] for r in eval_rows(workdir)] == [0, 5, 10]


def test_a_run_takes_the_architecture_of_the_run_it_starts_from(tmp_path):
    """init_from brings its encoder's shape-defining keys (and the vocabulary's casing):
    a fine-tune of a 3-layer MLM run or an imported MiniLM needs no architecture flags."""
    from configs import bert_mlm, clip, image_cls, text_cls, vit_simclr
    from core import config as config_lib

    saved = bert_mlm.get_config('tiny').to_dict()
    saved['model'].update(num_layers=3, hidden_size=64, pooler=True, layer_norm_eps=1e-7)
    saved['data']['lowercase'] = False
    (tmp_path / 'checkpoints' / '5').mkdir(parents=True)
    (tmp_path / 'config.json').write_text(json.dumps(saved))
    for where in (tmp_path, tmp_path / 'checkpoints', tmp_path / 'checkpoints' / '5'):
        assert config_lib.saved_run_config(str(where)) == saved
    assert config_lib.saved_run_config(str(tmp_path / 'a' / 'b' / 'c')) == {}  # 3 levels up

    c = text_cls.get_config('tiny')
    c.model.dropout_rate = 0.3
    changes = config_lib.adopt_architecture(c, saved)
    assert c.model.num_layers == 3 and c.model.hidden_size == 64 and c.model.pooler is True
    assert c.model.layer_norm_eps == 1e-7 and c.data.lowercase is False
    assert c.model.dropout_rate == 0.3  # the fine-tune's own choice stays
    assert 'model.num_layers: 2 -> 3' in changes and len(changes) == 5
    assert config_lib.adopt_architecture(c, saved) == []  # idempotent: a resume compares equal
    # A key given on the command line is the user's: kept (the restore reports a mismatch).
    c = text_cls.get_config('tiny')
    c.model.num_layers = 5
    config_lib.COMMAND_LINE_KEYS.add('model.num_layers')
    try:
        config_lib.adopt_architecture(c, saved)
    finally:
        config_lib.COMMAND_LINE_KEYS.discard('model.num_layers')
    assert c.model.num_layers == 5 and c.model.hidden_size == 64

    # A ViT: its pooling (whether a cls token exists) comes too, its image size does not.
    vit = vit_simclr.get_config('tiny').to_dict()
    vit['model'].update(pooling='gap', image_size=32, num_layers=2)
    c = image_cls.get_config('tiny')
    config_lib.adopt_architecture(c, vit)
    assert (c.model.pooling, c.model.image_size, c.model.num_layers) == ('gap', 16, 2)
    # A text run given to an image task is left alone (the restore names the mismatch) ...
    c = image_cls.get_config('tiny')
    assert config_lib.adopt_architecture(c, saved) == []
    # ... and CLIP's towers are read where CLIP keeps them.
    two_tower = clip.get_config('tiny').to_dict()
    two_tower['model']['text']['num_layers'] = 3
    c = text_cls.get_config('tiny')
    config_lib.adopt_architecture(c, two_tower, 'text_backbone')
    assert c.model.num_layers == 3 and c.model.layer_norm == 'pre'


def test_a_key_added_since_a_run_was_saved_does_not_block_its_resume(tmp_path):
    from configs import bert_mlm
    from core import config as config_lib
    from core.errors import ConfigError

    c = bert_mlm.get_config('tiny')
    old = c.to_dict()
    del old['model']['pooler']  # written before model.pooler existed
    (tmp_path / 'config.json').write_text(json.dumps(old))
    config_lib.prepare_workdir(c, str(tmp_path), True)
    c.model.num_layers = 3
    try:
        config_lib.prepare_workdir(c, str(tmp_path), True)
    except ConfigError as e:
        assert 'model.num_layers: 2 -> 3' in str(e)
    else:
        raise AssertionError('a changed key must still be refused')
