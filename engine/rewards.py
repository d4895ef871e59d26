"""Rewards that verify a completion against a task's answer: GRPO trains on them, evaluation scores with them.

A reward maps (completion text, answer) to a float: `exact_match` (1.0 when the completion, up to
the end-of-document token and stripped, equals the stripped answer) and `contains` (1.0 when the
stripped answer occurs in it) are built in; 'package.module:function' names any importable
function of the same signature (importing a module the user named is how rewards are extended,
as with an external stage). `check_reward` calls a reward once before training, so that a function
of another signature (`os:system`) or one that returns no number fails at the prompt, not at step 1.
"""
from __future__ import annotations

import importlib
import math
from typing import Callable

REWARDS = ("exact_match", "contains")
"""Built-in reward names; 'module:function' names a user function instead."""


def exact_match(completion: str, answer: str) -> float:
    """1.0 if the stripped completion equals the stripped answer, else 0.0."""
    return float(completion.strip() == answer.strip())


def contains(completion: str, answer: str) -> float:
    """1.0 if the stripped answer occurs in the completion, else 0.0."""
    return float(answer.strip() in completion)


def reward_function(name: str) -> Callable[[str, str], float]:
    """The reward called `name`: a built-in (REWARDS) or an importable 'module:function'."""
    if name == "exact_match":
        return exact_match
    if name == "contains":
        return contains
    module, _, attribute = name.partition(":")
    if not module or not attribute:
        raise ValueError(f"expected one of {', '.join(REWARDS)} or 'module:function'")
    try:
        function = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import {attribute!r} from {module!r} ({error})") from None
    if not callable(function):
        raise ValueError(f"{name} is not a function of (completion, answer)")
    return function


def check_reward(function: Callable, name: str, answer: str, completion: str = "") -> float:
    """Call `function(completion, answer)` once (by default an empty completion, which a model can
    produce); its result must be a finite number. ValueError naming the reward otherwise."""
    try:
        value = function(completion, answer)
    except Exception as error:  # a wrong signature (TypeError) or a function that fails on real input
        raise ValueError(f"{name}({completion!r}, {answer!r}) failed: {type(error).__name__}: {error}; a reward "
                         f"is a function of (completion: str, answer: str) -> float") from None
    try:
        number = float(value) if not isinstance(value, (str, bytes)) else None
    except (TypeError, ValueError):
        number = None
    if number is None or not math.isfinite(number):
        raise ValueError(f"{name}({completion!r}, {answer!r}) returned {value!r}: a reward must return a finite "
                         f"number")
    return number
