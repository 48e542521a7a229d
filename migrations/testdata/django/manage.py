"""A minimal Django project around the earlier service's outbox model, for
migrations/django_test.go. Commands:

  manage.py migrate            Django's own migrations (creates event_outbox)
  manage.py seed N             N events per status, as the old service left them
  manage.py produce N          N events written by the application after the switch

DATABASE_URL names the database; USE_TZ=1 writes aware times (the columns are
timestamptz either way: Django's PostgreSQL backend always makes them so).
Every write goes through the ORM inside transaction.atomic(), with nested
savepoints, some of them rolled back.
"""
import os
import sys
from urllib.parse import urlparse, parse_qs

import django
from django.conf import settings

url = urlparse(os.environ["DATABASE_URL"])
settings.configure(
    INSTALLED_APPS=["outbox_app"],
    USE_TZ=os.environ.get("USE_TZ") == "1",
    TIME_ZONE="UTC",
    DATABASES={"default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": url.path.lstrip("/"),
        "USER": url.username or "postgres",
        "PASSWORD": url.password or "",
        "HOST": url.hostname,
        "PORT": url.port,
        "OPTIONS": {k: v[0] for k, v in parse_qs(url.query).items()},
    }},
    DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
)
django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import transaction  # noqa: E402
from django.utils import timezone  # noqa: E402

from outbox_app.models import EventOutbox  # noqa: E402


class Rollback(Exception):
    pass


def write(n, prefix):
    """n events in batches of 10, each batch one transaction with a nested
    savepoint per event; every 5th event's savepoint is rolled back (a
    business step that failed), so its event must never reach ClickHouse."""
    written = 0
    for start in range(0, n, 10):
        with transaction.atomic():
            for i in range(start, min(start + 10, n)):
                try:
                    with transaction.atomic():
                        EventOutbox.objects.create(
                            event_type="rolled_back" if i % 5 == 4 else prefix,
                            event_date_time=timezone.now(),
                            environment=None if i % 7 == 0 else "prod",
                            event_context=None if i % 11 == 0 else {"i": i, "nested": {"ok": True}},
                        )
                        if i % 5 == 4:
                            raise Rollback()
                        written += 1
                except Rollback:
                    pass
    return written


def main():
    cmd = sys.argv[1]
    if cmd == "migrate":
        call_command("migrate", verbosity=0)
    elif cmd == "seed":
        n = int(sys.argv[2])
        write(3 * n, "seeded")
        ids = list(EventOutbox.objects.order_by("id").values_list("id", flat=True))
        # What the Celery task left behind: sent rows processed, some failed.
        with transaction.atomic():
            EventOutbox.objects.filter(id__in=ids[:n]).update(status="processed", updated_at=timezone.now())
            EventOutbox.objects.filter(id__in=ids[n:2 * n]).update(status="failed", updated_at=timezone.now())
    elif cmd == "produce":
        print(write(int(sys.argv[2]), "after_switch"))
    else:
        sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    main()
