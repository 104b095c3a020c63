"""Every numeric config key is checked for its range at start-up, before anything is built
or compiled (core/config.py RANGES, check_common and the stages' check_config): a
probability in [0, 1), a finite positive rate, a positive size that divides what it must."""

import importlib

import pytest

from core import config as config_lib
from core import task as task_lib
from core.errors import ConfigError
from study import runner

TASKS = {**task_lib.TASKS['pretrain'], **task_lib.TASKS['finetune']}


def check(config_file: str, preset: str, **overrides) -> None:
    """The start-up checks a stage runs on `config_file:preset` with `overrides`
    (dotted keys given with '__' for '.')."""
    config = importlib.import_module(f'configs.{config_file}').get_config(preset)
    for key, value in overrides.items():
        parent, _, name = key.replace('__', '.').rpartition('.')
        section = config_lib.get(config, parent) if parent else config
        section[name] = value
    config_lib.check_common(config)
    importlib.import_module(TASKS[config.task]).check_config(config)


CASES = [
    # (config, preset, overrides, message)
    ('bert_mlm', 'tiny', {'model__dropout_rate': 1.5}, 'model.dropout_rate=1.5 is out of range'),
    ('bert_mlm', 'tiny', {'model__attention_dropout_rate': -0.1}, 'a probability in [0, 1)'),
    ('bert_mlm', 'tiny', {'learning_rate': float('nan')}, 'learning_rate=nan is not a finite'),
    ('bert_mlm', 'tiny', {'learning_rate': float('inf')}, 'learning_rate=inf is not a finite'),
    ('bert_mlm', 'tiny', {'learning_rate': -1e-3}, 'expected finite and >= 0 (e.g. 1e-3)'),
    ('simcse', 'tiny', {'loss__temperature': 0.0}, 'expected finite and positive (e.g. 1e-3)'),
    ('bert_mlm', 'tiny', {'optimizer__end_learning_rate': -1e-4}, 'expected finite and >= 0'),
    ('bert_mlm', 'tiny', {'optimizer__b2': 1.0}, 'optimizer.b2=1.0 is out of range'),
    ('bert_mlm', 'tiny', {'optimizer__eps': 0.0}, 'optimizer.eps=0.0 is out of range'),
    ('bert_mlm', 'tiny', {'data__mask_prob': 1.0}, 'data.mask_prob=1.0 is out of range'),
    ('bert_mlm', 'tiny', {'data__eval_fraction': 1.0}, 'data.eval_fraction=1.0 is out of'),
    ('bert_mlm', 'tiny', {'batch_size': 0}, 'batch_size=0 is out of range'),
    ('bert_mlm', 'tiny', {'warmup_steps': -1}, 'warmup_steps=-1 is out of range'),
    ('bert_mlm', 'tiny', {'model__hidden_size': 0}, 'model.hidden_size=0 is out of range'),
    ('bert_mlm', 'tiny', {'model__num_heads': 3}, 'model.hidden_size 128 is not divisible'),
    ('bert_mlm', 'tiny', {'grad_accum_steps': 3}, 'is not divisible by grad_accum_steps 3'),
    ('simcse', 'tiny', {'loss__temperature': float('nan')}, 'loss.temperature=nan is not'),
    ('clip', 'tiny', {'model__text__dropout_rate': 1.0}, 'model.text.dropout_rate=1.0 is out'),
    ('clip', 'tiny', {'model__text__num_heads': 3}, 'model.text.hidden_size 128 is not divisible'),
    ('clip', 'tiny', {'loss__max_logit_scale': 0.0}, 'loss.max_logit_scale=0.0 is out of range'),
    ('clip', 'tiny', {'loss__init_bias': float('-inf')}, 'loss.init_bias=-inf is not a finite'),
    ('vit_simclr', 'ti', {'augment__brightness': float('nan')}, 'augment.brightness=nan is'),
    ('vit_simclr', 'ti', {'augment__blur_sigma': (0.1, float('inf'))}, 'blur_sigma=inf is not'),
    ('vit_simclr', 'ti', {'model__patch_size': 3}, 'must be a positive multiple of'),
    ('image_cls', 'ti', {'model__head_dropout': 1.0}, 'model.head_dropout=1.0 is out of range'),
    ('image_cls', 'ti', {'transfer__layer_decay': 0.0}, 'transfer.layer_decay=0.0 is out'),
    ('text_cls', 'tiny', {'model__dropout_rate': float('nan')}, 'dropout_rate=nan is not a'),
]


@pytest.mark.parametrize('config_file,preset,overrides,message', CASES)
def test_a_value_out_of_range_is_refused_at_start_up(config_file, preset, overrides, message):
    check(config_file, preset)  # the preset itself passes
    with pytest.raises(ConfigError) as e:
        check(config_file, preset, **overrides)
    assert message in str(e.value)


def test_every_preset_of_every_config_passes():
    for name, presets in {
        'bert_mlm': ('tiny', 'small', 'base', 'large'),
        'simcse': ('tiny',),
        'clip': ('tiny',),
        'vit_simclr': ('ti', 's', 'b', 'l'),
        'image_cls': ('ti', 's', 'b'),
        'text_cls': ('tiny', 'base'),
        'token_cls': ('tiny',),
    }.items():
        for preset in presets:
            check(name, preset, **({'data__files': 'train.conll'} if name == 'token_cls' else {}))


def test_a_study_checks_the_keys_of_its_stages_before_any_run():
    config = importlib.import_module('configs.study').get_config('digits')
    runner.plan(config)
    config.finetune.learning_rate = float('nan')
    with pytest.raises(ConfigError, match=r'finetune\.learning_rate=nan is not a finite'):
        runner.plan(config)
