"""Build the embedded demo model from configs: a word-level tokenizer, a LLaVA processor and a small LLaVA."""

from __future__ import annotations

import string
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from vheads.data.shapes import IMAGE_SIZE as SHAPES_IMAGE_SIZE
from vheads.data.shapes import shapes_vocabulary

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
TEMPLATE_WORDS = ("user", "assistant", "system")

IMAGE_SIZE = SHAPES_IMAGE_SIZE
PATCH_SIZE = 16
VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4)
TEXT = dict(
    hidden_size=128, intermediate_size=344, num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=16
)

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def demo_words() -> list[str]:
    """The words of the demo tokenizer beyond the template words, digits and punctuation: ShapesQA's vocabulary."""
    return list(shapes_vocabulary())


def build_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer over `words`; numbers split into digits, punctuation isolated."""
    vocab: dict[str, int] = {}
    extra = [*TEMPLATE_WORDS, *string.digits, *string.punctuation]
    for word in [*SPECIAL_TOKENS, *extra, *(w.lower() for w in words)]:
        for piece in _pieces(word):
            vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        model_max_length=512,
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE]})
    return fast


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Split on whitespace, isolate punctuation and split numbers into single digits."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )


def _pieces(word: str) -> list[str]:
    """The pieces the pre-tokenizer cuts `word` into (a vocabulary entry may hold punctuation or numbers)."""
    if word in SPECIAL_TOKENS:
        return [word]
    return [piece for piece, _ in _pre_tokenizer().pre_tokenize_str(word)]


def build_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """A LLaVA processor whose image-token count equals the demo model's number of image features."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
    )


def build_config(tokenizer: PreTrainedTokenizerFast, tiny: bool = False) -> LlavaConfig:
    """The LLaVA config: a small CLIP vision tower (VISION) and a small Llama (TEXT); `tiny`: toy sizes for tests."""
    vision_sizes, text_sizes = (TINY_VISION, TINY_TEXT) if tiny else (VISION, TEXT)
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=vision_sizes["hidden_size"], **vision_sizes
    )
    ids = dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=False, **text_sizes, **ids
    )
    image_tokens = (IMAGE_SIZE // PATCH_SIZE) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
        **ids,
    )


def build_demo(
    seed: int = 0, words: Iterable[str] | None = None, tiny: bool = False
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A freshly initialised demo model and its processor (`words` defaults to the ShapesQA vocabulary)."""
    tokenizer = build_tokenizer(demo_words() if words is None else words)
    processor = build_processor(tokenizer)
    config = build_config(tokenizer, tiny)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        do_sample=False,
        max_new_tokens=4,
    )
    return model, processor
