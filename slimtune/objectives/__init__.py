"""What a step optimises beyond the answers' next-token loss: GRPO's advantages and clipped loss (grpo.py) and its
rewards (rewards.py)."""
