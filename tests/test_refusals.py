"""Refusals that keep the stated guarantee true, each shown to happen: a resume under other privacy settings, a
LoRA layer the closed-form fused path would get wrong, a PRV failure (RDP's bound, never a guess), and a DP-MEPF
noise draw outside the accounting."""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from dpdiff.adapters import params_without_grad_sampler
from dpdiff.errors import ConfigError, PrivacyError
from dpdiff.mepf.embedding import EmbeddingConfig, EmbeddingSums
from dpdiff.mepf.release import add_noise, planned_releases
from dpdiff.privacy import accounting
from dpdiff.privacy.fused_layers import fusable_lora_layers, fusable_reason, lora_forward
from dpdiff.privacy.grad_samplers import FUSED_MODE, wrap_for_per_sample_grads
from test_engine import LatentCache, make_engine, scheduler

# ---- resume: the accountant composes ONE (q, sigma, C) over every step -------------------------------------------

RESUMED = dict(noise_multiplier=1.0, n=16, batch_size=4, physical_batch_size=2)


@pytest.fixture(scope="module")
def saved_state():
    engine = make_engine(**{**RESUMED, "privacy_seed": 5})  # other generator states than a fresh engine's
    engine.steps_taken = 3  # as after three steps (their work is not what is checked here)
    return engine.state_dict()


def _generator_states(engine):
    return engine.sampling_generator.get_state().clone(), engine.noise_generator.get_state().clone()


@pytest.mark.parametrize("changed, key", [
    (dict(batch_size=3), "sample_rate"),  # q = 3/16
    (dict(n=20), "sample_rate"),  # the same batch size over another dataset: q = 4/20
    (dict(noise_multiplicity=2), "noise_multiplicity"),
    (dict(clipping="per_layer"), "clipping"),
    (dict(max_grad_norm=0.5), "max_grad_norm"),
])
def test_resume_with_other_privacy_settings_is_refused_and_changes_nothing(saved_state, changed, key):
    engine = make_engine(**{**RESUMED, **changed})
    generators = _generator_states(engine)
    with pytest.raises(PrivacyError, match=f"different privacy settings .*'{key}'"):
        engine.load_state_dict(saved_state)
    assert engine.steps_taken == 0  # refused before any of the saved state was taken over
    assert all(torch.equal(a, b) for a, b in zip(generators, _generator_states(engine)))


def test_resume_on_another_number_of_processes_or_from_a_record_without_a_setting_is_refused(saved_state):
    """A checkpoint of a 2-process run (each rank samples its shard at q, noise on rank 0) resumed by one process,
    and a checkpoint whose config lacks a setting: neither can show the settings are the same, both are refused."""
    engine = make_engine(**RESUMED)
    generators = _generator_states(engine)
    two_ranks = {**saved_state, "config": {**saved_state["config"], "world_size": 2},
                 "ranks": saved_state["ranks"] * 2}
    with pytest.raises(PrivacyError, match="'world_size': \\(2, 1\\)"):
        engine.load_state_dict(two_ranks)
    for key in ("sample_rate", "noise_multiplicity", "clipping", "world_size"):
        older = {**saved_state, "config": {k: v for k, v in saved_state["config"].items() if k != key}}
        with pytest.raises(PrivacyError, match=f"'{key}': \\(None, "):
            engine.load_state_dict(older)
    assert engine.steps_taken == 0 and all(torch.equal(a, b) for a, b in zip(generators, _generator_states(engine)))
    engine.load_state_dict(saved_state)  # the same settings do resume, and take the saved state over
    assert engine.steps_taken == 3
    assert not any(torch.equal(a, b) for a, b in zip(generators, _generator_states(engine)))


# ---- the fused mode's closed form only for a plain LoRA Linear --------------------------------------------------


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 5))

    def forward(self, x):
        return self.net(x)


def _lora_net(case):
    """A LoRA on net.0 that the closed form y = W0 x + s B A x would compute wrongly (or not at all), B moved off 0."""
    torch.manual_seed(0)
    model = _Net()
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["net.0"], use_dora=case.startswith("dora"),
                                       lora_bias=case == "lora_bias"), model)
    layer = model.net[0]
    if case in ("two_adapters", "two_active"):
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["net.0"]), model, adapter_name="other")
        layer.set_adapter(["default", "other"] if case == "two_active" else "default")
        for p in layer.lora_A["other"].parameters():  # trained but inactive: it would get no gradient at all
            p.requires_grad_(True)
    if case == "dora_frozen_magnitude":
        layer.lora_magnitude_vector["default"].weight.requires_grad_(False)
    if case == "trained_base":
        layer.base_layer.weight.requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # weight and (lora_bias) bias: a closed form without them changes the output
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    if case == "merged":
        layer.merge()
    if case == "disabled":
        layer._disable_adapters = True  # as peft's enable_adapters(False), with A and B left trainable
    return model, layer


def _losses(model, x, y):
    return ((model(x) - y) ** 2).mean(dim=(1, 2))


@pytest.mark.parametrize("case, reason", [
    ("dora", "DoRA"), ("dora_frozen_magnitude", "DoRA"), ("lora_bias", "with bias"),
    ("two_adapters", "not exactly one active adapter"), ("two_active", "not exactly one active adapter"),
    ("merged", "merged or disabled"), ("disabled", "merged or disabled"), ("trained_base", "base layer trains"),
])
@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
def test_lora_layers_the_closed_form_would_get_wrong_are_not_fused_and_stay_exact(case, reason):
    model, layer = _lora_net(case)
    assert reason in fusable_reason(layer) and layer not in fusable_lora_layers(model)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 7, 16, generator=g), torch.randn(3, 7, 5, generator=g)
    with torch.no_grad():
        bare = model(x)
    if case == "dora":  # the trained magnitude has no per-example rule: the engine's checks refuse the model
        assert params_without_grad_sampler(model) == ["net.0.lora_magnitude_vector.default.weight"]
        return
    wrapped = wrap_for_per_sample_grads(model, FUSED_MODE)
    assert getattr(layer.__dict__.get("forward"), "__func__", None) is not lora_forward
    torch.testing.assert_close(wrapped(x), bare, rtol=1e-6, atol=1e-6)
    if case in ("merged", "disabled", "two_adapters"):
        return  # A/B (or the inactive adapter) are not in the forward: no gradient to compare
    _losses(wrapped, x, y).mean().backward()
    per_example = {n: p.grad_sample for n, p in trained.items()}
    wrapped._close()
    for i in range(3):  # each example's gradient on the plain model
        model.zero_grad(set_to_none=True)
        _losses(model, x[i : i + 1], y[i : i + 1]).sum().backward()
        for n, p in trained.items():
            torch.testing.assert_close(per_example[n][i], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_a_lora_layer_changed_after_wrapping_is_refused_at_the_next_forward():
    model, layer = _lora_net("plain")
    wrapped = wrap_for_per_sample_grads(model, FUSED_MODE)
    assert layer.forward.__func__ is lora_forward
    wrapped(torch.randn(2, 3, 16))
    layer._disable_adapters = True
    with pytest.raises(RuntimeError, match="changed after wrapping"):
        wrapped(torch.randn(2, 3, 16))


def _unet_with(case):
    from dpdiff.pipelines.preset import build_tiny_unet

    unet = build_tiny_unet(seed=0)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], use_dora=case == "dora"))
    layers = [m for m in unet.modules() if isinstance(m, LoraLinear)]
    if case == "merged":
        layers[0].merge()
    if case == "disabled":
        layers[0]._disable_adapters = True  # A and B left trainable
    if case == "inactive":
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k"]), unet, adapter_name="other")
        for layer in layers:
            layer.lora_A["default"].weight.requires_grad_(True)
        next(m for m in unet.modules() if isinstance(m, LoraLinear) and "other" in m.lora_A).set_adapter("other")
    return unet


@pytest.mark.parametrize("case, match", [
    ("dora", "no per-example gradient rule.*lora_magnitude_vector"),
    ("merged", "to_q.lora_A.default.*never used by the forward"),
    ("disabled", "to_q.lora_A.default.*never used by the forward"),
    ("inactive", "lora_A.default.*never used by the forward"),
])
@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
def test_the_engine_refuses_lora_parts_without_an_exact_per_example_gradient_before_any_work(case, match):
    """DoRA's trained magnitude has no per-example rule; a merged, disabled or inactive adapter's trained A/B are
    not in the forward (they would get no per-example gradient: the first step failed inside autograd/Opacus)."""
    from dpdiff.privacy.engine import DPDiffusionEngine

    unet = _unet_with(case)
    params = [p for p in unet.parameters() if p.requires_grad]
    with pytest.raises(ConfigError, match=match):
        DPDiffusionEngine(unet, scheduler(), torch.optim.SGD(params, lr=1.0), LatentCache(8), batch_size=4,
                          physical_batch_size=2, noise_multiplier=1.0, max_grad_norm=1.0)


# ---- PRV -> RDP: a valid bound when PRV's numerics fail, never a guess ------------------------------------------


@functools.cache
def _pld_epsilon(sigma, q, steps, delta):
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    pld = pld_privacy_accountant.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return pld.get_epsilon(delta)


@pytest.fixture
def fresh_epsilon_cache():
    accounting._epsilon_cached.cache_clear()  # epsilons cached by earlier tests (and this one's) stay out
    yield
    accounting._epsilon_cached.cache_clear()


@pytest.fixture
def failing_prv(monkeypatch, request, fresh_epsilon_cache):
    """PRV raises (or returns NaN); RDP is the real one."""
    real = accounting._opacus_epsilon
    failure = request.param

    def opacus_epsilon(mechanism, entries, delta):
        if mechanism == "prv":
            if failure is None:
                return math.nan
            raise failure("PRV numerics failed")
        return real(mechanism, entries, delta)

    monkeypatch.setattr(accounting, "_opacus_epsilon", opacus_epsilon)
    return real


@pytest.mark.parametrize("failing_prv", [None, RuntimeError, ValueError, FloatingPointError, OverflowError, MemoryError],
                         indirect=True, ids=["nan", "RuntimeError", "ValueError", "FloatingPointError", "OverflowError",
                                             "MemoryError"])
def test_a_failed_prv_accountant_reports_the_rdp_bound_with_a_warning(failing_prv):
    sigma, q, steps, delta = 1.0, 0.01, 200, 1e-5
    with pytest.warns(RuntimeWarning, match="PRV accountant failed.*RDP bound instead"):
        eps = accounting.epsilon_for(sigma, q, steps, delta, "prv")
    assert eps == failing_prv("rdp", ((sigma, q, steps),), delta)  # exactly RDP's bound, nothing else
    assert eps >= _pld_epsilon(sigma, q, steps, delta)  # an upper bound on the true epsilon (an independent accountant)
    with warnings.catch_warnings():  # the planner, on the same failure, picks a sigma that RDP certifies
        warnings.simplefilter("ignore", RuntimeWarning)
        chosen = accounting.noise_multiplier_for(2.0, q, steps, delta, "prv")
    assert failing_prv("rdp", ((chosen, q, steps),), delta) <= 2.0


def test_when_rdp_fails_too_epsilon_is_infinite_not_a_number_made_up(fresh_epsilon_cache, monkeypatch):
    monkeypatch.setattr(accounting, "_opacus_epsilon", lambda mechanism, entries, delta: math.nan)
    with pytest.warns(RuntimeWarning, match="PRV accountant failed"):
        assert accounting.epsilon_for(1.0, 0.01, 100, 1e-5, "prv") == math.inf
    accounting._epsilon_cached.cache_clear()
    assert accounting.epsilon_for(1.0, 0.01, 100, 1e-5, "rdp") == math.inf


# ---- DP-MEPF: every noisy tensor is a release the calibration counted --------------------------------------------


def _sums(moments):
    return EmbeddingSums(sum1=torch.ones(3, 8, dtype=torch.float64),
                         sum2=torch.ones(3, 8, dtype=torch.float64) if moments == 2 else None,
                         counts=torch.full((3,), 5.0, dtype=torch.float64))


@pytest.mark.parametrize("planned_moments, planned_validation, moments, prefix, unaccounted", [
    (1, False, 2, "", "sum2"),  # a second moment the plan (and so sigma) did not include
    (2, False, 2, "val_", "val_sum1"),  # a validation embedding outside the budget
    (1, True, 1, "", "counts"),  # counts dropped from the plan below
])
def test_a_mepf_release_that_was_not_accounted_for_is_refused(planned_moments, planned_validation, moments, prefix,
                                                             unaccounted):
    releases = planned_releases(EmbeddingConfig(max_norm=2.0, moments=planned_moments), with_validation=planned_validation)
    if unaccounted == "counts":
        releases = [r for r in releases if r.name != "counts"]
    with pytest.raises(PrivacyError, match=f"{unaccounted} would be released without being accounted for"):
        add_noise(_sums(moments), releases, 1.0, torch.Generator().manual_seed(0), prefix)
    planned = planned_releases(EmbeddingConfig(max_norm=2.0, moments=moments), with_validation=True)
    noisy = add_noise(_sums(moments), planned, 1.0, torch.Generator().manual_seed(0), prefix)  # when planned: released
    assert set(noisy) <= {r.name for r in planned} and len(noisy) == (3 if moments == 2 else 2)
