"""Model card and hub push on a real tiny LoRA run folder (only the hub's HTTP calls are replaced)."""

import json
import os

import pytest
from huggingface_hub import HfApi, ModelCard
from PIL import Image

from dpdiff.errors import ConfigError, PrivacyError
from dpdiff.hub import check_hub_ready, files_to_upload, push_to_hub, write_model_card
from dpdiff.model_card import round_up
from dpdiff.pipelines.preset import build_tiny_unet

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SECRET = "hf_dpdiffTESTtokenNEVERwritten1234567890"
PRIVACY = {
    "epsilon": 7.90123, "delta": 1e-5, "accountant": "prv", "noise_multiplier": 1.1, "max_grad_norm": 1.0,
    "sample_rate": 0.0042, "steps": 2000, "noise_multiplicity": 4, "batch_size": 256, "num_examples": 60000,
    "neighbouring_relation": "add/remove one example", "method": "lora", "trainable_parameters": 98304,
    "base_model": "someorg/tiny-sd", "dataset": "fashion_mnist",
    # the rest of what dpdiff.training.outputs.privacy_record writes
    "unit_of_privacy": "one training image together with its label/caption", "privacy_seed": None,
    "noise_source": "OS entropy", "ledger": {"steps": [1, 2]}, "versions": {"opacus": "1.6.0"}, "force_delta": False,
}


@pytest.fixture
def run_dir(tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = build_tiny_unet()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian")
    unet.add_adapter(config)
    d = tmp_path / "run"
    StableDiffusionPipeline.save_lora_weights(
        str(d), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True,
    )
    (d / "privacy.json").write_text(json.dumps(PRIVACY))
    (d / "generation_config.json").write_text(json.dumps({
        "base_model": "someorg/tiny-sd", "method": "lora", "class_names": ["t-shirt", "trouser"],
        "class_prompts": ["a photo of a t-shirt", "a photo of a trouser"], "resolution": 32, "channels": 1,
        "guidance_scale": 2.0, "num_inference_steps": 25,
    }))
    (d / "training_config.yaml").write_text("method: lora\nrank: 4\n")
    Image.new("RGB", (36, 36), (90, 90, 90)).save(d / "samples.png")
    Image.new("RGB", (64, 48), (255, 255, 255)).save(d / "epsilon_curve.png")
    (d / "checkpoints" / "step_100").mkdir(parents=True)
    (d / "checkpoints" / "step_100" / "state.safetensors").write_bytes(b"x")
    (d / "latent_cache.safetensors").write_bytes(b"private latents")
    (d / ".pytorch_lora_weights.safetensors.abc.tmp").write_bytes(b"x")
    return d


def test_card_states_the_guarantee_and_parses_back(run_dir):
    path = write_model_card(run_dir, repo_id="me/dp-lora-fmnist", license="apache-2.0")
    card = ModelCard.load(path)
    data = card.data.to_dict()
    for tag in ("differential-privacy", "lora", "dpdiff", "diffusers", "text-to-image"):
        assert tag in data["tags"]
    assert data["base_model"] == "someorg/tiny-sd" and data["library_name"] == "diffusers"
    assert data["license"] == "apache-2.0"
    text = card.text
    assert "(ε, δ) = (7.91, 0.00001)" in text  # rounded up, never down
    assert "`7.90123`" in text and "`1e-05`" in text and "`1.1`" in text and "`0.0042`" in text and "`2000`" in text
    assert "add/remove one example" in text and "one training image together with its label/caption" in text
    assert "hyperparameter tuning on the private data" in text and "base model's own training data" in text
    assert 'DiffusionPipeline.from_pretrained("someorg/tiny-sd")' in text and 'pipe.load_lora_weights("me/dp-lora-fmnist")' in text
    assert "![synthetic samples](samples.png)" in text and "Warning" not in text


def test_round_up_never_understates():
    for v in (0.7381234, 7.0000001, 1.2345e-5, 2980.957987, 3.0):
        assert float(round_up(v)) >= v
    assert round_up(0.7381234) == "0.739" and round_up(3.0) == "3"


def test_card_refuses_real_data_images_and_incomplete_records(run_dir):
    Image.new("RGB", (8, 8)).save(run_dir / "real_samples.png")
    with pytest.raises(PrivacyError, match="real_samples.png"):
        write_model_card(run_dir, images=["samples.png", "real_samples.png"])
    record = dict(PRIVACY)
    del record["noise_multiplier"]
    (run_dir / "privacy.json").write_text(json.dumps(record))
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        write_model_card(run_dir)


def test_weak_delta_is_flagged(run_dir):
    (run_dir / "privacy.json").write_text(json.dumps({**PRIVACY, "num_examples": 1000, "delta": 0.01}))
    assert "Warning" in write_model_card(run_dir).read_text()


def test_upload_allow_list_leaves_out_checkpoints_caches_and_temp_files(run_dir):
    uploaded, left_out = files_to_upload(run_dir)
    assert set(uploaded) == {"privacy.json", "generation_config.json", "training_config.yaml", "pytorch_lora_weights.safetensors",
                             "samples.png", "epsilon_curve.png"}  # no README yet
    assert "latent_cache.safetensors" in left_out and "checkpoints/step_100/state.safetensors" in left_out


def test_push_to_hub_calls_and_token_never_written(run_dir, monkeypatch):
    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create", (self.token, repo_id, kw)) and f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.setdefault("upload", (self.token, kw)))
    url = push_to_hub(run_dir, "me/dp-lora-fmnist", token=SECRET, private=True)
    assert url == "https://huggingface.co/me/dp-lora-fmnist"
    token, repo_id, kw = calls["create"]
    assert (token, repo_id, kw["private"], kw["exist_ok"]) == (SECRET, "me/dp-lora-fmnist", True, True)
    token, kw = calls["upload"]
    assert token == SECRET and kw["repo_id"] == "me/dp-lora-fmnist" and kw["folder_path"] == str(run_dir)
    assert "checkpoints/*" in kw["ignore_patterns"] and "*.tmp" in kw["ignore_patterns"]
    assert "README.md" in kw["allow_patterns"] and not any("cache" in p for p in kw["allow_patterns"])
    assert "7.90123" in kw["commit_message"]
    assert 'load_lora_weights("me/dp-lora-fmnist")' in (run_dir / "README.md").read_text()
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_missing_token_and_bad_repo_id_are_refused(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no saved login
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ConfigError, match="no Hugging Face token"):
        check_hub_ready("me/repo")
    assert check_hub_ready("me/repo", SECRET) == SECRET
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert check_hub_ready("me/repo") == SECRET
    with pytest.raises(ConfigError, match="owner/name") as e:
        check_hub_ready("not a repo", SECRET)
    assert SECRET not in str(e.value)


def test_push_refused_before_any_upload_without_token(run_dir, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    called = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: called.append(1))
    with pytest.raises(ConfigError):
        push_to_hub(run_dir, "me/repo")
    assert not called and not (run_dir / "README.md").exists()


def test_fixed_noise_seed_is_flagged_and_never_pushed(run_dir, monkeypatch):
    record = {**PRIVACY, "privacy_seed": 3, "noise_source": "fixed seed (NOT private: tests only)"}
    (run_dir / "privacy.json").write_text(json.dumps(record))
    assert "NOT private" in write_model_card(run_dir).read_text()
    called = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: called.append(1))
    with pytest.raises(PrivacyError, match="fixed seed"):
        push_to_hub(run_dir, "me/repo", token=SECRET)
    assert not called


def test_mepf_card(tmp_path):
    d = tmp_path / "mepf"
    (d / "generator").mkdir(parents=True)
    (d / "generator" / "model.safetensors").write_bytes(b"x")
    (d / "privacy.json").write_text(json.dumps({
        "method": "mepf", "epsilon": 1.0, "delta": 1e-5, "accountant": "gaussian", "noise_multiplier": 5.0,
        "max_grad_norm": 1.0, "num_examples": 59990.3, "neighbouring_relation": "add/remove one example",
        "dataset": "fashion_mnist", "releases": [{"name": "mean"}],
    }))
    (d / "generation_config.json").write_text(json.dumps({
        "method": "mepf", "class_names": ["a", "b"], "class_prompts": ["a", "b"], "resolution": 28, "channels": 1}))
    card = ModelCard.load(write_model_card(d, repo_id="me/mepf"))
    assert "dp-mepf" in card.data.tags and "Gaussian" in card.text and 'snapshot_download("me/mepf")' in card.text
    assert "(ε, δ) = (1, 0.00001)" in card.text


def test_bare_repo_name_gets_the_token_owner(run_dir, monkeypatch):
    calls = {}
    monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **k: {"name": "alice"})
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create", repo_id))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.setdefault("upload", kw["repo_id"]))
    push_to_hub(run_dir, "dp-lora-fmnist", token=SECRET)
    assert calls == {"create": "alice/dp-lora-fmnist", "upload": "alice/dp-lora-fmnist"}
    assert 'load_lora_weights("alice/dp-lora-fmnist")' in (run_dir / "README.md").read_text()
