"""Tiny random-weight text encoders and offline-built tokenizers for the tiny family pipelines.

Every tokenizer here is made from scratch (no hub, no sentencepiece file) and tokenizes ANY prompt:
  * CLIP: dpdiff's byte-level BPE (`dpdiff.pipelines.tokenizer.build_tokenizer`);
  * T5:   a stock `T5TokenizerFast` over a Unigram vocab of characters and a few common words
          (characters outside printable ASCII map to <unk>, as in a real T5 vocab);
  * Gemma: a stock `GemmaTokenizerFast` (BPE with byte fallback: every UTF-8 byte has a token).
"""

from __future__ import annotations

import string

from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from dpdiff.pipelines.tokenizer import build_tokenizer

# Public, generic words only: they shape the merges / word pieces of the tiny vocabularies.
TOKENIZER_CORPUS = [
    "a photo of a cat", "a photo of a dog", "a painting of a house on a hill",
    "an airplane in the sky", "a red car on the street", "a bird sitting on a tree",
    "a small boat at sea", "a horse in a green field", "a deer in the forest",
    "a frog on a leaf", "a truck on the road", "a close up picture of the face",
    "high quality, detailed, digital art", "black and white sketch",
]

CLIP_MAX_LENGTH = 32


def build_clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    return build_tokenizer(TOKENIZER_CORPUS, model_max_length=model_max_length)


def build_clip_text_encoder(tokenizer: CLIPTokenizer, hidden_size: int = 32, projection_dim: int = 32,
                            with_projection: bool = False, hidden_act: str = "quick_gelu"):
    """CLIPTextModel (pooler_output = hidden_size) or CLIPTextModelWithProjection (text_embeds = projection_dim)."""
    config = CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=projection_dim,
        hidden_act=hidden_act,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def build_t5_tokenizer(model_max_length: int = 32) -> T5TokenizerFast:
    """T5's layout (<pad>=0, </s>=1, <unk>=2) over a Unigram vocab: characters, "▁"+character, common words."""
    chars = [c for c in string.printable if not c.isspace()]
    words = sorted({w for line in TOKENIZER_CORPUS for w in line.replace(",", " ").split()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -6.0) for c in chars] + [("▁" + c, -5.0) for c in chars]
    vocab += [("▁" + w, -3.0) for w in words if len(w) > 1]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def build_t5_encoder(tokenizer: T5TokenizerFast, d_model: int = 32) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def build_gemma_tokenizer(model_max_length: int = 32) -> GemmaTokenizerFast:
    """Gemma's layout (<pad>=0, <eos>=1, <bos>=2, <unk>=3, <mask>=4), 256 byte-fallback tokens, ASCII characters."""
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁"] + [c for c in string.printable if not c.isspace()]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    # like Gemma: <bos> first; Sana pads on the right (its pipeline also sets this before tokenizing)
    return GemmaTokenizerFast(vocab=vocab, merges=[], add_bos_token=True, model_max_length=model_max_length,
                              padding_side="right")


def build_gemma2_encoder(tokenizer: GemmaTokenizerFast, hidden_size: int = 32) -> Gemma2Model:
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Gemma2Model(config)
