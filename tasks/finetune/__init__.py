"""The finetune stage: one (task, PEFT method) pair, trained on the shared DeepSpeed / Ray Train loop."""
