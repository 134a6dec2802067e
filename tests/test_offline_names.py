"""Published names without the hub: with HF_HUB_OFFLINE unset (as every entry point leaves it) and the hub
unreachable, a name fails within seconds with a line fit for a machine without internet."""

from __future__ import annotations

import time

import pytest

from captioner.models import hub
from captioner.models.decoder import load_tokenizer
from captioner.models.encoder import load_clip
from captioner.models.hub import MissingWeightsError


@pytest.fixture
def no_internet(monkeypatch, tmp_path):
    """No cached weights, HF_HUB_OFFLINE unset, and every connection refused: a machine without internet."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    tried = []

    def refuse(address, timeout=None):
        tried.append(address)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(hub.socket, "create_connection", refuse)
    return tried


@pytest.mark.parametrize(("load", "name", "host", "key"), [
    (load_clip, "ViT-B/32", "openaipublic.azureedge.net", "model.encoder"),
    (load_tokenizer, "gpt2", "huggingface.co", "model.tokenizer"),
])
def test_a_name_fails_fast_where_the_hub_cannot_be_reached(no_internet, load, name, host, key):
    start = time.monotonic()
    with pytest.raises(MissingWeightsError) as raised:
        load(name)
    assert time.monotonic() - start < 10
    assert no_internet == [(host, 443)]  # it asked whether the hub answers: a name downloads where it does
    message = str(raised.value)
    assert "\n" not in message and f"{host} cannot be reached" in message and name in message
    assert "Download them where there is internet" in message and f"{key}=" in message
    assert "HF_HUB_OFFLINE" not in message  # nothing set it: the message is about the network, not a setting
