"""Chat data for supervised fine-tuning: conversations rendered by a chat template into token
ids, with only the assistant's tokens trained.

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

A chat template is a Jinja program over `messages`, `add_generation_prompt`, `bos_token` and
`eos_token`, as Hugging Face's `tokenizer.apply_chat_template` runs it (the same sandboxed
environment, so a model's own template renders here exactly as in transformers). Where a run has
none, the built-in template below is used:

    <|system|>\\n{content}\\n          (a system message, if any)
    <|user|>\\n{content}\\n
    <|assistant|>\\n{content}</s>      (</s>: the tokenizer's EOS, so generation stops there)

and the generation prompt is `<|assistant|>\\n`.

Which tokens are trained: for each assistant message i, the text that rendering messages[: i + 1]
adds to rendering messages[: i] with the generation prompt is the answer, the end-of-turn marker
included. Templates that render earlier turns differently once later ones exist (some drop past
reasoning) are refused, since their training text would not be what the model sees at inference.

Tokenizing: the whole text is encoded at once, as transformers encodes it, so the ids are those
that inference produces; the tokenizer's control pieces (`<s>`, `</s>`) written in the text become
their ids, and SentencePiece's dummy prefix is added only at the start of the text (Hugging Face's
`legacy=false`). A token is trained when its first byte lies in an answer.

In prepared shards a token that is not trained carries UNTRAINED_BIT (jaxlm/data/prepare.py), so
the mask travels with the tokens through every order and blend and costs no extra file.
"""

import functools
import hashlib
import json
import pathlib
import re

import jinja2
import numpy as np
import sentencepiece as spm
from jinja2.sandbox import ImmutableSandboxedEnvironment
from sentencepiece import sentencepiece_model_pb2

from jaxlm.errors import UsageError

BUILTIN_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{- eos_token }}{% else %}{{- '\\n' }}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")


def load_template(path: str | pathlib.Path | None) -> str:
    """The template in `path`: a Jinja file, or a tokenizer_config.json with a `chat_template`
    (a string, or Hugging Face's list of named templates: the one named `default`); None: the
    built-in one."""
    if path is None:
        return BUILTIN_TEMPLATE
    path = pathlib.Path(path)
    if not path.is_file():
        raise UsageError(f"data.chat_template '{path}' does not exist")
    text = path.read_text()
    if path.suffix != ".json":
        return text
    found = template_of_tokenizer_config(path)
    if found is None:
        raise UsageError(f"{path} holds no chat_template")
    return found


def template_for(chat_template: str | None, init_from: str | None) -> str:
    """The template a run renders its conversations with: `data.chat_template` if set, else
    the one in the tokenizer_config.json of the run `checkpoint.init_from` names (a model
    converted from Hugging Face keeps its own), else the built-in one."""
    if chat_template or not init_from:
        return load_template(chat_template)
    run = pathlib.Path(init_from).absolute()
    # init_from may name the run, its checkpoints/ directory or one step's directory
    if run.name == "checkpoints":
        run = run.parent
    elif run.parent.name == "checkpoints":
        run = run.parent.parent
    config = run / "tokenizer_config.json"
    found = template_of_tokenizer_config(config) if config.is_file() else None
    return found or BUILTIN_TEMPLATE


def template_of_tokenizer_config(path: pathlib.Path) -> str | None:
    """The chat template a Hugging Face tokenizer_config.json holds, if any."""
    try:
        config = json.loads(pathlib.Path(path).read_text())
    except ValueError:
        raise UsageError(f"{path} is not valid JSON") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def fingerprint(template: str) -> str:
    return hashlib.sha256(template.encode()).hexdigest()


@functools.cache
def _compiled(template: str):
    """Hugging Face's environment for chat templates: sandboxed, blocks trimmed, `tojson`
    keeping non-ASCII text, and `raise_exception` for templates that refuse input."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UsageError(
            f"the chat template does not parse: {e.message} (line {e.lineno})"
        ) from None


def check_messages(text: str, where: str) -> list[dict]:
    """A conversation's `messages` from their JSON text, checked: a list of {role, content}
    strings with at least one assistant message."""
    try:
        messages = json.loads(text)
    except ValueError:
        messages = None
    if not isinstance(messages, list) or not messages:
        raise UsageError(f'{where}: "messages" is not a list of messages')
    for number, m in enumerate(messages, start=1):
        if not (isinstance(m, dict) and isinstance(m.get("content"), str)):
            raise UsageError(f"{where}: message {number} has no text content")
        if m.get("role") not in ROLES:
            raise UsageError(
                f"{where}: message {number} has role {m.get('role')!r}, not one of "
                f"{', '.join(ROLES)}"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise UsageError(f"{where} has no assistant message: nothing to train on")
    return messages


class ChatEncoder:
    """Conversations -> token ids and which of them are trained."""

    def __init__(self, tokenizer_path: pathlib.Path, template: str):
        self.sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
        self.template = _compiled(template)
        self.tokens = {
            "bos_token": _piece(self.sp, self.sp.bos_id()),
            "eos_token": _piece(self.sp, self.sp.eos_id()),
            "unk_token": _piece(self.sp, self.sp.unk_id()),
            "pad_token": _piece(self.sp, self.sp.pad_id()),
        }
        # control pieces written in the text (<s>, </s>) are their ids, as in transformers
        sp = self.sp
        self.controls = {
            sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)
        }
        longest_first = sorted(self.controls, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
        self._no_prefix = _without_dummy_prefix(tokenizer_path)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens
            )
        except jinja2.exceptions.TemplateError as e:
            raise UsageError(f"the chat template refused a conversation: {e}") from None

    def answers(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character ranges of the assistant's answers."""
        text = self.render(messages)
        ranges = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (through.startswith(prompt) and text.startswith(through)):
                raise UsageError(
                    "the chat template renders earlier turns differently once later ones exist, "
                    "so the trained text would not be what the model sees at inference"
                )
            ranges.append((len(prompt), len(through)))
        return text, ranges

    def encode_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of `text` and each token's first byte offset."""
        ids, begins, offset = [], [], 0
        for chunk in self._split.split(text):
            if chunk in self.controls:
                ids.append(self.controls[chunk])
                begins.append(offset)
            elif chunk:
                sp = self.sp if offset == 0 else self._no_prefix
                for piece in sp.encode_as_proto(chunk).pieces:
                    ids.append(piece.id)
                    begins.append(offset + piece.begin)
            offset += len(chunk.encode())
        return np.asarray(ids, np.int64), np.asarray(begins, np.int64)

    def encode(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of a conversation, and True for each token that is trained."""
        text, ranges = self.answers(messages)
        ids, begins = self.encode_text(text)
        trained = np.zeros(len(ids), bool)
        for start, stop in ranges:
            first, last = (len(text[:i].encode()) for i in (start, stop))
            trained |= (begins >= first) & (begins < last)
        return ids, trained

    def prompt_ids(self, messages: list[dict]) -> np.ndarray:
        """The ids a model is given to answer `messages` (their rendering with the generation
        prompt)."""
        return self.encode_text(self.render(messages, add_generation_prompt=True))[0]


def _piece(sp, i: int) -> str | None:
    return sp.id_to_piece(i) if i >= 0 else None


def _without_dummy_prefix(tokenizer_path) -> spm.SentencePieceProcessor:
    """The tokenizer without SentencePiece's dummy prefix, for text that follows a control piece
    (transformers' Metaspace prepends only at the start of the text)."""
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(pathlib.Path(tokenizer_path).read_bytes())
    model.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=model.SerializeToString())
