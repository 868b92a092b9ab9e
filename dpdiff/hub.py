"""Share a run on the Hugging Face hub: the weights, their privacy record and the model card.

What is uploaded is an allow-list (weights, privacy.json, generation_config.json, training_config.yaml,
README.md, the synthetic grid and the epsilon plot), not "the folder minus some junk": a latent cache or a grid of
real images left in the output folder must never reach the hub by accident. Checkpoints and temp
files are never uploaded.

The token is checked before training starts (`check_hub_ready`), so a long DP run does not end in
an authentication error; it is handed to HfApi only and never printed or written."""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from pathlib import Path
from typing import Sequence

from dpdiff.errors import ConfigError, PrivacyError
from dpdiff.model_card import REAL_DATA_NAME, build_model_card, predictable_noise, write_model_card
from dpdiff.run_files import (CARD_FILE, GENERATION_FILE, LORA_FILE, PLOT_IMAGES, PRIVACY_FILE, SAMPLE_IMAGES, TRAINING_CONFIG,
                              TRANSFORMER_DIR, UNET_DIR)
from dpdiff.sampling.records import HUB_ID, read_run

logger = logging.getLogger(__name__)

UPLOAD_PATTERNS = (
    CARD_FILE,
    PRIVACY_FILE,
    GENERATION_FILE,
    TRAINING_CONFIG,  # the run's flags (never the token)
    LORA_FILE,
    f"{UNET_DIR}/*",
    f"{TRANSFORMER_DIR}/*",
    "dpdiff_trainable.json",  # names of the trained parameters (adapters.py)
    "adapter_config.json",  # the peft LoraConfig of PixArt/DiT adapters (families/peft_export.py)
    "condition_embedder.safetensors",  # --train_condition_embedder with lora (adapters.py)
    "generator/*",  # DP-MEPF: the generator, the DP release it was trained on, its flags
    "release.safetensors",
    "mepf_config.json",
    *SAMPLE_IMAGES,
    *PLOT_IMAGES,
)
REPO_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")  # a bare name lives under the token's user
NEVER_UPLOAD = ("checkpoints/*", "checkpoint/*", "*.tmp", ".*", "*/.*")


def resolve_token(token: str | None = None) -> str:
    """The explicit token, else HF_TOKEN, else the one saved by `hf auth login`."""
    if token:
        return token
    env = os.environ.get("HF_TOKEN")
    if env:
        return env
    import huggingface_hub

    saved = huggingface_hub.get_token()
    if saved:
        return saved
    raise ConfigError(
        "no Hugging Face token: pass --hub_token, set the HF_TOKEN environment variable, or run `hf auth login` "
        "(needed to push the trained adapter; checked before training so the run is not wasted)"
    )


def check_hub_ready(repo_id: str, token: str | None = None) -> str:
    """Fail fast (before training) on a malformed repo id or a missing token; returns the token."""
    if not isinstance(repo_id, str) or not (HUB_ID.match(repo_id) or REPO_NAME.match(repo_id)):
        raise ConfigError(f"hub repo id {repo_id!r} is not 'owner/name' or 'name' (letters, digits, '-', '_', '.')")
    return resolve_token(token)


def files_to_upload(run_dir: str | os.PathLike, extra_patterns: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """(uploaded, left out) relative paths of the run folder, by the allow-list."""
    root = Path(run_dir)
    allow = (*UPLOAD_PATTERNS, *extra_patterns)
    uploaded, left_out = [], []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        ok = any(fnmatch.fnmatch(rel, pat) for pat in allow) and not any(fnmatch.fnmatch(rel, pat) for pat in NEVER_UPLOAD)
        (uploaded if ok else left_out).append(rel)
    return uploaded, left_out


def push_to_hub(
    run_dir: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    license: str = "other",
    commit_message: str | None = None,
    extra_patterns: Sequence[str] = (),
) -> str:
    """Create `repo_id` if needed and upload the run with a fresh model card; returns the repo URL.

    `extra_patterns` adds files to the allow-list deliberately (e.g. "eval/*.json"); a pattern
    whose name suggests real data is refused."""
    token = check_hub_ready(repo_id, token)
    suspicious = [p for p in extra_patterns if REAL_DATA_NAME.search(p)]
    if suspicious:
        raise ConfigError(f"refusing to upload {suspicious}: the names suggest real or cached training data")
    run = read_run(run_dir, strict_privacy=True)
    fixed = predictable_noise(run.privacy)
    if fixed:
        raise PrivacyError(f"refusing to publish {run.path}: its noise came from a fixed seed ({fixed}), so it is not private")

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    if "/" not in repo_id:  # the card's snippet needs the full id
        repo_id = f"{api.whoami()['name']}/{repo_id}"
    write_model_card(run.path, repo_id=repo_id, license=license)
    uploaded, left_out = files_to_upload(run.path, extra_patterns)
    if left_out:
        logger.info("not uploaded (not on the allow-list): %s", ", ".join(left_out))
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    eps, delta = run.privacy["epsilon"], run.privacy["delta"]
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(run.path),
        repo_type="model",
        allow_patterns=[*UPLOAD_PATTERNS, *extra_patterns],
        ignore_patterns=list(NEVER_UPLOAD),
        commit_message=commit_message or f"dpdiff {run.method} run, (epsilon, delta) = ({eps}, {delta})",
    )
    logger.info("pushed %d files to %s", len(uploaded), url)
    return str(url)


__all__ = ["build_model_card", "check_hub_ready", "files_to_upload", "push_to_hub", "resolve_token", "write_model_card"]
