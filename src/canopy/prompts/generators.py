"""Deterministic prompt generators written for this project, with worked answers.

* :func:`arithmetic_problem`: GSM8K-like multi-step arithmetic word problems with a worked
  solution (one step per line) and the numeric answer;
* :func:`creative_problem`: MacGyver-like everyday problems (setting, trouble, objects at hand)
  that ask for a creative solution, with one such solution;
* :func:`everyday_scene`: HellaSwag-like everyday scenes cut off mid-sentence, with an ending.

Their word lists (names, objects, scenarios, activities) are package data:
``canopy/prompts/data/{arithmetic,creative,scenes}.json``. A ``generated`` task takes the first
``n_prompts`` distinct prompts of a stream seeded by the seed and the task name
(:func:`generated_records`), so a longer request extends a shorter one; ids are
``{generator}-{index:04d}``. :mod:`canopy.training.corpus` uses the same generators to write the
training text of the default's small models.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from canopy.prompts.records import PromptSourceError, derived_rng

__all__ = [
    "GENERATORS",
    "WORKED_EXAMPLES",
    "PAPER_CREATIVE_TEMPLATE",
    "DEFAULT_GENERATOR_TEMPLATES",
    "ArithmeticProblem",
    "CreativeProblem",
    "EverydayScene",
    "arithmetic_problem",
    "creative_problem",
    "everyday_scene",
    "generated_records",
]

#: The instruction the paper puts before each MacGyver problem.
PAPER_CREATIVE_TEMPLATE = (
    "Come up with an original and creative solution for the following real-world problem: {text}"
)


def _word_lists(name: str) -> dict[str, Any]:
    """One of the package's word-list files, ``canopy/prompts/data/<name>.json``."""
    data = resources.files("canopy.prompts").joinpath("data", f"{name}.json")
    return json.loads(data.read_text(encoding="utf-8"))


_ARITHMETIC = _word_lists("arithmetic")
_CREATIVE = _word_lists("creative")
_SCENES = _word_lists("scenes")


# ---------------------------------------------------------------------------------------------
# Word lists shared by the three kinds of generated text
# ---------------------------------------------------------------------------------------------

# (name, subject pronoun, object pronoun, possessive)
_PEOPLE: list[tuple[str, str, str, str]] = [tuple(p) for p in _ARITHMETIC["people"]]

_COUNTABLES: list[str] = _ARITHMETIC["countables"]
_SHOP_ITEMS: list[tuple[str, int]] = [tuple(i) for i in _ARITHMETIC["shop_items"]]
_MONTHS: list[str] = _ARITHMETIC["months"]


def _person(rng: random.Random, exclude: Iterable[str] = ()) -> tuple[str, str, str, str]:
    excluded = set(exclude)
    return rng.choice([p for p in _PEOPLE if p[0] not in excluded])


# ---------------------------------------------------------------------------------------------
# Arithmetic word problems (GSM8K-like)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArithmeticProblem:
    """A word problem, its worked solution (one step per line) and the numeric answer."""

    question: str
    solution: str
    answer: int


def _worked(question: str, steps: list[str], answer: int) -> ArithmeticProblem:
    """The problem with its solution: the steps, then the answer sentence."""
    return ArithmeticProblem(question, "\n".join(steps + [f"The answer is {answer}."]), answer)


def _problem_buy_two(rng: random.Random) -> ArithmeticProblem:
    name, pronoun, _, _ = _person(rng)
    (item1, price1), (item2, price2) = rng.sample(_SHOP_ITEMS, 2)
    price1 += rng.randint(0, 3)
    price2 += rng.randint(0, 3)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    x, y = a * price1, b * price2
    question = (
        f"{name} buys {a} of the {item1}s that cost ${price1} each and {b} of the {item2}s that cost "
        f"${price2} each. How much money does {pronoun} spend in total?"
    )
    steps = [
        f"The {item1}s cost {a} x ${price1} = ${x}.",
        f"The {item2}s cost {b} x ${price2} = ${y}.",
        f"In total {name} spends ${x} + ${y} = ${x + y}.",
    ]
    return _worked(question, steps, x + y)


def _problem_give_and_buy(rng: random.Random) -> ArithmeticProblem:
    name, pronoun, _, _ = _person(rng)
    friend = _person(rng, exclude=[name])[0]
    thing = rng.choice(_COUNTABLES)
    start = rng.randint(20, 90)
    given = rng.randint(3, start - 5)
    bought = rng.randint(2, 30)
    left = start - given
    question = (
        f"{name} has {start} {thing}. {pronoun.capitalize()} gives {given} of them to {friend} and "
        f"then gets {bought} more. How many {thing} does {name} have now?"
    )
    steps = [
        f"After giving some away, {name} has {start} - {given} = {left} {thing}.",
        f"After getting more, {name} has {left} + {bought} = {left + bought} {thing}.",
    ]
    return _worked(question, steps, left + bought)


def _problem_half_as_many(rng: random.Random) -> ArithmeticProblem:
    name, pronoun, _, _ = _person(rng)
    thing = rng.choice(_COUNTABLES)
    month = rng.randrange(11)
    first = 2 * rng.randint(6, 45)
    half = first // 2
    question = (
        f"{name} sold {first} {thing} in {_MONTHS[month]}, and then {pronoun} sold half as many "
        f"{thing} in {_MONTHS[month + 1]}. How many {thing} did {name} sell altogether in "
        f"{_MONTHS[month]} and {_MONTHS[month + 1]}?"
    )
    steps = [
        f"In {_MONTHS[month + 1]} {name} sold {first} / 2 = {half} {thing}.",
        f"Altogether {name} sold {first} + {half} = {first + half} {thing}.",
    ]
    return _worked(question, steps, first + half)


def _problem_weekly_rate(rng: random.Random) -> ArithmeticProblem:
    name, pronoun, _, _ = _person(rng)
    activity, unit = rng.choice(_ARITHMETIC["weekly_activities"])
    per_day = rng.randint(2, 30)
    days = rng.randint(3, 7)
    weeks = rng.randint(2, 6)
    per_week = per_day * days
    question = (
        f"{name} {activity} {per_day} {unit} a day, {days} days a week. How many {unit} does "
        f"{pronoun} manage in {weeks} weeks?"
    )
    steps = [
        f"Each week {name} manages {per_day} x {days} = {per_week} {unit}.",
        f"In {weeks} weeks that is {per_week} x {weeks} = {per_week * weeks} {unit}.",
    ]
    return _worked(question, steps, per_week * weeks)


def _problem_saving(rng: random.Random) -> ArithmeticProblem:
    name, pronoun, _, _ = _person(rng)
    item = rng.choice(_ARITHMETIC["savings_goals"])
    saved = rng.randint(5, 60)
    weekly = rng.randint(4, 25)
    weeks = rng.randint(2, 12)
    price = saved + weekly * weeks
    question = (
        f"{name} wants to buy a {item} that costs ${price}. {pronoun.capitalize()} has already "
        f"saved ${saved} and saves ${weekly} every week. How many weeks does {pronoun} need to save "
        "to buy it?"
    )
    steps = [
        f"{name} still needs ${price} - ${saved} = ${price - saved}.",
        f"At ${weekly} a week that takes ${price - saved} / ${weekly} = {weeks} weeks.",
    ]
    return _worked(question, steps, weeks)


def _problem_rows(rng: random.Random) -> ArithmeticProblem:
    place, seat, people = rng.choice(_ARITHMETIC["seating"])
    rows, per_row = rng.randint(3, 15), rng.randint(4, 20)
    total = rows * per_row
    taken = rng.randint(1, total - 1)
    question = (
        f"A {place} has {rows} rows with {per_row} {seat} in each row. {taken} of the {seat} are "
        f"taken by {people}. How many {seat} are still free?"
    )
    steps = [
        f"There are {rows} x {per_row} = {total} {seat}.",
        f"Free {seat}: {total} - {taken} = {total - taken}.",
    ]
    return _worked(question, steps, total - taken)


def _problem_discount(rng: random.Random) -> ArithmeticProblem:
    name, pronoun, _, _ = _person(rng)
    item = rng.choice(_ARITHMETIC["discounted_items"])
    percent = rng.choice([10, 20, 25, 50])
    price = rng.randint(2, 20) * (100 // {10: 10, 20: 20, 25: 25, 50: 50}[percent]) * 5
    discount = price * percent // 100
    question = (
        f"A {item} normally costs ${price}. This week it is {percent}% off. How much does {name} pay "
        f"if {pronoun} buys it this week?"
    )
    steps = [
        f"The discount is {percent}% of ${price} = ${discount}.",
        f"{name} pays ${price} - ${discount} = ${price - discount}.",
    ]
    return _worked(question, steps, price - discount)


def _problem_three_people(rng: random.Random) -> ArithmeticProblem:
    first = _person(rng)[0]
    second = _person(rng, exclude=[first])[0]
    third = _person(rng, exclude=[first, second])[0]
    thing = rng.choice(_COUNTABLES)
    a, more = rng.randint(3, 40), rng.randint(2, 15)
    factor = rng.choice([2, 3])
    b = a + more
    c = b * factor
    word = {2: "twice", 3: "three times"}[factor]
    question = (
        f"{first} has {a} {thing}. {second} has {more} more {thing} than {first}, and {third} has "
        f"{word} as many as {second}. How many {thing} do they have together?"
    )
    steps = [
        f"{second} has {a} + {more} = {b} {thing}.",
        f"{third} has {b} x {factor} = {c} {thing}.",
        f"Together they have {a} + {b} + {c} = {a + b + c} {thing}.",
    ]
    return _worked(question, steps, a + b + c)


def _problem_trip(rng: random.Random) -> ArithmeticProblem:
    name, pronoun, _, possessive = _person(rng)
    speed = rng.randint(4, 16) * 5
    hours = rng.randint(2, 6)
    back = rng.randint(1, hours * speed // 10) * 5
    there = speed * hours
    question = (
        f"{name} drives to {possessive} grandparents at {speed} kilometres per hour for {hours} hours. "
        f"On the way back {pronoun} takes a shortcut that is {back} kilometres shorter. How many "
        "kilometres does the whole trip take?"
    )
    steps = [
        f"The way there is {speed} x {hours} = {there} kilometres.",
        f"The way back is {there} - {back} = {there - back} kilometres.",
        f"The whole trip is {there} + {there - back} = {2 * there - back} kilometres.",
    ]
    return _worked(question, steps, 2 * there - back)


def _problem_share(rng: random.Random) -> ArithmeticProblem:
    name, pronoun, _, _ = _person(rng)
    thing = rng.choice(_COUNTABLES)
    friends = rng.randint(2, 8)
    each = rng.randint(2, 12)
    kept = rng.randint(1, 10)
    total = friends * each + kept
    question = (
        f"{name} has {total} {thing}. After keeping {kept} of them, {pronoun} shares the rest "
        f"equally among {friends} friends. How many {thing} does each friend get?"
    )
    steps = [
        f"{name} shares {total} - {kept} = {total - kept} {thing}.",
        f"Each friend gets {total - kept} / {friends} = {each} {thing}.",
    ]
    return _worked(question, steps, each)


_ARITHMETIC_KINDS: list[Callable[[random.Random], ArithmeticProblem]] = [
    _problem_buy_two,
    _problem_give_and_buy,
    _problem_half_as_many,
    _problem_weekly_rate,
    _problem_saving,
    _problem_rows,
    _problem_discount,
    _problem_three_people,
    _problem_trip,
    _problem_share,
]


def arithmetic_problem(rng: random.Random) -> ArithmeticProblem:
    """One GSM8K-like multi-step word problem with its worked solution."""
    return rng.choice(_ARITHMETIC_KINDS)(rng)


# ---------------------------------------------------------------------------------------------
# Everyday problems that need a creative solution (MacGyver-like)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreativeProblem:
    """An everyday problem with a few objects at hand, and one creative solution to it."""

    problem: str
    solution: str


# (setting, trouble, goal of the solution)
_SCENARIOS: list[list[str]] = _CREATIVE["scenarios"]

# object -> ways it can help (imperative phrases ending the sentence "... the <object> ...")
_OBJECTS: dict[str, list[str]] = _CREATIVE["objects"]

_CONSTRAINTS: list[str] = _CREATIVE["constraints"]

_QUESTIONS: list[str] = _CREATIVE["questions"]

_OPENERS: list[str] = _CREATIVE["openers"]
_CLOSERS: list[str] = _CREATIVE["closers"]


def _object_list(objects: list[str]) -> str:
    return ", ".join(objects[:-1]) + f" and {objects[-1]}" if len(objects) > 1 else objects[0]


def creative_problem(rng: random.Random) -> CreativeProblem:
    """One MacGyver-like problem (setting, trouble, objects at hand, constraint, question) and a
    step-by-step solution that uses two of the objects."""
    setting, trouble, goal = rng.choice(_SCENARIOS)
    objects = rng.sample(sorted(_OBJECTS), rng.randint(3, 4))
    constraint = rng.choice(_CONSTRAINTS)
    question = rng.choice(_QUESTIONS).format(goal=goal)
    parts = [f"{setting} and {trouble}.", f"You have {_object_list(objects)}."]
    if constraint:
        parts.append(constraint)
    parts.append(question)
    used = rng.sample(objects, 2)
    first, second = (rng.choice(_OBJECTS[item]) for item in used)
    solution = " ".join(
        [
            rng.choice(_OPENERS),
            f"First, take {used[0]} and {first}.",
            f"Then take {used[1]} and {second}.",
            rng.choice(_CLOSERS).format(goal=goal),
        ]
    )
    return CreativeProblem(problem=" ".join(parts), solution=solution)


# ---------------------------------------------------------------------------------------------
# Everyday scenes to continue (HellaSwag-like)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EverydayScene:
    """A scene cut off mid-sentence (``context``) and a plausible continuation (``ending``)."""

    activity: str
    context: str
    ending: str


# (who, subject pronoun, possessive)
_ACTORS: list[list[str]] = _SCENES["actors"]

# activity label -> steps; each step lists alternative phrasings ("{p}" pronoun, "{s}" possessive)
_ACTIVITIES: dict[str, list[list[str]]] = _SCENES["activities"]


def everyday_scene(rng: random.Random, *, cut: bool = True) -> EverydayScene:
    """A HellaSwag-like scene: an actor, the first steps of an activity and, when ``cut``, the
    start of the next sentence (a subject only) left for the reader to continue."""
    who, pronoun, possessive = rng.choice(_ACTORS)
    activity = rng.choice(sorted(_ACTIVITIES))
    steps = [rng.choice(options).format(s=possessive) for options in _ACTIVITIES[activity]]
    shown = rng.randint(1, len(steps) - 2)
    subjects = [pronoun.capitalize(), "The " + who.split(" ", 1)[1]]
    sentences = [f"{who} {steps[0]}."]
    for step in steps[1:shown]:
        sentences.append(f"{rng.choice(subjects)} {rng.choice(['', 'then ', 'now '])}{step}.")
    subject = rng.choice(subjects)
    context = f"{activity}: " + " ".join(sentences) + f" {subject}"
    ending = f" {steps[shown]}." + "".join(
        f" {rng.choice(subjects)} {rng.choice(['', 'then ', 'finally '])}{step}."
        for step in steps[shown + 1 :]
    )
    return EverydayScene(
        activity=activity, context=context if cut else context + ending, ending=ending
    )


# ---------------------------------------------------------------------------------------------
# Generated prompt sets
# ---------------------------------------------------------------------------------------------

GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "arithmetic": lambda rng: arithmetic_problem(rng).question,
    "stories": lambda rng: creative_problem(rng).problem,
    "completion": lambda rng: everyday_scene(rng).context,
}

#: For each generator: one (question, worked answer) pair, for few-shot examples.
WORKED_EXAMPLES: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": lambda rng: (lambda p: (p.question, p.solution))(arithmetic_problem(rng)),
    "stories": lambda rng: (lambda p: (p.problem, p.solution))(creative_problem(rng)),
    "completion": lambda rng: (lambda s: (s.context, s.ending))(everyday_scene(rng)),
}

#: The generated MacGyver-like problems get the paper's instruction unless a template is given.
DEFAULT_GENERATOR_TEMPLATES: dict[str, str] = {"stories": PAPER_CREATIVE_TEMPLATE}


def generated_records(
    task: str, generator: str, n_prompts: int, seed: int
) -> list[tuple[str, str]]:
    """(id, text) of the first ``n_prompts`` distinct prompts of ``generator`` for ``task``."""
    rng = derived_rng(seed, "prompts", task, generator)
    make = GENERATORS[generator]
    records: list[tuple[str, str]] = []
    seen: set[str] = set()
    attempts = 0
    while len(records) < n_prompts:
        attempts += 1
        if attempts > 50 * n_prompts + 1000:
            raise PromptSourceError(
                f"tasks.{task}: the {generator!r} generator produced only {len(records)} distinct "
                f"prompts; lower tasks.{task}.n_prompts"
            )
        text = make(rng)
        if text in seen:
            continue
        seen.add(text)
        records.append((f"{generator}-{len(records):04d}", text))
    return records
