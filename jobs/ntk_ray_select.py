"""Entrypoint for `ray job submit` (and KubeRay RayJobs): run `ntk-ray select` on the cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/ntk_ray_select.py --domain DOMAIN --pool POOL --budget N --out OUT [options]

All arguments are those of `ntk-ray select --help` (including `--config run.toml`). Inside a
job Ray sets RAY_ADDRESS, so `ntk_ray.runtime.ray_executor.connect` joins the running cluster (plain
`ray.init()`, no local resources) instead of starting an embedded Ray. Paths (--domain, --pool,
--out) must be readable and writable from every node: shared storage on a real cluster.

The package does not have to be installed: the repository root (the job's working_dir, which
Ray also puts on the workers' sys.path) goes first on sys.path, so the uploaded code is used
rather than any installed (or editable) copy.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv: list[str] | None = None) -> int:
    import ntk_ray
    from ntk_ray.cli import main as cli_main

    print(f"[jobs/ntk_ray_select.py] ntk_ray {ntk_ray.__version__} from {os.path.dirname(ntk_ray.__file__)}",
          file=sys.stderr, flush=True)
    return cli_main(["select", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
