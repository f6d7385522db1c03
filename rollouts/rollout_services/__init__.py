"""Rollouts as services: creation and dry run (`creation`), the operator's verbs and the one
transition they share (`verbs`), agents' answers and the counts read from them (`answers`),
and the timed stage gate that Celery beat drives (`gate`).
"""
