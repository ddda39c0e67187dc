"""The sampler's CPU top-k helper (engine/cpu_top_k.c) against numpy."""

import mlx.core as mx
import numpy as np
import pytest

from engine import cpu_top_k, sampler


@pytest.fixture(scope="module")
def helper():
    h = cpu_top_k.load()
    if h is None:
        pytest.skip("no C compiler on this machine")
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
    assert np.array_equal(helper(x, k), ref)


def test_sampler_top_ids_same_on_both_paths(helper, monkeypatch):
    x = mx.array(np.where(np.isnan(logits()), -np.inf, logits()))
    fast = np.array(sampler._top_ids(x, 50))
    monkeypatch.setattr(cpu_top_k, "load", lambda: None)
    portable = np.array(sampler._top_ids(x, 50))
    values = np.take_along_axis(np.array(x), fast, axis=1)
    assert np.array_equal(values, np.take_along_axis(np.array(x), portable, axis=1))


def test_bad_k(helper):
    with pytest.raises(ValueError):
        helper(np.zeros((2, 5), np.float32), 6)
