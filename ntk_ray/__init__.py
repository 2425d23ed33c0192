"""ntk-ray: NTK-Selector (Wang et al., arXiv 2511.07380) as a Ray job.

``ntk_ray.select(domain=..., pool=..., budget=...)`` is the Python API (``ntk_ray.api``);
``ntk-ray`` / ``python -m ntk_ray`` the command line (``ntk_ray.cli``).
"""

from ntk_ray.version import __version__  # noqa: F401


def select(*args, **kwargs):
    """``ntk_ray.api.select`` (imported on first use, so ``import ntk_ray`` stays light)."""
    from ntk_ray.api import select as run

    return run(*args, **kwargs)


select.__doc__ = "Select the rows of a pool that help a domain most; see ntk_ray.api.select."
