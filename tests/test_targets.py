"""Targets: --target parsing, the engine's rule, the run's range checks, the dominant count."""

from __future__ import annotations

import re

import pytest
import torch

from scorecam_stream import targets
from scorecam_stream.errors import ScoreCamError

NAMES = ("tench", "goldfish", "great white shark")


def test_parse_policies_ids_and_names():
    assert targets.parse("top1", NAMES) == ("top1", None)
    assert targets.parse("dominant", NAMES) == ("dominant", None)
    assert targets.parse("2", NAMES) == ("great white shark", (2,))
    assert targets.parse("GoldFish", NAMES) == ("goldfish", (1,))
    assert targets.parse("7", ()) == ("7", (7,))  # a model without names: any id >= 0


@pytest.mark.parametrize(
    ("wanted", "message"),
    [
        ("3", "not a class id of the model"),
        ("-1", "not a class id"),
        ("shark", "did you mean great white shark?"),
        ("zebra", "is not top1, dominant, a class id or a class name"),
    ],
)
def test_parse_rejects_what_the_model_lacks(wanted, message):
    with pytest.raises(ScoreCamError, match=message):
        targets.parse(wanted, NAMES)


def test_parse_message_names_the_range():
    with pytest.raises(ScoreCamError, match=re.escape("(0..2)")):
        targets.parse("3", NAMES)


def test_resolve_is_topk_or_the_classes_given():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0], [5.0, 0.0, 1.0, 2.0]])
    chosen, implicit = targets.resolve(logits, None)
    assert chosen.tolist() == [[1], [0]] and implicit
    chosen, implicit = targets.resolve(logits, None, topk=2)
    assert chosen.tolist() == [[1, 2], [0, 3]] and not implicit
    assert targets.resolve(logits, 3)[0].tolist() == [[3], [3]]
    assert targets.resolve(logits, [2, 1])[0].tolist() == [[2], [1]]
    chosen, implicit = targets.resolve(logits, [[0, 1], [2, 3]])
    assert chosen.tolist() == [[0, 1], [2, 3]] and not implicit
    with pytest.raises(ValueError, match="must be in"):
        targets.resolve(logits, 4)
    with pytest.raises(ValueError, match="N=2"):
        targets.resolve(logits, [1, 2, 3])
    with pytest.raises(ValueError, match="topk"):
        targets.resolve(logits, None, topk=5)


def test_for_frame_checks_the_run_against_the_model():
    logits = torch.tensor([0.0, 2.0, 1.0])
    assert targets.for_frame(logits, None, 2).tolist() == [1, 2]
    assert targets.for_frame(logits, (0,), 1).tolist() == [0]
    with pytest.raises(ScoreCamError, match="--topk 4 is more than the model's 3 classes"):
        targets.for_frame(logits, None, 4)
    with pytest.raises(ScoreCamError, match="target class 3 is not in"):
        targets.for_frame(logits, (3,), 1)


def test_probabilities_are_the_softmax_of_the_targets():
    logits = torch.tensor([1.0, 2.0, 0.5])
    got = targets.probabilities(logits, torch.tensor([1, 0]))
    assert torch.allclose(got, logits.softmax(0)[[1, 0]])


def test_top_counts_grow_with_the_classes_seen_and_break_ties_low():
    counts = targets.TopCounts()
    with pytest.raises(ValueError):
        counts.dominant()
    counts.add(torch.tensor([[0.0, 0.0, 9.0]]))  # class 2
    counts.add(torch.tensor([[9.0, 0.0, 0.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0, 0.0]]))  # 0, 0
    assert counts.frames == 3 and counts.dominant() == 0
    counts.add(torch.tensor([[0.0, 0.0, 9.0], [0.0, 0.0, 9.0]]))
    assert counts.counts.tolist() == [2, 0, 3] and counts.dominant() == 2
    counts.add(torch.tensor([[9.0, 0.0, 0.0]]))  # a tie 3-3: the lower class id
    assert counts.dominant() == 0
