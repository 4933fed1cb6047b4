"""Tiny, random-weight Stable Diffusion 2-family pipelines (and detectors) written to disk.

No model hub is reachable from CI or the demo box, yet the workers must be
exercised through the real ``from_pretrained`` path (safetensors, configs,
tokenizer files). This writes a few-MB pipeline with the SD2-base architecture
so those code paths run offline and fast on CPU.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import warnings

from sdfleet.jobs.tiny_clip import clip_text_encoder, clip_tokenizer
from sdfleet.schemas.families import CLIP_TOKENS

# The SD2 family from the model card, scaled down: each variant keeps what tells its checkpoint
# apart (the UNet's conditioning channels, the VAE's scale factor, the prediction type, the extra
# components) and shrinks the rest. Default image sizes: 64 (base), 96 (768-v: "768-style", 1.5x
# base), 64 inpaint and depth, 16 -> 64 for the x4 upscaler.
TINY_SD2_VARIANTS = ("base", "768-v", "inpaint", "depth", "upscale")


def write_tiny_pipeline(path: str | os.PathLike, variant: str = "base") -> pathlib.Path:
    """Write one tiny SD2-family pipeline to ``path`` (safetensors) and return it.

    Seeding before each component keeps the weights byte-identical across runs,
    so cached fixtures and checksums stay valid.
    """
    if variant not in TINY_SD2_VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {', '.join(TINY_SD2_VARIANTS)}")
    tokenizer = clip_tokenizer()
    hidden = 32
    # 1. The components, each from seed 0.
    unet = _tiny_sd2_unet(variant, hidden)
    vae = _tiny_sd2_vae(variant)
    text_encoder = _tiny_sd2_text_encoder(tokenizer, hidden)
    parts = dict(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_tiny_sd2_scheduler(variant),
    )
    # 2. The variant's pipeline class around them, saved as safetensors.
    pipe = _tiny_sd2_pipeline(variant, parts)
    out = pathlib.Path(path)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _tiny_sd2_unet(variant: str, hidden: int):
    import torch
    from diffusers import UNet2DConditionModel

    # UNet input channels: 4 latent channels, plus the masked image's latents and the mask (inpaint),
    # the depth map (depth), or the low-resolution RGB image (upscale).
    in_channels = {"inpaint": 9, "depth": 5, "upscale": 7}.get(variant, 4)
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size={"768-v": 12, "upscale": 16}.get(variant, 8),
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden,
        attention_head_dim=(2, 4),  # per-block tuple, as in SD2
        use_linear_projection=True,  # SD2's transformer blocks use linear proj_in/out
        norm_num_groups=32,
        # The upscaler embeds its noise_level as a class label, as x4-upscaling does (1000 classes).
        num_class_embeds=1000 if variant == "upscale" else None,
    )


def _tiny_sd2_vae(variant: str):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    # Four blocks -> three downsamples -> scale factor 8, as in SD, so 64x64 images map to the
    # UNet's 8x8 latents; the x4 upscaler's VAE has three (scale factor 4) and its own scaling.
    blocks = 3 if variant == "upscale" else 4
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16)[:blocks],
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.08333 if variant == "upscale" else 0.18215,
    )


def _tiny_sd2_text_encoder(tokenizer, hidden: int):
    import torch

    torch.manual_seed(0)
    return clip_text_encoder(tokenizer, hidden)


def _tiny_sd2_scheduler(variant: str):
    from diffusers import DDIMScheduler, PNDMScheduler

    # SD2-base's shipped scheduler config (its model card swaps in Euler at
    # run time; the repo itself holds PNDM/PLMS). Built via from_config because
    # SD's config carries clip_sample, which PNDM's constructor does not accept.
    # 768-v and the upscaler are v-prediction checkpoints and ship DDIM, as their repos do.
    schedule = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        steps_offset=1,
        clip_sample=False,
    )
    if variant in ("768-v", "upscale"):
        return DDIMScheduler.from_config({**schedule, "prediction_type": "v_prediction"})
    return PNDMScheduler.from_config(
        {**schedule, "prediction_type": "epsilon", "skip_prk_steps": True}
    )


def _tiny_sd2_pipeline(variant: str, parts: dict):
    import diffusers
    from diffusers import DDPMScheduler

    if variant in ("base", "768-v", "inpaint"):
        cls = {"inpaint": diffusers.StableDiffusionInpaintPipeline}.get(
            variant, diffusers.StableDiffusionPipeline
        )
        return cls(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    if variant == "depth":
        return diffusers.StableDiffusionDepth2ImgPipeline(**parts, **_tiny_depth_estimator())
    # The upscaler noises its low-resolution input with a DDPM schedule, up to max_noise_level.
    low_res = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.0001,
        beta_end=0.02,
    )
    return diffusers.StableDiffusionUpscalePipeline(
        **parts,
        low_res_scheduler=low_res,
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        max_noise_level=350,
    )


def _tiny_depth_estimator() -> dict:
    """A tiny DPT (MiDaS' architecture, as 512-depth's dpt_hybrid) and its image processor."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    # Four transformer layers feed DPT's four reassemble stages, as ViT-based MiDaS does.
    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=16,
        reassemble_factors=[4, 2, 1, 0.5],
        is_hybrid=False,
    )
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False)
    return {"depth_estimator": DPTForDepthEstimation(config).eval(), "feature_extractor": processor}


# --------------------------------------------------------------------------- tiny safety detectors
# Random weights, real formats: each loads through the detector's own loading code. `flag` drives
# the output so tests can check every action: "nothing" makes every image safe, "everything"
# makes every image unsafe (set through the last layer's bias, or the checker's thresholds).
_FLAG_BIAS = 12.0  # a logit margin that no random feature can overcome


def write_tiny_nsfw_model(path: str | os.PathLike, flag: str = "nothing") -> pathlib.Path:
    """A Keras .h5 in nsfw-detector's contract: 224x224x3 in [0, 1] -> softmax over its 5 classes."""
    import numpy as np

    from sdfleet.actors.keras_models import import_tensorflow

    tf = import_tensorflow()
    keras = tf.keras
    keras.utils.set_random_seed(0)
    inputs = keras.Input((224, 224, 3))
    x = keras.layers.Conv2D(4, 3, strides=8, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    head = keras.layers.Dense(5, activation="softmax", name="predictions")
    model = keras.Model(inputs, head(x))
    kernel, bias = head.get_weights()
    bias = np.zeros_like(bias)
    # Classes in nsfw-detector's order: drawings, hentai, neutral, porn, sexy.
    bias[2 if flag == "nothing" else 3] = _FLAG_BIAS
    head.set_weights([kernel, bias])
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # .h5 is "legacy" to Keras but it is the format nsfw-detector's models ship in.
        warnings.simplefilter("ignore", UserWarning)
        model.save(out, save_format="h5")
    return out


# The tiny CLIP towers of the clip-checker detector and the scoring CLIP: two layers of width 32.
_CLIP_TOWER = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}
_CLIP_VISION = {**_CLIP_TOWER, "image_size": 32, "patch_size": 8}


def write_tiny_clip_checker(path: str | os.PathLike, flag: str = "nothing") -> pathlib.Path:
    """diffusers' StableDiffusionSafetyChecker with a tiny CLIP vision tower, and its image processor."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={**_CLIP_TOWER, "vocab_size": 100},
        vision_config=_CLIP_VISION,
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        # A concept is flagged when cosine similarity exceeds its threshold: -1 flags every image,
        # +1 (the highest similarity there is) flags none.
        threshold = 1.0 if flag == "nothing" else -1.0
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    out = pathlib.Path(path)
    checker.save_pretrained(out, safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(out)
    return out


def write_tiny_hf_classifier(path: str | os.PathLike, flag: str = "nothing") -> pathlib.Path:
    """A tiny ViT image classifier with labels normal/nsfw, like the NSFW classifiers on the hub."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
    )
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        model.classifier.bias.zero_()
        model.classifier.bias[0 if flag == "nothing" else 1] = _FLAG_BIAS
    out = pathlib.Path(path)
    model.save_pretrained(out, safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def write_tiny_models(folder: str | os.PathLike) -> dict[str, pathlib.Path]:
    """Everything `sdfleet tiny-models` writes: the pipelines (SD2's variants, SDXL's base and
    refiner, SD3.5's, FLUX.1 dev-, schnell- and Fill-shaped), an fp16-fixed SDXL VAE (for model.vae),
    a LoRA for the SD2 and the FLUX.1 dev pipelines (for model.loras) and one tiny model per
    detector and scorer."""
    from sdfleet.jobs.tiny_flux import TINY_FLUX_VARIANTS, write_tiny_flux
    from sdfleet.jobs.tiny_lora import write_tiny_lora
    from sdfleet.jobs.tiny_sd3 import write_tiny_sd3
    from sdfleet.jobs.tiny_sdxl import (
        TINY_SDXL_VAE,
        TINY_SDXL_VARIANTS,
        write_tiny_sdxl,
        write_tiny_sdxl_vae,
    )

    folder = pathlib.Path(folder)
    models = {
        "pipeline": write_tiny_pipeline(folder / "tiny-sd2"),
        **{
            f"pipeline {v}": write_tiny_pipeline(folder / f"tiny-sd2-{v}", v)
            for v in TINY_SD2_VARIANTS[1:]
        },
        **{f"sdxl {v}": write_tiny_sdxl(folder / f"tiny-sdxl-{v}", v) for v in TINY_SDXL_VARIANTS},
        "sdxl vae (fp16 fix)": write_tiny_sdxl_vae(folder / TINY_SDXL_VAE),
        "sd3": write_tiny_sd3(folder / "tiny-sd3"),
        **{f"flux {v}": write_tiny_flux(folder / f"tiny-flux-{v}", v) for v in TINY_FLUX_VARIANTS},
        "nsfw-detector": write_tiny_nsfw_model(folder / "tiny-nsfw.h5"),
        "clip-checker": write_tiny_clip_checker(folder / "tiny-clip-checker"),
        "hf-classifier": write_tiny_hf_classifier(folder / "tiny-hf-classifier"),
        "clip (score)": write_tiny_clip(folder / "tiny-clip"),
        "aesthetic head": write_tiny_aesthetic_head(folder / "tiny-aesthetic.safetensors"),
        "nsfw head": write_tiny_nsfw_head(folder / "tiny-laion-nsfw.safetensors"),
        "fid (score)": write_tiny_inception(folder / "tiny-fid.safetensors"),
    }
    # LoRAs for model.loras, made for the pipelines just written.
    models["lora (sd2)"] = write_tiny_lora(models["pipeline"], folder / "tiny-lora-sd2")
    models["lora (flux)"] = write_tiny_lora(models["flux dev"], folder / "tiny-lora-flux")
    return models


# --------------------------------------------------------------------------- tiny scoring models
# For `sdfleet score` tests: random weights in the real formats, loaded through the real loaders
# (CLIPModel/CLIPProcessor.from_pretrained with safetensors; jobs.score.inception.load_feature_extractor).


def write_tiny_clip(path: str | os.PathLike) -> pathlib.Path:
    """A tiny CLIPModel (text + vision towers, 32x32 images) with its CLIPProcessor, in safetensors."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            **_CLIP_TOWER,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": CLIP_TOKENS,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=_CLIP_VISION,
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    with torch.no_grad():
        # Random towers give near-constant, mostly negative similarities, which the score clips to 0.
        # One shared projection and a shared bias before it spread the scores over roughly 0-35.
        torch.manual_seed(1)
        shared = torch.randn(config.text_config.hidden_size)
        model.text_projection.weight.copy_(model.visual_projection.weight)
        model.text_model.final_layer_norm.bias.copy_(shared)
        model.vision_model.post_layernorm.bias.copy_(shared)
    out = pathlib.Path(path)
    model.save_pretrained(out, safe_serialization=True)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def write_tiny_inception(path: str | os.PathLike) -> pathlib.Path:
    """Tiny FID feature-extractor weights (.safetensors) for jobs.score: a two-conv network with the
    FID InceptionV3's interface (uint8 images in, features out), named in the file's metadata so the
    loader builds the right network. Batch-norm statistics are randomised, like trained ones."""
    import torch
    from safetensors.torch import save_file

    from sdfleet.jobs.score.inception import ARCH_METADATA_KEY, TinyFeatureExtractor

    torch.manual_seed(0)
    net = TinyFeatureExtractor()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        net.conv2.bn.weight.mul_(10.0)  # features of order 1, so FIDs are not all ~0.001
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.contiguous()
        for k, v in net.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    save_file(state, str(out), metadata={ARCH_METADATA_KEY: TinyFeatureExtractor.arch})
    return out


# --------------------------------------------------------------------------- tiny curation heads
# In sdfleet.actors.curation's head format, on tiny-clip's 16-wide embeddings: the LAION aesthetic
# predictor's shape (five linear layers, no activation, a score out) and the LAION CLIP NSFW
# classifier's (a normalization, ReLU layers, a sigmoid probability out), scaled down.


def _write_head(path, widths: list[int], metadata: dict[str, str], normalization: bool, seed: int):
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    tensors = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        layer = torch.nn.Linear(n_in, n_out)
        tensors[f"layers.{i}.weight"], tensors[f"layers.{i}.bias"] = (
            layer.weight.detach(),
            layer.bias.detach(),
        )
    if normalization:
        tensors["input_mean"] = torch.randn(widths[0]) * 0.05
        tensors["input_variance"] = torch.rand(widths[0]) * 0.01 + 0.005
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata=metadata)
    return out


def write_tiny_aesthetic_head(path: str | os.PathLike, embedding_size: int = 16) -> pathlib.Path:
    return _write_head(
        path,
        [embedding_size, 32, 16, 8, 4, 1],
        {"sdfleet_head": "aesthetic", "hidden_activation": "none", "output": "identity"},
        normalization=False,
        seed=2,
    )


def write_tiny_nsfw_head(path: str | os.PathLike, embedding_size: int = 16) -> pathlib.Path:
    return _write_head(
        path,
        [embedding_size, 32, 16, 1],
        {"sdfleet_head": "nsfw", "hidden_activation": "relu", "output": "sigmoid"},
        normalization=True,
        seed=3,
    )
