"""trainwatch for the trainers people already use: one callback each.

    from trainer_client.integrations.lightning import TrainwatchCallback     # Lightning
    from trainer_client.integrations.transformers import TrainwatchCallback  # HF Trainer

Each module imports its framework only when imported itself, so neither is a dependency
of the client.
"""
