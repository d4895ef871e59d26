"""`apogee grpo`: group relative policy optimisation with verifiable rewards (GRPO / RLVR).

stage.py: its config section, rules and data; objective.py: advantages, the clipped policy loss,
the KL term; trainer.py: rollouts of the policy and the step.
"""
