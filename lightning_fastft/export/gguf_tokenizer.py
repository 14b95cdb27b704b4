"""The tokenizer of a GGUF file: a Hugging Face fast tokenizer as llama.cpp's vocabulary metadata.

llama.cpp re-implements a few tokenizer families rather than reading ``tokenizer.json``; each HF
tokenizer is written as the family that tokenises like it (checked against the real llama.cpp in
``tests/test_gguf_llamacpp.py``):

================================  ====================  ========================================
HF tokenizer                      ``tokenizer.ggml``    what carries the behaviour
================================  ====================  ========================================
byte-level BPE, GPT-2 regex       ``gpt2`` / ``gpt-2``  merges (always written, even when empty)
byte-level BPE, Llama-3 regex     ``gpt2`` /            the ``pre`` name selects llama.cpp's
                                  ``llama-bpe``         copy of the split regex
byte-level BPE, Qwen2 regex       ``gpt2`` / ``qwen2``
SentencePiece-style BPE (byte     ``llama``             scores (merge order), BYTE/UNKNOWN/
fallback, ``▁`` for spaces:                             CONTROL types, ``add_space_prefix`` as
Llama 2, Mistral, Gemma)                                the Metaspace / normaliser prepends
WordLevel (like the demo's)       ``whitespace``        one-character entries NORMAL, longer
                                                        ones USER_DEFINED (llama.cpp cuts them
                                                        out of the text first); whitespace
                                                        dropped, as a whitespace split does
================================  ====================  ========================================

BOS/EOS/UNK/PAD ids come from the tokenizer; ``add_bos_token`` / ``add_eos_token`` are what the
tokenizer really does (a probe text encoded with and without special tokens), and the chat
template is carried. Anything else (Unigram, WordPiece, other split regexes, a byte-level
``add_prefix_space``) raises :class:`NotImplementedError` naming it, before a byte is written.

Where llama.cpp itself behaves differently from HF (no metadata changes it):

* a WordLevel vocabulary has no unknown-character rule in llama.cpp: characters outside it are
  dropped there where HF yields the unknown token (:func:`write_tokenizer` warns);
* SentencePiece: llama.cpp always prepends "▁" when ``add_space_prefix`` is set, HF's Metaspace
  (``prepend_scheme="first"``) not to a text that already starts with a space;
* llama.cpp's whole-sequence detokeniser removes the space before ``?!.,`` for the ``gpt-2`` and
  ``llama-bpe`` pre-tokenizers (as HF's ``clean_up_tokenization`` would; transformers 5 skips that
  for BPE); token-by-token pieces, which generation streams, are unaffected.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import gguf

# The split regexes of the byte-level BPE families llama.cpp knows, as they appear in tokenizer.json,
# by the ``tokenizer.ggml.pre`` name that selects llama.cpp's copy of them.
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BYTE_LEVEL_PRE = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
_SPACE_MARK = "\u2581"  # SentencePiece's "▁"
_PROBE = "probe text"  # encoded with and without special tokens to see which the tokenizer adds


class GGUFWriter(gguf.GGUFWriter):
    """``gguf.GGUFWriter`` that also writes an empty typed array (the GGUF format and llama.cpp accept
    one; the writer refuses it, and llama.cpp refuses a BPE vocabulary whose merges key is absent)."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            return (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


@dataclass(frozen=True)
class VocabFamily:
    """How a HF tokenizer is written: llama.cpp's tokenizer model and pre-tokenizer names."""

    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre
    add_space_prefix: bool | None = None  # SentencePiece only


def _components(spec: dict | None) -> list[dict]:
    """A normaliser / pre-tokenizer spec flattened (``Sequence`` members in order)."""
    if not spec:
        return []
    if spec["type"] == "Sequence":
        members = spec.get("pretokenizers", spec.get("normalizers", []))
        return [leaf for member in members for leaf in _components(member)]
    return [spec]


def _pattern(spec: dict) -> str:
    pattern = spec["pattern"]
    return pattern.get("Regex", pattern.get("String")) if isinstance(pattern, dict) else pattern


def vocab_family(tokenizer_json: dict) -> VocabFamily:
    """llama.cpp's family for a ``tokenizer.json``; NotImplementedError naming what has none."""
    model = tokenizer_json["model"]
    kind = model["type"]
    normalizers = _components(tokenizer_json.get("normalizer"))
    pre_tokenizers = _components(tokenizer_json.get("pre_tokenizer"))
    pre_types = [p["type"] for p in pre_tokenizers]
    if kind == "WordLevel":
        return VocabFamily("whitespace", "whitespace")
    if kind != "BPE":
        raise NotImplementedError(
            f"GGUF tokenizer export handles BPE (byte-level or SentencePiece-style) and WordLevel vocabularies, "
            f"not {kind}"
        )
    metaspace = [p for p in pre_tokenizers if p["type"] == "Metaspace"]
    space_to_mark = any(
        n["type"] == "Replace" and _pattern(n) == " " and n["content"] == _SPACE_MARK for n in normalizers
    )
    if model.get("byte_fallback") or metaspace or space_to_mark:
        if not (metaspace or space_to_mark):
            raise NotImplementedError("GGUF export: a byte-fallback BPE must map spaces to '▁' (SentencePiece style)")
        prepends = any(n["type"] == "Prepend" and n["prepend"] == _SPACE_MARK for n in normalizers) or any(
            m.get("prepend_scheme", "always" if m.get("add_prefix_space") else "never") != "never" for m in metaspace
        )
        return VocabFamily("llama", "default", add_space_prefix=prepends)
    byte_level = [p for p in pre_tokenizers if p["type"] == "ByteLevel"]
    if not byte_level:
        raise NotImplementedError(
            f"GGUF export: a BPE tokenizer without a ByteLevel or Metaspace pre-tokenizer has no llama.cpp "
            f"counterpart (pre-tokenizers {pre_types})"
        )
    if byte_level[0].get("add_prefix_space"):
        raise NotImplementedError("GGUF export: llama.cpp has no byte-level BPE that adds a prefix space")
    splits = [p for p in pre_tokenizers if p["type"] == "Split"]
    others = [t for t in pre_types if t not in ("Split", "ByteLevel")]
    if not splits and not others and byte_level[0].get("use_regex", True):
        return VocabFamily("gpt2", "gpt-2")
    if len(splits) == 1 and not others and not byte_level[0].get("use_regex", True):
        pre = _BYTE_LEVEL_PRE.get(_pattern(splits[0]))
        if pre is not None:
            return VocabFamily("gpt2", pre)
        raise NotImplementedError(
            f"GGUF export: llama.cpp knows no pre-tokenizer with the split regex {_pattern(splits[0])!r}"
        )
    raise NotImplementedError(f"GGUF export: llama.cpp knows no byte-level BPE pre-tokenizer like {pre_types}")


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def add_special_flags(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS, as the tokenizer really behaves (not as its config claims)."""
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos and full[1 : len(plain) + 1] == plain
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos and full[-len(plain) - 1 : -1] == plain
    return add_bos, add_eos


def write_tokenizer(writer: GGUFWriter, tokenizer, vocab_size: int) -> None:
    """Write ``tokenizer``'s vocabulary (padded to the model's ``vocab_size`` with unused tokens), types,
    scores, merges, special ids, add-BOS/EOS flags and chat template."""
    tokenizer_json = check_tokenizer(tokenizer, vocab_size)
    family = vocab_family(tokenizer_json)
    model = tokenizer_json["model"]
    vocab = tokenizer.get_vocab()
    id_to_token = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    special_ids = set(tokenizer.all_special_ids)
    merges = _merges(model)
    # SentencePiece-style scores: llama.cpp merges the adjacent pair whose joined token scores highest;
    # the token a BPE merge produces scores by that merge's rank, so the merge order is kept.
    merge_rank = {}
    for rank, merge in enumerate(merges):
        merge_rank.setdefault(merge.replace(" ", ""), rank)
    unk_id = tokenizer.unk_token_id

    tokens, scores, token_types = [], [], []
    for token_id in range(vocab_size):
        text = id_to_token.get(token_id)
        score = 0.0
        if text is None:
            text, token_type = f"[PAD{token_id}]", gguf.TokenType.UNUSED
        elif token_id in special_ids or (text in added and added[text].special):
            token_type = (
                gguf.TokenType.UNKNOWN if token_id == unk_id and family.model == "llama" else gguf.TokenType.CONTROL
            )
        elif text in added:
            token_type = gguf.TokenType.USER_DEFINED
        elif family.model == "llama" and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            token_type = gguf.TokenType.BYTE
        elif family.model == "whitespace" and not (len(text) == 1 and text.isascii() and text.isprintable()):
            token_type = gguf.TokenType.USER_DEFINED  # cut out of the text before the (merge-free) BPE pass
        else:
            token_type = gguf.TokenType.NORMAL
            score = -float(merge_rank.get(text, -1) + 1)
        tokens.append(text)
        token_types.append(token_type)
        scores.append(score)

    writer.add_tokenizer_model(family.model)
    writer.add_tokenizer_pre(family.pre)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    # written even when empty (add_token_merges skips an empty list); needs this module's GGUFWriter
    writer.add_key_value(
        gguf.Keys.Tokenizer.MERGES, merges, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING
    )
    if family.add_space_prefix is not None:
        writer.add_add_space_prefix(family.add_space_prefix)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    add_bos, add_eos = add_special_flags(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)
    if family.model == "whitespace":
        warnings.warn(
            "export_gguf: a WordLevel vocabulary is written as llama.cpp's 'whitespace' tokenizer, which drops "
            f"characters outside the vocabulary where Hugging Face yields {tokenizer.unk_token!r}",
            stacklevel=3,
        )


def check_tokenizer(tokenizer, vocab_size: int) -> dict:
    """The parsed ``tokenizer.json`` of a HF fast tokenizer whose family llama.cpp has and whose ids fit
    the model's ``vocab_size`` embedding rows; raises before anything is written otherwise."""
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise NotImplementedError(
            "GGUF tokenizer export needs a Hugging Face fast tokenizer (tokenizer.json); wrap a tokenizers.Tokenizer "
            "in transformers.PreTrainedTokenizerFast(tokenizer_object=..., bos_token=..., eos_token=...)"
        )
    tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab_family(tokenizer_json)
    largest = max(tokenizer.get_vocab().values())
    if largest >= vocab_size:
        raise ValueError(
            f"GGUF export: the tokenizer has token id {largest}, the model's vocab_size is {vocab_size} "
            "(llama.cpp needs one embedding row per token)"
        )
    return tokenizer_json
