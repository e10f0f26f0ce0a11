"""GAD objectives: SeqKD cross-entropy (generator warmup), Bradley-Terry (discriminator); GRPO comes with the trainer."""
