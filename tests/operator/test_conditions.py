"""The run's status vocabulary has one home (`coda_operator.conditions`): the planner and the
handlers name condition types and fixed reasons only through `Cond` and `Reason`, and every
condition goes through the one `set_condition`."""

from __future__ import annotations

import ast
from pathlib import Path

from coda_operator import conditions
from coda_operator.api import CodaTrainingRunStatus
from coda_operator.conditions import CONDITION_TYPES, Cond, Reason, set_condition

OPERATOR = Path(conditions.__file__).parent
WRITERS = ("planner.py", "handlers.py")


def _calls(name: str) -> list[tuple[str, ast.Call]]:
    """(file:line, call) for every call of a function or method called `name` in the writers."""
    found = []
    for file in WRITERS:
        tree = ast.parse((OPERATOR / file).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called == name:
                    found.append((f"{file}:{node.lineno}", node))
    return found


def _is_literal(node: ast.expr) -> bool:
    if isinstance(node, ast.IfExp):
        return _is_literal(node.body) or _is_literal(node.orelse)
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def test_condition_types_and_fixed_reasons_are_named_constants_in_the_writers() -> None:
    # (call name, index of the type argument, index of the reason argument)
    shapes = [("cond", 0, 2), ("clear", 0, 1), ("set_condition", 1, 3), ("condition", 0, None)]
    literals = []
    for name, type_at, reason_at in shapes:
        calls = _calls(name)
        assert calls or name == "condition", f"no {name}() calls found: the test lost its target"
        for where, call in calls:
            if len(call.args) <= max(type_at, reason_at or 0):
                continue  # another object's method of the same name (dict.clear(), …)
            if _is_literal(call.args[type_at]):
                literals.append(f"{where}: condition type {ast.unparse(call.args[type_at])}")
            if reason_at is not None and _is_literal(call.args[reason_at]):
                literals.append(f"{where}: reason {ast.unparse(call.args[reason_at])}")
    assert not literals, "use coda_operator.conditions.Cond / Reason:\n" + "\n".join(literals)


def test_the_vocabulary_lists_every_type_once_and_reasons_are_camel_case() -> None:
    types = [v for k, v in vars(Cond).items() if k.isupper()]
    assert sorted(CONDITION_TYPES) == sorted(types) and len(set(types)) == len(types)
    reasons = [v for k, v in vars(Reason).items() if k.isupper()]
    assert len(set(reasons)) == len(reasons)
    assert all(r[0].isupper() and r.isalnum() for r in [*types, *reasons])


def test_set_condition_moves_the_transition_time_only_when_the_status_flips() -> None:
    st = CodaTrainingRunStatus()
    set_condition(st, Cond.RUNNING, True, Reason.STAGE_RUNNING, "a", now="t0", generation=1)
    set_condition(st, Cond.RUNNING, True, Reason.STAGE_RUNNING, "b", now="t1", generation=2)
    c = st.condition(Cond.RUNNING)
    assert (c.last_transition_time, c.message, c.observed_generation) == ("t0", "b", 2)
    set_condition(
        st, Cond.RUNNING, False, Reason.STAGE_FAILED, "x" * 40_000, now="t2", generation=2
    )
    assert c.status == "False" and c.last_transition_time == "t2"
    assert len(c.message) == conditions.CONDITION_MESSAGE_MAX
