"""The names and layout of a run folder: a contract that training writes and the hub, sampling, the model
card and the tuner read. One low room owns it, so none of them reaches into another for a file name.

    OUTPUT_DIR/
      pytorch_lora_weights.safetensors   LORA_FILE: the adapter (lora), diffusers' own file name
      unet/ or transformer/              DENOISER_DIRS: the trained denoiser (attention, full)
      condition_embedder.safetensors     EXTRA_WEIGHTS_NAME: a trained condition embedder beside the LoRA
      dpdiff_trainable.json              MANIFEST_NAME: which parameters trained
      privacy.json                       PRIVACY_FILE: the guarantee and how it was accounted
      generation_config.json             GENERATION_FILE: how to sample it (prompts, resolution, channels)
      training_config.yaml               TRAINING_CONFIG: the flags, replayable with --config
      README.md                          CARD_FILE: the model card
      samples.png, epsilon_curve.png     SAMPLE_IMAGES, PLOT_IMAGES"""

PRIVACY_FILE = "privacy.json"
GENERATION_FILE = "generation_config.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
UNET_DIR = "unet"
TRANSFORMER_DIR = "transformer"
DENOISER_DIRS = (UNET_DIR, TRANSFORMER_DIR)  # where attention/full runs keep the trained denoiser
EXTRA_WEIGHTS_NAME = "condition_embedder.safetensors"
MANIFEST_NAME = "dpdiff_trainable.json"
TRAINING_CONFIG = "training_config.yaml"
CARD_FILE = "README.md"
SAMPLE_IMAGES = ("samples.png",)
PLOT_IMAGES = ("epsilon_curve.png",)
