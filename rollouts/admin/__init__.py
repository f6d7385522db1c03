"""Admin for configurations, their versions and their rollouts, one module per model admin.

Every write goes through `rollouts.services` (so it is validated, audited and re-resolves
the agents it affects); the forms only check input early, with the same parsers the
services use, so that problems show up as form errors. The role rules of the API apply
here too (`fleet.roles`); the admin itself additionally requires staff status.
"""

# Django's autodiscover imports this package only: importing the modules here is what
# registers their admins (and takes Celery beat's schedule models out of the index).
from rollouts.admin import configurations, desired_state, packages, periodic_tasks, rollouts, versions  # noqa: F401
