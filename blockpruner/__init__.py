"""BlockPruner: fine-grained (attention / MLP block) pruning of decoder-only LLMs.

Zhong et al., "BlockPruner: Fine-grained Pruning for Large Language Models", ACL Findings 2025.
The package holds the algorithm; the Snakemake workflow in `workflow/` only chains its stages.
"""

from .version import __version__

__all__ = ["__version__", "load_pruned"]


def __getattr__(name: str):
    """Lazy top-level helpers, so `import blockpruner` stays free of torch / transformers."""
    if name == "load_pruned":
        from .modeling.pruned import load_pruned

        return load_pruned
    raise AttributeError(f"module 'blockpruner' has no attribute {name!r}")
