"""Tiny vision-language models built from configs: real HF classes and processors, random weights.

Each builder saves a model folder with `save_pretrained` (safetensors) so tests load it back through
`vheads.models.load`, the same path a hub model takes. Query / key weights of the language model are
scaled up so attention is peaked and concentration is far from 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    VipLlavaConfig,
    VipLlavaForConditionalGeneration,
)

WORDS = ("USER : ASSISTANT what is in the image ? how many red blue circles squares are there of these "
         "yes no one two three four five 1 2 3 4 5 a an and . , < > [ ] 0 to at").split()
TEMPLATE = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")
QUESTIONS = ["how many red circles are there ?", "what is in the image ?", "are there blue squares ?"]


def word_tokenizer(extra_special: tuple[str, ...] = ("<image>",), **named: str) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with <pad> <s> </s> <unk>, the given added special tokens and named ones."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left", **named)
    fast.add_special_tokens({"additional_special_tokens": list(extra_special) + list(named.values())})
    return fast


def text_config(tokenizer: PreTrainedTokenizerFast, layers: int = 3, heads: int = 4, kv_heads: int = 2) -> LlamaConfig:
    """A small Llama with grouped-query attention."""
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)


def vision_config(image_size: int = 32, patch: int = 8) -> CLIPVisionConfig:
    """A small CLIP vision tower."""
    return CLIPVisionConfig(image_size=image_size, patch_size=patch, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2, projection_dim=32)


def sharpen(model: torch.nn.Module, factor: float = 20.0) -> None:
    """Scale the language model's q/k projections (and q/k norms, where the family has them) so attention is peaked."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "language_model" not in name:
                continue
            if "q_proj" in name or "k_proj" in name:
                param.mul_(factor)
            elif "q_norm" in name or "k_norm" in name:
                param.fill_(factor ** 0.5)


def _finish(model: torch.nn.Module, processor: object, tokenizer: PreTrainedTokenizerFast, out: Path) -> Path:
    torch.manual_seed(0)
    sharpen(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_llava(out: Path, pad_to_square: bool = True, strategy: str = "default") -> Path:
    """LLaVA-1.5 layout: CLIP 32px / 8px patches (16 tokens per image), pad-to-square processor."""
    torch.manual_seed(0)
    tok = word_tokenizer()
    from transformers import LlavaImageProcessor

    ip = LlavaImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_pad=pad_to_square,
                             do_center_crop=True)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy=strategy,
                          num_additional_image_tokens=1, chat_template=TEMPLATE)
    config = LlavaConfig(vision_config=vision_config(), text_config=text_config(tok),
                         image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy=strategy, image_seq_length=16, projector_hidden_act="gelu")
    return _finish(LlavaForConditionalGeneration(config), proc, tok, out)


def build_vipllava(out: Path) -> Path:
    """ViP-LLaVA layout: features of two vision layers, CLIP processor with resize + centre crop."""
    torch.manual_seed(0)
    tok = word_tokenizer()
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=TEMPLATE)
    config = VipLlavaConfig(vision_config=vision_config(), text_config=text_config(tok),
                            image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layers=[-2, -1],
                            projector_layernorm_eps=1e-5, image_seq_length=16)
    return _finish(VipLlavaForConditionalGeneration(config), proc, tok, out)


PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def build_llava_next(out: Path) -> Path:
    """LLaVA-NeXT layout: 32px tiles, anyres pinpoints up to 64x64 (up to 4 tiles + base), newline tokens."""
    torch.manual_seed(0)
    tok = word_tokenizer()
    ip = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 image_grid_pinpoints=PINPOINTS)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=TEMPLATE)
    config = LlavaNextConfig(vision_config=vision_config(), text_config=text_config(tok),
                             image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                             vision_feature_select_strategy="default", image_grid_pinpoints=PINPOINTS,
                             image_seq_length=16)
    return _finish(LlavaNextForConditionalGeneration(config), proc, tok, out)


def build_gemma3(out: Path) -> Path:
    """Gemma 3 layout: SigLIP tower pooled to 2x2 tokens, bidirectional attention among image tokens,
    sliding-window and global layers (a family vheads has no special adapter for)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    torch.manual_seed(0)
    tok = word_tokenizer((), boi_token="<start_of_image>", eoi_token="<end_of_image>",
                         image_token="<image_soft_token>")
    ip = Gemma3ImageProcessor(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<start_of_image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=template, image_seq_length=4)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          image_token_id=tok.convert_tokens_to_ids("<image_soft_token>"),
                          boi_token_id=tok.convert_tokens_to_ids("<start_of_image>"),
                          eoi_token_id=tok.convert_tokens_to_ids("<end_of_image>"))
    return _finish(Gemma3ForConditionalGeneration(config), proc, tok, out)


BUILDERS = {"llava": build_llava, "vipllava": build_vipllava, "llava_next": build_llava_next,
            "gemma3": build_gemma3}
