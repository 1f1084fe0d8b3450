"""Chat messages -> prompt text, the way the run was trained to read them.

An SFT run renders with what it trained with: the tokenizer's own chat
template (config.data.sft.chat_template=tokenizer) or its
message_template, followed by the assistant's opening (the template's text
before {content}). Any other run uses a chat template found beside its
tokenizer (chat_template.jinja or tokenizer_config.json, as an imported
Hugging Face model has), or has none.
"""
from __future__ import annotations

from collections.abc import Callable

from lm.checks import ConfigError
from lm.data import sft


def renderer(config, tok) -> tuple[Callable[[list[dict]], str] | None, str]:
  """(messages -> prompt text, or None; why there is none)."""
  if config.task == "sft" and config.data.sft.chat_template == "config":
    template = config.data.sft.message_template
    opening = template.split("{content}")[0].format(role="assistant")
    return (lambda messages: "".join(template.format(**m) for m in messages)
            + opening), ""
  try:
    jinja = sft.ChatTemplate(sft.chat_template(config.data.tokenizer), tok)
  except ConfigError:
    return None, (f"no chat_template.jinja or tokenizer_config.json chat "
                  f"template beside config.data.tokenizer="
                  f"{config.data.tokenizer!r}, and not an SFT run")
  return (lambda messages: jinja(messages, add_generation_prompt=True)), ""
