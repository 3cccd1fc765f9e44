"""Model quality evaluation: perplexity and KL divergence over the shipped corpus (jaxinfer.eval.perplexity)."""
