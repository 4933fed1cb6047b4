"""The engine's fuse_qkv on the transformer families: SD3.5's and FLUX.1's pipelines have no
fuse_qkv_projections, their transformer has; the fused transformer computes what the unfused one
did. SD3.5 Medium's image-only attention cannot run diffusers' fused joint processor: not fused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sdfleet.actors.speed_ups import apply_speed_ups, qkv_fusable
from sdfleet.schemas.family_flux import FLUX
from sdfleet.schemas.family_sd3 import SD3

OPTIONS = SimpleNamespace(channels_last=False, fuse_qkv=True, uint8_on_device=False)


def transformer(folder):
    """The tiny checkpoint's transformer, loaded as diffusers loads it (safetensors only)."""
    import json

    import diffusers

    config = json.loads((folder / "transformer" / "config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    return cls.from_pretrained(folder, subfolder="transformer", use_safetensors=True).eval()


def sd3(tiny_sd3, dual: list[int]):
    """The tiny SD3.5 transformer (Medium: image-only attention in layer 0), or one built from its
    config without that layer (Large's kind), with random weights."""
    model = transformer(tiny_sd3)
    if list(model.config.dual_attention_layers) == dual:
        return model
    torch.manual_seed(0)
    return type(model).from_config({**model.config, "dual_attention_layers": tuple(dual)}).eval()


def sd3_call(model):
    c = model.config
    torch.manual_seed(1)
    inputs = (
        torch.randn(1, c.in_channels, 8, 8),
        torch.randn(1, 5, c.joint_attention_dim),
        torch.randn(1, c.pooled_projection_dim),
        torch.tensor([3.0]),
    )
    return lambda: model(*inputs, return_dict=False)[0]


def flux_call(model):
    c = model.config
    torch.manual_seed(1)
    image, text = torch.randn(1, 16, c.in_channels), torch.randn(1, 6, c.joint_attention_dim)
    ids = (torch.zeros(16, 3), torch.zeros(6, 3))
    pooled, step = torch.randn(1, c.pooled_projection_dim), torch.tensor([0.5])
    guidance = torch.tensor([3.5])
    return lambda: model(image, text, pooled, step, *ids, guidance, return_dict=False)[0]


def test_flux1s_qkv_is_fused_and_computes_the_same(tiny_flux):
    model = transformer(tiny_flux["dev"])
    pipe = SimpleNamespace(transformer=model)  # no fuse_qkv_projections of its own
    run = flux_call(model)
    with torch.no_grad():
        before = run()
        assert apply_speed_ups(pipe, OPTIONS, FLUX.fuse_transformer_qkv) == ["fuse_qkv"]
        after = run()
    assert torch.allclose(before, after, atol=1e-5)
    fused = [m for m in model.modules() if getattr(m, "fused_projections", False)]
    assert fused, "no attention was fused"


@pytest.mark.parametrize("dual", [[], [0]], ids=["sd3.5-large", "sd3.5-medium"])
def test_sd35_is_left_unfused_where_diffusers_fusion_would_change_it(tiny_sd3, dual):
    model = sd3(tiny_sd3, dual)
    pipe = SimpleNamespace(transformer=model)
    run = sd3_call(model)
    with torch.no_grad():
        before = run()
        assert qkv_fusable(pipe, SD3.fuse_transformer_qkv) is None
        assert apply_speed_ups(pipe, OPTIONS, SD3.fuse_transformer_qkv) == []
        assert torch.equal(run(), before)
    # What it leaves: diffusers' own SD3 fusion, which gives other outputs (the q/k norm skipped)
    # or none (Medium's image-only attention has no text for the joint processor).
    with torch.no_grad():
        if dual:
            with pytest.raises(AttributeError):
                model.fuse_qkv_projections()
                run()
        else:
            model.fuse_qkv_projections()
            assert not torch.allclose(run(), before, atol=1e-3)


def test_a_unet_pipeline_fuses_as_before():
    fused = []
    pipe = SimpleNamespace(fuse_qkv_projections=lambda: fused.append(True), transformer=None)
    assert (
        qkv_fusable(pipe, False) is pipe
        and apply_speed_ups(pipe, OPTIONS) == ["fuse_qkv"]
        and fused
    )
