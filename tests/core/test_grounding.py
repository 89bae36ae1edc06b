"""Binding: words aligned to objects, the grounding losses, lexical cross-attention values."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from core.diffusion.data.shapes import (
    ShapeObject,
    ShapesDataset,
    aligned_caption,
    canonical_caption,
    object_masks,
)
from core.diffusion.text import TextConditioning, TextEncoder, WordTokenizer
from core.diffusion.training.grounding import grounding_losses, sample_masks, word_owner_tokens
from core.diffusion.unet import UNet
from core.diffusion.words import split_words
from tests.conftest import TINY_TEXT, TINY_UNET

CIRCLE = ShapeObject("circle", "red", "large", "top left")
SQUARE = ShapeObject("square", "blue", "small", "bottom right")


def test_every_content_word_of_every_paraphrase_names_its_own_object() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        text, owners = aligned_caption([CIRCLE, SQUARE], "navy", rng)
        words = split_words(text)
        assert len(owners) == len(words)
        named = {k: {w for w, o in zip(words, owners, strict=True) if o == k} for k in (0, 1)}
        assert named[0] == {"large", "red", "circle", "top", "left"} | (
            {"corner"} if "corner" in words else set()
        )
        assert {"small", "blue", "square", "bottom", "right"} <= named[1]
        # the background and the glue words belong to no object
        assert all(o == -1 for w, o in zip(words, owners, strict=True) if w in {"navy", "and"})


def test_the_dataset_carries_the_alignment_and_the_canonical_caption_keeps_its_text() -> None:
    text, owners = aligned_caption([CIRCLE, SQUARE], "gray", None)
    assert text == canonical_caption([CIRCLE, SQUARE])
    assert owners[:5] == (-1, 0, 0, 0, -1)  # "a large red circle in"
    sample = ShapesDataset(seed=3)[5]
    assert len(sample.word_objects) == len(split_words(sample.caption))


def test_object_masks_cover_each_object_where_it_is_drawn() -> None:
    sample = ShapesDataset(seed=0, max_objects=2)[1]
    masks = object_masks(sample)
    assert masks.shape == (len(sample.objects), 64, 64)
    for mask, obj in zip(masks, sample.objects, strict=True):
        inside = mask > 0.99
        assert inside.any()
        assert (sample.image[inside] == np.array(_rgb(obj.color))).all()
    assert (masks.sum(0) <= 1.0 + 1e-6).all()  # objects never overlap


def _rgb(color: str) -> tuple[int, int, int]:
    from core.diffusion.data.shapes import COLORS

    return COLORS[color]


def _two_object_case(attention_to: str) -> dict[str, torch.Tensor]:
    """A 4×4 grid, two objects (left half, right half), tokens 1 and 2 naming object 0 and 1.
    ``attention_to``: "own" puts each half's attention on its object's token, "other" on the
    other object's."""
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, :, :2] = 1.0
    masks[0, 1, :, 2:] = 1.0
    owners = torch.zeros(1, 4, 2)
    owners[0, 1, 0] = owners[0, 2, 1] = 1.0
    probs = torch.full((1, 2, 16, 4), 0.02)  # two heads, 16 positions, 4 tokens
    left = torch.arange(16) % 4 < 2
    own, other = (1, 2) if attention_to == "own" else (2, 1)
    probs[0, :, left, own] = probs[0, :, ~left, other] = 0.94
    return grounding_losses([probs], masks, owners)


def test_attention_inside_the_objects_mask_gives_lower_grounding_losses_than_outside() -> None:
    right, wrong = _two_object_case("own"), _two_object_case("other")
    assert right["token"] < 0.1 < 2.0 < wrong["token"]
    assert right["spatial"] < 0.1 < 2.0 < wrong["spatial"]


def test_grounding_losses_ignore_dropped_captions_and_need_two_objects_for_the_token_term() -> None:
    samples = [ShapesDataset(seed=0)[i] for i in range(12)]
    owners = word_owner_tokens(samples, [i % 2 == 0 for i in range(12)], 32)
    assert owners[1::2].sum() == 0  # dropped captions name nothing
    assert owners[0].sum() == sum(k >= 0 for k in samples[0].word_objects)
    masks = sample_masks(samples)
    one = [i for i, s in enumerate(samples) if len(s.objects) == 1]
    assert one and masks[one, 1].sum() == 0
    probs = torch.softmax(torch.randn(12, 2, 16, 32, requires_grad=True), dim=-1)
    losses = grounding_losses([probs], masks, owners)
    losses["token"].backward()
    assert torch.isfinite(losses["token"]) and torch.isfinite(losses["spatial"])


def _fast_and_recorded(
    unet: UNet, cond: TextConditioning
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """One forward pass as sampling runs it and one recording the maps; they must agree."""
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    fast = unet(x, t, cond.states, cond.mask)
    with unet.recording_cross_attention() as layers:
        slow = unet(x, t, cond.states, cond.mask)
        maps = [layer.probs for layer in layers]
    assert torch.allclose(fast, slow, atol=1e-5)
    return x, t, fast, maps


def test_recorded_cross_attention_changes_nothing_and_keeps_the_maps() -> None:
    torch.manual_seed(0)
    tok = WordTokenizer(["a", "red", "circle"], max_length=TINY_TEXT.max_length)
    text = TextEncoder(TINY_TEXT, tok)
    unet = UNet(TINY_UNET).eval()
    cond = text.encode(["a red circle", "circle"])
    maps = _fast_and_recorded(unet, cond)[3]
    assert maps and all(m is not None for m in maps)
    assert all(torch.allclose(m.sum(-1), torch.ones(())) for m in maps if m is not None)
    assert all(m is not None and m[1, :, :, 3:].max() == 0 for m in maps)  # padding unseen
    assert all(layer.probs is None for layer in unet.cross_attentions())


def test_lexical_values_read_keys_from_context_and_values_from_the_words() -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY_TEXT, lexical=True)
    tok = WordTokenizer(["a", "red", "blue", "circle", "in", "top", "left"], cfg.max_length)
    text = TextEncoder(cfg, tok)
    assert text.width == 2 * cfg.width
    states = text.encode(["a red circle in top left", "a red circle"]).states
    half = cfg.width
    # the lexical half of "red" is the same whatever its context; the contextual half is not
    assert torch.allclose(states[0, 2, half:], states[1, 2, half:])
    assert not torch.allclose(states[0, 2, :half], states[1, 2, :half])
    unet = UNet(dataclasses.replace(TINY_UNET, lexical_values=True))
    cond = text.encode(["a red circle"])
    out = unet(torch.randn(1, 4, 8, 8), torch.tensor([5]), cond.states, cond.mask)
    assert out.shape == (1, 4, 8, 8)


def test_training_refuses_lexical_values_without_a_lexical_encoder(tmp_path: Path) -> None:
    from core.diffusion.training.config import DenoiserTrainConfig, load_config
    from core.diffusion.training.denoiser import train_denoiser

    cfg = load_config(DenoiserTrainConfig, overrides={"unet": {"lexical_values": True}})
    with pytest.raises(ValueError, match=r"lexical_values and text\.lexical"):
        train_denoiser(cfg, tmp_path / "ae", tmp_path / "out", progress=False)


def test_relative_position_bias_is_learned_per_layer_and_head_and_keeps_padding_out() -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY_TEXT, relative_positions=3)
    tok = WordTokenizer(["a", "red", "circle"], cfg.max_length)
    text = TextEncoder(cfg, tok)
    assert text.relative_bias is not None
    assert text.relative_bias.shape == (cfg.layers, cfg.heads, 7)
    before = text.encode(["a red circle"]).states
    with torch.no_grad():
        text.relative_bias[:, :, 3 + 1] = 5.0  # every head looks at the next token
    after = text.encode(["a red circle"]).states
    assert not torch.allclose(before[0, :5], after[0, :5])
    # padding never leaks in: the same prompt beside a longer one encodes the same
    pair = text.encode(["a red circle", "a red circle red red red red"]).states
    assert torch.allclose(pair[0], after[0], atol=1e-6)


def test_location_loss_is_lower_when_each_word_points_at_its_own_objects_center() -> None:
    from core.diffusion.training.grounding import location_loss, mask_centers

    masks = torch.zeros(1, 2, 8, 8)
    masks[0, 0, :2, :2] = 1.0  # object 0 in the top left
    masks[0, 1, 6:, 6:] = 1.0  # object 1 in the bottom right
    centers = mask_centers(masks)
    assert torch.allclose(centers[0, 0], torch.tensor([-0.75, -0.75]))
    assert torch.allclose(centers[0, 1], torch.tensor([0.75, 0.75]))
    owners = torch.zeros(1, 4, 2)
    owners[0, 1, 0] = owners[0, 2, 1] = 1.0  # token 1 names object 0, token 2 object 1
    right = torch.zeros(1, 4, 2)
    right[0, 1], right[0, 2] = centers[0, 0], centers[0, 1]
    swapped = right[:, [0, 2, 1, 3]]
    # token 3 (unowned) may say anything
    right[0, 3] = swapped[0, 3] = torch.tensor([9.0, 9.0])
    assert location_loss(right, owners, masks) < 1e-6
    assert location_loss(swapped, owners, masks) > 2.0


def test_text_pretraining_teaches_object_words_where_their_object_is() -> None:
    from core.diffusion.data.shapes import vocabulary
    from core.diffusion.training.config import DenoiserTrainConfig, load_config
    from core.diffusion.training.denoiser import TextToLatent, pretrain_text_encoder
    from core.diffusion.training.grounding import location_loss

    torch.manual_seed(0)
    cfg = load_config(
        DenoiserTrainConfig,
        overrides={"train": {"text_grounding": 1.0, "text_pretrain_steps": 40}},
    )
    text = TextEncoder(TINY_TEXT, WordTokenizer(vocabulary(), TINY_TEXT.max_length))
    model = TextToLatent(text, UNet(TINY_UNET), locate=True)
    samples = [ShapesDataset(seed=99, two_object_share=1.0)[i] for i in range(64)]
    owners = word_owner_tokens(samples, [True] * 64, TINY_TEXT.max_length)

    def held_out_loss() -> float:
        assert model.locator is not None
        with torch.no_grad():
            states = text.encode([s.caption for s in samples]).states
            return location_loss(model.locator(states), owners, sample_masks(samples)).item()

    before = held_out_loss()
    pretrain_text_encoder(model, cfg)
    assert held_out_loss() < 0.5 * before


def test_text_pretraining_needs_the_text_grounding_weight() -> None:
    from core.diffusion.training.config import DenoiserTrainConfig, load_config

    with pytest.raises(ValueError, match="text_pretrain_steps"):
        load_config(DenoiserTrainConfig, overrides={"train": {"text_pretrain_steps": 10}})


def _layout_encoder() -> TextEncoder:
    cfg = dataclasses.replace(TINY_TEXT, lexical=True, layout=True)
    tok = WordTokenizer(["a", "red", "blue", "circle", "square", "and"], cfg.max_length)
    return TextEncoder(cfg, tok)


def test_the_layout_head_appends_three_channels_after_the_contextual_and_lexical_states() -> None:
    torch.manual_seed(0)
    text = _layout_encoder()
    assert text.width == 2 * TINY_TEXT.width + 3
    states = text.encode(["a red circle"]).states
    assert states.shape[-1] == text.width
    assert text.layout_head is not None
    contextual = states[..., : TINY_TEXT.width]
    assert torch.allclose(states[..., -3:], text.layout_head(contextual), atol=1e-6)


def _layout_unet() -> UNet:
    return UNet(dataclasses.replace(TINY_UNET, lexical_values=True, layout_bias=True))


def test_layout_bias_draws_each_pixel_to_the_words_the_text_places_near_it() -> None:
    """Hand-built layout on a 4×4 grid: token 1 owned and placed at the top left, token 2 owned
    and placed at the bottom right, token 3 free. With all keys equal, the bias alone decides."""
    attn = _layout_unet().cross_attentions()[0]
    layout = torch.zeros(1, 4, 3)
    layout[0, :, 2] = -20.0  # nothing owned ...
    layout[0, 1] = torch.tensor([-0.75, -0.75, 20.0])  # ... but token 1, at the top left
    layout[0, 2] = torch.tensor([0.75, 0.75, 20.0])  # and token 2, at the bottom right
    bias = attn.layout_logits(layout, (4, 4))  # (1, heads, 16, 4)
    probs = bias.softmax(-1)[0, 0]
    top_left, bottom_right = 0, 15
    # each corner reads its own object's word 10× more than the other's (free tokens share)
    assert probs[top_left, 1] > 10 * probs[top_left, 2]
    assert probs[bottom_right, 2] > 10 * probs[bottom_right, 1]
    # a free token is equally reachable from everywhere; the owned ones fall off with distance
    assert torch.allclose(bias[0, :, :, 3], torch.zeros(()), atol=1e-6)
    assert torch.allclose(bias[0, :, :, 0], torch.zeros(()), atol=1e-6)
    along_the_diagonal = bias[0, 0, [0, 5, 10, 15], 1]
    assert (along_the_diagonal.diff() < 0).all()


def test_layout_bias_keeps_padding_out_leaves_the_layout_untrained_and_records_the_same() -> None:
    torch.manual_seed(0)
    text, unet = _layout_encoder(), _layout_unet().eval()
    cond = text.encode(["a red circle and a blue square", "circle"])
    x, t, fast, maps = _fast_and_recorded(unet, cond)
    assert all(m is not None and m[1, :, :, 3:].max() == 0 for m in maps)  # padding unseen
    # the diffusion loss reaches the encoder's states but not its layout head
    fast.pow(2).mean().backward()
    head = text.layout_head
    assert head is not None and (head.weight.grad is None or not head.weight.grad.any())
    assert text.token_embedding.weight.grad is not None
    # alone or beside another prompt, an image's output is the same
    alone = unet(x[:1], t[:1], cond.states[:1], cond.mask[:1])
    assert torch.allclose(alone, fast[:1], atol=1e-5)


def test_layout_loss_is_lower_when_the_head_places_each_word_at_its_object_and_owns_it() -> None:
    from core.diffusion.training.grounding import layout_loss, mask_centers

    masks = torch.zeros(1, 2, 8, 8)
    masks[0, 0, :2, :2] = 1.0
    masks[0, 1, 6:, 6:] = 1.0
    centers = mask_centers(masks)
    owners = torch.zeros(1, 5, 2)
    owners[0, 1, 0] = owners[0, 2, 1] = 1.0  # tokens 1, 2 name objects 0, 1; 0 and 3 name none
    token_mask = torch.tensor([[True, True, True, True, False]])  # token 4 is padding
    right = torch.zeros(1, 5, 3)
    right[0, :, 2] = -10.0
    right[0, 1, :2], right[0, 2, :2] = centers[0, 0], centers[0, 1]
    right[0, 1:3, 2] = 10.0
    right[0, 4, 2] = 10.0  # padding may say anything
    swapped = right.clone()
    swapped[0, 1, :2], swapped[0, 2, :2] = centers[0, 1], centers[0, 0]
    unowned = right.clone()
    unowned[0, 1:3, 2] = -10.0  # right places, but claims the words name nothing
    good = layout_loss(right, owners, masks, token_mask)
    assert good < 1e-3
    assert layout_loss(swapped, owners, masks, token_mask) > 2.0
    assert layout_loss(unowned, owners, masks, token_mask) > 4.0


def test_text_pretraining_grounds_the_layout_head() -> None:
    from core.diffusion.data.shapes import vocabulary
    from core.diffusion.training.config import DenoiserTrainConfig, load_config
    from core.diffusion.training.denoiser import TextToLatent, pretrain_text_encoder
    from core.diffusion.training.grounding import layout_loss

    torch.manual_seed(0)
    cfg = load_config(
        DenoiserTrainConfig,
        overrides={"train": {"text_grounding": 1.0, "text_pretrain_steps": 40}},
    )
    text_cfg = dataclasses.replace(TINY_TEXT, layout=True)
    text = TextEncoder(text_cfg, WordTokenizer(vocabulary(), text_cfg.max_length))
    model = TextToLatent(text, UNet(dataclasses.replace(TINY_UNET, layout_bias=True)), True)
    assert model.locator is None  # the encoder's own head is grounded, not a training probe
    samples = [ShapesDataset(seed=99, two_object_share=1.0)[i] for i in range(64)]
    owners = word_owner_tokens(samples, [True] * 64, text_cfg.max_length)

    def held_out_loss() -> float:
        with torch.no_grad():
            cond = text.encode([s.caption for s in samples])
            masks = sample_masks(samples)
            return layout_loss(cond.states[..., -3:], owners, masks, cond.mask).item()

    before = held_out_loss()
    pretrain_text_encoder(model, cfg)
    assert held_out_loss() < 0.5 * before


def test_training_refuses_a_layout_head_it_cannot_ground(tmp_path: Path) -> None:
    from core.diffusion.training.config import DenoiserTrainConfig, load_config
    from core.diffusion.training.denoiser import train_denoiser

    half = load_config(DenoiserTrainConfig, overrides={"text": {"layout": True}})
    with pytest.raises(ValueError, match=r"layout_bias and text\.layout"):
        train_denoiser(half, tmp_path / "ae", tmp_path / "out", progress=False)
    ungrounded = load_config(
        DenoiserTrainConfig, overrides={"text": {"layout": True}, "unet": {"layout_bias": True}}
    )
    with pytest.raises(ValueError, match="text_grounding"):
        train_denoiser(ungrounded, tmp_path / "ae", tmp_path / "out", progress=False)
