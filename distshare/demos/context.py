"""Claim 6: context comes from attention over fixed weights and positions, in sentences never seen.

The tiny transformer learns to name the subject of subject-verb-object sentences from 64 draws
of the grammar (about 49 of its 120 sentences). It is judged on *mirror pairs* that training
never drew, neither sentence of the pair ("cat eat mouse" and "mouse eat cat" both held out;
disjointness from the samples the loop consumed is checked and is part of the verdict). With
its weights fixed:

- the verb ("eat") enters both sentences of a pair with the identical vector: its embedding
  plus the encoding of position 1 (bitwise equal, by construction);
- it leaves carrying who eats: the model's own classifier, applied to the verb's exit vector
  *alone* (the sentence's logits are the mean of such per-word logits), names the subject.
  The two sentences of a pair hold the same words, so an answer blind to word order is right
  on at most one of them: the claim holds when the verb's answer beats 1/2 on held-out pairs.

Controls, the same test on the same held-out pairs:

- untrained: the model at its initialization (the weights training starts from);
- attention on itself only: the same model trained the same way, except that each token
  attends to itself, so nothing moves between positions. It still names the subject from the
  whole sentence (pooling sees every word with its position), so the task alone does not
  prove context; the verb, alone, can no longer know who eats it.

Reported, not a control: uniform attention (every word weighted equally, nothing selected)
also carries most of the subject into the verb on this 3-word grammar: the mixing of positions
carries context; learned selection is what makes it complete.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distshare.data.corpus import encode_sentence, mirror_pairs
from distshare.data.types import DataInfo
from distshare.demos.common import TRANSFORMER, Trained, config, data, finding_title, pyplot, save, trained
from distshare.demos.finding import Control, Finding, verdict
from distshare.distributed.world import World
from distshare.models import build_model
from distshare.models.attention import set_attention
from distshare.training import train
from distshare.training.loop import Component, Loop

NAME = "context"
QUESTION = (
    "You imagine your dataset has 2 samples cat eat mouse and mouse eat cat, the eat word embedding is captured "
    "such that the model knows both context, so the weight matrix is also adjusted"
)
CLAIM = (
    "With fixed trained weights, in sentence pairs never trained on ('cat eat mouse' / 'mouse eat cat'), the verb "
    "enters both with the same vector and leaves carrying who eats: the model's own readout of the verb's exit "
    "vector alone names the subject more often than any answer blind to word order can (1/2)."
)
BY_CONSTRUCTION = (
    "The verb enters every sentence with the same vector: its embedding plus the encoding of position 1, a table "
    "lookup (checked bitwise on every held-out pair). Both sentences of a mirror pair hold the same words, so any "
    "answer blind to word order is right on at most one of them: that is where the 1/2 ceiling comes from. A "
    "model without positional encoding is such an answer (permutation invariant; the 'no positions' mutant), and "
    "so is the verb under attention on itself only (its exit depends on nothing but itself): that control fails "
    "by its construction, and what it measures is that the ablated model, trained the same way, still names the "
    "subject from the whole sentence, so context in the verb, not the task, is what needs attention."
)
# The claim's training: 64 draws of the grammar leave about 20 mirror pairs of which neither
# sentence was drawn; 60 steps of 32 (30 epochs) bring the loss under 0.01.
TRAINING = (*TRANSFORMER, "data.num_samples=64")
WORD = 1  # position of the verb
ORDER_BLIND_CEILING = 0.5  # best accuracy on mirror pairs of any answer that ignores word order
EXAMPLE = ("cat eat mouse", "mouse eat cat")  # the seed's pair, shown when training never drew it
MUTANTS = {
    "untrained": "the claim is judged on the model before training (the weights training starts from)",
    "training sentences": "judged on mirror pairs drawn from the training set in place of held-out ones",
    "self attention": "the claim's model is trained with each token attending to itself only",
    "no positions": "the claim's model is trained without positional encoding (a bag of words)",
}


def sentence_ids(text: str, info: DataInfo) -> torch.Tensor:
    """[1, T] ids of one sentence of the corpus vocabulary."""
    return torch.tensor([encode_sentence(text, info)])


# ------------------------------------------------------------------ training with a prepared start


class _Prepare(Component):
    """Applies `prepare` to the fresh model before the first step, and keeps the trained model."""

    def __init__(self, prepare: Callable[[nn.Module], object]) -> None:
        self.prepare, self.model = prepare, None

    def begin(self, loop: Loop) -> None:
        with torch.no_grad():
            self.prepare(loop.run.model)
        self.model = loop.run.model


def trained_from(overrides: tuple[str, ...], seed: int, prepare: Callable[[nn.Module], object]) -> Trained:
    """`common.trained` with `prepare(model)` applied before the first step: an ablation (attention on
    the token itself) or a start (heads as copies), trained by the one loop; a fresh copy of a cached run."""
    t = _trained_from(tuple(overrides), seed, prepare)
    return Trained(t.cfg, copy.deepcopy(t.model), t.info, t.table, t.result)


@lru_cache(maxsize=16)
def _trained_from(overrides: tuple[str, ...], seed: int, prepare: Callable[[nn.Module], object]) -> Trained:
    cfg = config(overrides, seed)
    keep = _Prepare(prepare)
    result = train(cfg, World(), out_dir=None, progress=False, components=[keep])
    info, table = data(cfg)
    assert keep.model is not None
    return Trained(cfg, keep.model, info, table, result)


def initial(t: Trained) -> nn.Module:
    """The model `t` started from: the same build from the same seed, before any step."""
    return build_model(t.cfg.model, t.info, seed=t.cfg.seed)


def self_only(model: nn.Module) -> None:
    """The ablation: every token attends to itself only; nothing moves between positions."""
    set_attention(model, "self")


def uniform(model: nn.Module) -> None:
    """Every real word weighted equally, whatever the query and key say: mixing without selection."""
    set_attention(model, "uniform")


# ------------------------------------------------------------------------------ the measurement


def seen_sentences(t: Trained) -> set[str]:
    """Every sentence some step of training consumed (from the loop's own account of its samples)."""
    used = sorted({i for step in t.result.samples_by_step for micro in step for i in micro})
    ids = t.table.inputs["input_ids"][used]
    mask = t.table.inputs["pad_mask"][used]
    return {
        " ".join(t.info.vocab[int(i)] for i, m in zip(row, keep, strict=True) if m)
        for row, keep in zip(ids, mask, strict=True)
    }


def judged_pairs(seen: set[str], held_out: bool = True) -> list[tuple[str, str]]:
    """Mirror pairs of which neither sentence was trained on (or, for the mutant, both were)."""
    if held_out:
        return [p for p in mirror_pairs() if not set(p) & seen]
    return [p for p in mirror_pairs() if set(p) <= seen]


def measure(model: nn.Module, info: DataInfo, pairs: list[tuple[str, str]], seen: set[str]) -> dict:
    """The verb's entry and exit on every sentence of `pairs`, and what its exit alone answers."""
    sentences = [s for pair in pairs for s in pair]
    overlap = sorted(set(sentences) & seen)
    out: dict = {"pairs": len(pairs), "sentences": len(sentences), "trained_on": len(overlap)}
    if not pairs:
        return {**out, "holds": False}
    ids = torch.tensor([encode_sentence(s, info) for s in sentences])
    subject = torch.tensor([info.class_names.index(s.split()[0]) for s in sentences])
    model.eval()
    with torch.no_grad():
        entry = model.embed(ids) + (model.pe[: ids.shape[1]] if model.positional else 0)
        h, _ = model.encode(ids)
        verb_says = model.head(h[:, WORD]).argmax(-1)  # the verb's own term of the sentence's logits
        sentence_says = model(ids).argmax(-1)
    entry_equal = all(torch.equal(entry[2 * i, WORD], entry[2 * i + 1, WORD]) for i in range(len(pairs)))
    right = verb_says == subject
    accuracy = float(right.float().mean())
    out |= {
        "entry_bitwise_equal": entry_equal,
        "verb_readout_right": int(right.sum()),
        "verb_readout_accuracy": accuracy,
        "pairs_both_right": int(right.view(-1, 2).all(1).sum()),
        "sentence_accuracy": float((sentence_says == subject).float().mean()),
    }
    out["holds"] = not overlap and entry_equal and accuracy > ORDER_BLIND_CEILING
    if overlap:
        out["trained_on_examples"] = overlap[:4]
    return out


def example(model: nn.Module, info: DataInfo, pair: tuple[str, str]) -> dict:
    """What the verb answers in both sentences of one pair, and where it looks (per layer, mean over heads)."""
    model.eval()
    with torch.no_grad():
        rows = []
        for sentence in pair:
            h, maps = model.encode(sentence_ids(sentence, info))
            probs = model.head(h[0, WORD]).softmax(-1)
            rows.append(
                {
                    "sentence": sentence,
                    "verb_answer": {c: round(float(p), 4) for c, p in zip(info.class_names, probs, strict=True)},
                    "verb_attention": [[round(float(w), 4) for w in m[0, :, WORD].mean(0)] for m in maps],
                }
            )
    return {"pair": list(pair), "sentences": rows}


# ------------------------------------------------------------------------------------ the run


def run(out_dir: Path, seed: int = 0, mutant: str | None = None) -> Finding:
    real = trained(TRAINING, seed)
    seen = seen_sentences(real)
    pairs = judged_pairs(seen)
    ablated = trained_from(TRAINING, seed, self_only)
    mixed = trained_from(TRAINING, seed, uniform)

    claim_model, claim_seen, claim_pairs = real.model, seen, pairs
    if mutant == "untrained":
        claim_model = initial(real)
    elif mutant == "training sentences":
        claim_pairs = judged_pairs(seen, held_out=False)
    elif mutant == "self attention":
        claim_model, claim_seen = ablated.model, seen_sentences(ablated)
    elif mutant == "no positions":
        bag = trained((*TRAINING, "model.positional=false"), seed)
        claim_model, claim_seen = bag.model, seen_sentences(bag)

    claim = measure(claim_model, real.info, claim_pairs, claim_seen)
    untrained = measure(initial(real), real.info, pairs, seen)
    self_ctrl = measure(ablated.model, real.info, pairs, seen_sentences(ablated))
    mixing = measure(mixed.model, real.info, pairs, seen_sentences(mixed))
    shown = next((p for p in (EXAMPLE, *pairs) if p in pairs and " eat " in p[0]), pairs[0] if pairs else EXAMPLE)
    examples = {
        "trained": example(claim_model, real.info, shown),
        "attention on itself only": example(ablated.model, real.info, shown),
    }
    holds = claim.pop("holds")
    controls = [
        Control(
            "untrained",
            "the same model at its initialization, the weights training starts from",
            verdict(untrained.pop("holds")),
            untrained,
        ),
        Control(
            "attention on itself only",
            "the same model trained the same way with each token attending to itself only (nothing moves "
            "between positions)",
            verdict(self_ctrl.pop("holds")),
            self_ctrl,
        ),
    ]
    mixing.pop("holds")
    numbers = {
        "training_samples": real.cfg.data.num_samples,
        "training_sentences_distinct": len(seen),
        "grammar_sentences": 2 * len(mirror_pairs()),
        "order_blind_ceiling": ORDER_BLIND_CEILING,
        "final_train_loss": real.result.losses[-1],
        **claim,
        "held_out_pairs": [list(p) for p in claim_pairs],
        "uniform_attention_not_a_control": mixing,
        "example": examples,
    }
    figure = save(figure_of(claim, untrained, self_ctrl, mixing, examples, mutant, holds), out_dir, NAME)
    judged = "held-out" if not claim["trained_on"] else f"TRAINED-ON ({claim['trained_on']} sentences)"
    headline = (
        f"the verb alone names the subject of {claim.get('verb_readout_right', 0)}/{claim['sentences']} sentences "
        f"of {claim['pairs']} {judged} mirror pairs (accuracy {claim.get('verb_readout_accuracy', 0):.2f}, "
        f"order-blind ceiling {ORDER_BLIND_CEILING}); untrained {untrained.get('verb_readout_accuracy', 0):.2f}; "
        f"attention on itself only {self_ctrl.get('verb_readout_accuracy', 0):.2f} (whole sentence "
        f"{self_ctrl.get('sentence_accuracy', 0):.2f}); uniform attention {mixing.get('verb_readout_accuracy', 0):.2f}"
    )
    return Finding(
        NAME,
        QUESTION,
        CLAIM,
        verdict(holds),
        controls,
        numbers,
        figure,
        headline,
        by_construction=BY_CONSTRUCTION,
        mutant=mutant,
    )


def figure_of(
    claim: dict, untrained: dict, self_ctrl: dict, mixing: dict, examples: dict, mutant: str | None, holds: bool
) -> Any:
    """Top: how often the verb alone (and the whole sentence) names the subject, the claim's model
    beside the controls. Middle: what the verb says in one held-out mirror pair. Bottom: where
    the verb looks in those two sentences (attention weights, numbers in the cells)."""
    plt = pyplot()
    fig, ax = plt.subplot_mosaic(
        [["bars", "bars"], ["first", "second"], ["heat", "heat"]],
        figsize=(10, 11),
        height_ratios=(1.25, 1, 0.9),
        layout="constrained",
    )
    bars = ax["bars"]
    rows = (
        ("trained\n(the claim)", claim, "tab:blue"),
        ("untrained\n(control)", untrained, "tab:red"),
        ("self-only attention\n(control)", self_ctrl, "tab:red"),
        ("uniform attention\n(not a control)", mixing, "tab:gray"),
    )
    y = range(len(rows))
    verb = [r.get("verb_readout_accuracy", 0.0) for _, r, _ in rows]
    whole = [r.get("sentence_accuracy", 0.0) for _, r, _ in rows]
    bars.barh(
        [i - 0.2 for i in y], verb, height=0.38, color=[c for *_, c in rows], label="the verb's exit vector alone"
    )
    bars.barh([i + 0.2 for i in y], whole, height=0.38, color="lightgray", edgecolor="k", label="the whole sentence")
    for i, (_, r, _) in enumerate(rows):
        n = r["sentences"]
        bars.text(verb[i] + 0.01, i - 0.2, f"{verb[i]:.2f} ({r.get('verb_readout_right', 0)}/{n})", va="center")
        bars.text(whole[i] + 0.01, i + 0.2, f"{whole[i]:.2f}", va="center", color="0.3")
    bars.axvline(ORDER_BLIND_CEILING, color="k", ls="--", label="ceiling of any answer blind to word order")
    bars.set_yticks(list(y), [name for name, *_ in rows])
    bars.set_xlim(0, 1.45)
    bars.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    bars.set_ylim(len(rows) - 0.4, -1.6)  # room above the bars for the legend
    bars.set_xlabel("fraction of held-out sentences whose subject is named")
    bars.legend(loc="upper right")
    judged = "never trained on" if not claim["trained_on"] else f"{claim['trained_on']} of them trained on"
    bars.set_title(
        f"Who eats? The subject named on {claim['sentences']} sentences ({claim['pairs']} mirror pairs, {judged})"
        + (f"  [mutant: {mutant}]" if mutant else "")
    )

    trained_ex = examples["trained"]["sentences"]
    held = "held out" if not claim["trained_on"] else "trained on"
    ablated_ex = examples["attention on itself only"]["sentences"]
    for col, (mine, theirs) in enumerate(zip(trained_ex, ablated_ex, strict=True)):
        a = ax[("first", "second")[col]]
        names = list(mine["verb_answer"])
        x = range(len(names))
        a.bar(
            [i - 0.2 for i in x],
            list(mine["verb_answer"].values()),
            width=0.4,
            color="tab:blue",
            label="the claim's model",
        )
        a.bar(
            [i + 0.2 for i in x],
            list(theirs["verb_answer"].values()),
            width=0.4,
            color="tab:red",
            label="self-only attention",
        )
        a.set_xticks(list(x), names)
        a.set_ylim(0, 1.05)
        a.set_xlabel("the subject it names")
        a.set_ylabel("probability (the verb's readout)")
        a.set_title(f'"{mine["sentence"]}" ({held}): what the verb says')
        if col == 0:
            a.legend(loc="upper right")
    heat = ax["heat"]
    labels, values = [], []
    for ex in trained_ex:
        for layer, w in enumerate(ex["verb_attention"]):
            labels.append(f'"{ex["sentence"]}", layer {layer}')
            values.append(w)
    image = heat.imshow(values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for r, row in enumerate(values):
        for c, w in enumerate(row):
            heat.text(c, r, f"{w:.2f}", ha="center", va="center", color="black" if w > 0.55 else "white")
    heat.set_xticks(range(3), ["1st word", "verb", "3rd word"])
    heat.set_yticks(range(len(labels)), labels)
    heat.set_xlabel("the word the verb attends to (key)")
    heat.set_title("where the verb looks (the claim's model, mean over heads)")
    fig.colorbar(image, ax=heat, label="attention weight")
    fig.suptitle(
        finding_title(
            "With fixed weights, the verb carries who eats it, in sentences never trained on",
            holds,
            f"the verb alone names the subject of {claim.get('verb_readout_right', 0)}/{claim['sentences']} "
            f"(order-blind ceiling {ORDER_BLIND_CEILING}); untrained {verb[1]:.2f}, self-only attention {verb[2]:.2f}",
        )
    )
    return fig
