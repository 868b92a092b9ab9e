"""--secure_mode: the sampling and the noise come from the OS CSPRNG, with the right distributions."""

import math

import pytest
import torch

from dpdiff.errors import ConfigError
from dpdiff.privacy.secure_random import secure_normal_, secure_poisson_subset, secure_uniform
from test_engine import flat_params, make_engine


def test_secure_normal_has_the_gaussian_quantiles_and_ignores_torch_seeds():
    torch.manual_seed(0)
    a = secure_normal_(torch.empty(400_001), 2.0)
    torch.manual_seed(0)
    b = secure_normal_(torch.empty(400_001), 2.0)
    assert not torch.equal(a, b)  # no torch generator involved
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    assert abs(float(a.mean())) < 0.02 and float(a.std()) == pytest.approx(2.0, rel=0.01)
    normal = torch.distributions.Normal(0.0, 2.0)
    for q in (0.01, 0.1, 0.5, 0.9, 0.99):
        expected = normal.icdf(torch.tensor(q))
        # the sample quantile's standard error, sqrt(q(1-q)/n) / density; 6 of them: a false alarm ~1e-9
        error = math.sqrt(q * (1 - q) / a.numel()) / float(normal.log_prob(expected).exp())
        assert float(a.quantile(q)) == pytest.approx(float(expected), abs=6 * error)
    # fp32 resolution: nearly every value distinct (no coarse grid)
    assert a.unique().numel() > 0.99 * a.numel()


def test_secure_uniforms_are_in_the_open_closed_unit_interval():
    u = secure_uniform(100_000)
    assert u.dtype == torch.float64 and float(u.min()) > 0 and float(u.max()) <= 1
    assert float(u.mean()) == pytest.approx(0.5, abs=0.005)


def test_secure_poisson_subsets_have_binomial_mean_and_variance():
    n, q, trials = 500, 0.1, 2000
    sizes = torch.tensor([len(secure_poisson_subset(n, q)) for _ in range(trials)], dtype=torch.float64)
    assert float(sizes.mean()) == pytest.approx(n * q, rel=0.03)
    assert float(sizes.var()) == pytest.approx(n * q * (1 - q), rel=0.15)  # a fixed-size sampler has variance 0


def test_secure_engine_noise_has_std_sigma_c_and_is_not_the_torch_generators():
    sigma, c, b = 2.0, 0.5, 4
    engine = make_engine("lora", noise_multiplier=sigma, max_grad_norm=c, batch_size=b, secure_mode=True,
                         privacy_seed=None)
    state, sampling = engine.noise_generator.get_state(), engine.sampling_generator.get_state()
    before = flat_params(engine)
    engine._logical_step([])
    noise = (before - flat_params(engine)) * b
    assert noise.std().item() == pytest.approx(sigma * c, rel=0.05)
    assert torch.equal(engine.noise_generator.get_state(), state)  # the seeded generator drew nothing
    stats = engine.step()  # a Poisson step through the CSPRNG sampler
    assert torch.equal(engine.sampling_generator.get_state(), sampling)
    assert 0 <= stats.num_examples <= len(engine.dataset) and math.isfinite(float(flat_params(engine).sum()))


def test_secure_mode_with_per_layer_clipping_is_refused():
    with pytest.raises(ConfigError, match="flat"):
        make_engine("lora", secure_mode=True, privacy_seed=None, clipping="per_layer")
