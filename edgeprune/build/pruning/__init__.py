"""Structured pruning of Llama models: heads (GQA-aware), FFN channels and whole layers, with recovery.

Ranks structures by an importance criterion, allocates widths uniformly (exports as `llama`) or adaptively
(exports as `deci`), cuts the modules in place and repairs the outputs of o_proj / down_proj.
"""

from edgeprune.build.pruning.criteria import CRITERIA
from edgeprune.build.pruning.evaluate import perplexity
from edgeprune.build.pruning.prune import METHODS, PruneOptions, PruneResult, prune_model
from edgeprune.build.pruning.surgery import NoAttention

__all__ = ["CRITERIA", "METHODS", "NoAttention", "PruneOptions", "PruneResult", "perplexity", "prune_model"]
