"""A tiny random llama plus a character-level tokenizer, saved with save_pretrained so that Ray workers load it
through the ordinary ``HookedModel.from_pretrained(folder)`` path (no network, no pickled models)."""

from __future__ import annotations

from pathlib import Path

CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()"


def char_tokenizer():
    """A PreTrainedTokenizerFast with one token per character (ids < 96, pad 0, bos 1, eos 2, unk 3)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")


def save_tiny_model(folder: str | Path, arch: str = "llama") -> str:
    """Save ``tests.models.tiny_model(arch)`` and the char tokenizer to ``folder``; return the folder."""
    from tests.models import tiny_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tiny_model(arch).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return str(folder)


def prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` short prompts of varied lengths (3..20 characters)."""
    import random

    rng = random.Random(seed)
    return ["".join(rng.choice(CHARS[:27]) for _ in range(rng.randint(3, 20))) for _ in range(n)]


def tiny_hooked(**_: object):
    """Model factory for workers (``"tests.distributed.tiny:tiny_hooked"``): the same tiny llama, built in memory."""
    from easyroutine_dist.hooked_model import HookedModel
    from tests.models import tiny_model

    return HookedModel(tiny_model("llama"), char_tokenizer(), model_name="tiny-llama-factory")
