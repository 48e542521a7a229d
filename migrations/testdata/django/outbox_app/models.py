"""The earlier Django + Celery service's outbox model (SEED.md), as its
operators have it: only event_type is required, and the defaults (status,
timestamps) are filled in by Django, not by the table."""
from django.db import models


class EventOutbox(models.Model):
    STATUS_CHOICES = [("pending", "pending"), ("processed", "processed"), ("failed", "failed")]

    id = models.BigAutoField(primary_key=True)
    event_type = models.CharField(max_length=255)
    event_date_time = models.DateTimeField(null=True)
    environment = models.CharField(max_length=50, null=True)
    event_context = models.JSONField(null=True)
    metadata_version = models.BigIntegerField(null=True, default=1)
    status = models.CharField(max_length=20, choices=STATUS_CHOICES, default="pending", db_index=True, null=True)
    created_at = models.DateTimeField(auto_now_add=True, null=True)
    updated_at = models.DateTimeField(auto_now=True, null=True)

    class Meta:
        app_label = "outbox_app"
        db_table = "event_outbox"
