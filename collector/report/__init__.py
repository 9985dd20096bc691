"""Views of the records for people: the HTML report, the live board, the wandb workspace.

``model`` (runs, epochs, verdicts from records; no HTML), ``html`` and ``plots`` (the page),
``liveview`` (the collector's terminal board), ``dashboard`` (the guide's wandb workspace).
"""
