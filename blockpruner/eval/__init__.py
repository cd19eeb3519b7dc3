"""Stage 4: evaluating a model -- WikiText-2 perplexity, lm-eval zero-shot tasks, generation speed."""
