"""DeBiFormer-Small on ImageNet-1k, the official recipe (see debiformer_jax/config_defaults.py).

  python -m debiformer_jax.main --config=configs/small.py --workdir=DIR \
      --config.data.data_dir=TFDS_DIR [--config.global_batch_size=...]
"""

from debiformer_jax import config_defaults


def get_config():
  return config_defaults.imagenet_config('debiformer_small', drop_path_rate=0.3)
