"""The distill stage: ToCom self-distillation on the frozen backbone (METHODS.md section 4)."""
