"""Chat templates: a tokenizer's Jinja template rendered as transformers renders it, and the
assistant turns found as transformers finds them.

A chat template is code read from a file (tokenizer_config.json or chat_template.jinja), so it
runs in Jinja's ImmutableSandboxedEnvironment with transformers' settings (trim_blocks,
lstrip_blocks, loop controls, its `tojson`, `raise_exception`, `strftime_now`, and a `namespace`
that refuses underscore names), given `messages`, `add_generation_prompt`, `tools=None`,
`documents=None` and the tokenizer's named special tokens (bos_token, eos_token, ...), the
messages normalised as transformers does (None values dropped; reasoning under `thinking` and
`reasoning_content` alike). The
rendered text is tokenised whole, without added special tokens: the ids of
`apply_chat_template(messages)`.

Which tokens are trained: a template with `{% generation %}` blocks marks the assistant's text
itself (transformers' `return_assistant_tokens_mask`: a token is trained when its character span
overlaps a block). Otherwise the conversation is rendered prefix by prefix: assistant turn k is
the text between `render(messages[:k], add_generation_prompt=True)` and `render(messages[:k+1])`
(TRL's prompt/completion split), which needs a template that renders every prefix as the start
of the whole conversation; one that does not is refused, naming the turn.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Optional

from data_pipeline import DataError

MIN_JINJA = (3, 1, 6)
"""Older Jinja releases have known sandbox escapes (transformers refuses them too)."""

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
"""The named special tokens a template sees (transformers' SPECIAL_TOKENS_ATTRIBUTES)."""

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
_REASONING = ("reasoning_content", "thinking", "reasoning")
"""Names a message's reasoning comes under; transformers fills the first two from any of them."""


def _aliased(messages: list) -> list:
    """transformers' message normalisation: keys whose value is None dropped, reasoning under both names."""
    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def plain_template(bos: bool) -> str:
    """Apogee's plain chat format as a template (for tokenizers without one, and for export):
    "<role>: <content>\\n" per message, an assistant turn ending with eos_token instead of the
    newline and trained on its content and eos_token (a generation block)."""
    return (("{{ bos_token }}" if bos else "")
            + "{% for message in messages %}{{ message['role'] + ': ' }}"
              "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}"
              "{% endgeneration %}{% else %}{{ message['content'] + '\\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3]) < MIN_JINJA:
        raise DataError(f"chat templates need jinja2>={'.'.join(map(str, MIN_JINJA))} (installed: {jinja2.__version__}); "
                        f"older releases have sandbox escapes")

    class GenerationBlocks(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: records where the block's text lands."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_block"), [], [], body).set_lineno(lineno)

        def _block(self, caller):
            text = caller()
            if self.environment.spans is not None:  # the blocks rendered so far end where this one starts
                start = sum(len(block) for block in self.environment.blocks)
                self.environment.spans.append((start, start + len(text)))
            return text

    class Namespace(jinja2.utils.Namespace):
        """transformers' namespace: no underscore attributes (no route to Python internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace.check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    class Dict:
        """`dict(...)` and `dict.fromkeys(...)` in a template, nothing else of the type."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       namespace=Namespace, dict=Dict())
    env.spans, env.blocks = None, []
    return env


class ChatTemplate:
    """One compiled chat template with the tokenizer's special tokens (see the module doc)."""

    def __init__(self, source: str, special_tokens: dict, where: str):
        import jinja2

        self.source, self.where = source, where
        self.special_tokens = {k: v for k, v in special_tokens.items() if k in SPECIAL_TOKEN_NAMES and v is not None}
        self.has_generation = bool(_GENERATION.search(source))
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as error:
            raise DataError(f"{where}: the chat template does not compile ({error})") from None

    def render(self, messages: list, add_generation_prompt: bool = False, spans: Optional[list] = None) -> str:
        """The text of `messages`; `spans` (a list) receives the (start, end) of each generation block."""
        import jinja2

        env = self._template.environment
        env.spans, env.blocks = spans, []
        try:
            for block in self._template.generate(messages=_aliased(messages), tools=None, documents=None,
                                                 add_generation_prompt=add_generation_prompt, **self.special_tokens):
                env.blocks.append(block)
            return "".join(env.blocks)
        except jinja2.TemplateError as error:
            raise DataError(f"{self.where}: the chat template fails on this conversation ({error})") from None
        finally:
            env.spans, env.blocks = None, []

    def trained_spans(self, messages: list, first_trained: int = 0, where: str = "example") -> tuple[str, list]:
        """(text of the conversation, [(start, end)] of the trained characters): the assistant turns
        from message `first_trained` on."""
        boundary = len(self.render(messages[:first_trained], add_generation_prompt=True)) if first_trained else 0
        if self.has_generation:
            spans: list = []
            text = self.render(messages, spans=spans)
            return text, [(max(s, boundary), e) for s, e in spans if e > boundary]
        text, spans = self.render(messages), []
        for k in range(first_trained, len(messages)):
            if messages[k]["role"] != "assistant":
                continue
            before = self.render(messages[:k], add_generation_prompt=True)
            through = self.render(messages[:k + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise DataError(f"{where}: messages[{k}]: the chat template ({self.where}) does not render the "
                                f"conversation up to this assistant turn as the start of the whole one, so the turn "
                                f"cannot be found; a template with {{% generation %}} blocks marks it")
            spans.append((len(before), len(through)))
        return text, spans


def overlap_mask(offsets: list, spans: list) -> list[int]:
    """1 for each token whose character span (start, end) overlaps one of `spans` (both in order),
    as transformers' apply_chat_template(return_assistant_tokens_mask=True) marks them."""
    mask, index = [0] * len(offsets), 0
    for token, (start, end) in enumerate(offsets):
        while index < len(spans) and start >= spans[index][1]:
            index += 1
        if index == len(spans):
            break
        if end > spans[index][0]:
            mask[token] = 1
    return mask
