"""Tiny models and data the tests build themselves: no hub, no network.

`corpus()` is a deterministic set of English-like sentences; `make_tokenizer()` trains a
WordPiece tokenizer on it; `make_bert()` / `make_roberta()` save a 2-layer encoder with
that tokenizer as a normal Hugging Face folder, and `make_mlm()` a masked LM sharing the
vocabulary (a generator for DiffCSE tests).
"""

from __future__ import annotations

import functools
import itertools
import random
from pathlib import Path

SUBJECTS = [
    "a man",
    "a woman",
    "the child",
    "two dogs",
    "a cat",
    "the team",
    "my friend",
    "an old farmer",
    "the students",
    "a young girl",
    "the police",
    "a chef",
]
VERBS = [
    "is playing",
    "is eating",
    "likes",
    "is watching",
    "bought",
    "is cutting",
    "plays with",
    "is riding",
    "cleans",
    "draws",
    "is reading",
    "carries",
]
OBJECTS = [
    "a guitar",
    "an apple",
    "the ball",
    "a horse",
    "the newspaper",
    "a red car",
    "some bread",
    "the piano",
    "a bicycle",
    "the onion",
    "a small boat",
    "the book",
]
PLACES = ["", " in the park", " at home", " on the street", " near the river", " today"]


def corpus(n: int | None = None, seed: int = 0) -> list[str]:
    """Template sentences (~10k distinct); shuffled deterministically, first `n` kept."""
    sents = [
        f"{s} {v} {o}{p} ." for s, v, o, p in itertools.product(SUBJECTS, VERBS, OBJECTS, PLACES)
    ]
    random.Random(seed).shuffle(sents)
    return sents[:n] if n else sents


def write_overlap_stsb(root: Path, n_sentences: int, seed: int = 9) -> Path:
    """A small STS-B dev set in the SentEval layout under `root`: consecutive corpus
    sentences paired, gold = the number of words the pair shares."""
    (root / "STSBenchmark").mkdir(parents=True)
    sents = corpus(n_sentences, seed=seed)
    rows = []
    for i in range(0, n_sentences, 2):
        a, b = sents[i], sents[i + 1]
        gold = len(set(a.split()) & set(b.split()))
        rows.append(f"main-captions\tMSRvid\t2012test\t{i:04d}\t{gold:.1f}\t{a}\t{b}")
    (root / "STSBenchmark" / "sts-dev.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def _wordpiece_vocab(vocab_size: int, specials: list[str]) -> dict[str, int]:
    """A WordPiece vocabulary built deterministically from `corpus()`: the special tokens,
    every character (alone and as a ##continuation), then the most frequent words, ties by
    spelling. The tokenizers library's WordPiece trainer breaks ties in hash order, so its
    vocabulary, and with it every tiny model's training curve, changed from run to run."""
    import collections
    import re

    words = collections.Counter(
        w for line in corpus() for w in re.findall(r"[^\W_]+|[^\w\s]|_", line.lower())
    )
    chars = sorted({c for w in words for c in w})
    tokens = [*specials, *chars, *("##" + c for c in chars)]
    for word, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(tokens) >= vocab_size:
            break
        if word not in tokens:
            tokens.append(word)
    return {token: i for i, token in enumerate(tokens)}


@functools.cache
def make_tokenizer(vocab_size: int = 200, style: str = "bert"):
    """A WordPiece (bert) or byte-level BPE (roberta) tokenizer trained on `corpus()`.

    Cached, so an encoder and its generator built in one session share one vocabulary
    object; the WordPiece vocabulary is also the same in every session (_wordpiece_vocab).
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    if style == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        vocab = _wordpiece_vocab(vocab_size, specials)
        tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.post_processor = processors.BertProcessing(
            ("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]"))
        )
        tok.decoder = decoders.WordPiece()
        return tok
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + 256,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>"))
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _hf_tokenizer(tok, style: str):
    from transformers import PreTrainedTokenizerFast

    names = (
        dict(
            cls_token="[CLS]",
            sep_token="[SEP]",
            pad_token="[PAD]",
            unk_token="[UNK]",
            mask_token="[MASK]",
        )
        if style == "bert"
        else dict(
            bos_token="<s>",
            eos_token="</s>",
            cls_token="<s>",
            sep_token="</s>",
            pad_token="<pad>",
            unk_token="<unk>",
            mask_token="<mask>",
        )
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **names)


def _config(style: str, vocab_size: int, pad_id: int, hidden: int, layers: int):
    from transformers import BertConfig, RobertaConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        pad_token_id=pad_id,
    )
    if style == "bert":
        return BertConfig(max_position_embeddings=128, **common)
    return RobertaConfig(max_position_embeddings=130, type_vocab_size=1, **common)


def make_encoder(
    out: Path, style: str = "bert", hidden: int = 32, layers: int = 2, seed: int = 0
) -> Path:
    """Save a randomly initialised 2-layer encoder (AutoModel) plus tokenizer to `out`."""
    import torch
    from transformers import AutoModel

    tok = _hf_tokenizer(make_tokenizer(style=style), style)
    torch.manual_seed(seed)
    config = _config(style, len(tok), tok.pad_token_id, hidden, layers)
    AutoModel.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)


def make_mlm(
    out: Path, style: str = "bert", hidden: int = 32, layers: int = 1, seed: int = 1
) -> Path:
    """Save a random masked LM with the same vocabulary as `make_encoder` (a test generator)."""
    import torch
    from transformers import AutoModelForMaskedLM

    tok = _hf_tokenizer(make_tokenizer(style=style), style)
    torch.manual_seed(seed)
    config = _config(style, len(tok), tok.pad_token_id, hidden, layers)
    AutoModelForMaskedLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)


def as_sentence_transformers(
    src: Path, dst: Path, pooling: str, normalize: bool = False, max_seq_length: int = 0
) -> Path:
    """A copy of the encoder folder `src` at `dst`, declared a sentence-transformers model."""
    import shutil

    from diffcse_runtime.pooling import write_st_modules

    shutil.copytree(src, dst)
    write_st_modules(dst, pooling, 32, normalize=normalize, max_seq_length=max_seq_length)
    return dst


def export_model_dir(hf_dir: Path, out: Path, max_seq_length: int = 128) -> Path:
    """Export an HF encoder folder's [CLS] state with diffcse_export (fp32, numeric parity
    gated, STS parity skipped for speed) and return the model directory."""
    from diffcse_export import ExportOptions, export_model

    export_model(hf_dir, out, ExportOptions(max_seq_length=max_seq_length, sts_data=None))
    return out
