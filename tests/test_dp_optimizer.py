"""dpdiff's flat-clipping optimizer against Opacus' DPOptimizer: same clipped sums, the norms it clipped
with, noise of std sigma*C drawn once per logical step (also across skipped micro-batch steps)."""

import pytest
import torch
from opacus.optimizers import DPOptimizer

from dpdiff.privacy.dp_optimizer import FlatClipDPOptimizer

SHAPES = [(6, 5), (5,), (3, 2, 2), (40, 8)]


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _grad_samples(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *s, generator=g) * (i + 1) for i, s in enumerate(SHAPES)]


def _run(cls, micro_batches, noise_multiplier=0.0, clip=1.5, seed=0):
    params = _params()
    optimizer = cls(torch.optim.SGD(params, lr=1.0), noise_multiplier=noise_multiplier, max_grad_norm=clip,
                    expected_batch_size=7, loss_reduction="mean", generator=torch.Generator().manual_seed(seed))
    optimizer.zero_grad(set_to_none=True)
    for j, samples in enumerate(micro_batches):
        for p, s in zip(params, samples):
            p.grad_sample = s.clone()
        if j < len(micro_batches) - 1:
            optimizer.signal_skip_step(do_skip=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return params, optimizer


@pytest.mark.parametrize("sizes", [[4], [3, 5], [0]])
def test_same_update_as_opacus(sizes):
    batches = [_grad_samples(n, seed=n + 10) for n in sizes]
    ours, _ = _run(FlatClipDPOptimizer, batches)
    theirs, _ = _run(DPOptimizer, batches)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_clipped_sum_and_norms_by_hand():
    samples = _grad_samples(5, seed=1)
    flat = torch.cat([s.reshape(5, -1) for s in samples], dim=1)
    norms = flat.norm(dim=1)
    clip = float(norms.min()) * 1.5  # some examples clipped, some not
    expected = (flat * (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]).sum(0) / 7
    start = torch.cat([p.detach().flatten() for p in _params()])
    params, optimizer = _run(FlatClipDPOptimizer, [samples], clip=clip)
    torch.testing.assert_close(optimizer.last_per_sample_norms, norms)
    torch.testing.assert_close(start - torch.cat([p.detach().flatten() for p in params]), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sizes", [[0], [3, 4]])
def test_noise_std_is_sigma_c_drawn_once(sizes):
    """Zero per-example gradients: the update is noise only. Two micro-batches must not add it twice."""
    sigma, clip = 0.8, 2.0
    shapes_total = sum(torch.Size(s).numel() for s in SHAPES)
    draws = []
    for seed in range(300):
        start = torch.cat([p.detach().flatten() for p in _params()])
        zeros = [[torch.zeros(n, *s) for s in SHAPES] for n in sizes]
        params, _ = _run(FlatClipDPOptimizer, zeros, noise_multiplier=sigma, clip=clip, seed=seed)
        draws.append((start - torch.cat([p.detach().flatten() for p in params])) * 7)  # undo 1/expected batch
    noise = torch.stack(draws)
    assert noise.shape == (300, shapes_total)
    std = float(noise.std())
    assert abs(std - sigma * clip) < 0.02 * sigma * clip, std  # ~26k draws: std's relative error ~0.4%
    assert abs(float(noise.mean())) < 0.02 * sigma * clip
    # independent across coordinates and tensors (one flat draw split over the parameters)
    corr = torch.corrcoef(noise[:, [0, 31, 40, 100]].T)
    assert float((corr - torch.eye(4)).abs().max()) < 0.25


@pytest.mark.parametrize("sizes", [[4], [3, 5]])
def test_noisy_update_is_opacus_own_draw(sizes):
    """With noise and a seeded generator, the update is stock Opacus' (its per-parameter draw, in its
    order): drawing in place into the clipped sums changes where the noise lives, not its values."""
    batches = [_grad_samples(n, seed=n + 20) for n in sizes]
    ours, _ = _run(FlatClipDPOptimizer, batches, noise_multiplier=0.7, seed=3)
    theirs, _ = _run(DPOptimizer, batches, noise_multiplier=0.7, seed=3)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    moved = torch.cat([(a - b).detach().flatten() for a, b in zip(ours, _params())])
    assert float(moved.abs().max()) > 0.05  # the noise is there (std 0.7 * 1.5 / 7 a coordinate)


def test_no_second_parameter_sized_tensor_while_noising():
    """The noised gradient IS the clipped sum (in place): peak memory of the step is one copy, not two."""
    params = _params()
    optimizer = FlatClipDPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                                    expected_batch_size=1, loss_reduction="sum", generator=torch.Generator().manual_seed(0))
    for p, s in zip(params, _grad_samples(3, seed=0)):
        p.grad_sample = s
    assert optimizer.pre_step()
    for p in params:
        assert p.grad.data_ptr() == p.summed_grad.data_ptr()


def test_secure_noise_ignores_the_seeded_generator_and_has_std_sigma_c():
    """secure_mode: the OS CSPRNG, so the same seeded generator gives two different draws."""
    sigma, clip = 0.7, 1.5
    draws = []
    for _ in range(2):
        params = _params()
        start = torch.cat([p.detach().flatten() for p in params])
        optimizer = FlatClipDPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=sigma, max_grad_norm=clip,
                                        expected_batch_size=1, loss_reduction="sum",
                                        generator=torch.Generator().manual_seed(3), secure_mode=True)
        for p, s in zip(params, _grad_samples(2, seed=0)):
            p.grad_sample = torch.zeros_like(s)
        optimizer.step()
        draws.append(start - torch.cat([p.detach().flatten() for p in params]))
    assert not torch.equal(draws[0], draws[1])
    assert float(torch.cat(draws).std()) == pytest.approx(sigma * clip, rel=0.15)
