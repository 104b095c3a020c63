"""One SimCLR training step of a ViT at 224: pretrax (JAX/XLA) vs a PyTorch reference
(Hugging Face `ViTModel` + the same projection MLP + NT-Xent).

    PYTHONPATH=. python benchmarks/simclr_step.py [--sizes s,b] [--batch 8] [--steps 10]
        [--warmup 2] [--precision float32|bfloat16] [--remat none|dots|full] [--scan_layers]
        [--threads N] [--peak_tflops T] [--no-augment-row] [--no-profile]

Needs `pip install -r benchmarks/requirements.txt` (torch 2.13.0, transformers 5.23.0).
On a GPU host both sides run on the GPU.

The model is the ImageNet recipe of `configs/vit_simclr.py`: ViT-{Ti,S,B}/16 at 224 (pre-LN,
cls token, learned positions), projection MLP 2048-2048-128 with GELU, NT-Xent at
temperature 0.1 over the batch's 2N views. Both sides take the same two uint8 views of each
image (already augmented: augmentation is not part of the comparison) and run forward,
backward, clip to global norm 1.0 and AdamW (the recipe's LARS is swapped for AdamW on both
sides, as PyTorch has no LARS). Precision is float32 on CPU and bfloat16 on GPU by default
(pretrax: bf16 compute, f32 params / optimizer state / softmax / LayerNorm statistics;
the reference: `torch.autocast(bfloat16)`, SDPA attention, fused CUDA AdamW). Steps
alternate between the sides. A third row times pretrax's real SimCLR step, which draws
both views on the device from one batch (random crop + resize, flip, colour jitter,
grayscale, blur): the difference is the cost of that augmentation.

MFU counts the ViT's and the projection head's matmul FLOPs (`core/flops.py`), the same
for both sides. Peak memory as in `benchmarks/mlm_step.py`.
"""

import jax.numpy as jnp
import numpy as np

from benchmarks import common
from configs import vit_simclr
from configs.common import VIT_SIZES
from core import flops, sharding
from core.task import Runtime
from data import augment as augment_lib
from models.contrastive import SimClrModel
from models.encoder import example_rows
from models.vit import VitConfig
from pretrain import contrastive, simclr

IMAGE, PATCH, CHANNELS = 224, 16, 3
PROJ_HIDDEN, PROJ_DIM, PROJ_LAYERS, TEMPERATURE = 2048, 128, 3, 0.1


def make_batch(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(seed)
    view = lambda: rs.randint(0, 256, (batch, IMAGE, IMAGE, CHANNELS)).astype(np.uint8)
    return {'view1': view(), 'view2': view(), 'image': view()}


def train_flops(size: str, batch: int) -> float:
    hidden = VIT_SIZES[size][0]
    head = simclr.projection_flops(hidden, PROJ_HIDDEN, PROJ_DIM, PROJ_LAYERS)
    return flops.vit_train_flops(vit_config(size, 'float32', 'none'), 2 * batch, head)


def vit_config(
    size: str, precision: str, remat: str, scan: bool = False, attention: str = 'auto'
) -> VitConfig:
    hidden, layers, heads, mlp = VIT_SIZES[size]
    return VitConfig(
        image_size=IMAGE,
        patch_size=PATCH,
        channels=CHANNELS,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        mlp_dim=mlp,
        remat=remat,
        scan_layers=scan,
        dtype=precision,
        attention_impl=attention,
    )


# --------------------------------------------------------------------------------------
# pretrax


def views_loss_fn(model: SimClrModel, mesh):
    """SimCLR's loss on two given views (`pretrain/simclr.py` minus the augmentation)."""
    loss = contrastive.on_mesh(
        lambda z1, z2, axis_name: contrastive.nt_xent(z1, z2, TEMPERATURE, axis_name), mesh, 2
    )

    def loss_fn(params, batch, rng, train: bool, rows=None):
        views = jnp.concatenate([batch['view1'], batch['view2']]).astype(jnp.float32) / 255.0
        n = batch['view1'].shape[0]
        rows = contrastive.view_rows(example_rows(rows, n))
        z = model.apply({'params': params}, views, not train, rows, rngs={'dropout': rng})
        z = contrastive.l2_normalize(z)
        sums = loss(z[:n], z[n:])
        return sums['loss'], {'accuracy': sums['accuracy'], 'denominator': sums['count']}

    return loss_fn


def pretrax_step(size: str, batch: dict, args, augment: bool = False) -> common.PretraxStep:
    """pretrax's SimCLR train step on the two given views, or (`augment`) as a run takes it:
    one batch of images, both views augmented on the device inside the step."""
    vit = vit_config(size, args.precision, args.remat, args.scan_layers, args.attention_impl)
    model = SimClrModel(vit, PROJ_HIDDEN, PROJ_DIM, PROJ_LAYERS)
    mesh = sharding.make_mesh()
    example = jnp.zeros((1, IMAGE, IMAGE, CHANNELS), jnp.float32)
    if augment:
        runtime = Runtime(mesh, 'jit', len(batch['image']), 0, 1)
        aug = augment_lib.AugmentConfig.from_config(vit_simclr.get_config('s,imagenet').augment)
        loss_fn = simclr.simclr_loss_fn(model, aug, TEMPERATURE, runtime)
        batch = {'image': batch['image']}
    else:
        loss_fn = views_loss_fn(model, mesh)
        batch = {'view1': batch['view1'], 'view2': batch['view2']}
    init_params = lambda rng: model.init(rng, example)['params']
    return common.PretraxStep(init_params, loss_fn, batch, args, mesh)


# --------------------------------------------------------------------------------------
# reference: Hugging Face ViTModel on PyTorch


class Reference:
    """`ViTModel` (no pooler) + Linear/GELU projection MLP + NT-Xent, `torch.optim.AdamW`."""

    def __init__(self, size: str, batch: dict[str, np.ndarray], runtime: common.TorchRuntime):
        import torch
        import transformers

        torch.manual_seed(0)
        hidden, layers, heads, mlp = VIT_SIZES[size]
        config = transformers.ViTConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=mlp,
            image_size=IMAGE,
            patch_size=PATCH,
            num_channels=CHANNELS,
            hidden_act='gelu',
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            layer_norm_eps=1e-6,
            attn_implementation='sdpa',
        )
        nn = torch.nn
        dims = [hidden] + [PROJ_HIDDEN] * (PROJ_LAYERS - 1) + [PROJ_DIM]
        head = []
        for a, b in zip(dims[:-1], dims[1:]):
            head += [nn.Linear(a, b), nn.GELU()]
        self.torch, self.runtime = torch, runtime
        self.backbone = transformers.ViTModel(config, add_pooling_layer=False)
        self.projection = nn.Sequential(*head[:-1])
        self.model = nn.ModuleList([self.backbone, self.projection]).to(runtime.device).train()
        self.optimizer = runtime.adamw(self.model)
        to_device = lambda x: torch.from_numpy(x).to(runtime.device)
        self.views = to_device(batch['view1']), to_device(batch['view2'])

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def loss(self):
        torch = self.torch
        pixels = torch.cat(self.views).permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0
        tokens = self.backbone(pixel_values=pixels).last_hidden_state
        z = torch.nn.functional.normalize(self.projection(tokens[:, 0]).float(), dim=-1)
        n = self.views[0].shape[0]
        logits = z @ z.T / TEMPERATURE
        logits.fill_diagonal_(float('-inf'))
        partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
        return torch.nn.functional.cross_entropy(logits, partner)

    def step(self):
        with self.runtime.autocast():
            loss = self.loss()
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), common.CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.runtime.sync()


# --------------------------------------------------------------------------------------


def run_size(size: str, args, runtime: common.TorchRuntime, peak: float) -> dict:
    hidden, layers, heads, mlp = VIT_SIZES[size]
    print(
        f'## ViT-{size.upper()}/16: hidden {hidden}, {layers} layers, {heads} heads, mlp {mlp}, '
        f'batch {args.batch} images (x2 views)\n'
    )
    batch = make_batch(args.batch)
    others = {}
    if args.augment_row:
        others['pretrax_augment'] = pretrax_step(size, batch, args, augment=True).step
    m = common.measure(
        pretrax_step(size, batch, args), Reference(size, batch, runtime), args, runtime, **others
    )

    p_med = m.median('pretrax')
    work = train_flops(size, args.batch)
    print(
        f'- analytic matmul GFLOP/step {work / 1e9:.1f}; pretrax step, XLA cost analysis '
        f'{m.xla_flops / 1e9:.1f} GFLOP'
    )
    if args.augment_row:
        a_med = m.median('pretrax_augment')
        print(
            f'- pretrax with on-device augmentation of both views: {a_med:.1f} ms/step, so '
            f'augmentation costs ~{a_med - p_med:.1f} ms ({100 * (a_med - p_med) / a_med:.0f}%)'
        )
    common.print_top_ops(m.top_ops)
    print()
    name = f'ViT-{size.upper()}/16'
    return dict(name=name, m=m, pretrax_flops=work, reference_flops=work, peak=peak)


def main():
    parser = common.step_arguments(__doc__, list(VIT_SIZES), 's,b', 'images', (8, 128), (10, 2))
    parser.add_argument(
        '--no-augment-row',
        dest='augment_row',
        action='store_false',
        help='skip timing pretrax with its on-device augmentation',
    )
    args = common.parse_step_arguments(parser)
    runtime = common.TorchRuntime(args.precision, args.threads)
    peak, peak_source = common.mfu_peak(args.peak_tflops, args.precision)
    common.print_environment(
        args.threads,
        f'shapes: {IMAGE}x{IMAGE}x{CHANNELS} images, patch {PATCH}, batch {args.batch} x 2 '
        f'views, projection {PROJ_HIDDEN}-{PROJ_HIDDEN}-{PROJ_DIM}, {args.precision}, '
        f'remat {args.remat}, scan_layers {args.scan_layers}, AdamW + clip {common.CLIP}',
    )
    print(f'MFU peak: {peak / 1e12:.3f} TFLOP/s per device ({peak_source})\n')
    rows = [run_size(size, args, runtime, peak) for size in args.sizes]
    common.print_results(args, rows, 'model', {'pretrax images/s': args.batch})


if __name__ == '__main__':
    main()
