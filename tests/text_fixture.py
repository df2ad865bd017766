"""A small tokenizer in the Hub's file format, built by the tests (the real one is not
downloadable here): byte-level BPE trained on a few sentences, ChatML special tokens
(`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`), and a ChatML chat template in
tokenizer_config.json, the shape of MiMo's files."""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Trainium runs the experts; the router picks eight of them for every token.",
    "Sliding windows keep the last keys, and sinks soak up the rest of the attention.",
    "héllo wörld, naïve café: ünïcödé text survives byte-level tokens ✓",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_tokenizer(path, vocab_size: int = 400, chat_template: str | None = CHAT_TEMPLATE,
                    generation_eos=None) -> Tokenizer:
    """tokenizer.json, tokenizer_config.json (and generation_config.json if `generation_eos`)."""
    os.makedirs(path, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": None,
              "add_bos_token": False}
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    if generation_eos is not None:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": generation_eos}, f)
    return tokenizer
