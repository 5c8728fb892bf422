"""Rebuild the embedded offline tokenizer: ``python -m pipefit.assets.build_tokenizer``.

A byte-level BPE (4096 tokens) trained on the Python reference documentation that
ships with CPython (``pydoc_data.topics``), so the default recipe needs no download.
Training is deterministic; the result is committed next to this file.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 4096
SPECIAL = ["<|endoftext|>", "<|pad|>"]
OUT = Path(__file__).parent / "tokenizer"


def pydoc_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(pydoc_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=4096,
    )
    fast.save_pretrained(OUT)
    print(f"saved {len(fast)} tokens to {OUT}")


if __name__ == "__main__":
    main()
