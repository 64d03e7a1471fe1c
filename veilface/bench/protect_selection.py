"""Who the protection benchmark measures, and who it leaves out (said out loud).

Three rules, for a folder of ``<person>/<image>`` files:

``test`` (default)
    LFW people whose :func:`~veilface.client.protect.surrogate_training.heldout_split`
    is ``"test"``: held out from surrogate training, and never looked at
    while tuning the protection. Reported figures come from these.
``validation``
    the other half of the held-out people, the only ones tuning may look at.
``unseen``
    every person with at least two images who is not in surrogate training.
    For a folder of people the surrogates never saw, that is all of them.

"In surrogate training" means: the name is on the training side of the
held-out rule *and* the person has at least two images in a folder the
surrogates were trained on. The training folders are the ``data`` the
weights' ``manifest.json`` records (resolved against the current directory
and the weights directory's parents) or the ``train_data`` given; when none
can be found, the name rule alone decides, which leaves out more people
than necessary, never fewer, and the selection record says so.

Every person left out is counted under one reason: ``fewer_than_two_images``,
``surrogate_training``, ``other_split`` (the rule wants another part of the
split), ``cap`` (beyond ``max_people``, in name order); the benchmark adds
``no_face`` (no detector finds a face on the first photo, or on any of the
others).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from veilface.errors import InvalidArgument

logger = logging.getLogger(__name__)

PeopleRule = Literal["test", "validation", "unseen"]
PEOPLE_RULES: tuple[PeopleRule, ...] = get_args(PeopleRule)

#: Reasons a person is left out, in the order they are checked.
EXCLUSION_REASONS = ("fewer_than_two_images", "surrogate_training", "other_split", "cap", "no_face")

_RULE_WORDS = {
    "test": "held-out people of the test half (never used for tuning)",
    "validation": "held-out people of the validation half (the tuning half)",
    "unseen": "every person with 2+ images who is not in surrogate training",
}


@dataclass
class PeopleSelection:
    """The people a run measures and the count left out per reason."""

    rule: PeopleRule
    people: dict[str, list[Path]]
    excluded: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EXCLUSION_REASONS, 0))
    #: folders whose people count as surrogate training; empty: the name rule alone
    train_data: tuple[str, ...] = ()
    max_people: int | None = None

    @property
    def n_people(self) -> int:
        return len(self.people)

    def drop(self, name: str, reason: str) -> None:
        """Leave ``name`` out after the fact (e.g. no face found), counting why."""
        if name in self.people:
            del self.people[name]
            self.excluded[reason] = self.excluded.get(reason, 0) + 1

    def description(self) -> str:
        """The rule in plain words."""
        how = (
            f"training people read from {', '.join(self.train_data)}"
            if self.train_data
            else "training people by the name rule alone (training folder not found)"
        )
        return f"{_RULE_WORDS[self.rule]}; {how}"

    def summary_line(self) -> str:
        """One line: how many people are measured, what was left out and why."""
        left = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in self.excluded.items() if n)
        return (
            f"people: {self.n_people} measured (--people {self.rule}: {_RULE_WORDS[self.rule]}); "
            f"left out: {left or 'none'}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "description": self.description(),
            "n_people": self.n_people,
            "excluded": dict(self.excluded),
            "train_data": list(self.train_data),
            "max_people": self.max_people,
            "names": list(self.people),
        }


def _resolve(recorded: str, weights_dir: Path) -> Path | None:
    path = Path(recorded)
    if path.is_absolute():
        return path if path.is_dir() else None
    for base in (Path.cwd(), weights_dir, *weights_dir.resolve().parents):
        if (base / path).is_dir():
            return (base / path).resolve()
    return None


def default_train_data(weights_dir: Path | None = None) -> list[Path]:
    """The training folders recorded in the surrogates' ``manifest.json`` that exist here."""
    from veilface.client.protect.surrogates import DEFAULT_WEIGHTS_DIR

    directory = Path(weights_dir) if weights_dir is not None else DEFAULT_WEIGHTS_DIR
    manifest = directory / "manifest.json"
    try:
        recorded = json.loads(manifest.read_text()).get("data")
    except (OSError, ValueError, AttributeError):
        return []
    entries = [recorded] if isinstance(recorded, str) else recorded
    if not isinstance(entries, list):
        return []
    found = [p for e in entries if isinstance(e, str) and (p := _resolve(e, directory))]
    if not found:
        logger.warning(
            "surrogate training folder(s) %s not found; using the name rule alone", entries
        )
    return found


def select_people(
    images: Path,
    rule: PeopleRule = "test",
    *,
    max_people: int | None = None,
    train_data: Sequence[Path] | None = None,
    weights_dir: Path | None = None,
) -> PeopleSelection:
    """Choose the people of ``images`` to measure under ``rule``.

    Parameters
    ----------
    images
        ``<person>/<image>`` folder.
    rule
        ``"test"``, ``"validation"`` or ``"unseen"`` (see the module docstring).
    max_people
        Keep at most this many (the first in name order); ``None``: all.
    train_data
        Folders the surrogates were trained on; default the weights' manifest.
    weights_dir
        Surrogate weights directory whose manifest names the training folders.

    Raises
    ------
    InvalidArgument
        Unknown rule, bad cap, or no person left.
    """
    from veilface.client.protect.surrogate_training import heldout_split, list_people

    if rule not in PEOPLE_RULES:
        raise InvalidArgument(f"people rule must be one of {', '.join(PEOPLE_RULES)}, got {rule!r}")
    if max_people is not None and max_people < 1:
        raise InvalidArgument(f"max_people must be at least 1, got {max_people}")
    folders = train_data if train_data is not None else default_train_data(weights_dir)
    trained: set[str] | None = None
    if folders:
        trained = set()
        for folder in folders:
            trained.update(
                n for n in list_people(Path(folder), min_images=2) if heldout_split(n) == "train"
            )
    selection = PeopleSelection(
        rule=rule,
        people={},
        train_data=tuple(str(Path(f)) for f in folders),
        max_people=max_people,
    )
    for name, files in list_people(images, min_images=0).items():
        split = heldout_split(name)
        if len(files) < 2:
            reason = "fewer_than_two_images"
        elif split == "train" and (trained is None or name in trained):
            reason = "surrogate_training"
        elif rule != "unseen" and split != rule:
            reason = "other_split"
        elif max_people is not None and selection.n_people >= max_people:
            reason = "cap"
        else:
            selection.people[name] = files
            continue
        selection.excluded[reason] += 1
    if not selection.people:
        hint = "; try --people unseen for a folder of people the surrogates never saw"
        raise InvalidArgument(
            f"no person of {images} is selected: {selection.summary_line()}"
            + (hint if rule != "unseen" else "")
        )
    return selection


__all__ = [
    "EXCLUSION_REASONS",
    "PEOPLE_RULES",
    "PeopleRule",
    "PeopleSelection",
    "default_train_data",
    "select_people",
]
