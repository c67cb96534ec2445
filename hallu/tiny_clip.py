"""A tiny random CLIP (``transformers.CLIPModel`` + ``CLIPProcessor``) for the clip judge's tests and demo.

Built like the tiny VLMs of :mod:`hallu.tiny`: real classes from configs, a byte-level BPE tokenizer
trained on the built-in corpus, weights drawn from ``seed`` (same arguments, same files). The text
tower pools the end-of-text token, so the tokenizer wraps every text as ``<s> ... </s>`` and pads on
the right, as CLIP's own tokenizer does; texts hold at most ``max_text_tokens`` tokens (77, CLIP's).
"""

from __future__ import annotations

from pathlib import Path

from hallu.tiny import build_tokenizer

IMAGE_SIZE = 32
PATCH = 8
MAX_TEXT_TOKENS = 77


def build_tiny_clip(out_dir: str | Path, *, seed: int = 0, projection_dim: int = 16) -> dict:
    """Write a loadable tiny CLIP folder to ``out_dir``; return a summary (sizes, token limit)."""
    import torch
    from tokenizers import processors
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out_dir = Path(out_dir)
    tok = build_tokenizer(add_bos=False, padding_side="right", model_max_length=MAX_TEXT_TOKENS)
    bos, eos = tok.bos_token, tok.eos_token
    # CLIP pools the hidden state at the end-of-text token: every text must end with one.
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, tok.bos_token_id), (eos, tok.eos_token_id)],
    )
    text = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=MAX_TEXT_TOKENS, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, projection_dim=projection_dim,
    )  # fmt: skip
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, projection_dim=projection_dim,
    )  # fmt: skip
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    ip = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                               crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = CLIPProcessor(image_processor=ip, tokenizer=tok)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return {"model_type": "clip", "image_size": IMAGE_SIZE, "patch_size": PATCH, "projection_dim": projection_dim,
            "max_text_tokens": MAX_TEXT_TOKENS, "seed": seed, "path": str(out_dir)}
