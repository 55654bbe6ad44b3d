"""Plan-time checks of the regression formulas: every variable a column of the panel, every
function one the fitting code provides, the slope term and its interaction with variant present.

A formula typo (``Rsc`` for ``R_sc``) would otherwise surface only inside the fit, after every
sampling job has run.
"""

from __future__ import annotations

import re
from collections.abc import Collection

__all__ = [
    "DISPERSION_FUNCTIONS",
    "FIXED_EFFECTS_FUNCTIONS",
    "GLMM_FUNCTIONS",
    "PANEL_ALIASES",
    "PANEL_COLUMNS",
    "SLOPE_TERM",
    "check_formula",
]

#: Short names used by the regression (left) for columns of the metric and diversity tables
#: (canopy.panel gives the panel these columns).
PANEL_ALIASES: dict[str, str] = {
    "D": "dissimilarity",
    "VS": "vendi",
    "log_VS": "log_vendi",
    "R": "mean_rate",
    "N": "mean_length",
    "CE": "canopy_entropy",
    "rho": "rho_pearson",
    "M": "n_rollouts",
}
#: Columns of the prepared panel (canopy.stats.prepare_panel) a formula may use: identifiers,
#: the short names and the columns they stand for, and the columns the preparation adds.
PANEL_COLUMNS: tuple[str, ...] = (
    "variant", "task", "family", "prompt_id", "prompt_uid",
    *PANEL_ALIASES, *PANEL_ALIASES.values(),
    "D_raw", "logit_D", "R_sc", "invN_sc",
)  # fmt: skip
#: The covariate whose slope is compared between the variants.
SLOPE_TERM = "R_sc"
#: Functions R's formula interface offers glmmTMB here (splines is attached by the R script).
GLMM_FUNCTIONS: tuple[str, ...] = ("ns", "bs", "poly", "log", "exp", "sqrt", "I", "offset")
DISPERSION_FUNCTIONS = GLMM_FUNCTIONS
#: Functions patsy evaluates in the fixed-effects fit (statsmodels' formula API, numpy as np).
FIXED_EFFECTS_FUNCTIONS: tuple[str, ...] = ("C", "I", "np.log", "np.exp", "np.sqrt")

_NAME = re.compile(r"[A-Za-z_.][A-Za-z0-9_.]*")
_NUMBER = re.compile(r"\d+(\.\d*)?([eE][-+]?\d+)?|\.\d+")
_OPERATORS = set("~+-*:/|^()%, ")


def check_formula(
    text: object,
    *,
    response: str | None,
    functions: Collection[str],
    columns: Collection[str] = PANEL_COLUMNS,
    slope: bool = False,
) -> str:
    """Return ``text`` if it is a valid formula, else raise ``ValueError`` saying what is wrong.

    ``response``: the required left-hand side (None: a one-sided formula ``~ ...``). ``slope``:
    the right-hand side must have :data:`SLOPE_TERM` and its interaction with ``variant``.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a formula string, got {type(text).__name__}")
    if text.count("~") != 1:
        raise ValueError("expected exactly one '~'")
    lhs, rhs = (part.strip() for part in text.split("~"))
    if response is None and lhs:
        raise ValueError(f"expected a one-sided formula '~ ...', got a response {lhs!r}")
    if response is not None and lhs != response:
        raise ValueError(f"expected the response {response!r} left of '~', got {lhs!r}")
    if not rhs:
        raise ValueError("the right-hand side is empty")
    depth = 0
    for char in rhs:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            break
    if depth != 0:
        raise ValueError("unbalanced parentheses")
    unknown_vars, unknown_funcs, position = [], [], 0
    while position < len(rhs):
        char = rhs[position]
        number = _NUMBER.match(rhs, position)
        if char.isdigit() or (char == "." and number):
            position = number.end()
            continue
        name = _NAME.match(rhs, position)
        if name:
            word, position = name.group(), name.end()
            follows = rhs[position:].lstrip()[:1]
            if follows == "(":
                if word not in functions:
                    unknown_funcs.append(word)
            elif word not in columns:
                unknown_vars.append(word)
            continue
        if char not in _OPERATORS:
            raise ValueError(f"unexpected character {char!r}")
        position += 1
    if unknown_vars:
        raise ValueError(
            f"unknown variable(s) {', '.join(dict.fromkeys(unknown_vars))}; "
            f"the panel's columns are {', '.join(columns)}"
        )
    if unknown_funcs:
        raise ValueError(
            f"unknown function(s) {', '.join(dict.fromkeys(unknown_funcs))}; "
            f"allowed: {', '.join(functions)}"
        )
    if slope and not _has_slope_interaction(rhs):
        raise ValueError(
            f"the right-hand side must contain {SLOPE_TERM} and its interaction with variant "
            f"({SLOPE_TERM} * variant or {SLOPE_TERM}:variant): the slope ratio is read from it"
        )
    return text


def _has_slope_interaction(rhs: str) -> bool:
    # Strip calls like ns(invN_sc, 4) to a placeholder so that their arguments do not count.
    bare = re.sub(r"\s+", "", rhs)
    term = re.escape(SLOPE_TERM)
    pair = rf"(?<![\w.]){term}[*:]variant(?![\w.])|(?<![\w.])variant[*:]{term}(?![\w.])"
    return re.search(pair, bare) is not None
