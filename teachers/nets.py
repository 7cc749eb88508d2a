"""Factories for the small diffusers networks the project trains, ships and tests with (docs/design.md §9)."""

from __future__ import annotations

from diffusers import UNet2DModel

__all__ = ["small_unet"]


def small_unet(
    sample_size: int = 8,
    in_channels: int = 1,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    layers_per_block: int = 1,
    attention: bool = True,
    num_class_embeds: int | None = None,
    norm_num_groups: int = 8,
    attention_head_dim: int = 8,
    class_embed_type: str | None = None,
) -> UNet2DModel:
    """A ``UNet2DModel`` with attention in the lowest-resolution blocks: (32, 64, 64) is 1.1 M parameters.

    ``class_embed_type="timestep"`` adds a second timestep-style embedding (students use it for a target noise
    level); ``num_class_embeds`` adds a label embedding.
    """
    n = len(block_out_channels)
    down = ("DownBlock2D",) * (n - 1) + (("AttnDownBlock2D",) if attention else ("DownBlock2D",))
    up = (("AttnUpBlock2D",) if attention else ("UpBlock2D",)) + ("UpBlock2D",) * (n - 1)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=norm_num_groups,
        attention_head_dim=attention_head_dim,
        add_attention=attention,
        num_class_embeds=num_class_embeds,
        class_embed_type=class_embed_type,
    )
