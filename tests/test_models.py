"""The models: shapes, named shared weights, exact masking, positions, and reproducible builds."""

from __future__ import annotations

import pytest
import torch

from distshare.config import ModelConfig
from distshare.data.types import DataInfo
from distshare.errors import ConfigError
from distshare.models import SmallCNN, TinyTransformer, build_model

VOCAB = ("<pad>", "cat", "eat", "mouse", "dog", "chase")
PAD, CAT, EAT, MOUSE, DOG, CHASE = range(len(VOCAB))
SEQ = DataInfo(kind="text", task="sequence", num_classes=3, vocab=VOCAB, max_len=8)
TOK = DataInfo(kind="text", task="token", num_classes=4, vocab=VOCAB, max_len=8)


def image_info(c: int, h: int, w: int) -> DataInfo:
    return DataInfo(kind="image", task="sequence", num_classes=5, image_shape=(c, h, w))


def transformer(info: DataInfo = SEQ, seed: int = 0, **overrides) -> torch.nn.Module:
    cfg = ModelConfig(name="transformer", dtype="float64", **overrides)
    return build_model(cfg, info, seed).eval()


def padded(tokens: list[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([t + [PAD] * (length - len(t)) for t in tokens])
    return ids, ids != PAD


def assert_every_parameter_has_a_gradient(model: torch.nn.Module) -> None:
    """After a backward through every layer: each trainable parameter got a gradient, finite
    and not all zero (a parameter the loss never reached would be silently left out of training)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params
    for name, p in params:
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: an all-zero gradient"


def test_transformer_shapes_for_both_tasks():
    ids, mask = padded([[CAT, EAT, MOUSE], [DOG, CHASE, CAT, PAD]], 6)
    assert transformer(SEQ)(ids, mask).shape == (2, 3)
    logits, maps = transformer(TOK, n_layers=3, n_heads=2)(ids, mask, return_attention=True)
    assert logits.shape == (2, 6, 4)
    assert len(maps) == 3 and all(m.shape == (2, 2, 6, 6) for m in maps)


def test_every_layer_has_its_own_named_w_q_w_k_w_v_w_o():
    names = dict(transformer(n_layers=2, d_model=16).named_parameters())
    for layer in range(2):
        for w in ("W_Q", "W_K", "W_V", "W_O"):
            assert names[f"layers.{layer}.attn.{w}.weight"].shape == (16, 16)
    assert not any(n.startswith("pe") for n in names), "positions are a fixed buffer, not a parameter"


def test_attention_rows_sum_to_one_and_ignore_padding_keys():
    ids, mask = padded([[CAT, EAT, MOUSE], [DOG, CHASE, CAT, EAT, MOUSE], []], 7)
    logits, maps = transformer()(ids, mask, return_attention=True)
    assert torch.isfinite(logits).all(), "an all-padding sample must not produce NaN"
    for attn in maps:
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1], dtype=attn.dtype))
        # Exactly zero, not merely small: pads must contribute nothing at all.
        assert (attn[:2] * ~mask[:2, None, None, :] == 0).all()


def test_gradients_stay_finite_with_padding_and_an_empty_sample():
    model = transformer(TOK)
    ids, mask = padded([[CAT, EAT], []], 5)
    model(ids, mask).sum().backward()
    assert_every_parameter_has_a_gradient(model)


def test_without_positions_token_order_does_not_matter():
    ids, mask = padded([[CAT, EAT, MOUSE, DOG]], 6)
    shuffled, _ = padded([[DOG, MOUSE, CAT, EAT]], 6)
    bag = transformer(positional=False)
    torch.testing.assert_close(bag(ids, mask), bag(shuffled, mask), rtol=1e-12, atol=1e-12)
    ordered = transformer(positional=True)
    assert not torch.allclose(ordered(ids, mask), ordered(shuffled, mask), rtol=1e-6, atol=1e-6)


def test_eat_leaves_with_a_different_representation_only_when_positions_are_on():
    # Claim 6: "eat" enters both sentences with the same embedding (and the same position 1).
    ids, mask = padded([[CAT, EAT, MOUSE], [MOUSE, EAT, CAT]], 3)
    for positional, differs in ((True, True), (False, False)):
        hidden, _ = transformer(positional=positional).encode(ids, mask)
        close = torch.allclose(hidden[0, 1], hidden[1, 1], rtol=1e-12, atol=1e-12)
        assert close != differs


@pytest.mark.parametrize("info", [SEQ, TOK], ids=["sequence", "token"])
def test_padding_length_and_batch_mates_do_not_change_a_sample(info):
    model = transformer(info)
    sentence = [CAT, CHASE, MOUSE]
    short_ids, short_mask = padded([sentence], 3)
    long_ids, long_mask = padded([sentence, [DOG, EAT, CAT, EAT, MOUSE, DOG, CAT]], 8)
    short, long = model(short_ids, short_mask)[0], model(long_ids, long_mask)[0]
    if info.task == "token":
        long = long[:3]  # the padding positions have logits too; their labels are ignored
    torch.testing.assert_close(short, long, rtol=1e-12, atol=1e-12)


def test_pad_mask_defaults_to_non_padding_ids():
    model = transformer()
    ids, mask = padded([[CAT, EAT], [MOUSE]], 4)
    assert torch.equal(model(ids), model(ids, mask))


def test_same_seed_gives_identical_parameters_and_leaves_the_global_rng_alone():
    for cfg, info in ((ModelConfig(name="transformer"), SEQ), (ModelConfig(name="cnn"), image_info(1, 8, 8))):
        before = torch.get_rng_state()
        a, b = build_model(cfg, info, seed=7), build_model(cfg, info, seed=7)
        assert torch.equal(torch.get_rng_state(), before)
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(pa, pb), name
        c = build_model(cfg, info, seed=8)
        assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))


@pytest.mark.parametrize("name,info", [("transformer", SEQ), ("cnn", image_info(1, 8, 8))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_honored(name, info, dtype):
    model = build_model(ModelConfig(name=name, dtype=str(dtype).removeprefix("torch.")), info, seed=0)
    assert all(t.dtype == dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())
    if name == "transformer":
        out = model(*padded([[CAT, EAT, MOUSE]], 8))
    else:
        out = model(torch.zeros(2, *info.image_shape, dtype=dtype))
    assert out.dtype == dtype


@pytest.mark.parametrize("norm", ["none", "batch", "group"])
@pytest.mark.parametrize("shape", [(1, 12, 12), (1, 8, 8), (3, 13, 7), (2, 5, 10)])
def test_cnn_shapes_with_every_norm(norm, shape):
    info = image_info(*shape)
    model = build_model(ModelConfig(name="cnn", norm=norm, conv_channels=4), info, seed=0)
    assert isinstance(model, SmallCNN)
    logits = model(torch.randn(3, *shape))
    assert logits.shape == (3, info.num_classes)
    logits.sum().backward()
    assert_every_parameter_has_a_gradient(model)


def test_cnn_rejects_images_too_small_for_two_poolings():
    with pytest.raises(ValueError, match="too small"):
        SmallCNN(image_info(1, 3, 8))


@pytest.mark.parametrize(
    "name,info,reason",
    [
        ("cnn", SEQ, "the cnn needs image data; the data set is text"),
        ("transformer", image_info(1, 8, 8), "the transformer needs text data; the data set is image"),
        ("mlp", SEQ, "unknown value 'mlp'"),
    ],
)
def test_model_and_data_mismatch_is_a_config_error(name, info, reason):
    with pytest.raises(ConfigError, match=reason) as err:
        build_model(ModelConfig(name=name), info, seed=0)
    assert err.value.field == "model.name"


def test_build_picks_the_class_by_name():
    assert isinstance(build_model(ModelConfig(name="transformer"), TOK, seed=0), TinyTransformer)
