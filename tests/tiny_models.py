"""Tiny vision-language models built from configs: real HF classes and processors, random weights.

Each builder saves a model folder with `save_pretrained` (safetensors) so tests load it back through
`vheads.models.load`, the same path a hub model takes. Query / key weights of the language model are
scaled up so attention is peaked and concentration is far from 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
            if "language_model" not in name and "text_model" not in name:
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




def chat_template(image: str) -> str:
    """A one-turn chat template that writes `image` for each image entry, as the family's own template does."""
    return ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}" + image +
            "\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")


def small_text(tok: PreTrainedTokenizerFast, **extra: object) -> dict:
    """The sizes of a small decoder as a config dict, with the tokenizer's special ids."""
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                **extra)


QWEN_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}


def _qwen_processor(processor_class: type, patch: int, tok: PreTrainedTokenizerFast) -> object:
    from transformers import Qwen2VLImageProcessorPil

    from vheads.models.processors import image_only

    factor = patch * 2
    ip = Qwen2VLImageProcessorPil(size={"shortest_edge": factor * factor * 4, "longest_edge": factor * factor * 20},
                                  patch_size=patch, merge_size=2, temporal_patch_size=2)
    return image_only(processor_class)(image_processor=ip, tokenizer=tok,
                                       chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"))


def _qwen_ids(tok: PreTrainedTokenizerFast) -> dict:
    ids = tok.convert_tokens_to_ids(list(QWEN_TOKENS))
    return dict(image_token_id=ids[0], video_token_id=ids[1], vision_start_token_id=ids[2], vision_end_token_id=ids[3])


def build_qwen2_vl(out: Path) -> Path:
    """Qwen2-VL layout: 8px patches merged 2x2, image size rounded to 16px, `<|image_pad|>` per merged cell."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    torch.manual_seed(0)
    tok = word_tokenizer(QWEN_TOKENS)
    proc = _qwen_processor(Qwen2VLProcessor, 8, tok)
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=small_text(tok, rope_parameters=MROPE), vision_config=vision, **_qwen_ids(tok))
    return _finish(Qwen2VLForConditionalGeneration(config), proc, tok, out)


def build_qwen2_5_vl(out: Path) -> Path:
    """Qwen2.5-VL layout: as Qwen2-VL, with windowed vision attention."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    torch.manual_seed(0)
    tok = word_tokenizer(QWEN_TOKENS)
    proc = _qwen_processor(Qwen2_5_VLProcessor, 8, tok)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=small_text(tok, rope_parameters=MROPE), vision_config=vision,
                              **_qwen_ids(tok))
    return _finish(Qwen2_5_VLForConditionalGeneration(config), proc, tok, out)


QWEN3_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                    deepstack_visual_indexes=[0])


def build_qwen3_vl(out: Path) -> Path:
    """Qwen3-VL layout: as Qwen2-VL, with interleaved multimodal rope and deepstack features."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    torch.manual_seed(0)
    tok = word_tokenizer(QWEN_TOKENS)
    proc = _qwen_processor(Qwen3VLProcessor, 8, tok)
    rope = {**MROPE, "mrope_interleaved": True}
    config = Qwen3VLConfig(text_config=small_text(tok, rope_parameters=rope), vision_config=QWEN3_VISION,
                           **_qwen_ids(tok))
    return _finish(Qwen3VLForConditionalGeneration(config), proc, tok, out)


def build_qwen3_5(out: Path) -> Path:
    """Qwen3.5 layout: Qwen3-VL vision; a hybrid decoder whose layers 0-2 are Gated DeltaNet (no softmax
    attention) and layer 3 softmax attention, twice over."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3VLProcessor

    torch.manual_seed(0)
    tok = word_tokenizer(QWEN_TOKENS)
    proc = _qwen_processor(Qwen3VLProcessor, 8, tok)
    rope = {**MROPE, "mrope_interleaved": True, "partial_rotary_factor": 1.0}
    layers = ["linear_attention", "linear_attention", "full_attention", "linear_attention", "full_attention"]
    text = small_text(tok, rope_parameters=rope, layer_types=layers, linear_conv_kernel_dim=4,
                      linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                      linear_num_value_heads=4)
    text["num_hidden_layers"] = len(layers)
    config = Qwen3_5Config(text_config=text, vision_config={k: v for k, v in QWEN3_VISION.items()
                                                             if k != "deepstack_visual_indexes"}, **_qwen_ids(tok))
    return _finish(Qwen3_5ForConditionalGeneration(config), proc, tok, out)


def build_glm4v(out: Path) -> Path:
    """GLM-4.1V layout: Qwen2-VL-like merged patches between `<|begin_of_image|>` and `<|end_of_image|>`."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration, Glm4vImageProcessorPil, Glm4vProcessor

    from vheads.models.processors import image_only

    torch.manual_seed(0)
    names = ("<|image|>", "<|video|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
             "<|end_of_video|>")
    tok = word_tokenizer(names)
    ip = Glm4vImageProcessorPil(size={"shortest_edge": 16 * 16 * 4, "longest_edge": 16 * 16 * 20}, patch_size=8,
                                merge_size=2, temporal_patch_size=2)
    proc = image_only(Glm4vProcessor)(image_processor=ip, tokenizer=tok,
                                      chat_template=chat_template("<|begin_of_image|><|image|><|end_of_image|>"))
    ids = tok.convert_tokens_to_ids(list(names))
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8,
                  image_size=32, spatial_merge_size=2, temporal_patch_size=2)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "partial_rotary_factor": 0.5}
    text = small_text(tok, rope_parameters={**rope, "mrope_section": [1, 1, 2]})
    config = Glm4vConfig(text_config=text, vision_config=vision, image_token_id=ids[0], video_token_id=ids[1],
                         image_start_token_id=ids[2], image_end_token_id=ids[3], video_start_token_id=ids[4],
                         video_end_token_id=ids[5])
    return _finish(Glm4vForConditionalGeneration(config), proc, tok, out)
def build_internvl(out: Path) -> Path:
    """InternVL layout: 32px tiles on the best aspect grid (up to 4) + a thumbnail, each pixel-shuffled to 4
    `<IMG_CONTEXT>` tokens, the whole image between `<img>` and `</img>`."""
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
    )

    from vheads.models.processors import image_only

    torch.manual_seed(0)
    tok = word_tokenizer((), start_image_token="<img>", end_image_token="</img>",
                         context_image_token="<IMG_CONTEXT>", video_token="<video>")
    ip = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                                  max_patches=4)
    proc = image_only(InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=4,
                                         chat_template=chat_template("<IMG_CONTEXT>"))
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=[32, 32], patch_size=[8, 8])
    text = {**small_text(tok), "model_type": "qwen2"}
    config = InternVLConfig(vision_config=vision, text_config=text, image_seq_length=4, downsample_ratio=0.5,
                            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    return _finish(InternVLForConditionalGeneration(config), proc, tok, out)


def build_llava_onevision(out: Path) -> Path:
    """LLaVA-OneVision layout: SigLIP 32px tiles, anyres pinpoints up to 64x64 with `anyres_max_9`, newlines."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
    )

    from vheads.models.processors import image_only

    torch.manual_seed(0)
    tok = word_tokenizer(("<image>", "<video>"))
    ip = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS)
    proc = image_only(LlavaOnevisionProcessor)(image_processor=ip, tokenizer=tok, num_image_tokens=16,
                                               vision_feature_select_strategy="full",
                                               chat_template=chat_template("<image>"))
    vision = dict(model_type="siglip_vision_model", image_size=32, patch_size=8, hidden_size=32,
                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = LlavaOnevisionConfig(vision_config=vision, text_config={**small_text(tok), "model_type": "qwen2"},
                                  image_token_index=tok.convert_tokens_to_ids("<image>"),
                                  video_token_index=tok.convert_tokens_to_ids("<video>"),
                                  vision_feature_select_strategy="full", image_grid_pinpoints=PINPOINTS)
    return _finish(LlavaOnevisionForConditionalGeneration(config), proc, tok, out)


IDEFICS_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>") + tuple(
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))


def _idefics_parts(tok: PreTrainedTokenizerFast) -> tuple[dict, dict]:
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    return vision, {**small_text(tok), "model_type": "llama"}


def build_smolvlm(out: Path) -> Path:
    """SmolVLM layout: the image split into row-major 32px crops (`<fake><row_i_col_j>` + 4 pixel-shuffled
    `<image>` tokens each), then the global image (`<fake><global-img>` + 4 tokens)."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil, SmolVLMProcessor

    from vheads.models.processors import image_only

    torch.manual_seed(0)
    tok = word_tokenizer(IDEFICS_TOKENS + ("<video>",))
    ip = SmolVLMImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                  do_image_splitting=True)
    proc = image_only(SmolVLMProcessor)(image_processor=ip, tokenizer=tok, video_processor=None, image_seq_len=4,
                                        chat_template=chat_template("<image>"))
    vision, text = _idefics_parts(tok)
    config = SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=2,
                           image_token_id=tok.convert_tokens_to_ids("<image>"))
    return _finish(SmolVLMForConditionalGeneration(config), proc, tok, out)


def build_idefics3(out: Path) -> Path:
    """Idefics3 layout: as SmolVLM (row-major crops + the global image, pixel-shuffled tokens)."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    torch.manual_seed(0)
    tok = word_tokenizer(IDEFICS_TOKENS)
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                   do_image_splitting=True)
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=chat_template("<image>"))
    vision, text = _idefics_parts(tok)
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=2,
                            image_token_id=tok.convert_tokens_to_ids("<image>"))
    return _finish(Idefics3ForConditionalGeneration(config), proc, tok, out)


def build_paligemma(out: Path) -> Path:
    """PaliGemma layout: `<image>` x 16 (one SigLIP grid of the 32px image), then `<bos>`, the prompt and a newline."""
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
    )

    torch.manual_seed(0)
    tok = word_tokenizer(())
    ip = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    ip.image_seq_length = 16
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, projection_dim=64)
    text = {**small_text(tok), "vocab_size": len(tok), "model_type": "gemma"}
    config = PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=64, hidden_size=64,
                             image_token_index=tok.convert_tokens_to_ids("<image>"), vocab_size=len(tok))
    return _finish(PaliGemmaForConditionalGeneration(config), proc, tok, out)


def pixtral_parts(size: int, merge: int) -> tuple[Any, Any, dict, dict]:
    """Tokenizer, processor, vision and text configs of a Pixtral-tower model: images up to `size` px in 8px
    patches merged `merge` x `merge`, one `[IMG]` per merged cell, `[IMG_BREAK]` per row, `[IMG_END]` last."""
    from transformers import PixtralImageProcessorPil

    from vheads.models.processors import PixtralProcessor

    tok = word_tokenizer(("[IMG]", "[IMG_BREAK]", "[IMG_END]"))
    ip = PixtralImageProcessorPil(size={"longest_edge": size}, patch_size=8)
    proc = PixtralProcessor(image_processor=ip, tokenizer=tok, patch_size=8, spatial_merge_size=merge,
                            chat_template=chat_template("[IMG]"))
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, head_dim=16, image_size=size, patch_size=8)
    text = {**small_text(tok), "model_type": "mistral", "sliding_window": None}
    return tok, proc, vision, text


def build_mistral3(out: Path) -> Path:
    """Mistral 3 / Pixtral layout: images up to 64px in 8px patches merged 2x2."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    tok, proc, vision, text = pixtral_parts(64, merge=2)
    config = Mistral3Config(vision_config=vision, text_config=text, spatial_merge_size=2,
                            image_token_index=tok.convert_tokens_to_ids("[IMG]"))
    return _finish(Mistral3ForConditionalGeneration(config), proc, tok, out)


BUILDERS = {
    "llava": build_llava, "vipllava": build_vipllava, "llava_next": build_llava_next, "gemma3": build_gemma3,
    "qwen2_vl": build_qwen2_vl, "qwen2_5_vl": build_qwen2_5_vl, "qwen3_vl": build_qwen3_vl, "qwen3_5": build_qwen3_5,
    "glm4v": build_glm4v, "internvl": build_internvl, "llava_onevision": build_llava_onevision,
    "smolvlm": build_smolvlm, "idefics3": build_idefics3, "paligemma": build_paligemma, "mistral3": build_mistral3,
}
