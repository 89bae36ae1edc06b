"""The three networks: shapes, masks, the tokenizer's contract, and the losses."""

from __future__ import annotations

import math

import pytest
import torch

from core.diffusion.autoencoder import Autoencoder, AutoencoderConfig, LatentDistribution, psnr
from core.diffusion.schedule import NoiseSchedule, ScheduleConfig
from core.diffusion.text import TextEncoder, WordTokenizer
from core.diffusion.training.denoiser import diffusion_loss
from core.diffusion.unet import UNet, UNetConfig, timestep_embedding
from tests.conftest import TINY_TEXT, TINY_UNET


def test_tokenizer_accepts_any_unicode_and_maps_unknown_words_to_unk() -> None:
    tok = WordTokenizer(["a", "red", "circle"], max_length=8)
    out = tok.encode(["A RED circle", "ein rotes Kreis 🔴 円", ""])
    ids = out.ids.tolist()
    assert ids[0][:5] == [1, tok.index["a"], tok.index["red"], tok.index["circle"], 2]
    unk = tok.index["<unk>"]
    assert set(ids[1][1:6]) == {unk}  # every unknown word, emoji and CJK character
    assert ids[2][:2] == [1, 2]  # the empty prompt is just <bos><eos>
    assert out.mask.tolist()[2] == [True, True] + [False] * 6
    assert out.truncated == [False, False, False]


def test_tokenizer_truncates_at_max_length_and_says_so() -> None:
    tok = WordTokenizer(["red"], max_length=5)
    out = tok.encode(["red red red", "red red red red"])
    assert out.truncated == [False, True]
    assert out.ids.shape == (2, 5)
    assert out.ids[1].tolist() == [1, 4, 4, 4, 2]  # cut words, but <eos> is kept


def test_tokenizer_round_trips_through_its_config() -> None:
    tok = WordTokenizer(["b", "a"], max_length=7)
    again = WordTokenizer.from_dict(tok.to_dict())
    assert again.vocab == tok.vocab and again.max_length == 7


def test_text_encoder_returns_per_token_states_and_ignores_padding() -> None:
    torch.manual_seed(0)
    tok = WordTokenizer(["a", "red", "circle", "blue"], max_length=TINY_TEXT.max_length)
    enc = TextEncoder(TINY_TEXT, tok).eval()
    cond = enc.encode(["a red circle", "a blue circle"])
    assert cond.states.shape == (2, TINY_TEXT.max_length, TINY_TEXT.width)
    assert cond.mask.sum(1).tolist() == [5, 5]
    # A real token's state depends on the other real tokens ...
    assert not torch.allclose(cond.states[0, 2], cond.states[1, 2])
    # ... but not on what the padding slots hold.
    ids, mask = tok.encode(["a red circle"]).ids, tok.encode(["a red circle"]).mask
    ids2 = ids.clone()
    ids2[0, 6:] = tok.index["blue"]
    with torch.no_grad():
        assert torch.allclose(enc(ids, mask)[0, :5], enc(ids2, mask)[0, :5], atol=1e-6)


def test_autoencoder_downsamples_by_its_factor_to_four_channels() -> None:
    for channels, factor in (((8, 16), 4), ((8, 16, 16), 8)):
        ae = Autoencoder(AutoencoderConfig(channels=channels, groups=4))
        assert ae.config.downsample_factor == factor
        post = ae.encode(torch.randn(2, 3, 32, 32))
        assert post.mean.shape == (2, 4, 32 // factor, 32 // factor)
        assert ae.decode(post.mean).shape == (2, 3, 32, 32)


def test_kl_term_is_zero_exactly_at_the_standard_normal() -> None:
    z = torch.zeros(1, 4, 2, 2)
    assert LatentDistribution(z, z).kl().item() == 0.0
    assert LatentDistribution(z + 1, z).kl().item() == pytest.approx(0.5)


def test_psnr_matches_its_definition() -> None:
    a = torch.zeros(1, 3, 4, 4)
    b = a + 0.1  # MSE 0.01 over a peak-to-peak range of 2
    assert psnr(a, b) == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-5)


def test_timestep_embedding_is_cos_then_sin() -> None:
    e = timestep_embedding(torch.tensor([0, 5]), 8)
    assert e.shape == (2, 8)
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert e[1, 0].item() == pytest.approx(math.cos(5.0))


def test_unet_maps_latents_to_latents_and_uses_time_and_text() -> None:
    torch.manual_seed(0)
    unet = UNet(TINY_UNET).eval()
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)
    x = torch.randn(2, 4, 8, 8)
    ctx, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        out = unet(x, torch.tensor([10, 10]), ctx, mask)
        assert out.shape == x.shape
        assert not torch.allclose(out, unet(x, torch.tensor([900, 900]), ctx, mask))
        assert not torch.allclose(out, unet(x, torch.tensor([10, 10]), ctx.flip(0), mask))


def test_unet_has_attention_only_at_the_requested_levels() -> None:
    cfg = UNetConfig(
        channels=(16, 32, 32),
        attention_levels=(False, True, True),
        groups=8,
        heads=2,
        context_width=8,
    )
    unet = UNet(cfg)
    with_attn = [s.attn is not None for s in unet.down]
    assert with_attn == [False, True, True]
    assert unet.mid1.attn is not None


def test_untrained_loss_is_about_one_for_epsilon_and_min_snr_weights_apply() -> None:
    torch.manual_seed(0)
    unet = UNet(TINY_UNET)  # conv_out is zero at init: predicts 0, so the loss is E‖ε‖² = 1
    sched = NoiseSchedule()
    x0 = torch.randn(64, 4, 8, 8)
    ctx, mask = torch.randn(64, 5, 32), torch.ones(64, 5, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    plain = diffusion_loss(unet, sched, x0, ctx, mask, g).item()
    assert plain == pytest.approx(1.0, abs=0.05)
    weighted = diffusion_loss(unet, sched, x0, ctx, mask, torch.Generator().manual_seed(0), 5.0)
    assert weighted.item() < plain  # min(SNR, γ)/SNR ≤ 1 for every t
    vsched = NoiseSchedule(ScheduleConfig(prediction="v_prediction"))
    v = diffusion_loss(unet, vsched, x0, ctx, mask, torch.Generator().manual_seed(0)).item()
    assert v == pytest.approx(1.0, abs=0.1)  # E‖v‖² = ᾱ + (1−ᾱ)·E‖x0‖² ≈ 1 for unit data
