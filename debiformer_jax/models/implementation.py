"""How DeBiFormer is computed (never what): formulation switches and rematerialisation.

Every formulation gives the same numbers (tested); which one is fastest depends on the
compiler, so 'auto' picks a per-backend default from `BACKEND_DEFAULTS`. The measurements
behind the defaults are in docs/performance.md ("How the formulations were chosen").
"""

from __future__ import annotations

import dataclasses
from typing import Union

import jax

_DENSE = jax.checkpoint_policies.save_only_these_names('dense')  # Dense outputs (custom VJP)
REMAT_POLICIES = {
    # Keep the outputs of matmuls without batch dimensions (every Dense / 1x1 conv, the
    # convs) and recompute the rest (norms, GELU, depthwise convs, attention logits/softmax).
    'dots_no_batch': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _DENSE),
    # Keep every matmul output, the attention logits included.
    'dots': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots, _DENSE),
    # Keep nothing: recompute the whole block.
    'nothing': jax.checkpoint_policies.nothing_saveable,
}

CHOICES = {'dwconv': ('shifted', 'grouped'), 'sampling': ('gather', 'matmul'),
           'region_gather': ('take', 'onehot'), 'remat_policy': tuple(REMAT_POLICIES)}


@dataclasses.dataclass(frozen=True)
class Implementation:
  """The formulation of each part of the model; the same field names are used end to end.

  dwconv: depthwise convs as 'grouped' (an XLA feature-grouped convolution) or 'shifted'
    (a sum of shifted multiplies, with a hand-written backward pass).
  sampling: bilinear sampling of the deformable features and of the relative-position bias
    by 'gather' (corner gathers) or 'matmul' (separable interpolation matrices).
  region_gather: where routed key regions are gathered, by 'take' (indexing) or 'onehot'
    (a one-hot matmul).
  dense_routing: routed attention whose dense form has at most this many logits per image
    and head is computed densely, the top-k regions as a mask (no gather); 0 = never.
  remat: recompute each block in the backward pass, keeping what `remat_policy` (a key of
    REMAT_POLICIES) says.
  'auto' fields are filled in per backend by `resolve`.
  """
  dwconv: str = 'auto'
  sampling: str = 'auto'
  region_gather: str = 'auto'
  dense_routing: Union[int, str] = 'auto'
  remat: bool = False
  remat_policy: str = 'dots_no_batch'

  def resolve(self, backend: str | None = None) -> 'Implementation':
    """This implementation with every 'auto' replaced by the backend's default; checked."""
    best = BACKEND_DEFAULTS.get(backend or jax.default_backend(), BACKEND_DEFAULTS['cpu'])
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    out = Implementation(**{k: best.get(k, v) if v == 'auto' else v for k, v in fields.items()})
    for name, ok in CHOICES.items():
      if getattr(out, name) not in ok:
        raise ValueError(f'Implementation.{name}={getattr(out, name)!r}; choose one of {ok} or '
                         f"'auto'.")
    if (not isinstance(out.dense_routing, int) or isinstance(out.dense_routing, bool)
        or out.dense_routing < 0):
      raise ValueError(f'Implementation.dense_routing={out.dense_routing!r} must be an int >= 0 '
                       f"or 'auto'.")
    if not isinstance(out.remat, bool):
      raise ValueError(f'Implementation.remat={out.remat!r} must be True or False.')
    return out


# The same in training and inference: no measurement favoured another choice in either.
# CPU: measured (docs/performance.md, "How the formulations were chosen"). XLA:CPU runs
# feature-grouped convs as slow generic loops; its gathers are cheap; dense routing wins where
# the dense logits are few.
# TPU: chosen from DeBiFormer-T's train and eval steps compiled by libtpu for v5e, one switch
# at a time (docs/performance.md, "TPU formulation switches"): with the 2^18 limit the train
# step has fewer FLOPs and less memory than with 2^20 or none; one-hot region gathers and
# separable-matmul sampling leave no gathers, scatters or scatter loops in it; grouped
# depthwise convs are native.
# GPU: reasoned, not measured: native depthwise convolutions, tensor-core matmuls rather than
# scatter-adds on atomics.
_CPU = dict(dwconv='shifted', sampling='gather', region_gather='take', dense_routing=2 ** 18)
_TPU = dict(dwconv='grouped', sampling='matmul', region_gather='onehot', dense_routing=2 ** 18)
_GPU = dict(dwconv='grouped', sampling='matmul', region_gather='take', dense_routing=2 ** 18)
BACKEND_DEFAULTS = {'cpu': _CPU, 'tpu': _TPU, 'gpu': _GPU, 'cuda': _GPU, 'rocm': _GPU}
