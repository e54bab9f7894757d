"""Chat templates: stored beside tokenizer.json in the checkpoint, named by the training config,
rendered in Jinja2's sandbox."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertmesh.platform import chat
from expertmesh.platform.config import load_config
from expertmesh.platform.errors import ConfigError
from expertmesh.platform.training import chat_template_of
from tests.integration.helpers import tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]


def test_checkpoint_keeps_its_template_and_a_plain_one_has_none(tmp_path: Path) -> None:
    text = chat.template_named("plain")
    with_template = tiny_checkpoint(tmp_path / "a", chat_template=text)
    assert chat.read_chat_template(with_template) == text
    assert chat.read_chat_template(tiny_checkpoint(tmp_path / "b")) is None


def test_plain_template_renders_each_turn_then_the_assistant_cue() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat.render(chat.template_named("plain"), messages) == (
        "system: Be brief.\nuser: Hi\nassistant:"
    )


def test_template_errors_and_unknown_names_name_their_field() -> None:
    with pytest.raises(ConfigError) as err:
        chat.template_named("chatml-9")
    assert err.value.field == "chat_template"
    with pytest.raises(ConfigError) as err:  # the sandbox refuses attribute tricks
        chat.render("{{ messages.__class__.__mro__ }}", [])
    assert err.value.field == "messages"


def test_demo_config_asks_for_the_plain_template() -> None:
    cfg = load_config(str(REPO / "expertmesh" / "configs" / "tiny.yaml"))
    assert chat_template_of(cfg) == chat.template_named("plain")
