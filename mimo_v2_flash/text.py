"""Text in, text out: the checkpoint's tokenizer and chat template beside the token-level model.

```python
tokenizer = TextTokenizer.from_dir(path)              # tokenizer.json + tokenizer_config.json
text = generate_text(model, tokenizer, "Hello", max_new_tokens=32, on_text=print_now)
reply = generate_text(model, tokenizer, [{"role": "user", "content": "Hi"}], chat=True)
```

`MiMoV2FlashModel.generate` stays token-in/token-out; `generate_text` runs the same generation
loop (`model.generation_loop`) on one prompt, decodes the continuation as it grows and hands
each new piece of text to `on_text` (streaming). Generation stops at the first of:
`max_new_tokens`, an end-of-turn token (`TextTokenizer.stop_token_ids`: the config's
`eos_token_id`, tokenizer_config's `eos_token`, generation_config.json's `eos_token_id`, and
ChatML's `<|im_end|>` when the vocabulary has it as a special token, since the chat template
closes every turn with it), or a stop string (the text is cut before it). Special tokens are
left out of the decoded text.

The chat template is Jinja, as the Hub's tokenizer_config.json (or chat_template.jinja) writes it,
rendered in a sandbox with the conventions such templates expect: trimmed blocks, loop controls,
`raise_exception`, a `tojson` that keeps non-ASCII text, `strftime_now`, and the special tokens
as variables (`bos_token`, `eos_token`, ...).

`tokenizers` and `jinja2` are imported when a tokenizer is loaded, not with the package.
"""

from __future__ import annotations

import json
import os
from datetime import datetime

import numpy as np

from .jsonfile import read_json

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
# ChatML (MiMo's chat format) ends every turn with this token.
CHATML_END_OF_TURN = "<|im_end|>"
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class TokenizerError(ValueError):
    """A missing or unreadable tokenizer; the message names the directory and file."""


def _token_text(value) -> str | None:
    """tokenizer_config writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class TextTokenizer:
    def __init__(self, tokenizer, tokenizer_config: dict, chat_template: str | None,
                 generation_eos: list[int], source: str):
        self.tokenizer = tokenizer
        self.source = source
        self.special_tokens = {key: _token_text(tokenizer_config.get(key)) for key in _SPECIAL_TOKEN_KEYS}
        self.chat_template = chat_template
        self.add_bos_token = bool(tokenizer_config.get("add_bos_token", False))
        stop = list(generation_eos)
        for text in (self.special_tokens["eos_token"], CHATML_END_OF_TURN):
            token = self.special_id(text)
            if token is not None:
                stop.append(token)
        self.stop_token_ids = sorted(set(stop))

    @classmethod
    def from_dir(cls, path) -> "TextTokenizer":
        """Read tokenizer.json, tokenizer_config.json (optional) and generation_config.json
        (optional) from a checkpoint directory."""
        path = os.fspath(path)
        tokenizer_file = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(tokenizer_file):
            raise TokenizerError(f"{path}: no {TOKENIZER_FILE} (text needs the checkpoint's tokenizer; "
                                 f"`run_example.py --mode download` fetches it, or pass --prompt-ids)")
        from tokenizers import Tokenizer
        try:
            tokenizer = Tokenizer.from_file(tokenizer_file)
        except Exception as err:   # tokenizers raises a bare Exception on a malformed file
            raise TokenizerError(f"{tokenizer_file}: cannot read the tokenizer: {err}") from None
        config_file = os.path.join(path, TOKENIZER_CONFIG_FILE)
        tokenizer_config = read_json(config_file, TokenizerError, "tokenizer config") \
            if os.path.isfile(config_file) else {}
        template = tokenizer_config.get("chat_template")
        if isinstance(template, list):   # named templates: the "default" one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        template_file = os.path.join(path, CHAT_TEMPLATE_FILE)
        if template is None and os.path.isfile(template_file):
            with open(template_file, encoding="utf-8") as f:
                template = f.read()
        generation_file = os.path.join(path, GENERATION_CONFIG_FILE)
        eos = read_json(generation_file, TokenizerError, "generation config").get("eos_token_id") \
            if os.path.isfile(generation_file) else None
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(tokenizer, tokenizer_config, template, eos, path)

    def special_id(self, text: str | None) -> int | None:
        """The id of a special (added) token, None if the vocabulary has no such special token."""
        if text is None:
            return None
        token = self.tokenizer.token_to_id(text)
        if token is None:
            return None
        added = self.tokenizer.get_added_tokens_decoder()
        return token if token in added and added[token].special else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.special_id(self.special_tokens["bos_token"])
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        """The chat template applied to `messages` ([{"role": ..., "content": ...}, ...])."""
        if not self.chat_template:
            raise TokenizerError(f"{self.source}: {TOKENIZER_CONFIG_FILE} has no chat_template "
                                 f"(and there is no {CHAT_TEMPLATE_FILE}); use a plain prompt")
        values = {key: value for key, value in self.special_tokens.items() if value is not None}
        values.update(variables)
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **values)

    def encode_chat(self, messages: list[dict], **variables) -> list[int]:
        # The rendered template already holds every special token it wants.
        return self.encode(self.render_chat(messages, **variables), add_special_tokens=False)


def _compile_template(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TokenizerError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None, ensure_ascii=False, **_: json.dumps(
        value, indent=indent, ensure_ascii=ensure_ascii)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise TokenizerError(f"chat template line {err.lineno}: {err.message}") from None


class TextStream:
    """Decodes a growing list of token ids and tells what text is new since the last call.

    Text is held back while it ends in an incomplete UTF-8 character (a byte-level token split
    one) or could be the start of a stop string; after a stop string appears, the text ends
    just before it."""

    def __init__(self, tokenizer: TextTokenizer, stop_strings=()):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.text = ""         # everything released so far
        self.stopped = False   # a stop string was reached

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        return self._release(final=False)

    def finish(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        full = self.tokenizer.decode(self.ids)
        cut = min((i for i in (full.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            ready, self.stopped = full[:cut], True
        elif final:
            ready = full
        else:
            ready = full.rstrip("\ufffd")
            hold = max((len(s) - 1 for s in self.stop_strings), default=0)
            ready = ready[:max(len(self.text), len(ready) - hold)]
        new = ready[len(self.text):]
        self.text = ready
        return new


def generate_text(model, tokenizer: TextTokenizer, prompt, *, chat: bool = False,
                  max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, seed: int = 0, stop_strings=(), on_text=None,
                  template_variables: dict | None = None) -> str:
    """Generate a continuation of `prompt` (a string, or with `chat` a string taken as one user
    message or a list of messages) and return it as text; `on_text(piece)` gets it as it grows."""
    from .model import generation_loop, host_sampler
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        ids = tokenizer.encode_chat(messages, **(template_variables or {}))
    else:
        ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    too_big = [i for i in ids if i >= model.config.vocab_size]
    if too_big:
        raise TokenizerError(f"{tokenizer.source}: the tokenizer gives id {too_big[0]}, outside the "
                             f"model's vocabulary 0..{model.config.vocab_size - 1}")
    stream = TextStream(tokenizer, stop_strings)
    stop = set(model.config.stop_token_ids) | set(tokenizer.stop_token_ids)
    rng = np.random.default_rng(seed)
    cache = model.new_cache(1)

    def last_logits(sequences, slots):
        return [logits[-1] for logits in model.forward_ragged(sequences, cache, slots)]

    sampler = host_sampler(temperature, top_k, top_p, rng)

    def choose(rows):
        tokens = sampler(rows)
        for token in tokens:
            if token not in stop:
                _emit(on_text, stream.push(token))
        return tokens

    generation_loop(np.array([ids], np.int64), max_new_tokens, last_logits, choose, stop,
                    keep_decoding=lambda step, active: bool(active) and not stream.stopped)
    _emit(on_text, stream.finish())
    return stream.text


def _emit(on_text, piece: str) -> None:
    if on_text is not None and piece:
        on_text(piece)
