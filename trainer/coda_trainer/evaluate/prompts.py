"""The CoDA instruct prompt format (as the release's lm-eval tasks `humaneval_instruct` and
`mbpp_instruct` build it): one user turn rendered with the chat template, then the assistant's
answer is started with a generation prefix that opens a python code block. For HumanEval the prefix
repeats the function header, so the model continues the function body.
"""

from __future__ import annotations

from typing import Any

from coda_trainer.evaluate.datasets import Problem

__all__ = ["GEN_PREFIX", "chat_messages", "gen_prefix", "prompt_ids", "render_prompt_text"]

GEN_PREFIX = "Here is the completed function:\n```python\n"


def chat_messages(problem: Problem) -> list[dict[str, str]]:
    if problem.continues_prompt:
        text = (
            "Write a solution to the following problem and make sure that it passes the tests:\n"
            f"```{problem.prompt}"
        )
    else:
        tests = "\n".join(problem.test_examples[:3])
        text = (
            f"You are an expert Python programmer, and here is your task: {problem.description} "
            f"Your code should pass these tests:\n\n{tests}"
        )
    return [{"role": "user", "content": text}]


def gen_prefix(problem: Problem) -> str:
    """What the assistant's answer starts with; the model generates what follows."""
    if problem.continues_prompt:
        return f"{GEN_PREFIX}{problem.prompt}\n"
    return GEN_PREFIX


def render_prompt_text(problem: Problem, tokenizer: Any) -> str:
    """The full prompt as text (chat template + generation prefix), for /v1/completions."""
    return tokenizer.apply_chat_template(
        chat_messages(problem), add_generation_prompt=True
    ) + gen_prefix(problem)


def prompt_ids(problem: Problem, tokenizer: Any) -> list[int]:
    # One encode of the whole text, as the release tokenizes prompt + gen prefix together.
    return tokenizer.encode(render_prompt_text(problem, tokenizer))
