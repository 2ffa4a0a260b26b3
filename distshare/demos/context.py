"""Claim 6: context comes from attention over positions, not from the (fixed) weights.

The tiny transformer is trained to name the subject of subject-verb-object sentences. Then,
with its weights fixed, "cat eat mouse" and "mouse eat cat" (both in the corpus vocabulary):

- "eat" enters both with the identical vector (its embedding plus the encoding of position 1,
  the same in both: bitwise equal);
- it leaves with different representations (cosine similarity, distance), because attention
  mixes in the other words and their positions;
- the model names the right subject for both, and for every sentence of the grammar.

Control: the same model trained without positional encoding. The two sentences are then
permutations of the same bag of words, the representation of "eat" is the same up to
rounding (the attention sums run in another order, nothing more), and the model gives both
sentences the same answer: it cannot tell subject from object.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.nn.functional as F

from distshare.data.corpus import NOUNS, VERBS, encode_sentence
from distshare.data.types import DataInfo
from distshare.demos.common import TRANSFORMER, Trained, pyplot, save, trained
from distshare.demos.finding import Control, Finding, verdict
from distshare.numerics.rounding import reorder_norm_bound
from distshare.training import DTYPES

NAME = "context"
QUESTION = (
    "You imagine your dataset has 2 samples cat eat mouse and mouse eat cat, the eat word embedding is captured "
    "such that the model knows both context, so the weight matrix is also adjusted"
)
CLAIM = (
    "With fixed weights, 'eat' enters both sentences with the same vector and leaves with different ones: "
    "context comes from attention over the other words and their positions, and the model tells subject from object."
)
CONTROL = "the same transformer without positional encoding"
SENTENCES = ("cat eat mouse", "mouse eat cat")
WORD = 1  # position of "eat"


def sentence_ids(text: str, info: DataInfo) -> torch.Tensor:
    """[1, T] ids of one sentence of the corpus vocabulary."""
    return torch.tensor([encode_sentence(text, info)])


def grammar(info: DataInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Every 3-word sentence of the grammar (subject != object) and its subject."""
    rows = [(s, v, o) for s, v, o in itertools.product(NOUNS, VERBS, NOUNS) if s != o]
    index = {w: i for i, w in enumerate(info.vocab)}
    ids = torch.tensor([[index[w] for w in r] for r in rows])
    return ids, torch.tensor([NOUNS.index(r[0]) for r in rows])


def measure(t: Trained) -> dict:
    """Entry and exit vectors of "eat" in both sentences, the answers, and the maps."""
    model, info = t.model, t.info
    model.eval()
    a, b = (sentence_ids(s, info) for s in SENTENCES)
    with torch.no_grad():
        entries = []
        for ids in (a, b):
            x = model.embed(ids)
            entries.append(x + model.pe[: ids.shape[1]] if model.positional else x)
        (ha, maps_a), (hb, maps_b) = model.encode(a), model.encode(b)
        ea, eb = ha[0, WORD], hb[0, WORD]
        pred = [info.class_names[int(model(ids).argmax())] for ids in (a, b)]
        ids, subject = grammar(info)
        accuracy = float((model(ids).argmax(1) == subject).float().mean())
    truth = [s.split()[0] for s in SENTENCES]
    return {
        "positional": model.positional,
        "entry_bitwise_equal": bool(torch.equal(entries[0][0, WORD], entries[1][0, WORD])),
        "exit_cosine_similarity": float(F.cosine_similarity(ea, eb, dim=0)),
        "exit_distance": float((ea - eb).norm()),
        "exit_rel_distance": float((ea - eb).norm() / ea.norm()),
        "predicted_subjects": pred,
        "both_subjects_right": pred == truth,
        "grammar_sentences": int(ids.shape[0]),
        "grammar_accuracy": accuracy,
        "final_train_loss": t.result.losses[-1],
        "maps": [maps_a[-1][0].mean(0).tolist(), maps_b[-1][0].mean(0).tolist()],
    }


def run(out_dir: Path, seed: int = 0) -> Finding:
    with_pe = trained(TRANSFORMER, seed)
    without = trained((*TRANSFORMER, "model.positional=false"), seed)
    m = with_pe.cfg.model
    # The no-position sentences run the same sums in another order: per layer the longest sum
    # is over d_ff (feed-forward) or d_model terms; the layers compound it.
    bound = m.n_layers * reorder_norm_bound(DTYPES[m.dtype], max(m.d_model, m.d_ff))
    pe, ctrl = measure(with_pe), measure(without)

    def tells_apart(r: dict) -> bool:
        return r["entry_bitwise_equal"] and r["exit_rel_distance"] > bound and r["both_subjects_right"]

    numbers = {
        "sentences": list(SENTENCES),
        "word": "eat",
        "rounding_bound_rel_distance": bound,
        "with_positions": {k: v for k, v in pe.items() if k != "maps"},
        "control_without_positions": {k: v for k, v in ctrl.items() if k != "maps"},
    }
    figure = _figure(out_dir, pe["maps"], ctrl["maps"])
    headline = (
        f"'eat' enters equal, leaves cos {pe['exit_cosine_similarity']:.3f} (rel dist {pe['exit_rel_distance']:.2f}), "
        f"subjects {pe['predicted_subjects']}; no positions: rel dist {ctrl['exit_rel_distance']:.1e} "
        f"(bound {bound:.1e}), subjects {ctrl['predicted_subjects']}"
    )
    return Finding(
        NAME,
        QUESTION,
        CLAIM,
        verdict(tells_apart(pe)),
        [Control("no positions", CONTROL, verdict(tells_apart(ctrl)))],
        numbers,
        figure,
        headline,
    )


def _figure(out_dir: Path, pe_maps: list, ctrl_maps: list) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(2, 2, figsize=(7, 6.5))
    for row, (maps, label) in enumerate(((pe_maps, "with positions"), (ctrl_maps, "no positions (control)"))):
        for col, sentence in enumerate(SENTENCES):
            words = sentence.split()
            a = ax[row, col]
            a.imshow(maps[col], cmap="viridis", vmin=0, vmax=1)
            a.set_xticks(range(3), words)
            a.set_yticks(range(3), words)
            for i, j in itertools.product(range(3), range(3)):
                a.text(j, i, f"{maps[col][i][j]:.2f}", ha="center", va="center", color="w", fontsize=8)
            a.set_title(f'"{sentence}", {label}', fontsize=9)
    fig.suptitle("last layer attention (mean over heads): row = query, column = key")
    return save(fig, out_dir, NAME)
