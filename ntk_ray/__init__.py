"""ntk-ray: NTK-Selector (Wang et al., arXiv 2511.07380) as a Ray job."""

__version__ = "0.1.0"
