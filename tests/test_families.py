"""Every model family on a tiny random-weight build of its stock pipeline: per-example gradients equal
a one-example loop, and a short DP run leaves what the family's stock diffusers pipeline loads."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dpdiff.adapters import prepare_trainable
from dpdiff.families import family_for_pipeline
from dpdiff.families.base import UNCONDITIONAL_PROMPT
from dpdiff.pipelines.tiny_families import FAMILY_BUILDS, build_tiny_family_pipeline, save_tiny_family_pipeline
from dpdiff.privacy.diffusion_loss import example_generator
from dpdiff.privacy.engine import DPDiffusionEngine
from dpdiff.training.arguments import finetune_args
from dpdiff.training.latent_cache import LatentCache
from dpdiff.training.loop import finetune

PROMPTS = ["a photo of a shirt", "a photo of a boot", "a sketch of a bag"]
RESOLUTION = 32  # the tiny builds: 32 px images, 8x8 latents
EXPECTED_FAMILY = {"sd15": "sd", "sd2": "sd", "sdxl": "sdxl", "pixart_alpha": "pixart", "pixart_sigma": "pixart",
                   "sd3": "sd3", "flux": "flux", "sana": "sana", "dit": "dit"}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the tiny models run 20-40x slower with 2 threads on 2 shared cores


def family_inputs(pipe, family, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    if family.conditioning == "label":
        keys = [1, 4, 7][:n]
    else:
        keys = PROMPTS[:n]
    conditions = family.encode_conditions(pipe, keys + [-1 if family.conditioning == "label" else UNCONDITIONAL_PROMPT],
                                          RESOLUTION)
    conditions = {k: v[:n] for k, v in conditions.items()}
    channels = family.latent_channels(family.denoiser(pipe))
    latents = torch.randn(n, channels, 8, 8, generator=g)
    return latents, conditions


def randomise_lora_b(model):
    """LoRA B starts at 0, which zeroes A's gradient: move it so both factors are checked."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))


@pytest.mark.parametrize("build", FAMILY_BUILDS)
@pytest.mark.parametrize("method", ["lora", "attention"])
def test_per_example_gradients_equal_a_one_example_loop(build, method):
    pipe = build_tiny_family_pipeline(build)
    family = family_for_pipeline(pipe)
    assert family.name == EXPECTED_FAMILY[build]
    denoiser = family.denoiser(pipe)
    family.train_mode(denoiser)
    prepare_trainable(denoiser, method, rank=2, family=family, attention_start_index=1 if method == "attention" else 0)
    randomise_lora_b(denoiser)
    reference = copy.deepcopy(denoiser)
    latents, conditions = family_inputs(pipe, family)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    k = 2  # noise multiplicity: the K draws are averaged inside each example before clipping
    engine = DPDiffusionEngine(denoiser, family.training_scheduler(pipe), torch.optim.SGD(params, lr=1.0),
                               LatentCache.per_example(latents, conditions), batch_size=3, physical_batch_size=3, noise_multiplier=0.0,
                               max_grad_norm=1.0, noise_multiplicity=k, privacy_seed=0, family=family)
    generators = [example_generator(0, 0, i) for i in range(3)]
    noise, timesteps = engine.objective.draw(latents, k, generators)
    engine.per_example_backward(latents, conditions, noise, timesteps)
    batched = torch.cat([p.grad_sample.flatten(1) for p in engine.params], dim=1)
    assert batched.shape[0] == 3
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    for i in range(3):
        reference.zero_grad(set_to_none=True)
        rows = slice(i * k, (i + 1) * k)
        one = {name: value[i : i + 1].repeat_interleave(k, dim=0) for name, value in conditions.items()}
        loss = engine.objective.per_row_loss(lambda x, t: family.predict(reference, x, t, one),
                                             latents[i : i + 1].repeat_interleave(k, dim=0), noise[rows], timesteps[rows])
        loss.mean().backward()
        alone = torch.cat([p.grad.flatten() for p in ref_params])
        assert alone.abs().max() > 0
        torch.testing.assert_close(batched[i], alone, rtol=1e-4, atol=1e-7)
    # an empty Poisson batch still steps; with sigma = 0 nothing moves (the dummy row contributes exactly 0)
    before = [p.detach().clone() for p in engine.params]
    stats = engine._logical_step([])
    assert stats.num_examples == 0 and engine.steps_taken == 1
    assert all(torch.equal(a, p) for a, p in zip(before, engine.params))


def tiny_run(base, out, method):
    return finetune(finetune_args(
        method=method, pretrained_model_name_or_path=str(base), output_dir=str(out), dataset="fashion_mnist",
        max_train_samples=16, batch_size=4, physical_batch_size=4, max_steps=2, delta=1e-2, target_epsilon=10.0,
        num_inference_steps=2, checkpointing_steps=0, privacy_seed=1, rank=2, resolution=RESOLUTION, ema_decay=0.0,
        learning_rate=5e-2, max_grad_norm=1.0, attention_start_index=0,
    ))


def sample(pipe, family, seed=0):
    images = family.generate(pipe, [PROMPTS[0]], [1], generator=torch.Generator().manual_seed(seed),
                             num_inference_steps=2, guidance_scale=1.0, resolution=RESOLUTION, output_type="np")
    return np.asarray(images)


@pytest.mark.parametrize("build", FAMILY_BUILDS)
def test_a_dp_lora_run_leaves_an_adapter_the_stock_pipeline_loads(build, tmp_path):
    from diffusers import DiffusionPipeline

    from dpdiff.families.peft_export import load_peft_lora

    base = save_tiny_family_pipeline(build, tmp_path / "base")
    result = tiny_run(base, tmp_path / "run", "lora")
    assert result.record["steps"] == 2 and result.record["family"] == EXPECTED_FAMILY[build]
    assert result.record["epsilon"] <= 10.0
    pipe = DiffusionPipeline.from_pretrained(base)
    family = family_for_pipeline(pipe)
    before = sample(pipe, family)
    if family.stock_lora_loader:  # exactly what a user of the hub adapter does
        pipe.load_lora_weights(str(tmp_path / "run"))
    else:  # PixArt/DiT pipelines have no LoRA loader: plain peft
        load_peft_lora(pipe.transformer, tmp_path / "run")
    after = sample(pipe, family)
    assert np.isfinite(after).all() and np.abs(after - before).max() > 1e-4
    # `dpdiff sample` goes through the same loader; the model card tells a user how to load it
    from dpdiff.sampling.generate import sample_dataset

    synthetic = sample_dataset(tmp_path / "run", tmp_path / "synthetic", num_per_class=1, num_inference_steps=2)
    assert len(list((synthetic / "train").glob("*.png"))) == 10
    card = (tmp_path / "run" / "README.md").read_text()
    assert family.usage_load_lora("REPO").split("REPO")[0].splitlines()[-1] in card
    # what --push_to_hub uploads is everything the loader needs
    from dpdiff.hub import files_to_upload

    uploaded = files_to_upload(tmp_path / "run")[0]
    assert "pytorch_lora_weights.safetensors" in uploaded
    assert family.stock_lora_loader or "adapter_config.json" in uploaded


@pytest.mark.parametrize("build", FAMILY_BUILDS)
def test_a_dp_attention_run_leaves_a_denoiser_folder_from_pretrained_loads(build, tmp_path):
    from diffusers import DiffusionPipeline

    base = save_tiny_family_pipeline(build, tmp_path / "base")
    result = tiny_run(base, tmp_path / "run", "attention")
    family = family_for_pipeline(result.pipeline)
    trained = family.denoiser(result.pipeline)
    folder = tmp_path / "run" / family.denoiser_attr
    reloaded = type(trained).from_pretrained(folder)
    for (name, p), q in zip(trained.state_dict().items(), reloaded.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)
    original = family.denoiser(DiffusionPipeline.from_pretrained(base))
    names = set(result.record_names) if hasattr(result, "record_names") else None
    changed = [n for (n, p), q in zip(original.state_dict().items(), reloaded.state_dict().values()) if not torch.equal(p, q)]
    assert changed and all(n.startswith(tuple(b for b, _ in family.attention_blocks(original))) for n in changed), names


def test_an_unsupported_pipeline_folder_gets_one_error_naming_the_supported_families(tmp_path):
    from dpdiff.errors import ConfigError
    from dpdiff.pipelines import resolve_model_path

    base = save_tiny_family_pipeline("sd15", tmp_path / "kandinsky")
    index = base / "model_index.json"
    index.write_text(index.read_text().replace('"StableDiffusionPipeline"', '"KandinskyV22Pipeline"'))
    with pytest.raises(ConfigError, match=r"'KandinskyV22Pipeline' is not supported.*FluxPipeline.*StableDiffusionXLPipeline"):
        resolve_model_path(str(base))


def test_a_flux_resolution_that_does_not_pack_into_2x2_patches_is_refused(tmp_path):
    from dpdiff.errors import ConfigError

    base = save_tiny_family_pipeline("flux", tmp_path / "flux")
    args = dict(pretrained_model_name_or_path=str(base), output_dir=str(tmp_path / "run"), dataset="fashion_mnist",
                max_train_samples=8, batch_size=4, max_steps=1, delta=1e-2, physical_batch_size=4, resolution=36)
    with pytest.raises(ConfigError, match="multiple of 8"):
        finetune(finetune_args(**args))
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_flow_matching_loss_matches_a_hand_computation():
    """x_s = (1 - s) x0 + s eps, target eps - x0, sigma = timestep / 1000 on the scheduler's shifted grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dpdiff.families.objectives import FlowMatchingObjective

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    objective = FlowMatchingObjective(scheduler)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 3, generator=g)
    noise, timesteps = objective.draw(x0, 1, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    # every drawn timestep is a point of the scheduler's training grid, and sigma = t / 1000 is its sigma
    grid = scheduler.timesteps.tolist()
    assert all(float(t) in grid for t in timesteps)
    sigma_of = dict(zip(scheduler.timesteps.tolist(), scheduler.sigmas[:-1].tolist()))
    weights = torch.tensor([[0.5]])
    seen = {}

    def predict(noisy, t):
        seen["noisy"] = noisy
        return weights * noisy

    losses = objective.per_row_loss(predict, x0, noise, timesteps)
    for i in range(2):
        s = sigma_of[float(timesteps[i])]
        noisy = (1 - s) * x0[i] + s * noise[i]
        torch.testing.assert_close(seen["noisy"][i], noisy)
        expected = ((0.5 * noisy - (noise[i] - x0[i])) ** 2).mean()
        torch.testing.assert_close(losses[i], expected)
    # weights on the last timestep indices = the noisiest part of the grid, as for DDPM timesteps
    later = torch.zeros(1000, dtype=torch.float64)
    later[900:] = 1.0
    _, t = objective.draw(x0[:1], 500, [torch.Generator().manual_seed(3)], later)
    assert float((t / 1000).min()) > 0.9


def test_a_flow_weighting_scheme_on_a_ddpm_family_is_refused_not_ignored(tmp_path):
    from dpdiff.errors import ConfigError

    base = save_tiny_family_pipeline("sd15", tmp_path / "sd")
    args = dict(pretrained_model_name_or_path=str(base), output_dir=str(tmp_path / "run"), dataset="fashion_mnist",
                max_train_samples=8, batch_size=4, max_steps=1, delta=1e-2, physical_batch_size=4,
                weighting_scheme="logit_normal")
    with pytest.raises(ConfigError, match="flow-matching families"):
        finetune(finetune_args(**args))
