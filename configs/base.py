"""DeBiFormer-B on ImageNet-1k, the paper's recipe (Table 10; see debiformer_jax/config.py).

  python -m debiformer_jax.main --config=configs/base.py --workdir=DIR \
      --config.data.data_dir=TFDS_DIR [--config.global_batch_size=...]
"""

from debiformer_jax import config


def get_config():
  c = config.defaults()
  c.model_name = 'debiformer_base'
  # Table 10, the paper's text and the official builder: 0.4.
  c.model.drop_path_rate = 0.4
  # Table 10: batch 512 at lr 5e-4 (the paper's text: 1024).
  c.global_batch_size = 512
  return c
