from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('rollouts', '0005_version_signature'),
    ]

    operations = [
        migrations.AddField(
            model_name='desiredstategeneration',
            name='definitions',
            field=models.CharField(blank=True, db_default='', default='', max_length=32),
        ),
    ]
