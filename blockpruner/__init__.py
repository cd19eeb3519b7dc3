"""BlockPruner: fine-grained (attention / MLP block) pruning of decoder-only LLMs.

Zhong et al., "BlockPruner: Fine-grained Pruning for Large Language Models", ACL Findings 2025.
The package holds the algorithm; the Snakemake workflow in `workflow/` only chains its stages.
"""

__version__ = "0.1.0"
