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


def sd3(dual: list[int]):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        pos_embed_max_size=8,
        dual_attention_layers=dual,
        qk_norm="rms_norm",
    ).eval()


def sd3_call(model):
    torch.manual_seed(1)
    inputs = (
        torch.randn(1, 4, 8, 8),
        torch.randn(1, 5, 16),
        torch.randn(1, 8),
        torch.tensor([3.0]),
    )
    return lambda: model(*inputs, return_dict=False)[0]


def flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    ).eval()


def flux_call(model):
    torch.manual_seed(1)
    image, text = torch.randn(1, 16, 16), torch.randn(1, 6, 32)
    ids = (torch.zeros(16, 3), torch.zeros(6, 3))
    pooled, step, guidance = torch.randn(1, 32), torch.tensor([0.5]), torch.tensor([3.5])
    return lambda: model(image, text, pooled, step, *ids, guidance, return_dict=False)[0]


def test_flux1s_qkv_is_fused_and_computes_the_same():
    model = flux()
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
def test_sd35_is_left_unfused_where_diffusers_fusion_would_change_it(dual):
    model = sd3(dual)
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
