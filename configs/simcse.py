r"""Unsupervised SimCSE: a BERT sentence encoder trained by contrasting two dropout views.

Run (the default: BERT-tiny, the same architecture as configs/bert_mlm.py:tiny, on the
sentences of the embedded CPython docs + stdlib docstrings; 5 minutes on 2 CPU cores;
held-out twin-finding accuracy 0.77 from scratch, 0.93 after MLM; k-NN / linear-probe
accuracy on the pydoc-topic task in docs/results.md):

  python launch.py pretrain --config configs/simcse.py:tiny --workdir runs/simcse

MLM then SimCSE (the MLM run's backbone and vocabulary carry over, the projection head is
new):

  python launch.py pretrain --config configs/bert_mlm.py:tiny --workdir runs/mlm
  python launch.py pretrain --config configs/simcse.py:tiny --workdir runs/mlm_simcse \
      --config.init_from=runs/mlm

Presets: tiny, small, base, large (the BERT sizes of configs/bert_mlm.py). The paper's
recipe for base: batch 64, lr 3e-5, temperature 0.05, 1M Wikipedia sentences, 1 epoch.
"""

import ml_collections

from configs import bert_mlm, common


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = 'pretrain'
    c.task = 'simcse'
    c.seed = 0
    tiny = preset == 'tiny'

    # Input: sentences of bert_mlm's corpus, [CLS] sentence [SEP].
    c.data = bert_mlm.corpus()
    c.data.seq_len = 64

    # Model: bert_mlm's encoder (so MLM checkpoints fit) + projection MLP used in training only.
    c.model = bert_mlm.encoder(preset, 'simcse')
    c.model.dropout_rate = 0.1  # the augmentation: two dropout masks per sentence
    c.model.pooling = 'cls'  # cls | mean
    c.model.proj_hidden = c.model.hidden_size
    c.model.proj_dim = c.model.hidden_size
    c.model.proj_layers = 2

    c.loss = ml_collections.ConfigDict()
    c.loss.temperature = 0.05

    c.eval = ml_collections.ConfigDict()
    # k-NN / linear probe on the pydoc-topic task's training paragraphs (never its test split).
    c.eval.topic_probe = True
    c.eval.knn_k = 20
    c.eval.knn_temperature = 0.07
    c.eval.probe_l2 = 0.0  # 0: chosen on a held-out part of the probe's train split

    c.batch_size = 64
    c.total_steps = 600 if tiny else 15_000
    c.warmup_steps = 60 if tiny else 0
    c.learning_rate = 3e-4 if tiny else 3e-5
    c.grad_accum_steps = 1
    c.optimizer = common.optimizer(weight_decay=0.01, schedule='linear')
    c.update(
        common.runtime(
            eval_every=100 if tiny else 1000,
            eval_steps=10,
            checkpoint_every=300 if tiny else 5000,
            keep_checkpoints=3,
        )
    )
    return c
