"""Captions: the prompt, the `captioner train` (TRL SFTTrainer + PEFT) and `captions generate` stages."""
