"""A GIN index over labels on PostgreSQL: selector containment (@>) and key (?) tests use it.

SQLite (the embedded default) has no GIN; there, selectors use JSON key lookups instead.
"""

from django.db import migrations

INDEX = "fleet_agent_labels_gin"


def create_index(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"CREATE INDEX IF NOT EXISTS {INDEX} ON fleet_agent USING gin (labels)")


def drop_index(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP INDEX IF EXISTS {INDEX}")


class Migration(migrations.Migration):
    dependencies = [("fleet", "0002_agent_labels")]
    operations = [migrations.RunPython(create_index, drop_index)]
