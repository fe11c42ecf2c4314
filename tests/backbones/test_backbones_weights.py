"""weights="auto": where weights are looked for, in which order, and the offline failure."""

from __future__ import annotations

import socket

import pytest
import torch
from safetensors.torch import save_file

from unsupseg.backbones import build_backbone, get_backbone_info
from unsupseg.errors import ConfigError, WeightsError


@pytest.fixture
def vits16_state(random_timm):
    return {k: v.contiguous() for k, v in random_timm("vit_small_patch16_224", seed=5).state_dict().items()}


def _weights_id(state, tmp_path):
    torch.save(state, tmp_path / "reference.pth")
    return build_backbone("dino_vits16", weights=tmp_path / "reference.pth").weights_id


def _no_network(monkeypatch) -> list:
    """Record every connection attempt instead of making it."""
    attempts = []

    def connect(self, address):
        attempts.append(address)
        raise OSError("test: no network")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    return attempts


def test_offline_with_nothing_cached_fails_without_a_network_call_and_says_what_to_do(offline_env, monkeypatch):
    attempts = _no_network(monkeypatch)
    with pytest.raises(WeightsError) as err:
        build_backbone("dino_vits8")
    assert attempts == []
    message = str(err.value)
    for needed in (
        "'dino_vits8'",
        "dino_deitsmall8_300ep_pretrain.pth",
        "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth",
        "--backbone-weights FILE",
        "weights=FILE",
        "UNSUPSEG_WEIGHTS_DIR",
        "timm/vit_small_patch8_224.dino",
        "HF_HUB_OFFLINE",
    ):
        assert needed in message, needed
    assert not get_backbone_info("dino_vits8").weights_available


def test_unreachable_hub_fails_after_one_connection_attempt(offline_env, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    attempts = _no_network(monkeypatch)
    # huggingface_hub would retry with back-off: it must not be reached
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("hub download attempted"))
    with pytest.raises(WeightsError, match="127.0.0.1 is unreachable"):
        build_backbone("dino_vits16")
    assert attempts == [("127.0.0.1", 9)]


@pytest.mark.parametrize(
    "filename", ["dino_deitsmall16_pretrain.pth", "dino_vits16.pth", "dino_vits16.safetensors"]
)
def test_weights_dir_by_published_or_backbone_name(offline_env, vits16_state, filename, tmp_path):
    path = offline_env / "weights" / filename
    if filename.endswith(".safetensors"):
        save_file(vits16_state, str(path))
    else:
        torch.save(vits16_state, path)
    assert get_backbone_info("dino_vits16").weights_available
    assert build_backbone("dino_vits16").weights_id == _weights_id(vits16_state, tmp_path)


def test_torch_hub_checkpoint_folder(offline_env, vits16_state, tmp_path):
    folder = offline_env / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(vits16_state, folder / "dino_deitsmall16_pretrain.pth")
    assert build_backbone("dino_vits16").weights_id == _weights_id(vits16_state, tmp_path)


def test_hugging_face_cache_of_the_timm_tag(offline_env, vits16_state, tmp_path):
    repo = offline_env / "hf" / "hub" / "models--timm--vit_small_patch16_224.dino"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file(vits16_state, str(repo / "snapshots" / "0123abcd" / "model.safetensors"))
    assert get_backbone_info("dino_vits16").weights_available
    assert build_backbone("dino_vits16").weights_id == _weights_id(vits16_state, tmp_path)


def test_weights_dir_comes_before_the_caches(offline_env, vits16_state, random_timm, tmp_path):
    folder = offline_env / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(random_timm("vit_small_patch16_224", seed=6).state_dict(), folder / "dino_deitsmall16_pretrain.pth")
    torch.save(vits16_state, offline_env / "weights" / "dino_deitsmall16_pretrain.pth")
    assert build_backbone("dino_vits16").weights_id == _weights_id(vits16_state, tmp_path)


def test_weights_must_be_a_path_or_keyword():
    with pytest.raises(ConfigError, match="backbone_from_state_dict"):
        build_backbone("dino_vits16", weights={"cls_token": torch.zeros(1)})
