r"""The embedded default: a small DeBiFormer on scikit-learn's handwritten digits, on CPU.

  python -m debiformer_jax.main --config=configs/demo.py --workdir=/tmp/debiformer_demo

The 1797 8x8 digits ship with scikit-learn; they are written once as a 32x32 ImageFolder
(80/20 stratified train/val split) into <workdir>/digits and read through the same
ImageFolder path as any user dataset. The model has the same modules as the ImageNet ones
(BRA and DBRA blocks, deformable offsets, relative-position tables) in two narrow stages:
32x32 input -> 8x8 and 4x4 feature maps split into 4x4 regions. Augmentation is light and
has no flip (a flipped digit is another symbol): small random-resized crops only.
"""

from debiformer_jax import config


def get_config():
  c = config.defaults()
  c.model_name = 'debiformer_tiny'
  c.model.update(dict(
      depths=(1, 1), widths=(64, 128), mlp_ratios=(2, 2), dbra_mlp_ratios=(2, 2), n_win=4,
      attn1_deformable=(False, True), topk1=(4, -1), topk2=(4, -1), offset_groups=(1, 2),
      offset_kernels=(5, 3), offset_strides=(2, 1), rpe_sizes=(8, 4), drop_path_rate=0.0))
  c.dtype = 'float32'
  c.image_size = 32

  c.data.name = 'imagefolder'
  c.data.prepare = 'sklearn_digits'
  c.data.folder = '{workdir}/digits'
  c.data.train_split, c.data.eval_split = 'train', 'val'
  c.data.hflip = False
  c.data.rrc_scale = (0.6, 1.0)
  c.data.randaugment = ''
  c.data.random_erase = 0.0
  c.data.eval_crop_pct = 1.0
  c.data.cache = True
  c.mixup.mixup_alpha = c.mixup.cutmix_alpha = 0.0
  c.label_smoothing = 0.1

  c.global_batch_size = 64
  c.num_epochs = 20
  c.optimizer.base_lr = 2e-3
  c.optimizer.lr_base_batch_size = 64
  c.optimizer.warmup_epochs = 2.0
  c.optimizer.min_lr = 1e-5
  c.log_every_steps = 20
  c.eval_every_epochs = 5.0
  c.checkpoint_every_epochs = 10.0
  return c
