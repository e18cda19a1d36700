"""Walking nested structures without recursion.

A cell's expressions nest as deep as the user writes them: a sum of 10,000
terms is a tree 10,000 levels deep, far past Python's recursion limit. So a
pass that would recurse writes its work on one node as a generator instead:
it yields each child it needs, receives the child's result, and returns its
own. `unnest` runs these generators on an explicit stack.
"""
from __future__ import annotations


def unnest(root, step):
    """The result of the generator `root`, where each child it yields is
    worked on by the generator `step(child)`, whose result is sent back."""
    stack, result = [root], None
    while stack:
        try:
            child = stack[-1].send(result)
        except StopIteration as done:
            stack.pop()
            result = done.value
        else:
            stack.append(step(child))
            result = None
    return result
