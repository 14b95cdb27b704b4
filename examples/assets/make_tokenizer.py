"""Build ``examples/assets/tokenizer.json``, the demo's tokenizer, offline with the ``tokenizers`` library.

    python examples/assets/make_tokenizer.py

A word-level vocabulary: the special tokens, the two task words ``reverse:`` and ``answer:`` and
one token per lowercase letter, so a word is spelled letter by letter.
"""

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
TASK_WORDS = ["reverse:", "answer:"]


def build_tokenizer() -> Tokenizer:
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + TASK_WORDS + list(string.ascii_lowercase))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("reverse:|answer:|."), behavior="isolated")]
    )
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


if __name__ == "__main__":
    path = Path(__file__).with_name("tokenizer.json")
    build_tokenizer().save(str(path))
    print(f"wrote {path}")
