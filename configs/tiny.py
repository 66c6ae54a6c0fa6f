"""DeBiFormer-T on ImageNet-1k, the paper's recipe (Table 10; see debiformer_jax/config.py).

  python -m debiformer_jax.main --config=configs/tiny.py --workdir=DIR \
      --config.data.data_dir=TFDS_DIR [--config.global_batch_size=...]
"""

from debiformer_jax import config


def get_config():
  c = config.defaults()
  c.model_name = 'debiformer_tiny'
  # Table 10 and the official builder: 0.0; the paper's text: 0.1.
  c.model.drop_path_rate = 0.0
  # Table 10: batch 1024 at lr 1e-3 (= 5e-4 x 1024 / 512).
  c.global_batch_size = 1024
  return c
