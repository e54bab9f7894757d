"""Chat templates: Jinja2 text stored in the checkpoint that turns chat messages into a prompt.

The template is Hugging Face's convention (``chat_template.jinja`` beside ``tokenizer.json``;
variables ``messages`` and ``add_generation_prompt``), rendered in Jinja2's immutable sandbox as
``transformers`` does, because it comes with the model, not from the operator.
"""

from __future__ import annotations

from expertmesh.platform import checkpoint as ckpt
from expertmesh.platform.errors import ConfigError

# Named templates a training config may ask for (``data.chat_template: plain``).
TEMPLATES: dict[str, str] = {
    # one "role: content" line per message, then the assistant's turn
    "plain": (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    ),
}


def template_named(name: str) -> str:
    """The template text of preset ``name`` (ConfigError naming ``chat_template`` if unknown)."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError(
            "chat_template", f"unknown template {name!r}; known: {sorted(TEMPLATES)}"
        ) from None


def read_chat_template(uri: str) -> str | None:
    """The checkpoint's chat template, or None if it was saved without one."""
    return ckpt.read_chat_template(uri)


def render(template: str, messages: list[dict[str, str]]) -> str:
    """The prompt for ``messages``, ending where the assistant's reply starts."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True)
    except TemplateError as exc:
        raise ConfigError("messages", f"the model's chat template failed: {exc}") from None
