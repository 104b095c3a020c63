"""`init_from` starts a run from another run's parameters (continued pretraining), and a
half-written checkpoint directory left by a crash is ignored on restart."""

import json
import os
import shutil

import pytest

from core import config as config_lib
from core import recipe, rundir
from core.errors import ConfigError
from data import tokenizer
from tests.conftest import SMALL_RUN, launch


def run(workdir, vocab, *overrides):
    return launch(
        'pretrain',
        '--config',
        'configs/bert_mlm.py:tiny',
        '--workdir',
        str(workdir),
        *SMALL_RUN,
        *([f'--config.data.vocab_file={vocab}'] if vocab else []),
        '--config.eval_every=5',
        '--config.log_every=5',
        '--config.checkpoint_every=5',
        *overrides,
    )


def eval_rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        return [r for r in map(json.loads, f) if r['split'] == 'eval']


def reordered_vocab(vocab: str, out) -> str:
    """`vocab` with its ordinary tokens in reverse order: the same tokens under other ids,
    a vocabulary no training on the corpus reproduces."""
    lines = open(vocab, encoding='utf-8').read().splitlines()
    special = len(tokenizer.SPECIAL_TOKENS)
    out.write_text('\n'.join(lines[:special] + lines[special:][::-1]) + '\n', encoding='utf-8')
    return str(out)


def test_init_from_a_checkpoint_step_continues_from_the_parameters(tmp_path, pydoc_vocab):
    """init_from=<workdir>/checkpoints/<step> and no vocab_file: the second run tokenizes
    with the first run's vocabulary, so it starts exactly where the first one ended."""
    first, second = tmp_path / 'first', tmp_path / 'second'
    vocab = reordered_vocab(pydoc_vocab, tmp_path / 'vocab.txt')
    r = run(first, vocab, '--config.total_steps=10')
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(
        second,
        '',
        '--config.total_steps=5',
        f'--config.init_from={first}/checkpoints/10',
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'initialised params from' in r.stderr
    assert (second / 'vocab.txt').read_text() == (first / 'vocab.txt').read_text()
    # Same eval data: the second run starts exactly where the first one ended.
    end_of_first = eval_rows(first)[-1]
    start_of_second = eval_rows(second)[0]
    assert start_of_second['step'] == 0
    assert abs(start_of_second['mlm_loss'] - end_of_first['mlm_loss']) < 1e-5
    # ... and not where a fresh model starts.
    assert abs(eval_rows(first)[0]['mlm_loss'] - end_of_first['mlm_loss']) > 1e-2


def source_run(root, vocab: str | None, step: int = 7):
    """A run directory as pretrain (or import-hf) leaves it: config.json, checkpoints/<step>
    and, for a text run, vocab.txt."""
    from configs import bert_mlm

    root.mkdir(parents=True)
    (root / 'config.json').write_text(bert_mlm.get_config('tiny').to_json())
    (root / 'checkpoints' / str(step) / 'state').mkdir(parents=True)
    if vocab:
        shutil.copyfile(vocab, root / 'vocab.txt')
    return root


def tokenizer_config(init_from: str, vocab_file: str = ''):
    from configs import text_cls

    c = text_cls.get_config('tiny')
    c.model.vocab_size = 1024
    c.init_from = init_from
    c.data.vocab_file = vocab_file
    return c


DOCS = ['a corpus of its own, which would train another vocabulary'] * 4


@pytest.mark.parametrize('form', ['', 'checkpoints', 'checkpoints/7', 'checkpoints/0'])
def test_init_from_any_form_brings_the_run_vocabulary(tmp_path, pydoc_vocab, form):
    """A workdir, its checkpoints/ or one step (checkpoints/0: an import-hf workdir)."""
    vocab = reordered_vocab(pydoc_vocab, tmp_path / 'reordered.txt')
    source = source_run(tmp_path / 'source', vocab, step=0 if form.endswith('/0') else 7)
    workdir = tmp_path / 'new'
    workdir.mkdir()
    tokenizer.make_tokenizer(tokenizer_config(str(source / form)), str(workdir), DOCS)
    assert (workdir / 'vocab.txt').read_text() == (source / 'vocab.txt').read_text()


@pytest.mark.parametrize('form', ['', 'checkpoints', 'checkpoints/7'])
def test_a_text_task_refuses_an_init_from_without_vocabulary(tmp_path, pydoc_vocab, form):
    """Neither the run (an image run, a copied checkpoint) nor data.vocab_file gives the
    vocabulary: no new one is trained under the restored embeddings."""
    source = source_run(tmp_path / 'source', vocab=None)
    workdir = tmp_path / 'new'
    workdir.mkdir()
    with pytest.raises(ConfigError, match='--config.data.vocab_file=') as e:
        tokenizer.make_tokenizer(tokenizer_config(str(source / form)), str(workdir), DOCS)
    assert str(source / form).rstrip('/') in str(e.value)
    assert not (workdir / 'vocab.txt').exists()
    # A bare checkpoint (no run directory around it) likewise.
    bare = tmp_path / 'copied' / '7'
    (bare / 'state').mkdir(parents=True)
    with pytest.raises(ConfigError, match=f'{bare}.*--config.data.vocab_file='):
        tokenizer.make_tokenizer(tokenizer_config(str(bare)), str(workdir), DOCS)
    # The fix the message names: the vocabulary given explicitly.
    tokenizer.make_tokenizer(tokenizer_config(str(bare), pydoc_vocab), str(workdir), DOCS)
    assert (workdir / 'vocab.txt').read_text() == open(pydoc_vocab).read()


def test_a_refused_init_from_leaves_the_new_workdir_empty(tmp_path):
    """Checked before config.json is written, so the start the message suggests (the same
    command with --config.data.vocab_file) is not then refused as another run's workdir."""
    source = source_run(tmp_path / 'source', vocab=None)
    workdir = tmp_path / 'new'
    with pytest.raises(ConfigError, match='--config.data.vocab_file='):
        rundir.check_workdir(tokenizer_config(f'{source}/checkpoints'), str(workdir))
    assert not workdir.exists()
    # An image run has no vocabulary to find.
    from configs import image_cls

    c = image_cls.get_config('tiny')
    c.init_from = str(source)
    assert rundir.check_workdir(c, str(workdir)).fresh


def test_run_directory_of_every_init_from_form(tmp_path):
    source = source_run(tmp_path / 'run', vocab=None)
    for form in ('', 'checkpoints', 'checkpoints/', 'checkpoints/7'):
        assert recipe.run_directory(str(source / form)) == str(source)
    assert recipe.run_directory(str(tmp_path / 'elsewhere' / '7')) is None
    # A workdir that happens to be called checkpoints is still that workdir.
    named = source_run(tmp_path / 'checkpoints', vocab=None)
    assert recipe.run_directory(str(named)) == str(named)


def test_a_vocab_file_other_than_the_init_from_runs_is_refused(tmp_path, pydoc_vocab):
    source = source_run(tmp_path / 'source', pydoc_vocab)
    other = reordered_vocab(pydoc_vocab, tmp_path / 'other.txt')
    workdir = tmp_path / 'new'
    workdir.mkdir()
    config = tokenizer_config(f'{source}/checkpoints/7', other)
    with pytest.raises(ConfigError, match='differs from') as e:
        tokenizer.make_tokenizer(config, str(workdir), DOCS)
    assert other in str(e.value) and str(source / 'vocab.txt') in str(e.value)
    assert not (workdir / 'vocab.txt').exists()
    # The same vocabulary under another path is fine.
    same = tmp_path / 'same.txt'
    shutil.copyfile(pydoc_vocab, same)
    tokenizer.make_tokenizer(tokenizer_config(str(source), str(same)), str(workdir), DOCS)
    assert (workdir / 'vocab.txt').read_text() == open(pydoc_vocab).read()


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

    saved = bert_mlm.get_config('tiny').to_dict()
    saved['model'].update(num_layers=3, hidden_size=64, pooler=True, layer_norm_eps=1e-7)
    saved['data']['lowercase'] = False
    (tmp_path / 'checkpoints' / '5').mkdir(parents=True)
    (tmp_path / 'config.json').write_text(json.dumps(saved))
    for where in (tmp_path, tmp_path / 'checkpoints', tmp_path / 'checkpoints' / '5'):
        assert recipe.saved_run_config(str(where)) == saved
    assert recipe.saved_run_config(str(tmp_path / 'a' / 'b' / 'c')) == {}  # 3 levels up

    c = text_cls.get_config('tiny')
    c.model.dropout_rate = 0.3
    changes = recipe.adopt_architecture(c, saved)
    assert c.model.num_layers == 3 and c.model.hidden_size == 64 and c.model.pooler is True
    assert c.model.layer_norm_eps == 1e-7 and c.data.lowercase is False
    assert c.model.dropout_rate == 0.3  # the fine-tune's own choice stays
    assert 'model.num_layers: 2 -> 3' in changes and len(changes) == 6
    assert 'model.vocab_size: 8192 -> 4096' in changes  # the MLM preset's corpus-sized one
    assert recipe.adopt_architecture(c, saved) == []  # idempotent: a resume compares equal
    # A key given on the command line is the user's: kept (the restore reports a mismatch).
    c = text_cls.get_config('tiny')
    c.model.num_layers = 5
    config_lib.COMMAND_LINE_KEYS.add('model.num_layers')
    try:
        recipe.adopt_architecture(c, saved)
    finally:
        config_lib.COMMAND_LINE_KEYS.discard('model.num_layers')
    assert c.model.num_layers == 5 and c.model.hidden_size == 64

    # A ViT: its pooling (whether a cls token exists) comes too, its image size does not.
    vit = vit_simclr.get_config('tiny').to_dict()
    vit['model'].update(pooling='gap', image_size=32, num_layers=2)
    c = image_cls.get_config('tiny')
    recipe.adopt_architecture(c, vit)
    assert (c.model.pooling, c.model.image_size, c.model.num_layers) == ('gap', 16, 2)
    # A text run given to an image task is refused, naming both kinds ...
    c = image_cls.get_config('tiny')
    with pytest.raises(ConfigError, match='is a text model .* this run trains an image model'):
        recipe.adopt_architecture(c, saved)
    # ... and CLIP's towers are read where CLIP keeps them.
    two_tower = clip.get_config('tiny').to_dict()
    two_tower['model']['text']['num_layers'] = 3
    c = text_cls.get_config('tiny')
    recipe.adopt_architecture(c, two_tower, 'text_backbone')
    assert c.model.num_layers == 3 and c.model.layer_norm == 'pre'


def test_fine_tuning_from_the_default_mlm_run_trains_with_dropout():
    """The quick start's MLM run trains without dropout (docs/mlm_tiny.md: a short run of a
    small model underfits); what starts from it adopts its shapes, 4096-token vocabulary
    included, but keeps BERT's fine-tuning dropout 0.1 (SimCSE needs it: its two views
    are two dropout masks)."""
    from configs import bert_mlm, simcse, text_cls, token_cls

    saved = bert_mlm.get_config('tiny').to_dict()
    assert saved['model']['dropout_rate'] == 0.0 and saved['model']['vocab_size'] == 4096
    for stage in (text_cls, token_cls, simcse):
        c = stage.get_config('tiny')
        recipe.adopt_architecture(c, saved)
        assert c.model.vocab_size == 4096
        assert c.model.dropout_rate == 0.1, stage.__name__


def test_a_key_added_since_a_run_was_saved_does_not_block_its_resume(tmp_path):
    from configs import bert_mlm

    c = bert_mlm.get_config('tiny')
    old = c.to_dict()
    del old['model']['pooler']  # written before model.pooler existed
    (tmp_path / 'config.json').write_text(json.dumps(old))
    assert not rundir.check_workdir(c, str(tmp_path)).fresh  # resumes
    c.model.num_layers = 3
    try:
        rundir.check_workdir(c, str(tmp_path))
    except ConfigError as e:
        assert 'model.num_layers: 2 -> 3' in str(e)
    else:
        raise AssertionError('a changed key must still be refused')
