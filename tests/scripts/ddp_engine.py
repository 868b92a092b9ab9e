"""Launched by tests/test_distributed.py under `accelerate launch --multi_gpu --num_processes 2`.

Accelerate only sets up the process group (gloo on CPU); the engine wraps with Opacus' distributed
pieces. Rank 0 also replays every step single-process on the union of both ranks' examples.
Writes a JSON summary to argv[1]."""

import json
import sys

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from dpdiff.adapters import prepare_trainable
from dpdiff.pipelines.preset import SCHEDULER_CONFIG, build_tiny_unet
from dpdiff.privacy.engine import DPDiffusionEngine


class LatentCache(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(1)
        self.latents, self.hidden = torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 6, 64, generator=g)

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return {"latents": self.latents[i], "encoder_hidden_states": self.hidden[i]}


def family_cache(pipe, family, n):
    """Random latents + one family's real conditioning (prompts through its tiny frozen encoders)."""
    from dpdiff.training.latent_cache import LatentCache

    g = torch.Generator().manual_seed(1)
    keys = [i % 3 for i in range(n)] if family.conditioning == "label" else [f"prompt {i % 3}" for i in range(n)]
    channels = family.latent_channels(family.denoiser(pipe))
    return LatentCache.per_example(torch.randn(n, channels, 8, 8, generator=g), family.encode_conditions(pipe, keys, 32))


# a dpdiff.pipelines.tiny_families name, or "unet" / none: the preset UNet; then the trained subset (lora | attention)
FAMILY_BUILD = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "unet" else None
METHOD = sys.argv[3] if len(sys.argv) > 3 else "lora"


def build(distributed, noise_multiplier, rank_seed):
    if FAMILY_BUILD is None:
        unet, family, scheduler, data = build_tiny_unet(seed=0), None, DDPMScheduler(**SCHEDULER_CONFIG), LatentCache(24)
    else:
        from dpdiff.families import family_for_pipeline
        from dpdiff.pipelines.tiny_families import build_tiny_family_pipeline

        pipe = build_tiny_family_pipeline(FAMILY_BUILD)
        family = family_for_pipeline(pipe)
        unet, scheduler, data = family.denoiser(pipe), family.training_scheduler(pipe), family_cache(pipe, family, 24)
        family.train_mode(unet)
    torch.manual_seed(rank_seed)  # a different LoRA init per rank: DPDDP must broadcast rank 0's
    prepare_trainable(unet, METHOD, family=family, **({"rank": 4} if METHOD == "lora" else {}))
    with torch.no_grad():  # LoRA B starts at 0 (A then gets no gradient): give both factors a gradient
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    params = [p for p in unet.parameters() if p.requires_grad]
    return DPDiffusionEngine(
        unet, scheduler, torch.optim.SGD(params, lr=1.0), data,
        batch_size=6, physical_batch_size=2, noise_multiplier=noise_multiplier, max_grad_norm=1e-2,
        noise_multiplicity=2, privacy_seed=0, distributed=distributed, family=family,
    )


def flat(engine):
    return torch.cat([p.detach().flatten() for p in engine.params]).clone()


def gather(obj):
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def main(out_path):
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    result = {"world_size": world, "backend": torch.distributed.get_backend() if world > 1 else None}
    engine = build(True, 0.0, rank_seed=rank)
    single = build(False, 0.0, rank_seed=0) if rank == 0 else None
    starts = gather(flat(engine))
    result["same_start"] = bool(all(torch.equal(starts[0], s) for s in starts))

    # noise 0: Poisson steps, plus one step where rank 1 has no examples (it must not hang)
    diffs, per_rank_counts = [], []
    for step in range(4):
        if step < 3:
            mine = [engine.shard[i] for i in next(iter(engine._sampler))]
        else:
            mine = [0, 2] if rank == 0 else []
        stats = engine._logical_step(mine)
        everyone = gather(mine)
        per_rank_counts.append([len(x) for x in everyone])
        if rank == 0:
            single._logical_step(sorted(i for x in everyone for i in x))
            diffs.append(float((flat(engine) - flat(single)).abs().max()))
        assert stats.num_examples == len(mine)
    params = gather(flat(engine))
    result["max_diff_vs_single"] = max(diffs) if rank == 0 else None
    result["update_norm"] = float((params[0] - flat(build(False, 0.0, 0))).norm()) if rank == 0 else None
    result["identical_across_ranks"] = bool(all(torch.equal(params[0], p) for p in params))
    result["counts"] = per_rank_counts

    # noise on: drawn once in total (rank 0), so empty steps on all ranks move params by sigma*C/B
    noisy = build(True, 3.0, rank_seed=rank)
    before = flat(noisy)
    noisy._logical_step([])
    noise = (before - flat(noisy)) * noisy.batch_size
    result["noise_std_over_sigma_c"] = float(noise.std() / (3.0 * 1e-2))
    noisy.step()
    params = gather(flat(noisy))
    result["noisy_identical_across_ranks"] = bool(all(torch.equal(params[0], p) for p in params))
    state = noisy.state_dict()  # a collective: every rank's generator states
    result["state_ranks"] = len(state["ranks"])
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    accelerator.wait_for_everyone()
    # tear gloo down before interpreter exit: left to the destructors, its threads can abort a rank
    # ("terminate called without an active exception") after all the work is done
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
