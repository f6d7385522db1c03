"""The two roles, as Django groups: `viewer` reads configurations, `operator` changes them."""

from django.db import migrations

# Spelled out rather than imported: a migration must not change when the code does.
ROLES = ("viewer", "operator")


def create_roles(apps, schema_editor):
    Group = apps.get_model("auth", "Group")
    for name in ROLES:
        Group.objects.get_or_create(name=name)


class Migration(migrations.Migration):

    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("rollouts", "0001_configurations_and_versions"),
    ]

    # Unapplying leaves the groups: deleting them would silently drop every membership.
    operations = [migrations.RunPython(create_roles, migrations.RunPython.noop)]
