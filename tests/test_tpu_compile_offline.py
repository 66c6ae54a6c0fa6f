"""tpu_compile's own logic without libtpu: `--max-batch`'s search on a stand-in compiler (a
memory model per batch) and the reading of compiled HLO text."""

import types

import pytest

from debiformer_jax import tpu_compile
from debiformer_jax.benchmark import Memory

GIB = 2 ** 30


def fake_compiler(monkeypatch, peak_of, hbm=16 * GIB, fixed=GIB // 2):
  """compile_step stand-in: a step of `batch` needs peak_of(batch) bytes, `fixed` of them
  arguments and the rest temporaries; it does not fit above `hbm`. Returns the batches tried."""
  tried = []

  def compile_step(config, topology, mode, batch, num_classes, devices):
    tried.append(batch)
    peak = peak_of(batch)
    if peak > hbm:
      raise tpu_compile.DoesNotFit(f'{batch} does not fit')
    return types.SimpleNamespace(memory=Memory(temp=peak - fixed, argument=fixed, output=0,
                                               alias=0), hbm=hbm, compile_s=1.0)

  monkeypatch.setattr(tpu_compile, 'compile_step', compile_step)
  monkeypatch.setattr(tpu_compile, 'topology_devices', lambda name: [])
  return tried


def search(start):
  return tpu_compile.max_batch(None, 'v5e:2x2', 'train', start, report=lambda line: None)[0]


def brute_force(peak_of, hbm=16 * GIB):
  fits = [b for b in range(1, 4096) if peak_of(b) <= hbm]
  best = max(fits, default=0)
  return best if best < 8 else best // 8 * 8


def linear(batch):
  return GIB // 2 + int(0.14 * GIB * batch)


def test_a_linear_step_is_found_in_three_compiles(monkeypatch):
  tried = fake_compiler(monkeypatch, linear)
  assert search(64) == brute_force(linear) == 104
  assert tried == [64, 104, 112]  # One full compile at the answer, one failed try above it.


def test_a_start_that_does_not_fit_halves_then_predicts(monkeypatch):
  tried = fake_compiler(monkeypatch, linear)
  assert search(512) == 104
  assert tried[:3] == [512, 256, 128] and len(tried) <= 6


@pytest.mark.parametrize('peak_of', [
    lambda b: GIB // 2 + int(0.01 * GIB * b ** 1.6),  # Grows faster than the line predicts.
    lambda b: GIB // 2 + int(2.5 * GIB * b ** 0.5),  # Grows slower.
    lambda b: GIB // 2 + int(3.1 * GIB * b),  # Fits only below 8: searched one by one.
])
def test_the_search_agrees_with_trying_every_batch(monkeypatch, peak_of):
  fake_compiler(monkeypatch, peak_of)
  for start in (1, 3, 8, 64, 300):
    assert search(start) == brute_force(peak_of), start


def test_a_step_whose_memory_is_not_monotone_ends_at_a_boundary(monkeypatch):
  peak_of = lambda b: GIB // 2 + int(0.14 * GIB * b) + (b % 16) * GIB // 8
  fake_compiler(monkeypatch, peak_of)
  best = search(64)
  assert peak_of(best) <= 16 * GIB < peak_of(best + 8)


def test_nothing_fits(monkeypatch):
  fake_compiler(monkeypatch, lambda b: 17 * GIB)
  assert tpu_compile.max_batch(None, 'v5e:2x2', 'train', 64, report=lambda line: None) == (0, None)


HLO = """\
HloModule step, entry_computation_layout={(f32[64,128]{1,0})->f32[64,128]{1,0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.1 = f32[] add(f32[] %a, f32[] %b)
}

ENTRY %main (p: f32[64,128]) -> f32[64,128] {
  %p = f32[64,128]{1,0} parameter(0)
  %fusion.7 = bf16[64,128]{1,0} fusion(f32[64,128]{1,0} %p), kind=kLoop, calls=%fused
  %fusion.7.remat = bf16[64,128]{1,0} fusion(f32[64,128]{1,0} %p), kind=kLoop, calls=%fused
  %fusion.7.remat2 = bf16[64,128]{1,0} fusion(f32[64,128]{1,0} %p), kind=kLoop, calls=%fused
  %checkpoint.3 = f32[64,128]{1,0} copy(%p), metadata={op_name="jit(step)/remat/mul"}
  %gather.2 = f32[8,128]{1,0} gather(f32[64,128]{1,0} %p, s32[8,1]{1,0} %i)
  %all-reduce-start = (f32[64,128]{1,0}, f32[64,128]{1,0}) all-reduce-start(%p), to_apply=%add
  %cp-start = (bf16[32,128], bf16[32,128], u32[], u32[]) collective-permute-start(%p)
  %all-gather-start = (bf16[16,128]{1,0}, bf16[64,128]{1,0}) all-gather-start(%fusion.7)
  ROOT %all-reduce-done = f32[64,128]{1,0} all-reduce-done(%all-reduce-start)
}
"""


def test_hlo_reading_counts_collectives_gathers_and_the_compilers_remat():
  ops = tpu_compile.hlo_ops(HLO)
  assert ops['collectives'] == {'all-reduce': {'count': 1, 'bytes': 64 * 128 * 4},
                                'collective-permute': {'count': 1, 'bytes': 32 * 128 * 2},
                                'all-gather': {'count': 1, 'bytes': 64 * 128 * 2}}
  assert (ops['gathers'], ops['scatters'], ops['while_loops']) == (1, 0, 0)
  assert ops['compiler_remat'] == 2  # The '.remat' clones; not JAX's remat in the metadata.
