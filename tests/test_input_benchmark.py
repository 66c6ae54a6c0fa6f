"""`benchmark --mode input`: the synthetic ImageNet-like JPEGs (the same bytes as an ImageFolder
and as tfds TFRecords), both sources timed through our real pipelines with a JSON report, and
--compare-timm without timm saying what to install. Rates are not asserted (not timed tests)."""

import io
import json
import os
import sys

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from debiformer_jax import benchmark, input_benchmark
from debiformer_jax.data import synthetic


def test_synthetic_images_are_imagenet_like_and_identical_in_both_formats(tmp_path):
  paths = input_benchmark.prepare(str(tmp_path), 6)
  files = sorted(os.path.join(root, n) for root, _, names in os.walk(paths['folder'])
                 for n in names if n.endswith('.jpg'))
  assert len(files) == 12  # 6 train + 6 val.
  for f in files:
    with Image.open(f) as image:
      assert image.format == 'JPEG' and image.mode == 'RGB'
      assert 200 <= min(image.size) and max(image.size) <= 800, image.size
  folder_bytes = sorted(open(f, 'rb').read() for f in files if '/train/' in f)
  builder = tfds.builder_from_directory(os.path.join(
      paths['data_dir'], input_benchmark.TFDS_NAME, os.listdir(
          os.path.join(paths['data_dir'], input_benchmark.TFDS_NAME))[0]))
  records = builder.as_dataset(split='train', decoders={'image': tfds.decode.SkipDecoding()})
  record_bytes = sorted(ex['image'].numpy() for ex in records)
  assert record_bytes == folder_bytes
  pixels = np.asarray(Image.open(io.BytesIO(folder_bytes[0])))
  assert pixels.std() > 10  # Texture, not a flat colour.
  assert synthetic.class_names(3) == ('class000', 'class001', 'class002')


def _run(capsys, *extra):
  code = benchmark.main(['--mode', 'input', '--images', '8', '--batch', '4', '--steps', '1',
                         '--warmup', '1', '--resolution', '32', *extra])
  out, err = capsys.readouterr()
  return code, out, err


def test_both_sources_are_timed_with_a_json_report(tmp_path, capsys):
  for source in ('imagefolder', 'tfrecord'):
    code, out, err = _run(capsys, '--source', source, '--input-dir', str(tmp_path), '--cores',
                          '1')
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report['source'] == source and report['cores'] == 1 and report['size'] == 32
    assert set(report['rates']) == {'ours train', 'ours eval'}
    for rate in report['rates'].values():
      assert rate['images'] == 4 and rate['wall_s'] > 0 and rate['cpu_s'] > 0
    assert 'images/CPU-s' in out


def test_compare_timm_without_timm_names_what_to_install(tmp_path, capsys):
  code, _, err = _run(capsys, '--input-dir', str(tmp_path), '--compare-timm', '--timm-python',
                      sys.executable)
  assert code == 2
  assert 'cannot import' in err and '--timm-python' in err and 'performance.md' in err
  code, _, err = _run(capsys, '--input-dir', str(tmp_path), '--cores', '999')
  assert code == 2 and '--cores 999' in err
