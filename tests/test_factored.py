"""Book-keeping clipping: per-example gradients kept factored as (G, X) give the same norms, clipped sums,
K-folds and non-finite handling as the dense per-example gradients, and the engine's released step on
attention and full fine-tuning is the clipped sum of one-example-at-a-time gradients."""

import copy
import io

import pytest
import torch

from dpdiff.privacy.factored import FactoredGradSample, clipped_sum, sq_norms, worth_factoring
from dpdiff.privacy.fused_layers import _store
from test_engine import clipped_contribution_check, expected_clipped_sum, flat_params, make_engine


def _factors(b=4, t=5, fan_out=3, fan_in=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, fan_out, generator=g), torch.randn(b, t, fan_in, generator=g)


def _dense(g, x):
    return torch.einsum("bto,bti->boi", g, x)


def test_norms_clipped_sum_and_dense_view_match_the_materialised_gradients():
    g, x = _factors()
    f, dense = FactoredGradSample(g, x, (3, 7)), _dense(g, x)
    assert f.shape == (4, 3, 7) and isinstance(f, torch.Tensor)
    exact = dense.double().flatten(1).pow(2).sum(1)
    assert (f.sq_norms().double() >= exact).all()  # rounded up: clipping never under-estimates a norm
    torch.testing.assert_close(f.sq_norms(), dense.flatten(1).pow(2).sum(1), rtol=1e-4, atol=1e-6)
    factor = torch.tensor([1.0, 0.5, 0.0, 2.0])
    torch.testing.assert_close(f.clipped_sum(factor), torch.einsum("b,boi->oi", factor, dense), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(clipped_sum(f, factor, torch.zeros(3, 7)), clipped_sum(dense, factor, torch.zeros(3, 7)))
    torch.testing.assert_close(sq_norms(f), sq_norms(dense), rtol=1e-4, atol=1e-6)
    # every other use sees the dense per-example gradients: torch ops, numpy, lists, copies, pickling
    torch.testing.assert_close(f[2] + 0, dense[2])
    torch.testing.assert_close(f.flatten(1).norm(dim=1), dense.flatten(1).norm(dim=1))
    torch.testing.assert_close(f, dense)
    torch.testing.assert_close(torch.from_numpy(f.numpy()), dense)
    torch.testing.assert_close(torch.tensor(f.tolist()), dense)
    torch.testing.assert_close(copy.deepcopy(f), dense)
    buffer = io.BytesIO()
    torch.save({"grad_sample": f}, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer)["grad_sample"], dense)
    # a conv weight's shape: [out, in*kh*kw] factors viewed as [out, in, kh, kw]
    conv = FactoredGradSample(*_factors(fan_in=2 * 3 * 3), (3, 2, 3, 3))
    assert conv.clipped_sum(torch.ones(4)).shape == (3, 2, 3, 3) and conv[0].shape == (3, 2, 3, 3)


def test_a_gradient_that_cancels_is_never_under_estimated():
    """Three tokens with one output gradient and inputs a, b, -(a + b): dW_i ~ 0. The raw fp32 Gram sum was
    negative for ~40% of such examples (NaN under a square root) and off by up to 4e-5 on terms ~10: the
    norm is rounded up by a bound on that error, so clipping can only over-clip such an example."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 1, 7, generator=g), torch.randn(64, 1, 7, generator=g)
    f = FactoredGradSample(torch.randn(64, 1, 5, generator=g).repeat(1, 3, 1), torch.cat([a, b, -(a + b)], dim=1), (5, 7))
    norms = f.sq_norms()
    exact = torch.einsum("bto,bti->boi", f.g.double(), f.x.double()).flatten(1).pow(2).sum(1)
    assert torch.isfinite(norms.sqrt()).all() and (norms.double() >= exact).all()
    assert norms.sqrt().max() < 0.1  # and still small next to the cancelled terms (~10)
    # the bound assumes fp32 rounding: a caller's autocast (bf16 Grams) or reduced matmul precision must not apply
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = f.sq_norms()
    finally:
        torch.set_float32_matmul_precision(previous)
    assert (under_autocast.double() >= exact).all() and torch.equal(under_autocast, norms)
    assert torch.get_float32_matmul_precision() == previous


def test_in_place_operations_are_refused():
    f = FactoredGradSample(*_factors(), (3, 7))
    with pytest.raises(RuntimeError, match="dense copy"):
        f[torch.tensor([True, False, False, False])] = 0.0
    with pytest.raises(RuntimeError, match="dense copy"):
        f.mul_(2)


def test_fold_plus_scale_and_zero_rows_equal_their_dense_counterparts():
    g, x = _factors(b=6)
    f, dense = FactoredGradSample(g, x, (3, 7)), _dense(g, x)
    folded = f.fold(3, 2)  # examples 0..2, rows 2i and 2i+1
    torch.testing.assert_close(folded.materialize(), dense.view(3, 2, 3, 7).mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(folded.sq_norms(), dense.view(3, 2, 3, 7).mean(1).flatten(1).pow(2).sum(1), rtol=1e-3, atol=1e-6)  # rounded up
    g2, x2 = _factors(b=6, t=2, seed=1)  # a second call of the same layer, with other tokens
    torch.testing.assert_close(f.plus(FactoredGradSample(g2, x2, (3, 7))).materialize(), dense + _dense(g2, x2))
    torch.testing.assert_close(f.scaled(4.0).materialize(), dense / 4)
    tripled = FactoredGradSample(g, x, (3, 7), scale=3.0)  # the batch-size factor, kept as a number
    torch.testing.assert_close(tripled.materialize(), 3 * dense)
    torch.testing.assert_close(tripled.sq_norms(), 9 * dense.flatten(1).pow(2).sum(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tripled.clipped_sum(torch.ones(6)), 3 * dense.sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tripled.plus(FactoredGradSample(g2, x2, (3, 7))).materialize(), 3 * dense + _dense(g2, x2))
    g[1, 0, 0], x[4, 2, 1] = float("nan"), float("inf")
    bad = FactoredGradSample(g, x, (3, 7))
    rows = bad.nonfinite_rows()
    assert rows.tolist() == [False, True, False, False, True, False]
    zeroed = bad.zero_rows(rows).materialize()
    assert torch.isfinite(zeroed).all() and zeroed[[1, 4]].abs().max() == 0
    torch.testing.assert_close(zeroed[0], dense[0])


def test_two_calls_in_one_pass_stay_factored_and_a_second_pass_stacks():
    p = torch.nn.Parameter(torch.zeros(3, 7))
    (g1, x1), (g2, x2) = _factors(), _factors(t=2, seed=1)
    _store(p, FactoredGradSample(g1, x1, (3, 7)), pass_id=0)
    _store(p, FactoredGradSample(g2, x2, (3, 7)), pass_id=0)
    assert isinstance(p.grad_sample, FactoredGradSample) and p.grad_sample.g.shape[1] == 7
    torch.testing.assert_close(p.grad_sample.materialize(), _dense(g1, x1) + _dense(g2, x2))
    _store(p, _dense(g1, x1), pass_id=1)  # Opacus' convention: a list across passes
    assert isinstance(p.grad_sample, list) and len(p.grad_sample) == 2


def test_the_rule_factors_only_where_it_is_cheaper():
    assert worth_factoring(16, 64, 64) and worth_factoring(8, 64, 512)
    assert not worth_factoring(64, 32, 32) and not worth_factoring(4096, 320, 320)  # 64x64 SD latents


@pytest.mark.parametrize("method", ["attention", "full"])
def test_the_engine_factors_cheap_layers_and_releases_the_clipped_sum_of_one_example_gradients(method):
    c, k, b, lr = 1e-3, 2, 4, 1e4  # tiny C: every example is clipped; a large lr keeps fp32 rounding of W - lr*grad small
    engine = make_engine(method, lr=lr, max_grad_norm=c, noise_multiplicity=k, batch_size=b, physical_batch_size=2)
    assert engine.module.book_keeping
    reference = engine.reference
    # the 4x4 level's layers (16 tokens, 64 channels) are factored: this test runs the book-keeping path
    item = engine.dataset[0]
    engine.per_example_backward(item["latents"][None].repeat(2, 1, 1, 1), item["encoder_hidden_states"][None].repeat(2, 1, 1))
    factored = [p for p in engine.params if isinstance(p.grad_sample, FactoredGradSample)]
    assert factored and len(factored) < len(engine.params)  # and the 8x8 level's 64-token layers are not
    engine.optimizer.zero_grad(set_to_none=True)
    before = flat_params(engine)
    engine._logical_step([3])
    contribution = (before - flat_params(engine)) * b / lr  # SGD, sigma=0, grads divided by B
    clipped_contribution_check(contribution, expected_clipped_sum(engine, reference, [3], 0, c), c)
    reference.load_state_dict(engine.model.state_dict())
    before = flat_params(engine)
    engine._logical_step([0, 5, 7])  # two micro-batches
    summed = (before - flat_params(engine)) * b / lr
    torch.testing.assert_close(summed, expected_clipped_sum(engine, reference, [0, 5, 7], 1, c), rtol=1e-3, atol=c * 1e-4)


def test_book_keeping_and_dense_per_example_gradients_release_the_same_step():
    """The same engine settings with the factored path off (per-layer bookkeeping aside) step identically."""
    engines = [make_engine("attention", max_grad_norm=0.05, noise_multiplier=0.8) for _ in range(2)]
    engines[1].module.book_keeping = False
    for engine in engines:
        engine._logical_step([1, 2, 6])
    torch.testing.assert_close(flat_params(engines[0]), flat_params(engines[1]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["attention", "full"])
def test_an_empty_batch_releases_exactly_the_noise(method):
    """No example: the step is N(0, sigma^2 C^2) / B alone, drawn once, for the factored layers too."""
    sigma, c, b, lr = 2.0, 0.5, 4, 1e3  # large lr: the noise dwarfs the fp32 rounding of W - lr*noise
    engine = make_engine(method, lr=lr, noise_multiplier=sigma, max_grad_norm=c, batch_size=b)
    before = flat_params(engine)
    stats = engine._logical_step([])
    noise = (before - flat_params(engine)) * b / lr
    assert stats.num_examples == 0
    assert noise.std().item() == pytest.approx(sigma * c, rel=0.03)
    assert abs(noise.mean().item()) < 5 * sigma * c / noise.numel() ** 0.5


def test_clipped_sums_are_full_fp32_under_a_callers_autocast_or_tf32():
    """The clipped sum is what the noise covers: formed in bf16 / TF32 (the caller's autocast or matmul
    precision), each example's share would be its factors rounded to 7 / 10 mantissa bits, not the
    gradient whose exact norm was clipped to C. Factored and dense, it matches fp64 to fp32 accuracy."""
    g = torch.Generator().manual_seed(1)
    f = FactoredGradSample(torch.randn(6, 5, 40, generator=g), torch.randn(6, 5, 48, generator=g), (40, 48))
    dense = torch.einsum("bto,bti->boi", f.g, f.x)
    factor = torch.rand(6, generator=g)
    exact = torch.einsum("b,bto,bti->oi", factor.double(), f.g.double(), f.x.double())
    param = torch.zeros(40, 48)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sums = [clipped_sum(f, factor, param), clipped_sum(dense, factor, param)]
    finally:
        torch.set_float32_matmul_precision(previous)
    for total in sums:
        assert total.dtype == torch.float32
        torch.testing.assert_close(total.double(), exact, rtol=1e-5, atol=1e-5)
    assert torch.get_float32_matmul_precision() == previous
