"""The sampler's CPU helpers (kernels/cpu_sampling.c) against numpy and the MLX path."""

import sys

import mlx.core as mx
import numpy as np
import pytest

from engine.core import sampler
from engine.platform import cpu_sampling, native
from engine.platform.base import PORTABLE_SAMPLING, SamplerKernels


@pytest.fixture(scope="module")
def helper():
    if sys.platform != "linux":
        pytest.skip("the native kernels are built on Linux only")
    h = cpu_sampling.load()
    assert h is not None, native.load().reason
    return h


def logits():
    x = np.random.default_rng(0).normal(0, 3, (9, 3000)).astype(np.float32)
    x[1] = 0.5                    # all tied
    x[2, 40:] = -np.inf           # fewer finite values than k
    x[3, 7] = np.nan              # a NaN never qualifies
    x[4, ::3] = x[4, 0]           # many ties with the largest
    x[5, :] = -np.inf
    x[5, 11] = 2.0
    return x


@pytest.mark.parametrize("k", [1, 7, 100, 1024, 3000])
def test_top_k_ids_match_a_stable_sort(helper, k):
    x = logits()
    ref = np.argsort(-np.where(np.isnan(x), -np.inf, x), axis=1, kind="stable")[:, :k]
    assert np.array_equal(helper.top_k(x, k), ref)


def test_sampler_top_ids_same_on_both_paths(helper):
    x = mx.array(np.where(np.isnan(logits()), -np.inf, logits()))
    fast = np.array(sampler._top_ids(x, 50, SamplerKernels(fast_exp=True, host=helper)))
    portable = np.array(sampler._top_ids(x, 50, PORTABLE_SAMPLING))
    values = np.take_along_axis(np.array(x), fast, axis=1)
    assert np.array_equal(values, np.take_along_axis(np.array(x), portable, axis=1))


def test_bad_k(helper):
    with pytest.raises(ValueError):
        helper.top_k(np.zeros((2, 5), np.float32), 6)


def test_softmax_rows_logsumexp_and_draws(helper):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 4, (6, 5000)).astype(np.float32)
    x[2, :4000] = -np.inf                       # banned tokens weigh nothing
    temps = np.array([1.0, 0.5, 2.0, 1.0, 0.7, 1.3], np.float32)
    u = rng.random(6).astype(np.float32)
    lse, ids = helper.softmax(x, temps, u)
    scaled = x.astype(np.float64) / temps[:, None]
    top = scaled.max(axis=1, keepdims=True)
    ref_lse = top[:, 0] + np.log(np.exp(scaled - top).sum(axis=1))
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5)
    cdf = np.cumsum(np.exp(scaled - top), axis=1)
    ref_ids = (cdf > u[:, None] * cdf[:, -1:]).argmax(axis=1)
    assert np.array_equal(ids, ref_ids)
    assert ids[2] >= 4000
    assert helper.softmax(x, temps)[1] is None


def test_sampled_tokens_same_on_both_paths(helper):
    """Temperature draws and top-p draws: C helpers and the MLX path agree."""
    from engine.core.sampler import SamplingRow
    from engine.core.sampling_params import SamplingParams

    logits = mx.array(np.random.default_rng(2).normal(0, 3, (16, 4000)).astype(np.float32))
    rows = [SamplingRow(SamplingParams(temperature=0.8, top_p=p, seed=i), i, [1, 2], [3] * i)
            for i, p in enumerate([1.0] * 8 + [0.9] * 8)]
    fast = np.array(sampler.sample(logits, rows, SamplerKernels(True, helper)).token_ids)
    portable = np.array(sampler.sample(logits, rows).token_ids)
    assert np.array_equal(fast, portable)
