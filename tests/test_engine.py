"""The DP-SGD engine on the real tiny UNet: per-sample gradients, clipping, noise multiplicity,
noise scale, empty batches, resume and input validation."""

import copy
import io
import math

import pytest
import torch
from diffusers import DDPMScheduler

from dpdiff.adapters import prepare_trainable
from dpdiff.errors import ConfigError, DataError, PrivacyError
from dpdiff.pipelines.preset import SCHEDULER_CONFIG, build_tiny_unet
from dpdiff.privacy.diffusion_loss import draw_diffusion_inputs, example_generator, per_row_loss, timestep_weights
from dpdiff.privacy.engine import DPDiffusionEngine

TOKENS = 6  # multi-token context: with one token, attn2.to_q/to_k get exactly zero gradient


class LatentCache(torch.utils.data.Dataset):
    def __init__(self, n, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.latents = torch.randn(n, 4, 8, 8, generator=g)
        self.hidden = torch.randn(n, TOKENS, 64, generator=g)

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return {"latents": self.latents[i], "encoder_hidden_states": self.hidden[i]}


def scheduler():
    return DDPMScheduler(**SCHEDULER_CONFIG)


def make_engine(method="lora", n=16, lr=1.0, optimizer="sgd", lora_targets=None, **kwargs):
    unet = build_tiny_unet(seed=0)
    prepare_trainable(unet, method, target_modules=lora_targets)
    if lora_targets is not None:  # LoRA B starts at 0, which zeroes A's gradient: move it so both are checked
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.Adam(params, lr=lr)
    settings = dict(batch_size=4, physical_batch_size=2, noise_multiplier=0.0, max_grad_norm=1.0, privacy_seed=0)
    settings.update(kwargs)
    reference = copy.deepcopy(unet)  # before Opacus attaches its hooks
    engine = DPDiffusionEngine(unet, scheduler(), opt, LatentCache(n), **settings)
    engine.reference = reference
    return engine


def flat_params(engine):
    return torch.cat([p.detach().flatten() for p in engine.params]).clone()


def example_grad(model, engine, latents, hidden, noise, timesteps):
    """Gradient of one example's K-averaged loss, computed alone on a plain copy of the model."""
    model.zero_grad(set_to_none=True)
    k = noise.shape[0]
    loss = per_row_loss(model, engine.noise_scheduler, latents.expand(k, -1, -1, -1).contiguous(),
                        hidden.expand(k, -1, -1).contiguous(), noise, timesteps).mean()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("method", ["lora", "attention", "full"])
def test_auto_mode_fuses_linear_layers(method):
    assert make_engine(method).grad_sample_mode == "fused"  # LoRA and plain Linear fused, the rest on hooks
    assert make_engine(method, grad_sample_mode="fused_lora").grad_sample_mode == "fused"  # the earlier name


@pytest.mark.parametrize("method, mode", [("lora", "fused"), ("lora", "hooks"), ("lora", "ew"), ("attention", "fused"),
                                          ("attention", "hooks"), ("full", "fused"), ("full", "hooks")])
def test_per_sample_gradients_match_one_example_at_a_time(method, mode):
    engine = make_engine(method, grad_sample_mode=mode)
    reference = engine.reference
    g = torch.Generator().manual_seed(5)
    latents, hidden = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, TOKENS, 64, generator=g)
    rows, noise, t = draw_diffusion_inputs(latents, 1, 1000, [g, g, g])
    engine.per_example_backward(latents, hidden, noise, t)
    batched = torch.cat([p.grad_sample.flatten(1) for p in engine.params], dim=1)
    for i in range(3):
        alone = example_grad(reference, engine, latents[i : i + 1], hidden[i : i + 1], noise[i : i + 1], t[i : i + 1])
        assert alone.abs().max() > 0
        torch.testing.assert_close(batched[i], alone, rtol=1e-4, atol=1e-6)
    if method != "full":  # the cross-attention query/key adapters do learn from a multi-token context
        to_k = [p.grad_sample for n, p in engine.model.named_parameters() if p.requires_grad and "attn2.to_k" in n]
        assert to_k and any(gs.abs().max() > 0 for gs in to_k)  # (LoRA A gets zero grad while B = 0)


def test_per_sample_gradients_of_lora_on_convolutions_match_one_example_at_a_time():
    """LoRA on every layer kind (3x3 resnet convs, 1x1 proj_in/out, feed-forward, time projection): `auto` fuses the
    Linear LoRA layers and runs Opacus hooks on the convolution LoRA layers, in one wrapper."""
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
               "time_emb_proj"]
    engine = make_engine("lora", lora_targets=targets)
    assert engine.grad_sample_mode == "fused"
    g = torch.Generator().manual_seed(6)
    latents, hidden = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, TOKENS, 64, generator=g)
    rows, noise, t = draw_diffusion_inputs(latents, 1, 1000, [g, g, g])
    engine.per_example_backward(latents, hidden, noise, t)
    batched = torch.cat([p.grad_sample.flatten(1) for p in engine.params], dim=1)
    assert all(p.grad_sample.abs().max() > 0 for p in engine.params)  # every adapter factor gets a gradient
    for i in range(3):
        alone = example_grad(engine.reference, engine, latents[i : i + 1], hidden[i : i + 1], noise[i : i + 1], t[i : i + 1])
        torch.testing.assert_close(batched[i], alone, rtol=1e-4, atol=1e-6)


def clipped_contribution_check(contribution, expected, max_grad_norm):
    """What DP needs from one example: norm <= C, and equal to the clipped mean of its K draws."""
    assert contribution.norm() <= max_grad_norm * (1 + 1e-5), f"norm {contribution.norm():.3g} > C={max_grad_norm}"
    torch.testing.assert_close(contribution, expected, rtol=1e-3, atol=max_grad_norm * 1e-4)


def expected_clipped_sum(engine, reference, indices, step, max_grad_norm):
    """Replay the engine's per-example draws of `step` on a plain model copy; clip each; sum."""
    k, total, data = engine.noise_multiplicity, 0, engine.dataset
    for i in indices:
        latents = data[i]["latents"][None]
        _, noise, t = draw_diffusion_inputs(latents, k, 1000, [example_generator(engine.seed, step, i)])
        grad = example_grad(reference, engine, latents, data[i]["encoder_hidden_states"][None], noise, t)
        total = total + grad * min(1.0, max_grad_norm / (grad.norm().item() + 1e-6))
    return total


def test_noise_multiplicity_clips_the_mean_of_k_draws_and_micro_batches_change_nothing():
    c, k, b = 1e-3, 3, 4  # tiny C: every example is clipped
    engine = make_engine("lora", max_grad_norm=c, noise_multiplicity=k, batch_size=b, physical_batch_size=2)
    reference = engine.reference
    # one example alone: its whole released contribution
    before = flat_params(engine)
    engine._logical_step([3])
    contribution = (before - flat_params(engine)) * b  # SGD lr=1, sigma=0, grads divided by B
    clipped_contribution_check(contribution, expected_clipped_sum(engine, reference, [3], 0, c), c)
    # five examples in three micro-batches: the sum of their clipped contributions
    reference.load_state_dict(engine.model.state_dict())
    before = flat_params(engine)
    engine._logical_step([0, 5, 7, 9, 11])
    summed = (before - flat_params(engine)) * b
    torch.testing.assert_close(summed, expected_clipped_sum(engine, reference, [0, 5, 7, 9, 11], 1, c),
                               rtol=1e-3, atol=c * 1e-4)


def test_repeating_the_batch_k_times_fails_the_sensitivity_check():
    """The published DP-LoRA bug: K copies in front of Opacus are clipped separately (sensitivity K*C)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    c, k, b = 1e-3, 3, 4
    engine = make_engine("lora", max_grad_norm=c, noise_multiplicity=k, batch_size=b)
    reference = engine.reference
    wrong_model = copy.deepcopy(engine.reference)
    params = [p for p in wrong_model.parameters() if p.requires_grad]
    wrong = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=b)
    gsm = GradSampleModule(wrong_model)
    item = engine.dataset[3]
    rows, noise, t = draw_diffusion_inputs(item["latents"][None], k, 1000, [example_generator(engine.seed, 0, 3)])
    before = torch.cat([p.detach().flatten() for p in params]).clone()
    per_row_loss(gsm, engine.noise_scheduler, rows, item["encoder_hidden_states"][None].repeat(k, 1, 1), noise, t).mean().backward()
    wrong.step()
    contribution = (before - torch.cat([p.detach().flatten() for p in params])) * b
    assert contribution.norm() > 1.5 * c  # each copy clipped to C on its own
    with pytest.raises(AssertionError):
        clipped_contribution_check(contribution, expected_clipped_sum(engine, reference, [3], 0, c), c)


@pytest.mark.parametrize("secure_mode", [False, True])
def test_added_noise_has_std_sigma_c_and_an_empty_batch_steps_with_noise_only(secure_mode):
    sigma, c, b = 2.0, 0.5, 4
    seed = None if secure_mode else 0
    engine = make_engine("lora", noise_multiplier=sigma, max_grad_norm=c, batch_size=b, secure_mode=secure_mode,
                         privacy_seed=seed)
    draws = []
    for step in (1, 2):
        before = flat_params(engine)
        stats = engine._logical_step([])
        assert stats.num_examples == 0 and math.isnan(stats.loss) and stats.step == step
        draws.append((before - flat_params(engine)) * b)  # zero data contribution: what moved is the noise
    assert abs(torch.corrcoef(torch.stack(draws))[0, 1]) < 0.05  # a fresh draw every step
    noise = torch.cat(draws)
    n = noise.numel()
    assert n > 40_000
    assert abs(noise.mean().item()) < 5 * sigma * c / math.sqrt(n)
    assert noise.std().item() == pytest.approx(sigma * c, rel=0.03)
    # fourth moment of a Gaussian: kurtosis 3
    assert ((noise / noise.std()) ** 4).mean().item() == pytest.approx(3.0, rel=0.1)


def test_a_step_with_data_adds_one_noise_draw_of_std_sigma_c_over_two_micro_batches():
    """Two examples in two micro-batches with noise, then the same step replayed with sigma = 0 (same seeds, same
    weights): the difference is the noise alone. One draw per logical step has std sigma*C; a draw per micro-batch
    would give sqrt(2)*sigma*C. sigma is small, so the clipped sum (<= 2C) is not negligible beside the noise."""
    sigma, c, b = 0.01, 0.05, 2  # every example clipped
    engine = make_engine("lora", noise_multiplier=sigma, max_grad_norm=c, batch_size=b, physical_batch_size=1)
    before = flat_params(engine)
    stats = engine._logical_step([0, 1])
    assert stats.num_micro_batches == 2 and stats.num_examples == 2
    noisy = (before - flat_params(engine)) * b
    with torch.no_grad():
        for p, value in zip(engine.params, before.split([p.numel() for p in engine.params])):
            p.copy_(value.view_as(p))  # replay: same weights, same step, sigma 0
    engine.steps_taken, engine.optimizer.noise_multiplier = 0, 0.0
    engine._logical_step([0, 1])
    clipped = (before - flat_params(engine)) * b
    assert c < clipped.norm().item() <= 2 * c * (1 + 1e-5)
    assert noisy.std().item() > 1.1 * sigma * c  # the data part is large: without subtracting it the std is off
    residual = noisy - clipped
    n = residual.numel()
    assert abs(residual.mean().item()) < 5 * sigma * c / math.sqrt(n)
    assert residual.std().item() == pytest.approx(sigma * c, rel=0.03)  # sqrt(2) sigma C: 41% off
    assert abs(torch.corrcoef(torch.stack([residual, clipped]))[0, 1]) < 0.05


def test_empty_poisson_batches_happen_and_step_without_noise_change_nothing():
    engine = make_engine("lora", n=20, batch_size=1, physical_batch_size=1)  # q = 0.05: P(empty) ~ 0.36
    assert engine.sample_rate == pytest.approx(0.05)
    for _ in range(30):
        before = flat_params(engine)
        stats = engine.step()
        if stats.num_examples == 0:
            break
    else:
        pytest.fail("no empty Poisson batch in 30 steps at q=0.05")
    torch.testing.assert_close(flat_params(engine), before, rtol=0, atol=0)
    assert engine.steps_taken == stats.step


@pytest.mark.parametrize("secure_mode", [False, True])
def test_poisson_batch_sizes_have_the_expected_mean_and_binomial_variance(secure_mode):
    """Each example joins independently with rate q: the size is Binomial(n, q), so a fixed-size (or any
    less random) sampler fails on the variance even where its mean is right. Drawn by `step()` itself."""
    n, b, draws = 1000, 50, 2000
    engine = make_engine("lora", n=n, batch_size=b, physical_batch_size=b, secure_mode=secure_mode,
                         privacy_seed=None if secure_mode else 0)
    chosen = []
    engine._logical_step = lambda indices: chosen.append(indices)  # the sampling only, no gradient work
    for _ in range(draws):
        engine.step()
    sizes = torch.tensor([len(c) for c in chosen], dtype=torch.float64)
    q = b / n
    assert sizes.mean().item() == pytest.approx(n * q, abs=4 * math.sqrt(n * q * (1 - q) / draws))
    # the sample variance of `draws` binomial sizes has a relative std of about sqrt(2 / draws) = 3%
    assert sizes.var().item() == pytest.approx(n * q * (1 - q), rel=5 * math.sqrt(2 / draws))
    assert all(len(set(c)) == len(c) for c in chosen)  # without replacement within a step
    members = torch.zeros(n)
    for c in chosen:
        members[c] += 1
    assert members.std().item() == pytest.approx(math.sqrt(draws * q * (1 - q)), rel=0.15)  # every example alike


@pytest.mark.parametrize("method", ["full"])
def test_full_unet_steps_in_the_default_mode(method):
    engine = make_engine(method, noise_multiplier=1.0, batch_size=2, physical_batch_size=2, n=8)
    before = flat_params(engine)
    stats = engine._logical_step([1, 2])
    assert stats.num_examples == 2 and math.isfinite(stats.loss)
    assert not torch.equal(before, flat_params(engine))


def test_per_layer_clipping_bounds_each_example_by_c():
    """Per layer, each of the L tensors of one example is clipped to C/sqrt(L) on its own (so the whole stays
    <= C); with every tensor's gradient above that, each share is reached, in the example's own direction."""
    c, b, lr = 1e-3, 4, 1e4  # a large lr keeps the tiny update far above the float32 rounding of the weights
    engine = make_engine("lora", clipping="per_layer", max_grad_norm=c, batch_size=b, lr=lr,
                         lora_targets=["to_q", "to_k", "to_v", "to_out.0"])
    sizes, share = [p.numel() for p in engine.params], c / math.sqrt(len(engine.params))
    latents = engine.dataset[2]["latents"][None]
    _, noise, t = draw_diffusion_inputs(latents, 1, 1000, [example_generator(engine.seed, 0, 2)])
    alone = example_grad(engine.reference, engine, latents, engine.dataset[2]["encoder_hidden_states"][None], noise, t)
    alone = alone.split(sizes)
    assert min(g.norm().item() for g in alone) > 10 * share  # every tensor is clipped: each share must be reached
    before = flat_params(engine)
    engine._logical_step([2])
    contribution = ((before - flat_params(engine)) * b / lr).split(sizes)
    norms = torch.stack([part.norm() for part in contribution])
    assert norms.max().item() <= share * (1 + 1e-4)
    assert norms.min().item() >= share * (1 - 1e-2)  # 1e-6 in Opacus' clip factor, on norms >= 10 * share
    for part, g in zip(contribution, alone):
        torch.testing.assert_close(part, g * (share / (g.norm() + 1e-6)), rtol=1e-3, atol=share * 1e-4)
    assert torch.cat(contribution).norm().item() <= c * (1 + 1e-4)


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_resume_continues_exactly_like_an_uninterrupted_run():
    settings = dict(noise_multiplier=1.0, noise_multiplicity=2, optimizer="adam", lr=1e-3, n=12, batch_size=3)
    straight = make_engine(**settings)
    for _ in range(4):
        straight.step()

    first = make_engine(**settings)
    for _ in range(2):
        first.step()
    saved = roundtrip({"engine": first.state_dict(), "model": first.model.state_dict(),
                       "optimizer": first.optimizer.state_dict()})
    resumed = make_engine(**{**settings, "privacy_seed": 123})  # the generators come from the checkpoint
    resumed.model.load_state_dict(saved["model"])
    resumed.optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["engine"])
    assert resumed.steps_taken == 2
    for _ in range(2):
        resumed.step()
    torch.testing.assert_close(flat_params(resumed), flat_params(straight), rtol=0, atol=0)

    other = make_engine(**{**settings, "noise_multiplier": 0.5})
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        other.load_state_dict(saved["engine"])


def test_privacy_generators_are_unpredictable_without_a_seed():
    a, b = make_engine(privacy_seed=None), make_engine(privacy_seed=None)
    assert not torch.equal(a.noise_generator.get_state(), b.noise_generator.get_state())
    assert not torch.equal(a.sampling_generator.get_state(), b.sampling_generator.get_state())


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(physical_batch_size=8, batch_size=4), ConfigError, "physical_batch_size"),
        (dict(batch_size=17, physical_batch_size=2), ConfigError, "exceeds the private dataset"),
        (dict(noise_multiplier=float("nan")), PrivacyError, "finite"),
        (dict(noise_multiplier=-1.0), PrivacyError, ">= 0"),
        (dict(max_grad_norm=0.0), PrivacyError, "> 0"),
        (dict(max_grad_norm=float("inf")), PrivacyError, "finite"),
        (dict(noise_multiplicity=0), ConfigError, "noise_multiplicity"),
        (dict(secure_mode=True, privacy_seed=3), PrivacyError, "secure_mode"),
        (dict(grad_sample_mode="ghost"), ConfigError, "ghost"),
        (dict(clipping="adaptive"), ConfigError, "clipping"),
        (dict(distributed=True), ConfigError, "process group"),
    ],
)
def test_invalid_settings_are_refused_before_any_work(overrides, error, match):
    with pytest.raises(error, match=match):
        make_engine(**overrides)


def test_refusals_that_depend_on_the_model_or_data():
    unet = build_tiny_unet()
    prepare_trainable(unet, "attention")
    params = [p for p in unet.parameters() if p.requires_grad]
    common = dict(batch_size=4, physical_batch_size=2, noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="ew"):
        DPDiffusionEngine(unet, scheduler(), torch.optim.SGD(params, lr=1), LatentCache(8), grad_sample_mode="ew", **common)
    with pytest.raises(ConfigError, match="exactly the trainable"):
        DPDiffusionEngine(unet, scheduler(), torch.optim.SGD(params[:3], lr=1), LatentCache(8), **common)
    with pytest.raises(DataError, match="latent cache"):
        DPDiffusionEngine(unet, scheduler(), torch.optim.SGD(params, lr=1), [torch.zeros(4, 8, 8)] * 8, **common)
    unet.enable_gradient_checkpointing()  # Opacus hooks lose checkpointed blocks' per-example gradients
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        DPDiffusionEngine(unet, scheduler(), torch.optim.SGD(params, lr=1), LatentCache(8), grad_sample_mode="hooks", **common)


def test_timestep_bias_weights_follow_the_diffusers_flags():
    assert timestep_weights(1000, "none") is None
    later = timestep_weights(1000, "later", multiplier=3.0, portion=0.25)
    assert later.sum().item() == pytest.approx(1.0)
    assert later[-250:].sum().item() == pytest.approx(0.5)  # 3*250 / (750 + 3*250)
    assert later[-1] == pytest.approx(3 * later[0])
    earlier = timestep_weights(1000, "earlier", multiplier=2.0, portion=0.1)
    assert earlier[0] == pytest.approx(2 * earlier[-1]) and earlier[99] > earlier[100]
    inside = timestep_weights(1000, "range", multiplier=1e9, begin=900, end=1000)
    assert inside[900:].sum().item() > 1 - 1e-6
    for bad in (dict(strategy="later", multiplier=0.0), dict(strategy="later", portion=1.5),
                dict(strategy="range", begin=10, end=5), dict(strategy="sideways")):
        with pytest.raises(ValueError, match="timestep_bias"):
            timestep_weights(1000, **bad)


def test_biased_timestep_draws_have_the_weighted_frequencies():
    latents = torch.zeros(1, 4, 8, 8)
    later = timestep_weights(1000, "later", multiplier=3.0, portion=0.25)
    g = torch.Generator().manual_seed(0)
    _, _, t = draw_diffusion_inputs(latents, 8000, 1000, [g], later)
    assert abs((t >= 750).float().mean().item() - 0.5) < 0.025  # uniform would give 0.25
    only_late = torch.zeros(1000, dtype=torch.float64)
    only_late[900:] = 1.0
    _, _, t = draw_diffusion_inputs(latents, 500, 1000, [g], only_late)
    assert t.min() >= 900


def test_engine_draws_each_examples_timesteps_from_its_weights():
    weights = torch.zeros(1000, dtype=torch.float64)
    weights[990:] = 1.0
    engine = make_engine("lora", timestep_weights=weights)
    data = engine.dataset
    latents, hidden = data.latents[:2], data.hidden[:2]
    engine.per_example_backward(latents, hidden, indices=[0, 1])
    batched = torch.cat([p.grad_sample.flatten(1) for p in engine.params], dim=1)
    for i in range(2):
        _, noise, t = draw_diffusion_inputs(latents[i : i + 1], 1, 1000, [example_generator(engine.seed, 0, i)], weights)
        assert t.item() >= 990
        alone = example_grad(engine.reference, engine, latents[i : i + 1], hidden[i : i + 1], noise, t)
        torch.testing.assert_close(batched[i], alone, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="timestep_weights must be 1000 non-negative weights"):
        make_engine("lora", timestep_weights=torch.ones(10))


def test_clipped_fraction_counts_the_examples_whose_own_gradient_exceeds_c():
    engine = make_engine("lora", lora_targets=["to_q", "to_k", "to_v", "to_out.0"], batch_size=4, physical_batch_size=2)
    norms = []
    for i in range(4):  # each example alone, on a plain copy, with the engine's draws of step 0
        latents = engine.dataset[i]["latents"][None]
        _, noise, t = draw_diffusion_inputs(latents, 1, 1000, [example_generator(engine.seed, 0, i)])
        norms.append(example_grad(engine.reference, engine, latents, engine.dataset[i]["encoder_hidden_states"][None],
                                  noise, t).norm().item())
    c = sorted(norms)[1] * 1.0001  # just above the second smallest: exactly two examples exceed C
    engine.max_grad_norm = c
    engine.optimizer.max_grad_norm = c
    assert engine._logical_step([0, 1, 2, 3]).clipped_fraction == pytest.approx(0.5)
    assert math.isnan(engine._logical_step([]).clipped_fraction)
    assert math.isnan(make_engine("lora", clipping="per_layer")._logical_step([0, 1]).clipped_fraction)


def test_a_c_far_above_the_gradients_is_reported_once(caplog):
    from dpdiff.training.loop import _ClipWatch
    from dpdiff.privacy.engine import StepStats

    watch = _ClipWatch(max_grad_norm=1.0, warn=True)
    with caplog.at_level("WARNING", logger="dpdiff.training.loop"):
        for step in range(1, 30):
            watch.add(StepStats(loss=0.1, num_examples=100, num_micro_batches=1, step=step, clipped_fraction=0.1))
    assert len(caplog.records) == 1 and "only 10% of the per-example gradients exceeded --max_grad_norm 1" in caplog.text
    caplog.clear()
    mostly_clipped = _ClipWatch(max_grad_norm=1.0, warn=True)
    with caplog.at_level("WARNING", logger="dpdiff.training.loop"):
        for step in range(1, 30):
            mostly_clipped.add(StepStats(loss=0.1, num_examples=100, num_micro_batches=1, step=step, clipped_fraction=0.9))
    assert not caplog.records


def test_each_step_rechecks_modes_changed_after_the_engine_was_built():
    """The engine finds its modules once, but each step still sees what changed since: an eval() in
    between (a validation grid) is undone before per-example gradients are taken, and gradient
    checkpointing switched on later is refused on Opacus hooks, as at construction."""
    engine = make_engine("attention", grad_sample_mode="hooks")
    engine.model.eval()
    engine._logical_step([0, 1, 2])
    assert all(m.training for m in engine.model.modules())
    assert engine.steps_taken == 1
    engine.model.enable_gradient_checkpointing()
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        engine._logical_step([0, 1, 2])
