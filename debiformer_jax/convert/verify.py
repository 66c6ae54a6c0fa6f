"""Measured parity: our PyTorch reference and the converted Flax model on the same input.

The input is drawn so that every routing decision has a clear margin (the k-th and
(k+1)-th region scores differ by at least 5e-6 of the largest), so a difference in the
logits means a conversion error, not a float-rounding tie between two regions.

The Flax side runs on JAX's default backend. The verdict is taken at matmul precision
'highest' (float32 matmuls in full float32): TPUs otherwise do float32 matmuls in one bfloat16
pass and NVIDIA GPUs in TF32, which a faithful model misses 1e-4 by. The error at the default
precision, and optionally in bfloat16 compute, is reported beside it, not judged.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import torch

from debiformer_jax.models import Architecture, DeBiFormer
from debiformer_jax.reference.torch_debiformer import build_torch_model, clear_routing_input

RELATIVE_TOLERANCE = 1e-4


VERDICT_PRECISION = 'highest'


@dataclasses.dataclass(frozen=True)
class Unjudged:
  """The error of one more Flax run: at the default matmul precision, or in bfloat16."""
  label: str
  max_abs_diffs: Tuple[float, ...]  # One per output (logits, or each stage map).
  top1_agreement: Optional[float] = None  # Logits only.

  def __str__(self) -> str:
    top1 = ('' if self.top1_agreement is None
            else f', top-1 agreement {self.top1_agreement:.0%}')
    diffs = ', '.join(f'{d:.3e}' for d in self.max_abs_diffs)
    return f'  {self.label} (reported, not judged): max |difference| {diffs}{top1}'


@dataclasses.dataclass(frozen=True)
class ParityReport:
  max_abs_diff: float
  max_abs_reference: float
  tolerance: float
  top1_agreement: float
  image_size: int
  batch: int
  backend: str
  unjudged: Tuple[Unjudged, ...] = ()

  @property
  def ok(self) -> bool:
    return self.max_abs_diff <= self.tolerance

  def __str__(self) -> str:
    verdict = 'OK' if self.ok else 'FAILED'
    return '\n'.join(
        [f'parity {verdict} ({self.backend}, matmul precision {VERDICT_PRECISION!r}): max '
         f'|logit difference| {self.max_abs_diff:.3e} (tolerance {self.tolerance:.1e} = '
         f'{RELATIVE_TOLERANCE:g} x max(1, max |logit| {self.max_abs_reference:.3f})), top-1 '
         f'agreement {self.top1_agreement:.0%}, batch {self.batch} at '
         f'{self.image_size}x{self.image_size}'] + [str(u) for u in self.unjudged])


def nonfinite_tensors(state_dict) -> list:
  """'name (k of n values)' for every tensor of `state_dict` holding NaN or inf."""
  out = []
  for name, value in state_dict.items():
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.floating):
      bad = int(np.size(value) - np.isfinite(value).sum())
      if bad:
        out.append(f'{name} ({bad} of {value.size} values)')
  return out


def _flax_runs(cfg: Architecture, variables, x: np.ndarray, dtype: Optional[str],
               features_only: bool = False) -> list:
  """[(label, outputs)]: the verdict run at VERDICT_PRECISION first, then the default
  precision, then (with `dtype`) that compute dtype at the default precision; numpy."""
  runs = [('verdict', VERDICT_PRECISION, jnp.float32),
          ('default matmul precision', 'default', jnp.float32)]
  if dtype is not None:
    runs.append((f'{dtype} compute', 'default', jnp.dtype(dtype)))
  out = []
  for label, precision, compute in runs:
    model = DeBiFormer(cfg, dtype=compute, features_only=features_only)
    with jax.default_matmul_precision(precision):
      got = jax.jit(model.apply)(variables, x)
    out.append((label, jax.tree.map(lambda a: np.asarray(a, np.float32), got)))
  return out


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
                   image_size: int = 224, seed: int = 0,
                   dtype: Optional[str] = None) -> ParityReport:
  """Runs both models on one clear-routing input (float32, CPU for torch) and compares
  (`_flax_runs`: the verdict's run, and the unjudged ones)."""
  cfg.check_input_size(image_size, image_size)
  x = clear_routing_input(torch_model, (batch, cfg.in_chans, image_size, image_size), seed)
  with torch.no_grad():
    ref = torch_model(x).numpy()
  (_, got), *others = _flax_runs(cfg, variables, x.numpy().transpose(0, 2, 3, 1), dtype)
  agreement = lambda logits: float((logits.argmax(-1) == ref.argmax(-1)).mean())
  scale = max(1.0, float(np.abs(ref).max()))
  return ParityReport(
      max_abs_diff=float(np.abs(got - ref).max()), max_abs_reference=float(np.abs(ref).max()),
      tolerance=RELATIVE_TOLERANCE * scale, top1_agreement=agreement(got),
      image_size=image_size, batch=batch, backend=jax.default_backend(),
      unjudged=tuple(Unjudged(label, (float(np.abs(logits - ref).max()),), agreement(logits))
                     for label, logits in others))


@dataclasses.dataclass(frozen=True)
class FeatureParityReport:
  """`compare_features`: per stage map, max |difference| against 1e-4 x max(1, max |ref|)."""
  max_abs_diffs: Tuple[float, ...]
  max_abs_references: Tuple[float, ...]
  size: Tuple[int, int]
  batch: int
  backend: str
  unjudged: Tuple[Unjudged, ...] = ()

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
    return '\n'.join(
        [f'parity {verdict} ({self.backend}, matmul precision {VERDICT_PRECISION!r}): max '
         f'|feature difference| {maps}; tolerance {RELATIVE_TOLERANCE:g} x max(1, max '
         f'|reference|); batch {self.batch} at {self.size[0]}x{self.size[1]}']
        + [str(u) for u in self.unjudged])


def compare_features(torch_model, variables, cfg: Architecture, *, batch: int = 2,
                     size: Tuple[int, int] = (224, 224), seed: int = 0,
                     dtype: Optional[str] = None) -> FeatureParityReport:
  """Runs our reference's dense backbone and the Flax backbone (`features_only`) on one
  clear-routing input of `size` (height, width) and compares every stage map."""
  cfg.check_input_size(*size)
  x = clear_routing_input(torch_model, (batch, cfg.in_chans) + tuple(size), seed)
  with torch.no_grad():
    refs = [t.numpy().transpose(0, 2, 3, 1) for t in torch_model(x)]
  (_, got), *others = _flax_runs(cfg, variables, x.numpy().transpose(0, 2, 3, 1), dtype,
                                 features_only=True)
  diffs = lambda maps: tuple(float(np.abs(g - r).max()) for g, r in zip(maps, refs))
  return FeatureParityReport(
      max_abs_diffs=diffs(got), max_abs_references=tuple(float(np.abs(r).max()) for r in refs),
      size=tuple(size), batch=batch, backend=jax.default_backend(),
      unjudged=tuple(Unjudged(label, diffs(maps)) for label, maps in others))
