"""Empirical privacy audit: a LOWER bound on epsilon from one training run (`dpdiff audit`).

The accountant gives an upper bound on epsilon; nothing checks that the code really implements the
mechanism it accounts for (a clipping bug, noise added per micro-batch instead of per step, a
sensitivity of K*C...). The audit tests that from the outside, by the one-run method of Steinke,
Nasr & Jagielski (2023, "Privacy Auditing with One (1) Training Run"):

1. make m canaries: an out-of-distribution image whose caption embedding is a unique basis
   direction of the text-embedding space, one the private captions barely use ("Dirac" canaries); a SECRET coin per canary decides
   whether it joins the private training set (probability 1/2 each);
2. train exactly as `dpdiff finetune` does, on the latent cache (the DP mechanism's input): same
   accounting plan, same DP engine (Poisson sampling, clipping, noise, multiplicity);
3. score every canary by how far training moved the cross-attention key/value projections along
   ITS direction (no other canary's caption has a component there, the private captions little);
4. guess the top-k scores "member" and the bottom-k "non-member", count the correct guesses, and
   turn the count into the largest epsilon that an (epsilon, delta)-DP run would produce with
   probability below 1 - confidence (their Theorem: the guesses are at best randomized response).

Why not the denoising loss of image canaries? Measured here (tiny UNet, 30-60 steps): member and
non-member losses were indistinguishable even without noise (AUC 0.3-0.6): the model learns a
generic denoiser long before it memorises one image. The direction statistic gets 31 of 32 right.

If the lower bound ever exceeds the claimed epsilon, the implementation (or the accounting) is
wrong. A bound far below the claim is expected and says nothing: one weak attacker, few canaries.
A non-private run (`--non_private`: no noise, no effective clipping) shows the audit's power."""

from __future__ import annotations

import argparse
import math
import secrets
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dpdiff.errors import ConfigError, DPDiffError
from dpdiff.privacy.audit_bounds import (  # noqa: F401  (public API of dpdiff.audit)
    REFERENCE,
    count_correct,
    epsilon_lower_bound,
    guesses_from_scores,
    one_run_p_value,
)

AUDIT_FILE = "audit.json"
CANARY_KINDS = ("blocks", "noise")
DEFAULT_LEARNING_RATES = {"sgd": 1e-2, "adamw": 5e-4}


# ---- canaries ------------------------------------------------------------------------------

def draw_membership(num_canaries: int, audit_seed: int) -> np.ndarray:
    """The secret: which canaries are trained on, a fair coin each."""
    return np.random.default_rng([audit_seed, 0]).random(num_canaries) < 0.5


def make_canary_images(num_canaries: int, resolution: int, audit_seed: int, kind: str = "blocks"):
    """Out-of-distribution images: `blocks` (a random 4x4 black/white pattern, which survives resizing
    and the VAE) or `noise` (i.i.d. uniform pixels)."""
    from PIL import Image

    if kind not in CANARY_KINDS:
        raise ConfigError(f"canary kind {kind!r} is not one of {list(CANARY_KINDS)}")
    rng = np.random.default_rng([audit_seed, 1])
    images = []
    for _ in range(num_canaries):
        if kind == "blocks":
            cells = rng.integers(0, 2, size=(4, 4), dtype=np.uint8) * 255
            pixels = np.kron(cells, np.ones((resolution // 4 + 1,) * 2, dtype=np.uint8))[:resolution, :resolution]
        else:
            pixels = rng.integers(0, 256, size=(resolution, resolution), dtype=np.uint8)
        images.append(Image.fromarray(pixels).convert("RGB"))
    return images


def canary_directions(caption_embeddings, num_canaries: int):
    """m orthonormal directions of the text-embedding space along which the private captions have the
    LEAST energy (the bottom eigenvectors of their token second-moment matrix): [m, dim].

    Choosing canaries from the private data is allowed: the theorem only needs the membership coins
    to be independent of everything else."""
    import torch

    tokens = caption_embeddings.reshape(-1, caption_embeddings.shape[-1]).double()
    _, vectors = torch.linalg.eigh(tokens.T @ tokens)  # ascending eigenvalues
    return vectors[:, :num_canaries].T.float().contiguous()


def canary_contexts(directions, tokens: int, norm: float):
    """Canary i's caption embedding: every token = norm * u_i, a direction no other canary uses (a
    "Dirac" canary). Its gradient on a cross-attention key/value projection W then moves W only along
    u_i, so ||(W_T - W_0) u_i|| is a per-canary membership statistic (white-box, in the spirit of
    Steinke et al.'s gradient canaries)."""
    return (float(norm) * directions)[:, None, :].expand(-1, tokens, -1).contiguous()


def context_projections(unet) -> dict:
    """Trainable cross-attention key/value weights whose input is the caption embedding: name -> parameter
    (plain `attn2.to_k/to_v.weight`, or their LoRA `lora_A` factors)."""
    dim = unet.config.cross_attention_dim
    return {n: p for n, p in unet.named_parameters()
            if p.requires_grad and ".attn2.to_" in n and n.split(".attn2.")[1][:4] in ("to_k", "to_v")
            and p.ndim == 2 and p.shape[1] == dim}


def direction_scores(initial: dict, trained: dict, directions) -> np.ndarray:
    """sum over projections of ||(W_T - W_0) u_i||^2: how much training moved W along canary i's direction."""
    scores = np.zeros(len(directions))
    for name, before in initial.items():
        change = trained[name].detach().cpu().double() - before.double()
        scores += (change @ directions.double().T).pow(2).sum(dim=0).numpy()
    return scores


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class AuditResult:
    """What `dpdiff audit` reports (and writes to audit.json)."""

    epsilon_lower: float
    epsilon_claimed: float  # inf for a non-private run
    delta: float
    confidence: float
    num_canaries: int
    num_members: int
    num_guesses: int
    num_correct: int
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    num_examples: int  # private examples + member canaries
    method: str
    optimizer: str
    accountant: str | None
    canary_kind: str
    scores: list[float] = field(repr=False)
    membership: list[bool] = field(repr=False)
    reference: str = REFERENCE

    @property
    def consistent(self) -> bool:
        """False means the claimed guarantee is empirically refuted: a bug."""
        return self.epsilon_lower <= self.epsilon_claimed

    def to_dict(self) -> dict:
        d = asdict(self)
        d["epsilon_claimed"] = self.epsilon_claimed if math.isfinite(self.epsilon_claimed) else "inf"
        d["consistent"] = self.consistent
        return d


def check_audit_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Pure checks and defaults; no file, model or data touched yet."""
    from dpdiff.privacy import accounting

    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LEARNING_RATES[args.optimizer]
    if args.num_canaries is not None and args.num_canaries < 2:
        raise ConfigError(f"--num_canaries must be >= 2, got {args.num_canaries}")
    if args.num_guesses is not None and not (0 < args.num_guesses and (args.num_canaries is None or args.num_guesses <= args.num_canaries)):
        raise ConfigError(f"--num_guesses must be in 1..{args.num_canaries or 'num_canaries'} (the canaries), got {args.num_guesses}")
    if not 0 < args.confidence < 1:
        raise ConfigError(f"--confidence must be in (0, 1), got {args.confidence}")
    positive = {"batch_size": args.batch_size, "physical_batch_size": args.physical_batch_size, "max_steps": args.max_steps,
                "max_grad_norm": args.max_grad_norm, "learning_rate": args.learning_rate, "canary_scale": args.canary_scale}
    bad = {k: v for k, v in positive.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise ConfigError(f"these options must be finite and positive: {bad}")
    if args.physical_batch_size > args.batch_size:
        raise ConfigError(f"--physical_batch_size {args.physical_batch_size} > --batch_size {args.batch_size}; make it <= the logical batch")
    if not 0 <= args.cond_dropout < 1:
        raise ConfigError(f"--cond_dropout must be in [0, 1), got {args.cond_dropout}")
    if not args.non_private:
        accounting.check_epsilon(args.target_epsilon)
    accounting.validate_accountant(args.accountant)
    return args


def run_audit(args: argparse.Namespace) -> AuditResult:
    """Train once with secretly chosen canaries, score them, and bound epsilon from below."""
    import torch
    from tqdm.auto import tqdm

    from dpdiff.adapters import prepare_trainable
    from dpdiff.data import load_source
    from dpdiff.io import write_json
    from dpdiff.pipelines import load_pipeline
    from dpdiff.pipelines.preset import training_scheduler
    from dpdiff.privacy import accounting
    from dpdiff.privacy.engine import DPDiffusionEngine
    from dpdiff.training.latent_cache import LatentCache, build_latent_cache, encode_images
    from dpdiff.training.outputs import prepare_output_dir

    args = check_audit_arguments(args)
    output_dir = prepare_output_dir(args.output_dir, args.overwrite_output_dir, resuming=False)
    audit_seed = secrets.randbits(63) if args.audit_seed is None else int(args.audit_seed)
    torch.manual_seed(args.seed)

    source = load_source(args.dataset, "train", limit=args.max_train_samples, seed=args.seed)
    pipeline = load_pipeline(args.pretrained_model_name_or_path)
    if not hasattr(pipeline, "unet") or getattr(pipeline.unet.config, "addition_embed_type", None) is not None:
        raise ConfigError(
            f"the audit plants canaries in the text-conditioning of an SD-1.x/2.x UNet; {type(pipeline).__name__} "
            "has another conditioning. Audit the DP engine on an SD-format pipeline (e.g. dpdiff-tiny): the "
            "mechanism audited is the same for every family"
        )
    unet = pipeline.unet
    dim = unet.config.cross_attention_dim
    m = args.num_canaries or min(256, dim // 2)
    if m > dim:
        raise ConfigError(f"--num_canaries {m} > {dim}: each canary needs its own direction of the {dim}-d text embedding")
    if args.num_guesses is not None and args.num_guesses > m:
        raise ConfigError(f"--num_guesses must be in 1..{m} (the canaries), got {args.num_guesses}")
    resolution = unet.config.sample_size * pipeline.vae_scale_factor
    unet.train()
    prepare_trainable(unet, args.method, rank=args.rank, lora_alpha=args.lora_alpha,
                      target_modules=args.lora_target_modules, attention_start_index=args.attention_start_index)
    pipeline.vae.requires_grad_(False)
    pipeline.text_encoder.requires_grad_(False)
    probes = context_projections(unet)
    if not probes:
        raise ConfigError("the audit scores canaries on the cross-attention key/value projections, and none trains here; "
                          "use --method attention or full, or LoRA targets that include to_k or to_v")

    membership = draw_membership(m, audit_seed)
    members = torch.from_numpy(np.flatnonzero(membership))
    private = build_latent_cache(pipeline, source, resolution, args.cond_dropout, args.seed)
    latents = encode_images(pipeline.vae, make_canary_images(m, resolution, audit_seed, args.canary_kind), resolution,
                            show_progress=False)
    embeddings = private.conditions["encoder_hidden_states"]
    norm = args.canary_scale * float(embeddings[:-1].norm(dim=-1).mean())
    directions = canary_directions(embeddings, m)
    contexts = canary_contexts(directions, embeddings.shape[1], norm)[members]
    first = len(embeddings) - 1  # canary contexts go before the trailing empty prompt
    cache = LatentCache(
        latents=torch.cat([private.latents, latents[members]]),
        prompt_ids=torch.cat([private.prompt_ids, first + torch.arange(len(members))]),
        prompt_embeddings=torch.cat([embeddings[:-1], contexts, embeddings[-1:]]),
        labels=torch.cat([private.labels, torch.full((len(members),), -1, dtype=private.labels.dtype)]),
        cond_dropout=args.cond_dropout, seed=args.seed,
    )
    n = len(cache)
    if args.non_private:  # sigma 0: the accountant's epsilon is infinite; shows the attack's power
        if args.batch_size > n:
            raise ConfigError(f"batch_size={args.batch_size} > {n} training examples; use a batch size <= {n}")
        sigma, q, steps, claimed, accountant = 0.0, args.batch_size / n, args.max_steps, math.inf, None
    else:
        plan = accounting.plan(args.target_epsilon, args.delta, n, args.batch_size, max_steps=args.max_steps,
                               accountant=args.accountant)
        sigma, q, steps, claimed, accountant = plan.noise_multiplier, plan.sample_rate, plan.steps, plan.epsilon, plan.accountant

    initial = {name: p.detach().cpu().clone() for name, p in probes.items()}
    params = [p for p in unet.parameters() if p.requires_grad]
    # any optimizer is post-processing of the noisy gradient: the claimed guarantee covers it. SGD
    # keeps a canary's update along its own direction; Adam's per-coordinate scaling would blur it.
    optimizer = (torch.optim.SGD(params, lr=args.learning_rate) if args.optimizer == "sgd"
                 else torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0))
    engine = DPDiffusionEngine(
        unet, training_scheduler(pipeline), optimizer, cache,
        batch_size=args.batch_size, physical_batch_size=args.physical_batch_size, noise_multiplier=sigma,
        max_grad_norm=args.max_grad_norm, noise_multiplicity=args.noise_multiplicity,
        grad_sample_mode=args.grad_sample_mode, seed=args.seed, privacy_seed=args.privacy_seed,
    )
    for _ in tqdm(range(steps), desc="audit run"):
        cache.step = engine.steps_taken
        engine.step()
    scores = direction_scores(initial, dict(engine.model.named_parameters()), directions)

    guesses = guesses_from_scores(scores, args.num_guesses or m)
    made, correct = count_correct(guesses, membership)
    result = AuditResult(
        epsilon_lower=epsilon_lower_bound(m, made, correct, args.delta, args.confidence),
        epsilon_claimed=float(claimed), delta=float(args.delta), confidence=float(args.confidence),
        num_canaries=m, num_members=int(membership.sum()), num_guesses=made, num_correct=correct,
        noise_multiplier=float(sigma), max_grad_norm=float(args.max_grad_norm), sample_rate=float(q), steps=int(steps),
        num_examples=n, method=args.method, optimizer=args.optimizer, accountant=accountant, canary_kind=args.canary_kind,
        scores=[float(s) for s in scores], membership=[bool(b) for b in membership],
    )
    write_json(output_dir / AUDIT_FILE, result.to_dict())
    return result


# ---- the command -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `dpdiff audit`; training flags have the names and defaults of `dpdiff finetune`."""
    from dpdiff.pipelines.loading import PRESET_NAME
    from dpdiff.training.arguments import METHODS

    a = parser.add_argument
    a("--pretrained_model_name_or_path", default=PRESET_NAME, help="hub id, local pipeline folder, or 'dpdiff-tiny'")
    a("--dataset", default="fashion_mnist", help="the private set the canaries are hidden in")
    a("--max_train_samples", type=int, default=1000, help="a seeded subset of the private set (the audit trains once on it)")
    a("--method", choices=METHODS, default="attention", help="must train the cross-attention to_k/to_v (attention, full, or lora on them)")
    a("--rank", type=int, default=8)
    a("--lora_alpha", type=float, default=None)
    a("--lora_target_modules", nargs="+", default=None)
    a("--attention_start_index", type=int, default=0)
    a("--target_epsilon", type=float, default=10.0, help="the claim under audit; sigma is planned as in finetune")
    a("--non_private", action="store_true", help="no noise (epsilon = inf): shows the attack's power; pair with a large --max_grad_norm")
    a("--delta", type=float, default=1e-5)
    a("--accountant", choices=("prv", "rdp"), default="prv")
    a("--max_grad_norm", type=float, default=1.0)
    a("--noise_multiplicity", type=int, default=1)
    a("--grad_sample_mode", choices=("auto", "hooks", "ew", "functorch"), default="auto", help="auto: ew unless a convolution trains")
    a("--max_steps", type=int, default=500, help="logical DP-SGD steps")
    a("--batch_size", type=int, default=64)
    a("--physical_batch_size", type=int, default=64)
    a("--learning_rate", type=float, default=None, help="default: 1e-2 sgd, 5e-4 adamw")
    a("--optimizer", choices=("sgd", "adamw"), default="sgd", help="post-processing of the noisy gradient; SGD gives the audit most power")
    a("--cond_dropout", type=float, default=0.0, help="as in finetune (0 here: canaries always show their caption)")
    a("--num_canaries", type=int, default=None, help="m, each joins the training set with probability 1/2; default min(256, text-embedding width / 2)")
    a("--canary_kind", choices=CANARY_KINDS, default="blocks")
    a("--num_guesses", type=int, default=None, help="guesses (half member, half non-member); default all canaries. Fix it in advance")
    a("--canary_scale", type=float, default=10.0, help="canary caption-embedding norm, in units of the private captions' mean token norm")
    a("--confidence", type=float, default=0.95, help="the lower bound holds with this probability")
    a("--output_dir", default="dpdiff-audit", help="audit.json goes here")
    a("--overwrite_output_dir", action="store_true")
    a("--seed", type=int, default=0, help="public seed of initialisation, subset and diffusion draws")
    a("--privacy_seed", type=int, default=None, help="seed the secret sampling/noise (tests only)")
    a("--audit_seed", type=int, default=None, help="seed the secret canary coins (default: OS entropy)")


def format_table(r: AuditResult) -> str:
    claimed = f"{r.epsilon_claimed:.3f}" if math.isfinite(r.epsilon_claimed) else "inf (non-private)"
    rows = [
        (f"claimed epsilon ({r.accountant or 'no noise'}, delta={r.delta:g})", claimed),
        (f"empirical lower bound ({r.confidence:.0%} confidence)", f"{r.epsilon_lower:.3f}"),
        ("correct guesses", f"{r.num_correct} / {r.num_guesses}"),
        ("canaries (members)", f"{r.num_canaries} ({r.num_members})"),
        ("noise multiplier, clip norm", f"{r.noise_multiplier:.4g}, {r.max_grad_norm:g}"),
        ("method, optimizer", f"{r.method}, {r.optimizer}"),
        ("sample rate x steps", f"{r.sample_rate:.4g} x {r.steps}"),
        ("verdict", "consistent" if r.consistent else "REFUTED: the implementation leaks more than it claims"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    try:
        result = run_audit(args)
    except DPDiffError as e:
        print(f"dpdiff audit: error: {e}", file=sys.stderr)
        return 2
    print(f"dpdiff audit ({REFERENCE}):")
    print(format_table(result))
    print(f"wrote {Path(args.output_dir) / AUDIT_FILE}")
    return 0 if result.consistent else 1


__all__ = ["AuditResult", "add_arguments", "count_correct", "draw_membership", "epsilon_lower_bound", "format_table",
           "guesses_from_scores", "make_canary_images", "one_run_p_value", "run", "run_audit"]
