"""The selectors: each a named plan of stages, registered here and nowhere else.

``select --selector NAME`` looks the name up here; ``--help`` lists the registered names and
their help text; adding a selector is one ``register`` call (see docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Selector:
    name: str
    help: str  # one sentence for --help
    plan: Callable | None = None  # (SelectConfig) -> list of stages; filled in by stages.plans


SELECTORS: dict[str, Selector] = {}


def register(selector: Selector) -> Selector:
    if selector.name in SELECTORS and SELECTORS[selector.name] is not selector:
        raise ValueError(f"selector {selector.name!r} is registered twice")
    SELECTORS[selector.name] = selector
    return selector


def selector_names() -> tuple[str, ...]:
    _load_builtin()
    return tuple(SELECTORS)


def get_selector(name: str) -> Selector:
    _load_builtin()
    try:
        return SELECTORS[name]
    except KeyError:
        raise KeyError(f"--selector {name!r}: choose {', '.join(SELECTORS)}") from None


def selector_help() -> str:
    _load_builtin()
    return "; ".join(f"{s.name}: {s.help}" for s in SELECTORS.values())


def _load_builtin() -> None:
    """The built-in selectors register themselves when their module is imported."""
    import ntk_ray.stages.plans  # noqa: F401
