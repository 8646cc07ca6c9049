"""Prompt templates: they turn a record into a prompt, and own the loss mask.

The template decides where the prompt ends, so it decides which tokens are trained on (LitGPT's
``prompts.py`` habit). It is saved as JSON beside the adapter (:meth:`Template.to_dict`,
:func:`template_from_dict`) so generation builds exactly the prompt the adapter was trained on.

Tokenisation: the prompt and the response are tokenised separately and concatenated, so the mask
boundary is exact (joint tokenisation can merge the last prompt character with the first response
character into one token) and the prompt tokens are the ones generation will later see. The
response is followed by the template's terminator, which is a label: the model must learn to stop.
For ``alpaca`` that is the EOS token; for ``chat`` it is the end-of-turn token of the model's own
chat format (``<|eot_id|>``, ``<end_of_turn>``, ``<|im_end|>``, ...), read off the tokenizer's chat
template (:func:`chat_turn_end`), and generation stops on it too. The mask is built from
positions, never from ``pad_token_id`` (SmolLM2's pad token *is* its EOS).

Left truncation of an overlong prompt keeps the special prefix the tokenizer puts in front of
every text (the BOS token of Llama, Gemma, ...): a model never saw inputs without it.

Examples never end up with zero labelled tokens, unlike FS-LLM, whose right-truncation of long
prompts masks every label and yields NaN losses (FederatedScope issues #625, #777).
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal

from fedtune.data.records import Record
from fedtune.errors import FedtuneError, unknown_name

IGNORE_INDEX = -100

#: FS-LLM's (= Stanford Alpaca's) wording, federatedscope/llm/dataset/llm_dataset.py PROMPT_DICT.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)


class Template:
    """Base class: ``prompt(record, tokenizer) -> str``; the response is ``record.output``."""

    name: ClassVar[str] = ""
    #: tokenise the prompt with the tokenizer's own special tokens (e.g. Llama's BOS). False for
    #: chat templates, whose rendered text already holds them.
    add_special_tokens: ClassVar[bool] = True

    def prompt(self, record: Record, tokenizer: Any = None) -> str:
        raise NotImplementedError

    def response(self, record: Record) -> str:
        return record.output

    def end_ids(self, tokenizer: Any) -> list[int]:
        """The token ids that end a response (labels: the model learns to stop with them)."""
        return [_eos_id(tokenizer)]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}  # type: ignore[call-overload]

    def fingerprint(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class AlpacaTemplate(Template):
    """FS-LLM's Alpaca prompt; the no-input wording when the record's input is empty."""

    name: ClassVar[str] = "alpaca"
    prompt_input: str = ALPACA_PROMPT_INPUT
    prompt_no_input: str = ALPACA_PROMPT_NO_INPUT

    def prompt(self, record: Record, tokenizer: Any = None) -> str:
        # Same test as FS-LLM: ``example.get("input", "") != ""``.
        if record.input != "":
            return self.prompt_input.format(instruction=record.instruction, input=record.input)
        return self.prompt_no_input.format(instruction=record.instruction)


@dataclass(frozen=True)
class AlpacaNoInputTemplate(Template):
    """Always the no-input wording; a non-empty input is appended to the instruction."""

    name: ClassVar[str] = "alpaca_no_input"
    prompt_no_input: str = ALPACA_PROMPT_NO_INPUT
    separator: str = "\n\n"

    def prompt(self, record: Record, tokenizer: Any = None) -> str:
        instruction = record.instruction
        if record.input != "":
            instruction = f"{instruction}{self.separator}{record.input}"
        return self.prompt_no_input.format(instruction=instruction)


@dataclass(frozen=True)
class ChatTemplate(Template):
    """The tokenizer's own chat template: user = instruction (+ blank line + input)."""

    name: ClassVar[str] = "chat"
    add_special_tokens: ClassVar[bool] = False
    #: optional system message; ``None`` keeps the model's default (SmolLM2 inserts its own).
    system: str | None = None
    separator: str = "\n\n"

    def prompt(self, record: Record, tokenizer: Any = None) -> str:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            what = type(tokenizer).__name__ if tokenizer is not None else "no tokenizer"
            raise FedtuneError(
                f"data.template 'chat' needs a tokenizer with a chat template, but {what} has "
                "none; use data.template=alpaca (or alpaca_no_input) for base models"
            )
        user = record.instruction
        if record.input != "":
            user = f"{user}{self.separator}{record.input}"
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": user}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def end_ids(self, tokenizer: Any) -> list[int]:
        """The chat format's own end of an assistant turn (:func:`chat_turn_end`); EOS when the
        template has no special token there."""
        ids = chat_turn_end(tokenizer)
        return ids if ids else [_eos_id(tokenizer)]


#: the assistant's content when a chat template is rendered to see what follows it: plain
#: letters, so no template trims, escapes or splits it.
_SENTINEL = "FEDTUNEassistantTURNsentinel"
_TURN_END_MEMO: weakref.WeakKeyDictionary[Any, tuple[str, list[int]]] = weakref.WeakKeyDictionary()


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    ids.update(int(k) for k in (getattr(tokenizer, "added_tokens_decoder", None) or {}))
    return ids


def chat_turn_end(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn in the tokenizer's chat template, up to and including
    its first special token (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``</s>`` ...);
    ``[]`` when the template has none there (or cannot be rendered).

    Found by rendering a one-turn conversation whose answer is a sentinel and tokenising what the
    template puts after it, so it follows the template itself rather than a table of formats.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template or not isinstance(template, str):
        return []
    try:
        memo = _TURN_END_MEMO.get(tokenizer)
    except TypeError:  # not weakly referenceable
        memo = None
    if memo is not None and memo[0] == template:
        return list(memo[1])
    ids: list[int] = []
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False)
        at = text.rfind(_SENTINEL) if isinstance(text, str) else -1
        if at >= 0:
            after = list(tokenizer(text[at + len(_SENTINEL):], add_special_tokens=False)["input_ids"])
            special = _special_ids(tokenizer)
            for k, t in enumerate(after):
                if t in special:
                    ids = after[: k + 1]
                    break
    except Exception:  # noqa: BLE001 - a template that cannot render this: fall back to EOS
        ids = []
    if not ids:
        logging.getLogger(__name__).warning(
            "the chat template of %s puts no special token after an assistant turn; responses end with "
            "EOS instead", type(tokenizer).__name__)
    try:
        _TURN_END_MEMO[tokenizer] = (template, ids)
    except TypeError:
        pass
    return list(ids)


def special_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts in front of every text with ``add_special_tokens=True`` (the
    BOS token of Llama, Gemma, TinyLlama ...; nothing for GPT-2, Qwen2, SmolLM2)."""
    try:
        with_ = list(tokenizer("a b", add_special_tokens=True)["input_ids"])
        without = list(tokenizer("a b", add_special_tokens=False)["input_ids"])
    except Exception:  # noqa: BLE001
        return []
    for i in range(len(with_) - len(without) + 1):
        if with_[i : i + len(without)] == without:
            return with_[:i]
    return []


def protected_prefix(prompt: list[int], prefix: list[int], bos_id: int | None) -> int:
    """How many leading prompt ids left truncation must keep: the tokenizer's special prefix when
    the prompt starts with it, else a leading BOS that occurs nowhere else in the prompt (a chat
    template that writes it as text; not ChatML's ``<|im_start|>``, which SmolLM2 names its BOS
    and which opens every turn)."""
    if prefix and prompt[: len(prefix)] == prefix:
        return len(prefix)
    if bos_id is not None and prompt[:1] == [bos_id] and bos_id not in prompt[1:]:
        return 1
    return 0


TEMPLATES: dict[str, type[Template]] = {
    t.name: t for t in (AlpacaTemplate, AlpacaNoInputTemplate, ChatTemplate)
}


def get_template(template: str | Template) -> Template:
    """A template instance from its registered name (or the instance itself)."""
    if isinstance(template, Template):
        return template
    cls = TEMPLATES.get(template)
    if cls is None:
        raise unknown_name("template", template, TEMPLATES)
    return cls()


def template_from_dict(d: dict[str, Any]) -> Template:
    """Rebuild a template saved with :meth:`Template.to_dict` (e.g. beside an adapter)."""
    d = dict(d)
    name = d.pop("name", None)
    cls = TEMPLATES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise unknown_name("template", str(name), TEMPLATES)
    valid = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(d) - valid
    if unknown:
        raise FedtuneError(f"template '{name}': unknown keys {sorted(unknown)}; valid: {sorted(valid)}")
    return cls(**d)


# --------------------------------------------------------------------------------------------
# token ids and labels


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise FedtuneError(
            f"tokenizer {type(tokenizer).__name__} has no EOS token; the response must end with one "
            "so the model learns to stop"
        )
    return int(eos)


def _ids(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def tokenize_parts(
    records: Sequence[Record], tokenizer: Any, template: str | Template, batch_size: int = 1024
) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids and response ids (the template's terminator appended) of every record, untruncated."""
    tpl = get_template(template)
    end = tpl.end_ids(tokenizer)
    prompts: list[list[int]] = []
    responses: list[list[int]] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts += _ids(tokenizer, [tpl.prompt(r, tokenizer) for r in chunk], tpl.add_special_tokens)
        responses += [ids + end for ids in _ids(tokenizer, [tpl.response(r) for r in chunk], False)]
    return prompts, responses


Status = Literal["ok", "truncated"]


def assemble(
    prompt: list[int], response: list[int], max_length: int, truncation: Literal["left", "drop"],
    keep_prefix: int = 0,
) -> tuple[list[int], list[int], Status] | None:
    """Concatenate prompt and response ids, mask the prompt, and fit ``max_length``.

    ``left``: the prompt is cut from the left, after its first ``keep_prefix`` ids (the
    tokenizer's special prefix, e.g. BOS: see :func:`protected_prefix`), which always stay. Of the
    rest it keeps at least its last ``min(len, budget // 4)`` tokens (the end of the instruction
    and the ``### Response:`` marker; ``budget = max_length - keep_prefix``), and the response
    fills the rest; a response too long for that is cut at its end (losing its terminator,
    correctly: it did not end there). At least one response token is always labelled. ``drop``:
    return None for anything longer than ``max_length``.
    """
    if max_length < 2:
        raise FedtuneError(f"data.max_length must be at least 2, got {max_length}")
    if not prompt:
        # A causal LM cannot learn a token at position 0 (nothing precedes it): with an empty
        # prompt a one-token response would have no trainable label.
        raise FedtuneError("the prompt template produced no tokens; every example needs a prompt")
    if len(prompt) + len(response) <= max_length:
        return prompt + response, [IGNORE_INDEX] * len(prompt) + response, "ok"
    if truncation == "drop":
        return None
    if truncation != "left":
        raise unknown_name("truncation", str(truncation), ["left", "drop"])
    if not 0 <= keep_prefix < min(len(prompt), max_length - 1):
        keep_prefix = 0  # a prefix that leaves no room (or is the whole prompt) is not kept apart
    head, body = prompt[:keep_prefix], prompt[keep_prefix:]
    budget = max_length - keep_prefix
    keep_p = min(len(body), max(budget - len(response), budget // 4))
    keep_r = budget - keep_p
    p = head + (body[len(body) - keep_p :] if keep_p else [])
    r = response[:keep_r]
    return p + r, [IGNORE_INDEX] * len(p) + r, "truncated"


def encode_example(
    record: Record,
    tokenizer: Any,
    template: str | Template,
    max_length: int,
    truncation: Literal["left", "drop"] = "left",
) -> tuple[list[int], list[int]] | None:
    """``(input_ids, labels)`` for one record: labels are -100 on the prompt, ids on the response.

    Returns None when ``truncation="drop"`` and the example is longer than ``max_length``.
    """
    prompts, responses = tokenize_parts([record], tokenizer, template)
    keep = protected_prefix(prompts[0], special_prefix(tokenizer), getattr(tokenizer, "bos_token_id", None))
    out = assemble(prompts[0], responses[0], max_length, truncation, keep)
    return None if out is None else (out[0], out[1])
