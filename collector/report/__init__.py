"""Views of the records for people: the HTML report, the live board, the wandb workspace.

``model`` (runs, epochs, findings, verdicts from records; no HTML), ``collapse`` (which
findings mean the samples collapsed), ``html`` (the page), ``plots``, ``validation`` and
``figures`` (its plots), ``liveview`` (the collector's terminal board), ``dashboard`` (the
guide's wandb workspace).
"""
