"""The prune stage: a fine-tuned task model -> a pruned, ToMe + ToCom merged, registered deployable model."""
