"""Measured parity: our PyTorch reference and the converted Flax model on the same input.

The input is drawn so that every routing decision has a clear margin (the k-th and
(k+1)-th region scores differ by at least 5e-6 of the largest), so a difference in the
logits means a conversion error, not a float-rounding tie between two regions.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import jax
import numpy as np
import torch

from debiformer_jax.models import Architecture, DeBiFormer
from debiformer_jax.reference.torch_debiformer import build_torch_model, clear_routing_input

RELATIVE_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class ParityReport:
  max_abs_diff: float
  max_abs_reference: float
  tolerance: float
  top1_agreement: float
  image_size: int
  batch: int

  @property
  def ok(self) -> bool:
    return self.max_abs_diff <= self.tolerance

  def __str__(self) -> str:
    verdict = 'OK' if self.ok else 'FAILED'
    return (f'parity {verdict}: max |logit difference| {self.max_abs_diff:.3e} '
            f'(tolerance {self.tolerance:.1e} = {RELATIVE_TOLERANCE:g} x max(1, max |logit| '
            f'{self.max_abs_reference:.3f})), top-1 agreement {self.top1_agreement:.0%}, '
            f'batch {self.batch} at {self.image_size}x{self.image_size}')


def torch_model_from_state_dict(state_dict, cfg: Architecture,
                                features_only: bool = False) -> torch.nn.Module:
  """Our PyTorch reference (the classifier, or the dense backbone with `features_only`) with
  `state_dict` (numpy arrays, official names) loaded, eval mode."""
  model = build_torch_model(cfg, features_only)
  tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
  missing, unexpected = model.load_state_dict(tensors, strict=False)
  missing = [k for k in missing if not k.endswith('num_batches_tracked')]
  if missing or unexpected:
    raise ValueError(f'reference model does not fit the state dict: missing {missing[:10]}, '
                     f'unexpected {unexpected[:10]}')
  return model.eval()


def compare_logits(torch_model, variables, cfg: Architecture, *, batch: int = 2,
                   image_size: int = 224, seed: int = 0) -> ParityReport:
  """Runs both models on one clear-routing input (float32, CPU for torch) and compares."""
  cfg.check_input_size(image_size, image_size)
  x = clear_routing_input(torch_model, (batch, cfg.in_chans, image_size, image_size), seed)
  with torch.no_grad():
    ref = torch_model(x).numpy()
  model = DeBiFormer(cfg)
  got = np.asarray(jax.jit(lambda v, x: model.apply(v, x))(variables,
                                                          x.numpy().transpose(0, 2, 3, 1)))
  scale = max(1.0, float(np.abs(ref).max()))
  return ParityReport(max_abs_diff=float(np.abs(got - ref).max()),
                      max_abs_reference=float(np.abs(ref).max()),
                      tolerance=RELATIVE_TOLERANCE * scale,
                      top1_agreement=float((got.argmax(-1) == ref.argmax(-1)).mean()),
                      image_size=image_size, batch=batch)


@dataclasses.dataclass(frozen=True)
class FeatureParityReport:
  """`compare_features`: per stage map, max |difference| against 1e-4 x max(1, max |ref|)."""
  max_abs_diffs: Tuple[float, ...]
  max_abs_references: Tuple[float, ...]
  size: Tuple[int, int]
  batch: int

  @property
  def tolerances(self) -> Tuple[float, ...]:
    return tuple(RELATIVE_TOLERANCE * max(1.0, r) for r in self.max_abs_references)

  @property
  def ok(self) -> bool:
    return all(d <= t for d, t in zip(self.max_abs_diffs, self.tolerances))

  def __str__(self) -> str:
    verdict = 'OK' if self.ok else 'FAILED'
    maps = '; '.join(f'stage {s}: {d:.3e} (tolerance {t:.1e})'
                     for s, (d, t) in enumerate(zip(self.max_abs_diffs, self.tolerances)))
    return (f'parity {verdict}: max |feature difference| {maps}; tolerance '
            f'{RELATIVE_TOLERANCE:g} x max(1, max |reference|); batch {self.batch} at '
            f'{self.size[0]}x{self.size[1]}')


def compare_features(torch_model, variables, cfg: Architecture, *, batch: int = 2,
                     size: Tuple[int, int] = (224, 224), seed: int = 0) -> FeatureParityReport:
  """Runs our reference's dense backbone and the Flax backbone (`features_only`) on one
  clear-routing input of `size` (height, width) and compares every stage map."""
  cfg.check_input_size(*size)
  x = clear_routing_input(torch_model, (batch, cfg.in_chans) + tuple(size), seed)
  with torch.no_grad():
    refs = [t.numpy().transpose(0, 2, 3, 1) for t in torch_model(x)]
  model = DeBiFormer(cfg, features_only=True)
  got = jax.jit(lambda v, x: model.apply(v, x))(variables, x.numpy().transpose(0, 2, 3, 1))
  return FeatureParityReport(
      max_abs_diffs=tuple(float(np.abs(np.asarray(g) - r).max()) for g, r in zip(got, refs)),
      max_abs_references=tuple(float(np.abs(r).max()) for r in refs), size=tuple(size),
      batch=batch)
