"""Turn a model's response into a program to test.

Two response shapes:
- continuation (`prefixed=True`): the prompt ended with the generation prefix, i.e. inside an open
  ```python block that already holds the function header (HumanEval), so the response continues the
  code and normally ends with a closing fence. The code is prefix code + "\\n" + the response up to
  the first fence, as the release's `build_predictions_instruct` does.
- free answer (`prefixed=False`, e.g. a chat endpoint): the code is the first fenced block that
  defines the entry point (else the first fenced block, else the whole response); HumanEval code
  that lacks the entry point's `def` is treated as a body continuing the prompt.
Then the code is sanitized: a response cut off mid-statement is trimmed back to the longest prefix
that parses, and only imports, definitions and plain assignments are kept at top level, so example
calls, prints, asserts and `if __name__ == "__main__":` demos cannot fail (or pass) the tests.
"""

from __future__ import annotations

import ast
import re

from coda_trainer.evaluate.datasets import Problem

__all__ = ["extract_code", "fenced_blocks", "sanitize"]

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_KEEP = (
    ast.Import,
    ast.ImportFrom,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.Assign,
    ast.AnnAssign,
)


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of each ``` block; an unterminated last block runs to the end."""
    return [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]


def _longest_parsable(code: str) -> ast.Module | None:
    lines = code.splitlines()
    for end in range(len(lines), 0, -1):
        try:
            return ast.parse("\n".join(lines[:end]))
        except SyntaxError:
            continue
    return None


def sanitize(code: str) -> str:
    """Keep top-level imports, defs, classes and assignments of the longest parsable prefix."""
    tree = _longest_parsable(code)
    if tree is None:
        return ""
    lines = code.splitlines()
    kept = []
    for node in tree.body:
        if isinstance(node, _KEEP):
            first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
            kept.append("\n".join(lines[first - 1 : node.end_lineno]))
    return "\n".join(kept) + "\n"


def _defines(code: str, name: str) -> bool:
    return (
        re.search(rf"^\s*(async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None
    )


def _prompt_imports(prompt: str) -> str:
    return "\n".join(
        line for line in prompt.splitlines() if re.match(r"^(from\s+\S+\s+)?import\s", line)
    )


def extract_code(problem: Problem, response: str, *, prefixed: bool = True) -> str:
    """The sanitized candidate program (without tests) for `response`."""
    if prefixed:
        body = response.split("```python\n", 1)[-1] if "```python\n" in response else response
        body = body.split("```", 1)[0]
        code = f"{problem.prompt}\n{body}" if problem.prompt else body
    else:
        blocks = [
            code
            for lang, code in fenced_blocks(response)
            if lang in ("", "python", "py", "python3")
        ]
        code = next(
            (b for b in blocks if _defines(b, problem.entry_point)),
            blocks[0] if blocks else response,
        )
        if problem.prompt and not _defines(code, problem.entry_point):
            code = f"{problem.prompt}\n{code}"
    if problem.prompt:
        code = f"{_prompt_imports(problem.prompt)}\n{code}"
    return sanitize(code)
