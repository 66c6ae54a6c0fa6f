"""Shared training defaults; the files in configs/ start from these and change a few fields.

This lives in the package (not in configs/) so that a config file loaded by path, from any
working directory, can import it.

The ImageNet recipe is the official DeBiFormer one (DeiT / BiFormer lineage): AdamW, lr
5e-4 x global_batch / 512, weight decay 0.05, 5 warm-up epochs from 1e-6, cosine to 5e-6,
300 epochs, grad-norm clip 5.0, label smoothing 0.1, mixup 0.8 / cutmix 1.0 (switch 0.5),
RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25. The official runs use 128 images per
GPU on 8 GPUs, a global batch of 1024, so the peak lr is 1e-3.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with the ImageNet recipe's values."""
  from debiformer_jax.data import input_pipeline  # Imported here: it pulls in TensorFlow.

  c = ml_collections.ConfigDict()
  c.mode = 'train'  # 'train': train with periodic eval. 'eval': evaluate a checkpoint only.
  c.workdir = ''  # Used when --workdir is not given; '' means ./workdir.
  c.seed = 0

  # Model: a preset name and DeBiFormerConfig fields to change. num_classes comes from the data.
  c.model_name = 'debiformer_tiny'
  c.model = ml_collections.ConfigDict({'drop_path_rate': 0.0})
  c.dtype = 'bfloat16'  # Compute dtype; parameters and optimizer state stay float32.

  # Data: see debiformer_jax/data/input_pipeline.py for the fields.
  c.data = input_pipeline.default_data_config()
  c.data.name = 'imagenet2012'
  c.data.label_smoothing = 0.1
  c.data.mixup = 0.8
  c.data.cutmix = 1.0
  c.data.mixup_switch_prob = 0.5
  c.data.randaugment = 'rand-m9-mstd0.5-inc1'
  c.data.random_erase = 0.25
  c.image_size = 224
  c.global_batch_size = 1024  # Official: 128 per GPU x 8 GPUs.

  # Length. num_train_steps > 0 replaces num_epochs (smoke runs).
  c.num_epochs = 300
  c.num_train_steps = -1

  # Optimizer and schedule (all in steps internally; warm-up and cosine per step).
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.base_lr = 5e-4  # Per lr_base_batch_size images: peak lr = base_lr * batch / 512.
  c.optimizer.lr_base_batch_size = 512
  c.optimizer.warmup_epochs = 5.0
  c.optimizer.warmup_lr = 1e-6
  c.optimizer.min_lr = 5e-6
  c.optimizer.weight_decay = 0.05  # Not on 1-D params (biases, norm scales) nor rpe_table.
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip_norm = 5.0  # <= 0: no clipping.
  c.ema_decay = 0.0  # EMA of params, evaluated instead of them when > 0. 0 = off.

  # Cadence.
  c.log_every_steps = 100
  c.eval_every_epochs = 1.0
  c.checkpoint_every_epochs = 1.0
  c.keep_checkpoints = 3  # The last N...
  c.keep_best = 1  # ... and the best N by eval top-1 all survive.
  c.async_checkpoints = True  # Write checkpoints in a background thread while training goes on.

  # Sharding: 'dp' replicates params; 'fsdp' splits params and optimizer state over the data
  # axis (leaves with at least fsdp_min_size elements).
  c.sharding = 'dp'
  c.fsdp_min_size = 2 ** 18

  # Fine-tuning / evaluation of a converted or earlier checkpoint: a directory written by
  # convert_torch_weights.py (has debiformer.json) or a training workdir. In 'train' mode its
  # params and batch_stats start a fresh run (a head of another class count is dropped); a
  # checkpoint in --workdir takes precedence (resume). In 'eval' mode it is what gets evaluated.
  c.init_from = ''
  return c


def imagenet_config(model_name: str, drop_path_rate: float) -> ml_collections.ConfigDict:
  """The official ImageNet-1k recipe for one variant."""
  c = base_config()
  c.model_name = model_name
  c.model.drop_path_rate = drop_path_rate
  return c
