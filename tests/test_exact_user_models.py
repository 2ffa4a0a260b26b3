"""Claim: exact mode works on models nobody here wrote. transformers' GPT-2 and BERT, built from
tiny configs, trained in a plain loop with `distshare.exact.ExactGradients` (or under
`assert_accumulation_equivalent(sync="exact")`), end bitwise the same for every split W x k
of the global batch, on real gloo ranks; where a per-sample method cannot run a model, the
user reads one line naming the layer and the fix.

The contrast is measured beside it: the same loop with a normal summed-loss backward differs
between splits in the last bits, so "bitwise" is exact mode's doing, not a grid too small
to show rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import rules_written_in_place
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from distshare.distributed.spawn import run_distributed
from distshare.errors import UsageError
from distshare.exact import ExactGradients
from distshare.numerics import per_sample
from distshare.numerics.per_sample import CHUNK, choose_method, per_sample_grads
from distshare.testing import assert_accumulation_equivalent

VOCAB, LENGTH, G = 64, 12, 16
WORLD_SIZES, ACCUM_STEPS = (1, 2), (1, 2, 4)


# ---------------------------------------------------------------- models and losses nobody here wrote


def tiny_gpt2(dropout: float = 0.0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0,
        attn_pdrop=dropout, resid_pdrop=dropout, embd_pdrop=dropout,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def _bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra,
    )  # fmt: skip


def tiny_bert() -> nn.Module:
    from transformers import BertForMaskedLM

    return BertForMaskedLM(_bert_config())


def tiny_bert_classifier() -> nn.Module:
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(_bert_config(num_labels=3))


MODELS = {"gpt2": tiny_gpt2, "bert": tiny_bert}


def text(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n right-padded sequences of 6..LENGTH tokens: ids and attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, LENGTH), generator=gen)
    lengths = torch.randint(6, LENGTH + 1, (n,), generator=gen)
    mask = (torch.arange(LENGTH) < lengths.unsqueeze(1)).long()
    return ids * mask, mask


def causal_lm_losses(model: nn.Module, batch, attention_mask: bool = True) -> torch.Tensor:
    """Each sequence's summed next-token loss; padding labels -100 (exactly 0)."""
    ids, mask = batch
    logits = model(input_ids=ids, attention_mask=mask if attention_mask else None).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    per_token = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none", ignore_index=-100)
    return per_token.view(labels.shape).sum(dim=1)


def _hidden(mask: torch.Tensor) -> torch.Tensor:
    return (torch.arange(LENGTH) % 3 == 0) & (mask == 1)


def masked_lm_losses(model: nn.Module, batch) -> torch.Tensor:
    """Each sequence's summed loss of recovering every third token from a [MASK] (id 1)."""
    ids, mask = batch
    hidden = _hidden(mask)
    logits = model(input_ids=ids.masked_fill(hidden, 1), attention_mask=mask).logits
    labels = ids.masked_fill(~hidden, -100)
    per_token = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none", ignore_index=-100)
    return per_token.view(labels.shape).sum(dim=1)


def classifier_losses(model: nn.Module, batch) -> torch.Tensor:
    ids, mask = batch
    return F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, ids[:, 0] % 3, reduction="none")


LOSSES = {"gpt2": causal_lm_losses, "bert": masked_lm_losses}
ITEMS = {"gpt2": lambda mask: int(mask[:, 1:].sum()), "bert": lambda mask: int(_hidden(mask).sum())}  # label tokens


def causal_lm_loss(model: nn.Module, batch) -> torch.Tensor:
    return causal_lm_losses(model, batch).sum()


# ---------------------------------------------------------------- a plain loop, every split


def _train_loop(world, ks: list[int], steps: int, exact: bool) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
    """Each model trained `steps` steps for each k by a user's plain loop: this rank's parameters."""
    out = {}
    ids, mask = text(G * steps)
    for name, build in MODELS.items():
        losses_of = LOSSES[name]
        for k in ks:
            torch.manual_seed(0)
            model = build()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
            exact_grads = ExactGradients(model) if exact else None
            for s in range(steps):
                # The global batch s, this rank's contiguous share, cut into k micro-batches.
                batch = slice(s * G, (s + 1) * G)
                tokens = ITEMS[name](mask[batch])
                share = G // world.world_size
                start = s * G + world.rank * share
                micro = [
                    (ids[i : i + share // k], mask[i : i + share // k]) for i in range(start, start + share, share // k)
                ]
                if exact_grads is not None:
                    exact_grads.start_step(global_items=tokens, global_samples=G)
                    for m in micro:
                        exact_grads.accumulate(m, losses_of)
                    exact_grads.synchronize()
                else:  # the control: a summed-loss backward per micro-batch, all-reduced
                    for m in micro:
                        (losses_of(model, m).sum() / tokens).backward()
                    if world.world_size > 1:
                        for p in model.parameters():
                            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            out[(name, k)] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def _one_process():
    from distshare.distributed.world import World

    return World()


def _max_abs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.slow
def test_gpt2_and_bert_train_bitwise_alike_for_every_split_in_a_plain_loop():
    steps = 2
    exact = {(1, rank): r for rank, r in enumerate([_train_loop(_one_process(), list(ACCUM_STEPS), steps, True)])}
    two = run_distributed(_train_loop, 2, list(ACCUM_STEPS), steps, True, timeout_s=300)
    exact.update({(2, rank): r for rank, r in enumerate(two)})
    for name in MODELS:
        reference = exact[(1, 0)][(name, 1)]
        for (w, rank), runs in exact.items():
            for k in ACCUM_STEPS:
                params = runs[(name, k)]
                assert all(torch.equal(params[n], reference[n]) for n in reference), (name, w, k, rank)
    # The control: the same loop with a normal summed-loss backward, k = 4 against k = 1 on
    # one process (only the order of the additions changes): not bitwise, by rounding.
    normal = _train_loop(_one_process(), [1, 4], steps, False)
    for name in MODELS:
        d = _max_abs(normal[(name, 4)], normal[(name, 1)])
        assert 0 < d < 1e-4, (name, d)


# ---------------------------------------------------------------- per-sample gradients of GPT-2 and BERT


@pytest.mark.parametrize("name", ["gpt2", "bert", "bert-classifier"])
def test_a_samples_gradient_is_the_same_in_any_batch_and_sums_to_the_batch_gradient(name):
    # The premise of exact mode for these models: a sample's rows depend on the sample and
    # the parameters only (not on how many samples came with it, nor where it sat), and they
    # add up to the ordinary batch gradient (every use of every weight counted: GPT-2's
    # tied wte / lm_head, BERT's shared output bias, the position embeddings).
    build, losses_of = {
        "gpt2": (tiny_gpt2, causal_lm_losses),
        "bert": (tiny_bert, masked_lm_losses),
        "bert-classifier": (tiny_bert_classifier, classifier_losses),
    }[name]
    torch.manual_seed(0)
    model = build()
    assert choose_method(model) == "hooks"
    batch = text(CHUNK + 5)
    whole, _ = per_sample_grads(model, batch, losses_of)
    for size, start in ((1, 0), (1, 7), (3, 2), (CHUNK + 1, 4)):
        part, _ = per_sample_grads(model, tuple(t[start : start + size] for t in batch), losses_of)
        assert torch.equal(part, whole[start : start + size]), (size, start)
    assert _relative_error_to_batch_gradient(model, batch, losses_of, whole) < 1e-5


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_parameters_in_groups_of_their_own_get_the_same_rows_in_place(name, monkeypatch):
    # Groups of 16: every parameter of 16 elements or more is a group of its own and its rule
    # writes the block itself (GPT-2's Conv1D, BERT's Linear, embeddings and LayerNorms;
    # GPT-2's tied wte, used twice, still added in the shared block): one group's rows, bitwise.
    build, losses_of = {"gpt2": (tiny_gpt2, causal_lm_losses), "bert": (tiny_bert, masked_lm_losses)}[name]
    torch.manual_seed(0)
    model = build()
    batch = text(CHUNK)
    whole, _ = per_sample_grads(model, batch, losses_of)
    in_place = rules_written_in_place(monkeypatch)
    monkeypatch.setattr(per_sample, "GROUP", 16)
    per_sample._layouts.pop(model)  # the layout is made again, in groups of 16
    cut, _ = per_sample_grads(model, batch, losses_of)
    assert {"gpt2": {"conv1d", "embedding", "layer_norm"}, "bert": {"linear", "embedding", "layer_norm"}}[name] <= set(
        in_place
    )
    assert len(per_sample._layout(model).groups) > 10
    assert torch.equal(cut, whole)


@pytest.mark.parametrize(
    "method", ["hooks", pytest.param("expanded", marks=pytest.mark.slow), pytest.param("vmap", marks=pytest.mark.slow)]
)
def test_every_method_keeps_a_samples_gradient_independent_of_its_batch_on_distshares_transformer(method):
    # "auto" now takes hooks for distshare's own transformer (Linear, Embedding, LayerNorm):
    # the other two methods stay reachable and keep the same property.
    from distshare.config import load_config
    from distshare.data import build_dataset
    from distshare.data.tensors import TensorTable
    from distshare.models import build_model
    from distshare.training import sample_losses

    cfg = load_config(None, ["data.task=roles", "data.variable_length=true", "data.num_samples=48"])
    ds, info = build_dataset(cfg.data)
    table = TensorTable.from_dataset(ds, info, torch.float32)
    model = build_model(cfg.model, info, seed=0)
    assert choose_method(model) == "hooks"

    def rows(indices: list[int]) -> torch.Tensor:
        b = table.select(indices)
        return per_sample_grads(model, {"inputs": b.inputs, "labels": b.labels}, sample_losses, method)[0]

    whole = rows(list(range(CHUNK + 3)))
    for size, start in ((1, 0), (2, 5), (CHUNK, 3)):
        assert torch.equal(rows(list(range(start, start + size))), whole[start : start + size]), (size, start)


def _relative_error_to_batch_gradient(model, batch, losses_of, rows) -> float:
    model.zero_grad(set_to_none=True)
    losses_of(model, batch).sum().backward()
    batch_grad = torch.cat([p.grad.reshape(-1) for _, p in model.named_parameters()]).double()
    model.zero_grad(set_to_none=True)
    return float((rows.double().sum(0) - batch_grad).norm() / batch_grad.norm())


def test_a_missing_use_of_a_tied_weight_fails_the_sum_check(monkeypatch):
    # The mutant for the check above: GPT-2's lm_head shares wte's weight; drop that use's
    # per-sample contribution and the rows no longer add up to the batch gradient.
    torch.manual_seed(0)
    model = tiny_gpt2()
    rule = per_sample._rule
    monkeypatch.setattr(
        per_sample, "_rule", lambda call, gy, *group: [] if call.module is model.lm_head else rule(call, gy, *group)
    )
    batch = text(8)
    rows, _ = per_sample_grads(model, batch, causal_lm_losses)
    assert _relative_error_to_batch_gradient(model, batch, causal_lm_losses, rows) > 0.1


class _ReadsItsWeightTwice(nn.Module):
    """A projection also used directly by its parent: a use no per-layer rule sees."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + x @ self.proj.weight


def _squares(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).pow(2).sum(dim=1)


def test_a_weight_used_outside_its_layer_falls_back_to_vmap_and_hooks_refuse_it():
    torch.manual_seed(0)
    model = _ReadsItsWeightTwice()
    x = torch.randn(6, 4)
    with pytest.raises(UsageError, match=r"parameter 'proj.weight' enters the loss 2 times, through layers with a per"):
        per_sample_grads(model, x, _squares, method="hooks")
    assert choose_method(model) == "hooks"  # by its layers; the graph says otherwise on the first chunk
    auto, _ = per_sample_grads(model, x, _squares)
    assert choose_method(model) == "vmap"
    assert torch.equal(auto, per_sample_grads(model, x, _squares, method="vmap")[0])
    assert _relative_error_to_batch_gradient(model, x, _squares, auto) < 1e-5


# ---------------------------------------------------------------- raw errors, one line each


def _one_line_usage_error(fn) -> str:
    with pytest.raises(UsageError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.slow
def test_gpt2s_attention_mask_under_vmap_is_one_line_naming_the_layer_and_the_fix():
    torch.manual_seed(0)
    model = tiny_gpt2()
    batch = text(4)
    message = _one_line_usage_error(lambda: per_sample_grads(model, batch, causal_lm_losses, method="vmap"))
    assert message.startswith("sync=exact: vmap: layer 'transformer' calls .item()"), message
    assert "masking_utils.py" in message and "method='hooks'" in message and "no attention_mask" in message
    # The known fix works: no attention_mask (right padding, padding labels -100) under vmap.
    def without_mask(model, batch):
        return causal_lm_losses(model, batch, attention_mask=False)

    assert per_sample_grads(model, batch, without_mask, method="vmap")[0].shape[0] == 4
    # And exact mode's default (hooks) runs the masked model as it is.
    assert per_sample_grads(model, batch, causal_lm_losses)[0].shape[0] == 4


def test_berts_batch_of_one_position_ids_in_expanded_weights_is_one_line_naming_the_layer_and_the_fix():
    torch.manual_seed(0)
    model = tiny_bert_classifier()
    batch = text(4)
    message = _one_line_usage_error(lambda: per_sample_grads(model, batch, classifier_losses, method="expanded"))
    assert message.startswith(
        "sync=exact: expanded weights: layer 'bert.embeddings.position_embeddings' is called with a batch of 1"
    ), message
    assert "pass position_ids and token_type_ids" in message and "method='hooks'" in message
    # The default (hooks) looks the shared position ids up once per sample: it just works.
    assert per_sample_grads(model, batch, classifier_losses)[0].shape[0] == 4


# ---------------------------------------------------------------- the loop API's refusals


def test_dropout_in_a_transformers_model_is_refused_in_one_line():
    model = tiny_gpt2(dropout=0.1)
    message = _one_line_usage_error(lambda: ExactGradients(model))
    assert message.startswith("sync=exact: layer 'transformer.drop' is dropout (p=0.1)"), message
    model.eval()
    ExactGradients(model)  # dropout is off in eval mode: nothing depends on the split
    model.train()
    exact = ExactGradients(tiny_gpt2())
    exact.model = model  # put back into training mode after construction: caught at the next step
    _one_line_usage_error(lambda: exact.start_step(global_items=10, global_samples=2))


def test_a_skipped_micro_batch_is_refused_not_summed():
    # The mutant for the sample count: the step was announced for 8 samples, 6 arrive.
    torch.manual_seed(0)
    model = tiny_gpt2()
    ids, mask = text(8)
    exact = ExactGradients(model)
    exact.start_step(global_items=int(mask[:, 1:].sum()), global_samples=8)
    exact.accumulate((ids[:4], mask[:4]), causal_lm_losses)
    exact.accumulate((ids[6:], mask[6:]), causal_lm_losses)  # ids[4:6] skipped
    message = _one_line_usage_error(exact.synchronize)
    assert "global_samples=8, but the ranks added 6" in message, message
    exact.start_step(global_items=int(mask[:, 1:].sum()), global_samples=8)
    exact.accumulate((ids[:4], mask[:4]), causal_lm_losses)
    exact.accumulate((ids[4:], mask[4:]), causal_lm_losses)
    loss = exact.synchronize()
    assert math.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_misuse_of_the_loop_api_is_one_line():
    exact = ExactGradients(tiny_gpt2())
    assert exact.method == "hooks"
    assert "before start_step()" in _one_line_usage_error(lambda: exact.accumulate(text(2), causal_lm_losses))
    assert "global_items must be > 0" in _one_line_usage_error(lambda: exact.start_step(0, 2))
    assert "method 'fast' is not one of" in _one_line_usage_error(lambda: ExactGradients(tiny_gpt2(), method="fast"))
    exact.start_step(global_items=3, global_samples=2)
    exact.accumulate(text(2), lambda model, batch: causal_lm_losses(model, batch).sum())
    assert "not one loss per sample" in _one_line_usage_error(exact.synchronize)


# ---------------------------------------------------------------- assert_accumulation_equivalent(sync="exact")


_ulp_hook_installed = False
_ulp_struck = False


def _ulp_on_first_partition(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    # The mutant: one gradient element 1 ULP up, once, on rank 0 of the W = 2 run (the rank
    # the grid observes), at the first step of its first partition (k = 1). Nothing else.
    global _ulp_struck
    if _ulp_struck or type(optimizer) is not torch.optim.SGD or not (dist.is_initialized() and dist.get_rank() == 0):
        return
    _ulp_struck = True
    grad = optimizer.param_groups[0]["params"][0].grad.view(-1)
    grad[0] = torch.nextafter(grad[0], torch.tensor(math.inf))


def tiny_gpt2_with_ulp_mutant() -> nn.Module:
    global _ulp_hook_installed
    if not _ulp_hook_installed:
        register_optimizer_step_pre_hook(_ulp_on_first_partition)
        _ulp_hook_installed = True
    return tiny_gpt2()


def _grid(model_fn, world_sizes=WORLD_SIZES, accum_steps=ACCUM_STEPS, **kwargs):
    return assert_accumulation_equivalent(
        model_fn,
        causal_lm_loss,
        torch.utils.data.TensorDataset(*text(16)),
        world_sizes=world_sizes,
        accum_steps=accum_steps,
        steps=2,
        sync="exact",
        timeout_s=300,
        **kwargs,
    )


@pytest.mark.slow
def test_the_grid_in_exact_mode_is_bitwise_on_gpt2_and_one_ulp_on_one_partition_fails_it():
    result = _grid(tiny_gpt2, sample_loss_fn=causal_lm_losses)
    assert len(result.partitions) == 6
    assert all(p.bitwise_equal and p.grad_bitwise_equal for p in result.partitions), result.text()
    with pytest.raises(AssertionError, match=r"exact mode is not bitwise for float32 W=2 k=1 b=4 "):
        _grid(tiny_gpt2_with_ulp_mutant, (2,), (1,), sample_loss_fn=causal_lm_losses)


def test_the_grid_in_exact_mode_needs_per_sample_losses():
    message = _one_line_usage_error(lambda: _grid(tiny_gpt2))
    assert message == "sync='exact' needs sample_loss_fn(model, batch) -> each sample's summed loss, shape [n]"
