"""Small tokenizers of every family the GGUF export writes, trained offline on a multilingual corpus.

``family_tokenizer(name)`` for ``name`` in :data:`FAMILIES`; each is built the way its model
family's HF tokenizer is (the transformers tokenizer class where one builds from vocab + merges,
else ``tokenizers`` components with that family's split regex / post-processor), with a chat
template. ``TEXTS`` are held-out strings for tokenisation checks; ``CORPUS`` is what the
vocabularies are trained on. Nothing is downloaded.
"""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GemmaTokenizer, LlamaTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer

from lightning_fastft.export.gguf_tokenizer import _LLAMA3_SPLIT

CORPUS = [
    "the quick brown fox jumps over the lazy dog, again and again.",
    "Lightning makes fine-tuning fast and lean; adapters keep quality high.",
    "Quantised weights keep memory small: 4-bit, 5-bit and 6-bit blocks of 256 values.",
    "Der schnelle braune Fuchs springt über den faulen Hund. Größe, Übung, Straße.",
    "Le renard brun rapide saute par-dessus le chien paresseux. Où est l'été ? Déjà vu, très bien.",
    "El rápido zorro marrón salta sobre el perro perezoso. ¿Qué tal? ¡Mañana!",
    "Быстрая коричневая лиса прыгает через ленивую собаку. Привет, мир!",
    "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο.",
    "敏捷的棕色狐狸跳过了懒狗。你好，世界！机器学习很有趣。",
    "素早い茶色の狐がのろまな犬を飛び越える。こんにちは世界。",
    "def add(a, b):\n    return a + b  # numbers 12345 and 3.14159\n",
    "Emoji: 🚀🔥✨ and symbols like € £ ¥ © ® ™ — “quoted” ‘text’…",
    "Numbers 2024-11-23, 1,000,000 and 0.001; email me@example.com; path /usr/local/bin.",
    "Tabs\tand  double  spaces\nand new lines\n\nbetween paragraphs.",
] * 3

# Held-out text: unseen words and characters (byte fallback), whitespace runs, digits, code, emoji.
TEXTS = [
    "Hello world",
    "the lazy fox sleeps",
    " leading space and trailing space ",
    "Straßenbahn über München",
    "À bientôt, garçon ! Ça va ?",
    "¿Dónde está la biblioteca?",
    "Съешь же ещё этих мягких французских булок",
    "Καλημέρα κόσμε",
    "今天天气很好，我们去公园吧。",
    "東京タワーは高いです",
    "x = [i ** 2 for i in range(10)]\n\tprint(x)",
    "🤖 robots 🚀 rockets",
    "3.14159 + 2.71828 = 5.85987; 1234567890",
    "multiple   spaces\n\n\nand lines",
    "unseen: ẞ ø ŋ ħ ĳ ʕ ᚠ ℵ",
]

FAMILIES = ("gpt2", "llama3", "qwen2", "llama2", "mistral", "gemma", "wordlevel")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_CHAT = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_CHAT = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
MISTRAL_CHAT = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def _train_bpe(pre_tokenizer, special_tokens, vocab_size, byte_level):
    """A BPE ``Tokenizer`` trained on CORPUS with the given pre-tokenizer."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=not byte_level, unk_token=None if byte_level else "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [],
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def _vocab_merges(tokenizer: Tokenizer):
    spec = json.loads(tokenizer.to_str())["model"]
    return spec["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]


def _byte_level(pre_tokenizer, specials, bos, eos, add_bos, chat_template, vocab_size=700):
    tokenizer = _train_bpe(pre_tokenizer, specials, vocab_size, byte_level=True)
    tokenizer.decoder = decoders.ByteLevel()
    if add_bos:
        vocab = tokenizer.get_vocab()
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, chat_template=chat_template
    )


def _sentencepiece(cls, specials, chat_template, vocab_size=800, **kwargs):
    metaspace = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    vocab, merges = _vocab_merges(_train_bpe(metaspace, specials + BYTE_TOKENS, vocab_size, byte_level=False))
    return cls(vocab=vocab, merges=merges, chat_template=chat_template, **kwargs)


def wordlevel_tokenizer() -> PreTrainedTokenizerFast:
    """The demo's word-level tokenizer (``examples/assets/tokenizer.json``) with its special tokens."""
    path = Path(__file__).resolve().parents[1] / "examples" / "assets" / "tokenizer.json"
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path), bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )


@cache
def family_tokenizer(name: str):
    if name == "gpt2":
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        return _byte_level(pre, ["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", False, CHATML)
    if name == "llama3":
        pre = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        return _byte_level(pre, specials, "<|begin_of_text|>", "<|eot_id|>", True, LLAMA3_CHAT)
    if name == "qwen2":
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        pre = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        vocab, merges = _vocab_merges(_train_bpe(pre, specials, 700, byte_level=True))
        tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, chat_template=CHATML, eos_token="<|im_end|>")
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        return tokenizer
    if name in ("llama2", "mistral"):
        template = MISTRAL_CHAT if name == "mistral" else None
        return _sentencepiece(LlamaTokenizer, ["<unk>", "<s>", "</s>"], template, add_bos_token=True)
    if name == "gemma":
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
        tokenizer = _sentencepiece(GemmaTokenizer, specials, GEMMA_CHAT, add_bos_token=True)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        return tokenizer
    if name == "wordlevel":
        return wordlevel_tokenizer()
    raise ValueError(f"unknown tokenizer family {name!r}; one of {FAMILIES}")


if __name__ == "__main__":  # print what each family makes of the texts
    for family in sys.argv[1:] or FAMILIES:
        tok = family_tokenizer(family)
        print(family, len(tok), tok(TEXTS[0])["input_ids"])
