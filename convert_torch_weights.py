"""Convert an official PyTorch DeBiFormer checkpoint to our Flax variables (orbax).

  python convert_torch_weights.py --model debiformer_small --checkpoint debi_small.pth \
      --output converted/debi_small --verify
  python convert_torch_weights.py --model debi_small --features-only \
      --checkpoint upernet_debi_small.pth --output converted/debi_small_backbone --verify

Reads the checkpoint with torch.load(weights_only=True) (bare state dict or the official
training format), maps every tensor through the explicit name map (an error names any
missing, unused or mis-shaped tensor), optionally proves parity against our PyTorch reference
of the official model, and writes an orbax checkpoint that
`python -m debiformer_jax.main --config.init_from=DIR` loads for evaluation or fine-tuning.
With --features-only it converts the dense backbone (`create_model(MODEL, features_only=True)`)
from the official dense backbone's checkpoint, an mmsegmentation / mmdetection checkpoint
(`backbone.*`; every other tensor is listed as ignored) or an ImageNet classifier (its head and
final norm listed as unused, the per-stage LayerNorms it lacks listed as initialised), and
--verify compares every stage map.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np

from debiformer_jax.models.architecture import parse_override


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', required=True,
                 help='debiformer_tiny|small|base (or the official debi_tiny|small|base)')
  p.add_argument('--checkpoint', required=True, help='PyTorch .pth file')
  p.add_argument('--output', required=True, help='directory for the orbax checkpoint')
  p.add_argument('--ema', action='store_true', help="convert 'model_ema' instead of 'model'")
  p.add_argument('--features-only', action='store_true',
                 help='convert the dense backbone (official segmentation/detection settings: '
                      'n_win 8, auto_pad, per-stage LayerNorms; override with --model-override); '
                      '--verify then compares every stage map')
  p.add_argument('--verify', action='store_true',
                 help='run our PyTorch reference and the Flax model on the same input and fail '
                      'if the logits differ by more than 1e-4 x max(1, max |logit|) (Flax on '
                      "the default backend at matmul precision 'highest'; the error at the "
                      'default precision is reported too). It proves that the converted file '
                      'computes what the official model computes with these weights, not that '
                      'the weights are the right ones (a checkpoint of another run or an '
                      'untrained one passes too); it fails, naming the tensor, on NaN or inf '
                      'weights')
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                 help='with --verify, also report the error of the Flax model computing in this '
                      'dtype (bfloat16: not judged; the verdict is always float32)')
  p.add_argument('--verify-batch', type=int, default=2)
  p.add_argument('--verify-size', type=int, default=224, help='input side for --verify')
  p.add_argument('--seed', type=int, default=0, help='seed of the --verify input')
  p.add_argument('--model-override', type=parse_override, action='append', default=[],
                 metavar='FIELD=VALUE', help='replace a model config field, e.g. depths=(1,1,1,1)')
  p.add_argument('--overwrite', action='store_true',
                 help='replace an earlier conversion in --output (a directory holding '
                      'debiformer.json); anything else, or one that contains --checkpoint, is '
                      'refused. The new one is renamed into place only once complete')
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  from debiformer_jax import weights
  from debiformer_jax.convert import (backbone_state_dict, convert_state_dict,
                                      read_torch_state_dict)
  from debiformer_jax.data import class_names
  from debiformer_jax.models import get_architecture

  try:
    weights.check_output(args.output, overwrite=args.overwrite, keep=(args.checkpoint,))
    cfg = get_architecture(args.model, backbone=args.features_only, **dict(args.model_override))
    state_dict = read_torch_state_dict(args.checkpoint, ema=args.ema)
    if args.features_only:
      backbone = backbone_state_dict(state_dict, cfg)
      print(backbone.summary())
      state_dict = backbone.state_dict
    variables = convert_state_dict(state_dict, cfg, features_only=args.features_only)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  count = lambda tree: sum(int(np.prod(v.shape)) for v in _leaves(tree))
  print(f'converted {len(state_dict)} tensors of {args.checkpoint} '
        f'({"model_ema" if args.ema else "model"}) into {args.model}: '
        f'{count(variables["params"]):,} parameters, '
        f'{count(variables["batch_stats"]):,} BatchNorm statistics')

  extra = {'source_checkpoint': args.checkpoint, 'ema': args.ema,
           'features_only': args.features_only}
  if not args.features_only and cfg.num_classes == class_names.IMAGENET_NUM_CLASSES:
    extra['class_names'] = list(class_names.imagenet())  # What predict prints.
  if args.features_only:
    extra.update(backbone_source=backbone.source, ignored=list(backbone.ignored),
                 unused=list(backbone.unused), initialised=list(backbone.initialised))
  if args.verify:
    from debiformer_jax.convert.verify import (compare_features, compare_logits,
                                               nonfinite_tensors, torch_model_from_state_dict)
    nonfinite = nonfinite_tensors(state_dict)
    if nonfinite:
      print(f'error: the checkpoint itself holds NaN or inf values, in {"; ".join(nonfinite)}; '
            f'the conversion is not at fault, and parity cannot be checked. Nothing was '
            f'written.', file=sys.stderr)
      return 1
    torch_model = torch_model_from_state_dict(state_dict, cfg, args.features_only)
    dtype = None if args.dtype == 'float32' else args.dtype
    if args.features_only:
      report = compare_features(torch_model, variables, cfg, batch=args.verify_batch,
                                size=(args.verify_size,) * 2, seed=args.seed, dtype=dtype)
    else:
      report = compare_logits(torch_model, variables, cfg, batch=args.verify_batch,
                              image_size=args.verify_size, seed=args.seed, dtype=dtype)
    print(report)
    if not report.ok:
      print('error: parity check failed; nothing was written.', file=sys.stderr)
      return 1
    if args.features_only:
      extra['verified_max_abs_feature_diffs'] = list(report.max_abs_diffs)
    else:
      extra['verified_max_abs_logit_diff'] = report.max_abs_diff
  try:
    out = weights.save(args.output, variables, model_name=args.model,
                       architecture=dataclasses.asdict(cfg), overwrite=args.overwrite,
                       metadata=extra, keep=(args.checkpoint,))
  except FileExistsError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {out}')
  return 0


def _leaves(tree):
  for v in tree.values():
    if isinstance(v, dict):
      yield from _leaves(v)
    else:
      yield v


if __name__ == '__main__':
  sys.exit(main())
