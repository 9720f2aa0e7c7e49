"""The evaluate stage: a task model deployed at other ToMe degrees, with and without ToCom."""
