"""The pretrain stage: LocalMIM + contrastive/InfoCL on the unlabeled corpus -> the pipeline's encoder."""
